"""ops/swiglu.py: the analytic backward (the formula the Triton kernel computes) equals autograd of the
forward in float64; the megatron install routes only the bias-free MLP activation, keeps megatron's own
function elsewhere (bias, fp8 input store, CPU) and agrees with it. The Triton kernels themselves are
checked on GPU (tests/gpu/test_megatron_kernels.py)."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.fusions import fused_bias_swiglu
from megatron.core.transformer import mlp

from raytron.ops import swiglu as sw
from raytron.parallelism.megatron import modules as mm


def _inputs(rows=7, width=10, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    y = (3 * torch.randn(rows, 2 * width, generator=g, dtype=dtype)).requires_grad_()
    return y, torch.randn(rows, width, generator=g, dtype=dtype)


def test_forward_is_silu_gate_times_up():
    y, _ = _inputs()
    a, b = y.detach().chunk(2, -1)
    torch.testing.assert_close(sw.swiglu(y), F.silu(a) * b, atol=1e-15, rtol=1e-15)


def test_analytic_backward_matches_autograd():
    y, g = _inputs()
    (want,) = torch.autograd.grad((sw.swiglu_reference(y) * g).sum(), y)
    torch.testing.assert_close(sw.swiglu_backward_reference(g, y.detach()), want, atol=1e-13, rtol=1e-13)
    (ours,) = torch.autograd.grad((sw.swiglu(y) * g).sum(), y)
    torch.testing.assert_close(ours, want, atol=1e-13, rtol=1e-13)


def test_bf16_reference_rounds_once_from_fp32():
    y, g = _inputs(dtype=torch.float32)
    out = sw.swiglu_reference(y.detach().bfloat16())
    assert out.dtype == torch.bfloat16
    want = sw.swiglu_reference(y.detach().bfloat16().float()).bfloat16()
    assert torch.equal(out, want)


def test_triton_is_not_claimed_on_cpu():
    y, _ = _inputs(dtype=torch.bfloat16)
    assert not sw.triton_supported(y)


def test_install_routes_mlp_activation_and_keeps_megatron_elsewhere(monkeypatch):
    monkeypatch.setattr(mlp, "bias_swiglu_impl", fused_bias_swiglu.bias_swiglu_impl)
    assert mm.install_fused_swiglu() and mlp.bias_swiglu_impl is mm._bias_swiglu
    y, _ = _inputs(dtype=torch.float32)
    bias = torch.randn(y.shape[-1])
    torch.testing.assert_close(mm._bias_swiglu(y, None), fused_bias_swiglu.bias_swiglu_impl(y, None))
    torch.testing.assert_close(mm._bias_swiglu(y, bias), fused_bias_swiglu.bias_swiglu_impl(y, bias))
    sentinel = object()  # a binding that is not megatron's own (e.g. a future TE one) is kept
    monkeypatch.setattr(mlp, "bias_swiglu_impl", sentinel)
    mm.install_fused_swiglu()
    assert mlp.bias_swiglu_impl is sentinel


@pytest.mark.parametrize("width", [5, 1000])
def test_reference_accepts_leading_dims(width):
    y = torch.randn(3, 2, 2 * width, dtype=torch.float64)
    assert sw.swiglu(y).shape == (3, 2, width)
