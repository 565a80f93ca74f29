"""Write summary.txt of a GPU results folder (tests/gpu/results/<gpu>/) from its raw JSON lines.

    python tests/gpu/summarize_results.py tests/gpu/results/h200x4_suite_5 [--check] [--only EP2,TP2xEP2]

--check also applies the GPU tests' own assertions (test_megatron_equivalence.py,
test_megatron_checkpoint.py: same functions, same tolerances) to the raw records and appends a verdict per
test: a way to re-verify committed results on any machine, and to judge raw results whose pytest run was
cut short (device calls have a time limit) without spending device time again. A case without a record
fails. --only LAYOUTS judges the equivalence cases of those layouts alone (a folder that holds only them,
e.g. runs of one engine option).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path (torchrun, python FILE): the repository root holds `tests`
    sys.path.append(str(Path(__file__).resolve().parents[2]))
from tests.gpu.gpu_worlds import load_records, read_records as _records  # noqa: E402


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


def check(folder: Path, only: set[str] | None = None, recorded_only: bool = False) -> tuple[list[str], int]:
    """Verdicts of the GPU tests' assertions on this folder's records, as if run with 4 GPUs."""
    import torch

    from tests.gpu import test_megatron_checkpoint as tc
    from tests.gpu import test_megatron_equivalence as te

    eq = load_records(folder, "megatron_equivalence_w*.jsonl", lambda r: (r["layout"], r["family"]))
    ck = load_records(folder, "megatron_checkpoint_w*.jsonl", lambda r: r["case"])
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


def main() -> None:
    folder = Path(sys.argv[1])
    gpus = (folder / "gpus.csv").read_text().strip().splitlines()[1:] if (folder / "gpus.csv").exists() else []
    lines = [f"GPUs: {len(gpus)} x {gpus[0] if gpus else '?'}", ""] + equivalence_table(folder) + [""]
    lines += checkpoint_table(folder)
    args = sys.argv[2:]
    only = set(args[args.index("--only") + 1].split(",")) if "--only" in args else None
    verdicts, failed = check(folder, only) if "--check" in args else ([], 0)
    lines += [""] + verdicts if verdicts else []
    (folder / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
