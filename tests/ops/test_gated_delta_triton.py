"""The fused Gated DeltaNet kernels (ops/gated_delta_triton.py) run in the Triton interpreter on CPU in
float32 against the token-by-token recurrence in float64: outputs and the gradients of q, k, v, g, beta
(and of the initial state), with packed documents, lengths that are no multiple of the chunk, batch and
heads > 1, d_v over two tiles. The interpreter runs in one subprocess for the module (cases:
_gdn_interpret_cases.py). Also: kernel choice never picks Triton on CPU and refuses names it cannot run."""

import pathlib

import pytest
import torch

from raytron.ops.gated_delta import choose_gdn_kernel, gated_delta
from tests.ops.interpreter import needs_triton, run_interpreted

CASES_SCRIPT = pathlib.Path(__file__).with_name("_gdn_interpret_cases.py")
CASES = ["docs_odd_length", "two_value_tiles", "initial_and_final_state"]


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, dict[str, float]]:
    return run_interpreted(CASES_SCRIPT, *CASES, unset=("RAYTRON_GDN_KERNEL",))


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_fused_kernels_match_recurrence_in_interpreter(interpreted_errors, case):
    errors = interpreted_errors[case]
    assert {"output", "dq", "dk", "dv", "dg", "dbeta"} <= set(errors)
    bad = {name: err for name, err in errors.items() if not err < 1e-5}
    assert not bad, f"{case}: relative errors above 1e-5 (float32 rounding): {bad}"


def test_cpu_never_chooses_fused_and_named_kernels_are_checked(monkeypatch):
    monkeypatch.delenv("RAYTRON_GDN_KERNEL", raising=False)
    monkeypatch.delenv("RAYTRON_SCAN_KERNEL", raising=False)
    q, v = torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 8, 16)
    assert choose_gdn_kernel(q, v, 16) == "torch"
    with pytest.raises(ValueError, match="expected one of fused, reference, torch, triton"):
        choose_gdn_kernel(q, v, 16, "magic")
    with pytest.raises(ValueError, match="kernel 'fused' cannot run here: .*(CUDA|Triton)"):
        choose_gdn_kernel(q, v, 16, "fused")
    monkeypatch.setenv("RAYTRON_GDN_KERNEL", "fused")
    with pytest.raises(ValueError, match="unset RAYTRON_GDN_KERNEL"):
        gated_delta(q, q, v, q[..., 0], q[..., 0], 16)
    monkeypatch.setenv("RAYTRON_GDN_KERNEL", "reference")
    assert choose_gdn_kernel(q, v, 16) == "reference"
