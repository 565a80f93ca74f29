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
