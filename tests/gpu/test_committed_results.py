"""CPU check of the committed GPU evidence: the raw records under tests/gpu/results/ still pass the GPU
tests' own assertions (summarize_results.check, test_megatron_submit's functions), so a tightened
tolerance or a changed layout list cannot silently leave the committed results behind."""

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.gpu import test_megatron_submit as ts
from tests.gpu import summarize_results as hybrid
from tests.gpu.summarize_results import check

RESULTS = Path(__file__).parent / "results"
BENCH = Path(__file__).parents[2] / "benchmarks" / "results"
# The newest one-call run of scripts/gpu_megatron_all.sh (every GPU part): 84 equivalence verdicts (the
# engine-option VARIANTS included) + 5 checkpoint cases.
LATEST_SUITE, LATEST_VERDICTS, LATEST_SHARDS = "h200x4_suite_5", 89, 11


def test_latest_one_call_suite_covers_every_case_of_today():
    """The newest one-call folder has a passing record for every equivalence case (VARIANTS included) and
    every checkpoint case the GPU tests list now: a case added later fails here until the suite is rerun on
    GPUs (`bash scripts/gpu_megatron_all.sh`) and its folder committed as LATEST_SUITE."""
    rows, failed = check(RESULTS / LATEST_SUITE)
    assert failed == 0, "\n".join(r for r in rows if r.startswith("FAILED"))
    assert len(rows) == 1 + LATEST_VERDICTS


@pytest.mark.parametrize("folder", [LATEST_SUITE, "h200x2_submit_seq"])
def test_committed_submit_resume_records_pass_the_gpu_tests(folder):
    """The suite's submit part, and scripts/gpu_megatron_submit.sh alone on a 2-GPU machine (its runs in turn)."""
    ts.test_resume_continues_the_run_without_a_jump(RESULTS / folder / "submit")
    ts.test_resume_under_pp2_passes_the_canary_and_follows_the_run(RESULTS / folder / "submit")


def test_a_resume_that_drifts_from_the_uninterrupted_run_fails(tmp_path):
    """The committed comparison with the resumed run off by more than the bar (SAME_ATOL) fails it."""
    shutil.copytree(RESULTS / LATEST_SUITE / "submit", tmp_path / "submit")
    path = tmp_path / "submit" / "resume_compare.json"
    rec = json.loads(path.read_text())
    rec["max_abs_dloss_after_resume"] = 2 * ts.SAME_ATOL
    path.write_text(json.dumps(rec))
    with pytest.raises(AssertionError):
        ts.test_resume_continues_the_run_without_a_jump(tmp_path / "submit")


def test_committed_suite_ran_every_part_in_one_call():
    """timeline.json of the newest one-call run: every job ended by itself (rc 0), all within the device
    call's 600 s, and the timed all-GPU benchmark runs had the machine to themselves."""
    timeline = json.loads((RESULTS / LATEST_SUITE / "timeline.json").read_text())
    assert [t["job"] for t in timeline if t["rc"] != 0 and t["job"] != "judge"] == []
    assert max(t["end_s"] for t in timeline) < 600
    for wide in (t for t in timeline if t["phase"] == "bench" and len(t["gpus"]) > 1):
        beside = [t["job"] for t in timeline if t is not wide
                  and t["start_s"] < wide["end_s"] and t["end_s"] > wide["start_s"]]
        assert beside == [], (wide["job"], beside)
    names = {t["job"] for t in timeline}
    assert {"submit", "kernels", "judge"} <= names
    assert sum(n.startswith("equivalence_") for n in names) == LATEST_SHARDS


def _bench_key(r: dict) -> str:
    return f"{r['impl']} {r['workload']} w{r['world']}" + (" overlap_moe_comm" if r.get("overlap_moe_comm") else "")


def _raw_bench(folder: str) -> list[dict]:
    return [json.loads(line) for f in sorted((RESULTS / folder).glob("bench_*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]


def _same_records(a: list[dict], b: list[dict]) -> bool:
    """Equal but for ran_beside (the suite adds it when it merges the raw files)."""
    def strip(r: dict) -> str:
        return json.dumps({k: v for k, v in r.items() if k != "ran_beside"}, sort_keys=True)
    return sorted(map(strip, a)) == sorted(map(strip, b))


def _ratios(raw: list[dict]) -> dict[str, str]:
    """The ratios a bench JSON states (targets, or an other_runs entry's `ratios`), from raw records: each one
    whose two records are there."""
    tok = {_bench_key(r): r["tokens_per_s_per_gpu"] for r in raw if "error" not in r}
    ep4 = "raytron moe-olmoe-4l w4 overlap_moe_comm"
    pairs = {"vs_mcore_local_dense_w1": ("raytron dense-1b w1", "mcore_local dense-1b w1", "x"),
             "scaling_dense_1_to_4": ("raytron dense-1b w4", "raytron dense-1b w1", "%"),
             "scaling_moe_ep4_overlap_mb8": (ep4, "raytron moe-olmoe-4l w1", "%"),
             "scaling_moe_ep1_dp4": ("raytron moe-olmoe-4l-ep1 w4", "raytron moe-olmoe-4l w1", "%"),
             "scaling_dense_1_to_2": ("raytron dense-1b w2", "raytron dense-1b w1", "%"),
             "vs_torchtitan_moe_w1": ("raytron moe-olmoe-4l w1", "torchtitan moe-olmoe-4l w1", "x"),
             "vs_torchtitan_moe_ep1_w4": ("raytron moe-olmoe-4l-ep1 w4", "torchtitan moe-olmoe-4l-ep1 w4", "x")}
    for w in (2, 4):  # megatron-core's local spec beside raytron at all GPUs too
        pairs |= {f"vs_mcore_local_dense_w{w}": (f"raytron dense-1b w{w}", f"mcore_local dense-1b w{w}", "x"),
                  f"vs_mcore_local_moe_w{w}": (f"raytron moe-olmoe-4l w{w} overlap_moe_comm",
                                               f"mcore_local moe-olmoe-4l w{w}", "x")}
    return {name: f"{tok[a] / tok[b]:.2f}x" if kind == "x" else f"{tok[a] / tok[b]:.1%}"
            for name, (a, b, kind) in pairs.items() if a in tok and b in tok}


def _check_stated(stated: dict[str, str], raw: list[dict]) -> int:
    """Every stated ratio (name, or name + " (bar)") that follows from the records starts with its value."""
    names = {name.split(" (")[0]: name for name in stated}
    checked = 0
    for name, value in _ratios(raw).items():
        if name in names:
            assert stated[names[name]].startswith(value), (name, stated[names[name]], value)
            checked += 1
    return checked


def _named_folder(run: dict) -> str | None:
    """The results folder an other_runs entry names (in its `what`), if any."""
    found = re.search(r"tests/gpu/results/(\w+)", run.get("what", ""))
    return found.group(1) if found else None


OTHER_RUNS = [(p.name, i) for p in sorted(BENCH.glob("megatron_throughput_*.json"))
              for i, run in enumerate(json.loads(p.read_text()).get("other_runs", [])) if _named_folder(run)]


@pytest.mark.parametrize("bench_json,index", OTHER_RUNS)
def test_committed_benchmark_other_runs_are_their_raw_records(bench_json, index):
    """An other_runs entry that names a results folder holds exactly that folder's raw records, and the
    ratios it states follow from them."""
    run = json.loads((BENCH / bench_json).read_text())["other_runs"][index]
    assert _same_records(run["records"], _raw_bench(_named_folder(run))), (bench_json, _named_folder(run))
    assert _check_stated(run.get("ratios", {}), run["records"]) == len(run.get("ratios", {}))


def test_every_results_folder_the_benchmarks_name_is_committed():
    """Pruning superseded raw folders must not leave a benchmark record or README pointing at nothing."""
    root = BENCH.parents[1]
    texts = [p.read_text() for p in (*BENCH.glob("*.json"), *root.glob("benchmarks/*/README.md"),
                                     root / "tests/gpu/README.md")]
    named = {m for text in texts for m in re.findall(r"tests/gpu/results/(\w+)", text)} - {"local"}
    assert named and {n for n in named if not (RESULTS / n).is_dir()} == set()


MAIN_RUNS = {"megatron_throughput_NVIDIA_H200x4.json": ("h200x4_bench_alone_2", 11, 6),
             "megatron_throughput_NVIDIA_H100.json": ("h100x1_bench_2", 6, 2),
             "megatron_throughput_NVIDIA_H200x2.json": ("h200x2_bench_alone", 11, 4)}


def _check_main_run(bench: dict, folder: str, n: int, checked: int) -> None:
    raw = _raw_bench(folder)
    assert _same_records(bench["records"], raw) and len(raw) == n, f"{folder}: records differ from the JSON's"
    timeline = json.loads((RESULTS / folder / "timeline.json").read_text())
    for job in timeline:
        assert job["rc"] == 0 and not [t for t in timeline if t is not job and t["start_s"] < job["end_s"]
                                       and t["end_s"] > job["start_s"]], job
    assert _check_stated(bench["targets"], raw) == checked


@pytest.mark.parametrize("bench_json", MAIN_RUNS)
def test_committed_benchmark_is_the_raw_records_and_its_targets_follow_from_them(bench_json):
    """A bench JSON's main run is a results folder's raw records (every timed run alone on the machine, per
    its timeline), and the ratios its targets state are computed from those records."""
    _check_main_run(json.loads((BENCH / bench_json).read_text()), *MAIN_RUNS[bench_json])


@pytest.mark.parametrize("field", ["records", "targets"])
def test_a_main_run_that_disagrees_with_its_raw_records_fails(field):
    """One tokens/s changed in the JSON's records, or one stated ratio, fails the main-run check."""
    name = "megatron_throughput_NVIDIA_H200x4.json"
    bench = json.loads((BENCH / name).read_text())
    if field == "records":
        bench["records"][0]["tokens_per_s_per_gpu"] *= 1.01
    else:
        bench["targets"]["vs_mcore_local_dense_w4"] = "4.50x"
    with pytest.raises(AssertionError):
        _check_main_run(bench, *MAIN_RUNS[name])


def test_a_variant_that_ran_without_its_option_fails(tmp_path):
    """The verdict reads the option off the record: the same numbers recorded without the option fail."""
    records = [json.loads(line) for f in sorted((RESULTS / LATEST_SUITE).glob("megatron_equivalence_w2_s*.jsonl"))
               for line in f.read_text().splitlines() if line.strip()]
    assert any(r["layout"] == "EP2+moe-comm" for r in records)
    for r in records:
        if r["layout"] == "EP2+moe-comm" and r["family"] == "moe":
            r["overlap_moe_comm"] = False
    (tmp_path / "megatron_equivalence_w2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows, failed = check(tmp_path, only={"EP2+moe-comm"}, recorded_only=True)
    assert failed == 1 and [r for r in rows if r.startswith("FAILED")][0].startswith(
        "FAILED test_matches_reference[EP2+moe-comm-moe]: EP2+moe-comm/moe ran without train.overlap_moe_comm"), rows


HYBRID = sorted(p.name for p in BENCH.glob("hybrid_*.json") if not p.name.startswith("hybrid_vs_attention_"))


@pytest.mark.parametrize("name", HYBRID)
def test_committed_hybrid_results_state_the_ratios_of_their_records(name):
    """A committed hybrid_<gpu>.json (scripts/gpu_hybrid.sh, summarize_results.py --hybrid): the ratios and
    verdicts it states follow from its own records (re-derived here)."""
    got = json.loads((BENCH / name).read_text())
    assert got["layers"]["ratios"] == hybrid.layer_ratios(got["layers"]["records"])
    assert got["whole_model"]["ratios"] == hybrid.whole_ratios(got["whole_model"]["records"])
