"""The state scan's hand-written backward (ops/state_scan.py, the recurrence the Triton kernel
transliterates) equals autograd through the plain loop, in float64, with and without the w term;
kernel selection refuses what cannot run instead of falling back silently."""

import pytest
import torch

from raytron.ops.state_scan import StateScan, _NoWScan, choose_kernel, scan_reference, state_scan


def _inputs(with_w: bool, bh=3, n=5, c=4, dk=6, dv=7):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(bh, n, c, dk, generator=g, dtype=torch.float64) if with_w else None
    uv = torch.randn(bh, n, c, dv, generator=g, dtype=torch.float64)
    kt = torch.randn(bh, n, c, dk, generator=g, dtype=torch.float64)
    decay = torch.rand(bh, n, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (w, uv, kt, decay) if x is not None]


@pytest.mark.parametrize("with_w", [True, False])
def test_manual_backward_matches_autograd(with_w):
    inputs = _inputs(with_w)
    w = inputs[0] if with_w else None
    ref_states, ref_u = scan_reference(w, *inputs[-3:])
    if with_w:
        states, u = StateScan.apply(*inputs, "torch")
    else:
        states, u = _NoWScan.apply(*inputs, "torch"), inputs[0]
    torch.testing.assert_close(states, ref_states, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(u, ref_u, atol=1e-12, rtol=1e-12)
    g = torch.Generator().manual_seed(8)
    probe_h = torch.randn(states.shape, generator=g, dtype=torch.float64)
    probe_u = torch.randn(u.shape, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad((ref_states * probe_h).sum() + (ref_u * probe_u).sum(), inputs)
    got = torch.autograd.grad((states * probe_h).sum() + (u * probe_u).sum(), inputs)
    for name, a, b in zip(["w", "uv", "kt", "decay"][-len(inputs):], got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=f"gradient of {name}")


def test_state_scan_matches_reference_and_without_w_passes_uv_through():
    w, uv, kt, decay = _inputs(True)
    for kernel in ("reference", "torch"):
        states, u = state_scan(w, uv, kt, decay, kernel)
        torch.testing.assert_close(states, scan_reference(w, uv, kt, decay)[0], atol=1e-12, rtol=1e-12)
    states, u = state_scan(None, uv, kt, decay, "torch")
    assert u is uv
    torch.testing.assert_close(states, scan_reference(None, uv, kt, decay)[0], atol=1e-12, rtol=1e-12)


def test_kernel_choice_refuses_what_cannot_run(monkeypatch):
    _, uv, kt, _ = _inputs(True)
    assert choose_kernel(kt, uv) == "torch"  # CPU
    with pytest.raises(ValueError, match="expected one of reference, torch, triton"):
        choose_kernel(kt, uv, "cuda-magic")
    with pytest.raises(ValueError, match="scan kernel 'triton' cannot run here"):
        choose_kernel(kt, uv, "triton")
    monkeypatch.setenv("RAYTRON_SCAN_KERNEL", "triton")
    with pytest.raises(ValueError, match="cannot run here.*RAYTRON_SCAN_KERNEL"):
        choose_kernel(kt, uv)
    monkeypatch.setenv("RAYTRON_SCAN_KERNEL", "reference")
    assert choose_kernel(kt, uv) == "reference"
