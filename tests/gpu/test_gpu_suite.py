"""CPU checks of the one-call GPU suite (scripts/gpu_suite.py) and the case sharding it relies on:
the schedule keeps the timed benchmark runs apart from everything else, every GPU test case lands in
exactly one shard, and the job runner keeps order, time limits and the deadline."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.gpu.gpu_worlds import load_records, parse_shard, shard

_SPEC = importlib.util.spec_from_file_location("gpu_suite", Path(__file__).parents[2] / "scripts" / "gpu_suite.py")
suite = importlib.util.module_from_spec(_SPEC)
sys.modules["gpu_suite"] = suite  # dataclasses look their module up by name
_SPEC.loader.exec_module(suite)


def test_shards_partition_the_items_and_balance_their_weight():
    items = [f"case{i}" for i in range(11)]
    weight = lambda item: 3.0 if item in ("case0", "case5", "case9") else 1.0  # noqa: E731
    parts = [shard(items, f"{i}/4", weight) for i in range(4)]
    assert sorted(x for p in parts for x in p) == sorted(items)
    assert all(p == [x for x in items if x in p] for p in parts)  # original order kept
    loads = [sum(map(weight, p)) for p in parts]
    assert max(loads) - min(loads) <= 1.0, loads
    assert shard(items, "", weight) == items
    for bad in ("2/2", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_every_gpu_case_runs_in_exactly_one_shard_of_the_suite(tmp_path):
    from tests.gpu import megatron_checkpoint as ck
    from tests.gpu import megatron_equivalence as eq

    jobs = suite.test_jobs(4, tmp_path, ())
    covered = {"equivalence": [], "checkpoint": []}
    for job in jobs:
        if "--shard" not in job.argv:
            continue
        kind, world = job.name.split("_")[0], int(job.name.split("_")[1][1:])
        assert len(job.gpus) == world
        shard_text = job.argv[job.argv.index("--shard") + 1]
        if kind == "equivalence":
            cases = [(n, f) for n, (w, _, fams) in eq.LAYOUTS.items() for f in fams if w == world]
            covered[kind] += shard(cases, shard_text, eq.case_weight)
        else:
            covered[kind] += shard([n for n, (w, *_) in ck.CASES.items() if w == world], shard_text)
    assert sorted(covered["equivalence"]) == sorted((n, f) for n, (_, _, fams) in eq.LAYOUTS.items() for f in fams)
    assert sorted(covered["checkpoint"]) == sorted(ck.CASES)
    ports = [a for j in jobs for a in j.argv if a.startswith("--master_port=")]
    assert len(ports) == len(set(ports))
    assert {g for j in jobs for g in j.gpus} <= {0, 1, 2, 3}


def _ancestors(jobs: list) -> dict[str, set[str]]:
    by_name, out = {j.name: j for j in jobs}, {}

    def walk(name):
        if name not in out:
            out[name] = set()
            for dep in by_name[name].after:
                out[name] |= {dep} | walk(dep)
        return out[name]

    for j in jobs:
        walk(j.name)
    return out


@pytest.mark.parametrize("ngpu,titan", [(4, "dense-1b,moe-olmoe-4l"), (4, ""), (2, "dense-1b")])
def test_timed_runs_never_share_the_machine_and_one_gpu_runs_get_their_own_gpu(tmp_path, ngpu, titan):
    bench = suite.bench_jobs(ngpu, tmp_path, titan, "raytron,mcore_local", ["--overlap-moe-comm"])
    jobs = bench + suite.test_jobs(ngpu, tmp_path, tuple(j.name for j in bench))
    jobs.append(suite.judge_job(tmp_path, tuple(j.name for j in jobs), ngpu))
    anc = _ancestors(jobs)
    may_overlap = lambda a, b: a.name not in anc[b.name] and b.name not in anc[a.name]  # noqa: E731
    wide = [j for j in bench if len(j.gpus) > 1]
    assert [j.name for j in wide] == [f"bench_megatron_w{min(ngpu, 4)}"] + ([f"bench_titan_w{min(ngpu, 4)}"] * bool(titan))
    for j in wide:
        assert [o.name for o in jobs if o is not j and may_overlap(j, o)] == []
    narrow = [j for j in bench if len(j.gpus) == 1]
    assert len(narrow) == 2 + bool(titan)
    for j in narrow:  # beside the other 1-GPU bench runs only, each on a GPU of its own
        beside = [o for o in jobs if o is not j and may_overlap(j, o)]
        assert all(o in narrow and o.gpus != j.gpus for o in beside), [o.name for o in beside]
    assert all(g < ngpu for j in jobs for g in j.gpus)


def test_local_spec_runs_at_all_gpus_in_benchmark_calls_and_not_beside_the_tests():
    assert suite.default_wide_impls({"bench"}) == "raytron,mcore_local"
    assert suite.default_wide_impls({"bench", "tests"}) == "raytron"


def test_torchtitan_moe_runs_in_benchmark_calls_with_the_time_it_needs(tmp_path):
    assert suite.default_titan_workloads({"bench"}) == "dense-1b,moe-olmoe-4l,moe-olmoe-4l-ep1"
    assert suite.default_titan_workloads({"bench", "tests"}) == "dense-1b"
    for titan, extra in (("dense-1b", 0), ("dense-1b,moe-olmoe-4l,moe-olmoe-4l-ep1", 100)):
        jobs = {j.name: j for j in suite.bench_jobs(4, tmp_path, titan, "raytron", [], one_alone=True)}
        for name, base in (("bench_titan_w4", 150), ("bench_titan_w1", 170)):
            assert jobs[name].timeout == base + extra
            assert f"--workloads {titan} " in jobs[name].argv[-1] and "--cuda-graphs" not in jobs[name].argv[-1]


def test_runner_keeps_order_stops_jobs_at_their_limit_and_holds_back_the_reserve(tmp_path):
    jobs = [suite.Job("a", ["sleep", "0.2"], timeout=10),
            suite.Job("slow", ["sleep", "30"], timeout=1.0),
            suite.Job("b", ["bash", "-c", "echo hi"], after=("a",)),
            suite.Job("late", ["sleep", "30"], after=("b",), timeout=60, phase="tests")]
    import time

    t0 = time.monotonic()
    timeline = suite.run_jobs(jobs, deadline=4.0, logs=tmp_path, t0=t0, reserve={"tests": 1.5})
    got = {t["job"]: t for t in timeline}
    assert got["a"]["rc"] == 0 and got["b"]["rc"] == 0 and got["b"]["start_s"] >= got["a"]["end_s"]
    assert (got["slow"]["rc"], got["slow"]["ended_by"]) == (124, "time limit") and got["slow"]["end_s"] < 3
    assert got["late"]["rc"] == 124 and got["late"]["end_s"] <= 4.0 - 1.5 + 1.0  # stopped at deadline - reserve
    assert (tmp_path / "b.log").read_text() == "hi\n"
    assert time.monotonic() - t0 < 10


def test_bench_records_say_what_ran_beside_them(tmp_path):
    (tmp_path / "bench_raytron_w1.jsonl").write_text(json.dumps({"impl": "raytron", "world": 1}) + "\n")
    (tmp_path / "bench_raytron_w4.jsonl").write_text(json.dumps({"impl": "raytron", "world": 4}) + "\n")
    timeline = [{"job": "bench_raytron_w4", "start_s": 0, "end_s": 80},
                {"job": "bench_raytron_w1", "start_s": 80, "end_s": 150},
                {"job": "bench_mcore_local_w1", "start_s": 80.5, "end_s": 140}]
    suite.merge_bench(tmp_path, timeline, tmp_path / "bench.jsonl")
    recs = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert {r["world"]: r["ran_beside"] for r in recs} == {1: ["bench_mcore_local_w1"], 4: []}


def test_records_of_shards_merge_by_key(tmp_path):
    (tmp_path / "megatron_equivalence_w2_s0.jsonl").write_text(json.dumps({"layout": "TP2", "family": "dense"}) + "\n")
    (tmp_path / "megatron_equivalence_w2_s1.jsonl").write_text(json.dumps({"layout": "EP2", "family": "moe"}) + "\n\n")
    got = load_records(tmp_path, "megatron_equivalence_w*.jsonl", lambda r: (r["layout"], r["family"]))
    assert set(got) == {("TP2", "dense"), ("EP2", "moe")}


@pytest.mark.parametrize("ngpu", [2, 4])
def test_engine_option_variants_are_equivalence_cases_of_their_base_layout_and_get_judged(tmp_path, ngpu):
    from tests.gpu import megatron_equivalence as eq

    for name, (base, options, families) in eq.VARIANTS.items():
        assert name.startswith(base + "+") and options and set(families) <= set(eq.LAYOUTS[base][2])
        assert eq.LAYOUTS[name] == (*eq.LAYOUTS[base][:2], families)
    jobs = suite.test_jobs(ngpu, tmp_path, ())
    ports = [a for j in jobs for a in j.argv if a.startswith("--master_port=")]
    assert len(ports) == len(set(ports))
    judge = suite.judge_job(tmp_path, ("equivalence_w2_s0",), ngpu)
    script = judge.argv[-1]
    assert "-m pytest" in script and "summarize_results.py" in script and script.endswith("exit $rc")
    assert judge.env["RAYTRON_GPU_RECORDS"] == str(tmp_path) and judge.env["RAYTRON_GPU_RECORDS_GPUS"] == str(ngpu)


def test_one_gpu_runs_alone_on_request_run_one_after_another(tmp_path):
    bench = suite.bench_jobs(4, tmp_path, "dense-1b", "raytron", [], one_alone=True)
    anc = _ancestors(bench)
    for j in bench:  # every pair of bench jobs is ordered: nothing runs beside a timed run
        others = [o for o in bench if o is not j and j.name not in anc[o.name] and o.name not in anc[j.name]]
        assert others == [], (j.name, [o.name for o in others])
    assert {j.gpus for j in bench if len(j.gpus) == 1} == {(0,)}


def test_on_one_gpu_the_bench_part_runs_the_one_gpu_runs_in_turn(tmp_path):
    bench = suite.bench_jobs(1, tmp_path, "dense-1b", "raytron", [])
    assert [(j.name, j.gpus, j.after) for j in bench] == [
        ("bench_raytron_w1", (0,), ()), ("bench_mcore_local_w1", (0,), ("bench_raytron_w1",)),
        ("bench_titan_w1", (0,), ("bench_mcore_local_w1",))]


def test_one_gpu_args_reach_the_one_gpu_bench_runs_only(tmp_path):
    """--one-gpu-args '--workloads dense-3b --recompute selective': dense/3b on one H200 through the suite."""
    extra = ["--workloads", "dense-3b", "--recompute", "selective"]
    bench = {j.name: j for j in suite.bench_jobs(2, tmp_path, "", "raytron", [], one_args=extra)}
    assert bench["bench_raytron_w1"].argv[-4:] == extra and bench["bench_mcore_local_w1"].argv[-4:] == extra
    assert not set(extra) & set(bench["bench_megatron_w2"].argv)


def test_each_call_starts_from_an_empty_records_folder(tmp_path):
    """A warm device machine keeps /tmp between calls: records an earlier call left must not be judged or
    benchmarked as this call's."""
    res, gpus = tmp_path / "gpu_suite", tmp_path / "gpus.csv"
    gpus.write_text("name\nNVIDIA H200\n")
    (res / "overlap_moe_comm").mkdir(parents=True)
    (res / "bench_raytron_w1.jsonl").write_text('{"impl": "raytron"}\n')
    (res / "overlap_moe_comm" / "megatron_equivalence_w2.jsonl").write_text("{}\n")
    assert suite.fresh_records(res, gpus) == res
    assert sorted(p.relative_to(res).as_posix() for p in res.rglob("*")) == ["gpus.csv", "logs"]
    assert (res / "gpus.csv").read_text() == gpus.read_text()
