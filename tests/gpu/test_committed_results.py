"""CPU check of the committed GPU evidence: the raw records under tests/gpu/results/ still pass the GPU
tests' own assertions (summarize_results.check), so a tightened tolerance or a changed layout list
cannot silently leave the committed results behind."""

from pathlib import Path

import pytest

from summarize_results import check

FOLDERS = [Path(__file__).parent / "results" / "h200x4"]  # the complete run (1, 2 and 4 GPUs)


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_committed_gpu_results_pass_the_gpu_tests(folder):
    rows, failed = check(folder)
    assert failed == 0, "\n".join(r for r in rows if r.startswith("FAILED"))
    assert len(rows) > 50  # every equivalence and checkpoint case was judged


def test_committed_overlap_moe_comm_records_pass_the_gpu_tests():
    """results/h200x4/overlap_moe_comm: the EP2 cases (moe, hybrid-moe) run with train.overlap_moe_comm
    (megatron-core's combined-1F1B all-to-all overlap); only those cases were run there."""
    folder = FOLDERS[0] / "overlap_moe_comm"
    rows, _ = check(folder)
    ep2 = [r for r in rows if "[EP2-moe]" in r or "[EP2-hybrid-moe]" in r]
    assert len(ep2) == 4 and all(r.startswith("PASSED") for r in ep2), "\n".join(ep2)
    import json

    records = [json.loads(line) for line in (folder / "megatron_equivalence_w2.jsonl").read_text().splitlines()]
    assert {r["family"] for r in records} == {"moe", "hybrid-moe"} and all(r["overlap_moe_comm"] for r in records)
