"""Write summary.txt of a GPU results folder (tests/gpu/results/<gpu>/) from its raw JSON lines.

    python tests/gpu/summarize_results.py tests/gpu/results/h200x4_suite_5 [--check] [--only EP2,TP2xEP2]
    python tests/gpu/summarize_results.py --hybrid OUT [OUT2 ...] [--command CMD]   # scripts/gpu_hybrid.sh's
        folders: hybrid_<gpu>.json in OUT (records, hybrid/attention ratios vs LAYER_TARGETS / WHOLE_TARGETS, 64K submit)

--engines OUT.json --command CMD --commit SHA writes the engines comparison instead (scripts/gpu_engines.sh's
folder: its bench_*.jsonl, timeline.json, gpus.csv, junit_gpu.xml): the raw records, the ratios of the
deepspeed engine to the megatron engine and the verdict on the target, each record's tokens/s and MFU.

--check also applies the GPU tests' own assertions (test_megatron_equivalence.py,
test_megatron_checkpoint.py: same functions, same tolerances) to the raw records and appends a verdict per
test: a way to re-verify committed results on any machine, and to judge raw results whose pytest run was
cut short (device calls have a time limit) without spending device time again. A case without a record
fails. --only LAYOUTS judges the equivalence cases of those layouts alone (a folder that holds only them,
e.g. runs of one engine option).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path (torchrun, python FILE): the repository root holds `tests`
    sys.path.append(str(Path(__file__).resolve().parents[2]))
from tests.gpu.gpu_worlds import load_records, read_records as _records  # noqa: E402


def bench_key(r: dict) -> str:
    """A benchmark record's name in the ratios: impl, workload, world (and the EP-overlap option)."""
    return f"{r['impl']} {r['workload']} w{r['world']}" + (" overlap_moe_comm" if r.get("overlap_moe_comm") else "")


def read_bench(folder: Path) -> list[dict]:
    """The raw benchmark records of a results folder (its bench_*.jsonl, one per job)."""
    return [json.loads(line) for f in sorted(folder.glob("bench_*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]


def _ratio_pairs() -> dict[str, tuple[str, str, str]]:
    """name -> (numerator record, denominator record, "x" ratio or "%" scaling efficiency)."""
    ep4 = "raytron moe-olmoe-4l w4 overlap_moe_comm"
    pairs = {"vs_mcore_local_dense_w1": ("raytron dense-1b w1", "mcore_local dense-1b w1", "x"),
             "scaling_dense_1_to_4": ("raytron dense-1b w4", "raytron dense-1b w1", "%"),
             "scaling_moe_ep4_overlap_mb8": (ep4, "raytron moe-olmoe-4l w1", "%"),
             "scaling_moe_ep1_dp4": ("raytron moe-olmoe-4l-ep1 w4", "raytron moe-olmoe-4l w1", "%"),
             "scaling_dense_1_to_2": ("raytron dense-1b w2", "raytron dense-1b w1", "%"),
             "vs_torchtitan_moe_w1": ("raytron moe-olmoe-4l w1", "torchtitan moe-olmoe-4l w1", "x"),
             "vs_torchtitan_moe_ep1_w4": ("raytron moe-olmoe-4l-ep1 w4", "torchtitan moe-olmoe-4l-ep1 w4", "x"),
             # the deepspeed engine (ZeRO-2, bf16) over the megatron engine, same batch, one GPU
             "deepspeed_vs_megatron_dense_w1": ("deepspeed dense-1b w1", "raytron dense-1b w1", "x"),
             "deepspeed_vs_megatron_moe_w1": ("deepspeed moe-olmoe-4l w1", "raytron moe-olmoe-4l w1", "x")}
    for w in (2, 4):  # megatron-core's local spec beside raytron at all GPUs too
        pairs |= {f"vs_mcore_local_dense_w{w}": (f"raytron dense-1b w{w}", f"mcore_local dense-1b w{w}", "x"),
                  f"vs_mcore_local_moe_w{w}": (f"raytron moe-olmoe-4l w{w} overlap_moe_comm",
                                               f"mcore_local moe-olmoe-4l w{w}", "x")}
    return pairs


def ratio_values(raw: list[dict]) -> dict[str, float]:
    """Each ratio of _ratio_pairs whose two records are there (without an error), unrounded."""
    tok = {bench_key(r): r["tokens_per_s_per_gpu"] for r in raw if "error" not in r}
    return {name: tok[a] / tok[b] for name, (a, b, _) in _ratio_pairs().items() if a in tok and b in tok}


def bench_ratios(raw: list[dict]) -> dict[str, str]:
    """The ratios a bench JSON states (targets, or an other_runs entry's `ratios`), from raw records."""
    kinds = {name: kind for name, (_, _, kind) in _ratio_pairs().items()}
    return {name: f"{v:.2f}x" if kinds[name] == "x" else f"{v:.1%}" for name, v in ratio_values(raw).items()}


ENGINE_TARGETS = {"deepspeed_vs_megatron_dense_w1": 0.9}  # DeepSpeed ZeRO-2 dense/1b >= 0.9x megatron's tokens/s


def _junit_counts(path: Path) -> dict[str, int] | str:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return f"{path.name} missing (pytest cut short before writing it)"
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def _repo_relative(folder: Path) -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        return str(folder.resolve().relative_to(root))
    except ValueError:  # a folder outside the repository (not yet committed)
        return str(folder)


def engines_json(folder: Path, command: str, commit: str) -> dict:
    """The engines comparison of a scripts/gpu_engines.sh folder (see the module docstring)."""
    raw = read_bench(folder)
    gpus = (folder / "gpus.csv").read_text().strip().splitlines()[1:] if (folder / "gpus.csv").exists() else []
    ratios = {k: v for k, v in bench_ratios(raw).items() if k.startswith("deepspeed_vs_")}
    values, targets = ratio_values(raw), {}
    for name, bar in ENGINE_TARGETS.items():
        verdict = ("not measured (a record is missing or has an error)" if name not in values
                   else f"{ratios[name]}: {'met' if values[name] >= bar else 'NOT met'}")
        targets[f"{name} (>= {bar:.2f}x)"] = verdict
    summary = {bench_key(r): r.get("error") or f"{r['tokens_per_s_per_gpu']:.0f} tok/s/GPU, MFU {r['mfu']:.1%}, "
               f"mb {r['micro_batch']}, peak {r['peak_mem_gib']:.1f} GiB" for r in raw}
    timeline = json.loads((folder / "timeline.json").read_text()) if (folder / "timeline.json").exists() else []
    return {"what": "the deepspeed engine (ZeRO-2, bf16, reference model) beside the megatron engine on one GPU, "
                    "same batch and FLOPs convention (benchmarks/megatron/bench_throughput.py); and the "
                    "megatron engine's throughput and MFU on moe/deepseek-small-mla",
            "script": "scripts/gpu_engines.sh", "command": command, "commit": commit,
            "gpu": gpus[0] if gpus else "?", "results_folder": _repo_relative(folder), "summary": summary,
            "ratios": ratios, "targets": targets, "tests": _junit_counts(folder / "junit_gpu.xml"),
            "timeline": timeline, "records": raw}


def equivalence_table(folder: Path) -> list[str]:
    rows = ["megatron engine vs fp32 reference (tests/gpu/test_megatron_equivalence.py), 50 steps each",
            f"{'layout':9} {'family':10} {'mapping_err':11} {'step1_loss(meg/ref)':19} {'step1_gradnorm(meg/ref)':23} "
            f"{'step1_aux(meg/ref)':18} {'step50_loss(meg/ref)':20} max|dloss|_50steps"]
    for r in _records(folder, "megatron_equivalence_w*.jsonl"):
        if "error" in r:
            rows.append(f"{r['layout']:9} {r['family']:10} ERROR {r['error']}")
            continue
        m, ref = r["megatron"], r["reference"]
        worst = max(abs(a - b) for a, b in zip(m["loss"], ref["loss"]))
        rows.append(f"{r['layout']:9} {r['family']:10} {m['mapping_max_abs_err']:<11.1e} "
                    f"{m['loss'][0]:.5f}/{ref['loss'][0]:.5f}   {m['grad_norm'][0]:.4f}/{ref['grad_norm'][0]:.4f}        "
                    f"{m['aux_loss'][0]:.4f}/{ref['aux_loss'][0]:.4f}    {m['loss'][-1]:.4f}/{ref['loss'][-1]:.4f}      "
                    f"{worst:.4f}")
    return rows


def checkpoint_table(folder: Path) -> list[str]:
    rows = ["megatron checkpoint state: save under layout A after K steps, load under B, M more steps "
            "(tests/gpu/test_megatron_checkpoint.py)",
            f"{'case':18} {'family':6} {'tensors':7} {'digest_mismatch':15} max|dloss|_after_load(B vs uninterrupted A)"]
    for r in _records(folder, "megatron_checkpoint_w*.jsonl"):
        if "error" in r:
            rows.append(f"{r['case']:18} {r['family']:6} ERROR {r['error']}")
            continue
        rows.append(f"{r['case']:18} {r['family']:6} {r['tensors']:<7} {len(r['digest_mismatch']):<15} "
                    f"{r['max_abs_dloss']:.2e} over {r['M']} steps")
    return rows


def suite_records(folders: list[Path]) -> tuple[dict, dict]:
    """({(layout, family): equivalence record}, {case: checkpoint record}) over `folders` in order: a later
    folder's record of a case replaces an earlier one's."""
    eq, ck = {}, {}
    for folder in folders:
        eq.update(load_records(folder, "megatron_equivalence_w*.jsonl", lambda r: (r["layout"], r["family"])))
        ck.update(load_records(folder, "megatron_checkpoint_w*.jsonl", lambda r: r["case"]))
    return eq, ck


def check(folder: Path | list[Path], only: set[str] | None = None, recorded_only: bool = False,
          records: tuple[dict, dict] | None = None) -> tuple[list[str], int]:
    """Verdicts of the GPU tests' assertions on the records of `folder` (or of several, see suite_records; or
    the given `records`), as if run with 4 GPUs."""
    import torch

    from tests.gpu import test_megatron_checkpoint as tc
    from tests.gpu import test_megatron_equivalence as te

    eq, ck = records or suite_records(folder if isinstance(folder, list) else [folder])
    calls = [(f"{fn.__name__}[{name}-{fam}]", fn, (eq, name, fam)) for name, fam in te.CASES
             for fn in (te.test_matches_reference, te.test_loss_curve)]
    if only:
        calls = [c for c in calls if c[2][1] in only]
    else:
        calls += [(f"test_resume_under_layout[{name}]", tc.test_resume_under_layout, (ck, name)) for name in tc.CASES]
    if recorded_only:  # a folder from before a case was added: judge what it has (missing cases are not failures)
        calls = [c for c in calls if (c[2][1:] in eq if c[2][0] is eq else c[2][1] in ck)]
    rows, failed, device_count = [], 0, torch.cuda.device_count
    torch.cuda.device_count = lambda: 4  # the tests skip layouts larger than the machine; judge them all
    try:
        for label, fn, args in calls:
            try:
                fn(*args)
                rows.append(f"PASSED {label}")
            except AssertionError as exc:
                failed += 1
                rows.append(f"FAILED {label}: {str(exc).splitlines()[0][:200] if str(exc) else 'assertion'}")
    finally:
        torch.cuda.device_count = device_count
    head = f"--check: {len(calls) - failed} passed, {failed} failed (assertions of tests/gpu on these records)"
    return [head] + rows, failed


# Speed bars of hybrid models (tokens/s of the hybrid / tokens/s of its attention counterpart, per sequence length)
LAYER_TARGETS = {4096: 0.95, 16384: 1.25, 32768: 1.5, 65536: 1.9}  # 3:1 layer stacks vs attention stacks
WHOLE_TARGETS = {4096: 0.95, 32768: 1.4}  # hybrid/1b and hybrid/1b-mamba vs dense/1b, whole model, one GPU
LAYER_PAIRS = {"hybrid-gdn": "attention", "hybrid-mamba2": "attention"}
WHOLE_PAIRS = {"hybrid-1b": "dense-1b", "hybrid-1b-mamba": "dense-1b"}


def speed_ratios(rows: list[dict], model_of, speed: str, pairs: dict[str, str], targets: dict[int, float]) -> list[dict]:
    """One entry per (hybrid, sequence length) that has both records: its tokens/s over its counterpart's and,
    where a target is set for that length, the target and whether the ratio meets it. `model_of(row)`: the
    model a record is of; rows with an `error` count as missing."""
    speeds = {(model_of(r), r["seq"]): r[speed] for r in rows if "error" not in r}
    out = []
    for (model, seq), tokens in sorted(speeds.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = speeds.get((pairs.get(model), seq))
        if base:
            entry = {"model": model, "vs": pairs[model], "seq": seq, "ratio": round(tokens / base, 3)}
            if seq in targets:
                entry |= {"target": targets[seq], "met": tokens / base >= targets[seq]}
            out.append(entry)
    return out


def layer_ratios(rows: list[dict]) -> list[dict]:
    """speed_ratios of bench_hybrid_vs_attention.py rows: each 3:1 stack vs the attention stack."""
    return speed_ratios(rows, lambda r: r["stack"], "tokens_per_s", LAYER_PAIRS, LAYER_TARGETS)


def whole_ratios(records: list[dict]) -> list[dict]:
    """speed_ratios of bench_throughput.py records of the <model>-<seq> workloads: each hybrid vs dense/1b."""
    return speed_ratios([dict(r, seq=r["seq_len"]) for r in records], lambda r: r["workload"].rsplit("-", 1)[0],
                        "tokens_per_s_per_gpu", WHOLE_PAIRS, WHOLE_TARGETS)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def submit_summary(folder: Path) -> dict:
    """The 64K submit: steps logged, peak GPU memory over its steps (the step metrics' per-interval peaks),
    tokens/s of its last step, its exit status and the checkpoints it committed."""
    steps = [m for m in _jsonl(folder / "submit_metrics.jsonl") if "memory/max_allocated_gib" in m]
    timeline = {t["job"]: t for t in json.loads((folder / "timeline.json").read_text())} \
        if (folder / "timeline.json").exists() else {}
    markers = folder / "submit_committed.txt"  # checkpoint steps with their commit marker (parallelism/checkpoint.py)
    committed = markers.read_text().split() if markers.exists() else []
    return {"rc": timeline.get("submit-64k", {}).get("rc"), "steps_logged": len(steps),
            "peak_allocated_gib": round(max((m["memory/max_allocated_gib"] for m in steps), default=0.0), 2) or None,
            "peak_reserved_gib": round(max((m["memory/max_reserved_gib"] for m in steps), default=0.0), 2) or None,
            "last_step_tokens_per_s": steps[-1].get("tokens_per_sec") if steps else None,
            "committed_checkpoints": committed}


def hybrid_summary(folders: list[Path], command: str) -> dict:
    """hybrid_<gpu>.json from the output folders of one or more scripts/gpu_hybrid.sh calls (their records
    together): raw records, ratios vs targets, the 64K submit's peak memory, the kernel tests' counts (junit)
    and each call's timeline."""
    def read(folder: Path, name: str, default=None):
        return json.loads((folder / name).read_text()) if (folder / name).exists() else default

    layer_rows = [r for f in folders for p in sorted((f / "layers").glob("hybrid_vs_attention_*.json"))
                  for r in json.loads(p.read_text())["rows"]]
    whole = [{k: v for k, v in r.items() if k != "traceback"} for f in folders for r in _jsonl(f / "whole.jsonl")]
    first = folders[0]
    gpus = (first / "gpus.csv").read_text().strip().splitlines()[1:] if (first / "gpus.csv").exists() else []
    submitted = [f for f in folders if any(t["job"] == "submit-64k" for t in read(f, "timeline.json", []))]
    junits = [f / "junit_ops.xml" for f in folders if (f / "junit_ops.xml").exists()]
    return {"what": "hybrid (3:1 Gated DeltaNet / Mamba2 : attention) vs attention speed, one GPU: layer stacks "
                    "(benchmarks/models/bench_hybrid_vs_attention.py) and whole models on the megatron engine "
                    "(benchmarks/megatron/bench_throughput.py, <model>-<seq> workloads, 65,536 tokens per step; "
                    "MFU from models/flops.py, megatron convention, GDN/Mamba2 chunked matmuls counted)",
            "command": command, "script": "scripts/gpu_hybrid.sh", "device": gpus[0] if gpus else None,
            "commit": (first / "commit.txt").read_text().strip() if (first / "commit.txt").exists() else None,
            "layers": {"ratios": layer_ratios(layer_rows), "records": layer_rows},
            "whole_model": {"ratios": whole_ratios(whole), "records": whole},
            "submit_64k": submit_summary(submitted[0]) if submitted else None,
            "pytest_ops": _junit_counts(junits[0]) if junits else None,
            "timelines": [read(f, "timeline.json", []) for f in folders]}


def write_hybrid(folders: list[Path], command: str) -> Path:
    """Write hybrid_<gpu>.json into the first folder and print its ratios."""
    summary = hybrid_summary(folders, command)
    gpu = (summary["device"] or "unknown").split(",")[0].strip().replace(" ", "_")
    path = folders[0] / f"hybrid_{gpu}.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    for part in ("layers", "whole_model"):
        for r in summary[part]["ratios"]:
            bar = f" (target {r['target']}: {'met' if r['met'] else 'NOT met'})" if "target" in r else ""
            print(f"{part:11} {r['model']:15} / {r['vs']:9} at {r['seq']:>5}: {r['ratio']:.2f}x{bar}")
    print(f"submit 64K: {summary['submit_64k']}\nkernel tests: {summary['pytest_ops']}\nwrote {path}")
    return path


def main() -> None:
    if sys.argv[1] == "--hybrid":  # --hybrid FOLDER [FOLDER ...] [--command CMD]
        args = sys.argv[2:]
        cut = args.index("--command") if "--command" in args else len(args)
        write_hybrid([Path(a) for a in args[:cut]], args[cut + 1] if cut < len(args) else "")
        return
    folder = Path(sys.argv[1])
    args = sys.argv[2:]
    if "--engines" in args:
        value = {flag: args[args.index(flag) + 1] for flag in ("--engines", "--command", "--commit")
                 if flag in args and args.index(flag) + 1 < len(args)}
        if len(value) < 3:
            sys.exit("--engines OUT.json needs --command CMD (the run call) and --commit SHA (the tree it ran)")
        out = engines_json(folder, value["--command"], value["--commit"])
        Path(value["--engines"]).write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps({k: out[k] for k in ("gpu", "summary", "ratios", "targets", "tests")}, indent=1))
        return
    gpus = (folder / "gpus.csv").read_text().strip().splitlines()[1:] if (folder / "gpus.csv").exists() else []
    lines = [f"GPUs: {len(gpus)} x {gpus[0] if gpus else '?'}", ""] + equivalence_table(folder) + [""]
    lines += checkpoint_table(folder)
    only = set(args[args.index("--only") + 1].split(",")) if "--only" in args else None
    verdicts, failed = check(folder, only) if "--check" in args else ([], 0)
    lines += [""] + verdicts if verdicts else []
    (folder / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
