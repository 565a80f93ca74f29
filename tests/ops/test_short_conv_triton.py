"""The fused short-conv + SiLU kernels (ops/short_conv_triton.py) run in the Triton interpreter on CPU against
`F.silu(short_conv)` in float64 on the same inputs: output, dx and dweight, float32 and bf16, K = 2 / 4 / 8,
with and without packed documents, lengths and widths no multiple of the blocks, batch 2, a strided x
(cases: _conv_interpret_cases.py, one subprocess for the module). Tolerances (relative error
||fast - ref|| / ||ref||): 1e-5 in float32 (float32 accumulation), 1e-2 in bf16 (one rounding of the result to an
8-bit mantissa, ~4e-3). Also: RAYTRON_CONV_KERNEL picks the kernel, unknown names and `triton` where it cannot
run are refused, and the default stays the PyTorch path."""

import pathlib

import pytest
import torch
import torch.nn.functional as F

from raytron.ops import short_conv as conv_ops
from raytron.ops.short_conv import choose_conv_kernel, conv_silu, short_conv
from tests.ops.interpreter import needs_triton, run_interpreted

CASES_SCRIPT = pathlib.Path(__file__).with_name("_conv_interpret_cases.py")
CASES = ["fp32_docs_k4", "bf16_docs_k4", "fp32_k2", "bf16_k2", "fp32_docs_k8_strided"]
TOL = {"fp32": 1e-5, "bf16": 1e-2}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(CASES_SCRIPT, *CASES, unset=("RAYTRON_CONV_KERNEL",))


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_reference_in_interpreter(interpreted, case):
    errors, tol = interpreted["errors"][case], TOL[case.split("_")[0]]
    assert set(errors) == {"y", "dx", "dweight"}
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"{case}: relative errors above {tol}: {bad}"


@needs_triton
def test_env_var_routes_conv_silu_through_the_kernels(interpreted):
    assert interpreted["routing"] == {"chosen": "triton", "same_as_kernel": True, "kernel_calls": 1,
                                      "halo_same_as_torch": True, "kernel_calls_with_halo": 0}


def test_default_is_torch_and_names_are_checked(monkeypatch):
    monkeypatch.delenv("RAYTRON_CONV_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.randn(2, 9, 6), torch.randn(6, 4)
    assert conv_ops.DEFAULT_KERNEL == "torch"  # until the kernels are measured on a GPU (module docstring)
    assert choose_conv_kernel(x, w) == "torch"
    monkeypatch.setenv("RAYTRON_CONV_KERNEL", "torch")
    assert choose_conv_kernel(x, w) == "torch"
    torch.testing.assert_close(conv_silu(x, w), F.silu(short_conv(x, w)), rtol=0, atol=0)
    monkeypatch.setenv("RAYTRON_CONV_KERNEL", "magic")
    for halo in (None, torch.randn(2, 3, 6)):  # the halo (PyTorch-only) path refuses a wrong name too
        with pytest.raises(ValueError, match="'magic' .*RAYTRON_CONV_KERNEL.*expected one of torch, triton"):
            conv_silu(x, w, halo=halo)
    monkeypatch.setenv("RAYTRON_CONV_KERNEL", "triton")
    with pytest.raises(ValueError, match="'triton' cannot run here: .*(CUDA|Triton).*unset RAYTRON_CONV_KERNEL"):
        conv_silu(x, w)
    with pytest.raises(ValueError, match="expected one of torch, triton"):
        choose_conv_kernel(x, w, "cuda")
