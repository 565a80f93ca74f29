"""The fused Triton SSD kernels (ops/ssd_triton.py, wired by ops/ssd_fused.py) run by Triton's interpreter
on CPU against the token-by-token reference ssd_recurrent (float64): outputs, the final state and every
gradient (x, dt, a, B, C, initial state), with documents, lengths that are odd / not a multiple of the
chunk, batch and heads > 1, dims that are not powers of two or span two blocks. The interpreter must be on
before Triton is imported, so the kernels run in one subprocess (tests/ops/ssd_interpreted.py) shared by
the cases; this process keeps Triton compiled (and never picks it for CPU tensors, last test)."""

import json
import pathlib

import pytest
import torch

from raytron.ops import ssd_fused
from raytron.ops.ssd import ssd, ssd_chunked, ssd_recurrent
from tests.ops.interpreter import run_interpreted

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' on x86_64 Linux)")

# id -> (batch, length, heads, head dim P, state N, chunk, documents, initial state, dtype)
CASES = {
    "odd-docs-init": (2, 37, 3, 16, 16, 16, True, True, "float32"),
    "exact-plain": (1, 32, 2, 16, 16, 16, False, False, "float32"),
    "exact-init": (1, 32, 2, 16, 16, 16, False, True, "float32"),
    "unpadded-dims-docs": (2, 21, 2, 20, 24, 16, True, True, "float32"),
    "two-blocks-chunk32": (1, 45, 2, 80, 72, 32, True, True, "float32"),
    "bf16-docs-init": (1, 40, 2, 16, 16, 16, True, True, "bfloat16"),
    "shorter-than-chunk": (3, 7, 2, 16, 16, 16, True, True, "float32"),
}
TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # float32: rounding only (IEEE dots); bf16: 8-bit mantissa operands


@pytest.fixture(scope="module")
def interpreted() -> dict:
    keys = ("b", "t", "h", "p", "n", "chunk", "docs", "with_init", "dtype")
    cases = [dict(id=k, args=dict(zip(keys, v))) for k, v in CASES.items()]
    return run_interpreted(pathlib.Path(__file__).with_name("ssd_interpreted.py"), json.dumps(cases), timeout=900)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_ssd_matches_recurrent(interpreted, case):
    errors = interpreted[case]
    assert isinstance(errors, dict), errors  # else the worker's traceback
    tol = TOL[CASES[case][-1]]
    expected = 8 if CASES[case][7] else 7  # d initial state only with one
    assert len(errors) == expected, errors
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


def test_cpu_never_chooses_triton(monkeypatch, caplog):
    """Triton importable (even with the interpreter set) does not move CPU tensors onto the fused path;
    asking for it there is an error that names the way out."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(0)
    x, b_in, c_in = torch.randn(1, 20, 2, 16, generator=gen), torch.randn(1, 20, 16), torch.randn(1, 20, 16)
    dt, a = torch.rand(1, 20, 2, generator=gen), -torch.rand(2, generator=gen)
    starts = torch.zeros(1, 20, dtype=torch.bool)
    starts[0, 7] = True
    ssd_fused._log_choice.cache_clear()
    with caplog.at_level("INFO", logger="raytron.ops.ssd_fused"):
        assert ssd_fused.choose_kernel(x, b_in, 16) == "chunked"
        assert ssd_fused.choose_kernel(x, b_in, 16) == "chunked"
    assert [r.getMessage() for r in caplog.records] == [  # logged once
        "Mamba2 SSD kernel 'chunked' on cpu (torch.float32): Triton or CUDA is not available on this machine"]
    torch.testing.assert_close(ssd(x, dt, a, b_in, c_in, 16, starts), ssd_chunked(x, dt, a, b_in, c_in, 16, starts))
    torch.testing.assert_close(ssd(x, dt, a, b_in, c_in, 16, starts), ssd_recurrent(x, dt, a, b_in, c_in, starts))
    with pytest.raises(ValueError, match="SSD kernel 'triton' cannot run here.*use kernel 'chunked'"):
        ssd(x, dt, a, b_in, c_in, 16, starts, kernel="triton")
    monkeypatch.setenv("RAYTRON_SSD_KERNEL", "fused")
    with pytest.raises(ValueError, match="expected one of triton, chunked"):
        ssd(x, dt, a, b_in, c_in, 16, starts)
