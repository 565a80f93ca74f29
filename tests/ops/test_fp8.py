"""FP8 scaling math and the FP8 linear / grouped-expert autograd functions on CPU, against hand-written
fake quantisation (torch's float8 dtypes exist on CPU). The CUDA fast path: tests/ops/test_fp8_gpu.py."""

import pytest
import torch

from raytron.ops import fp8
from raytron.ops.fp8 import E4M3, E5M2

FMAX = {E4M3: 448.0, E5M2: 57344.0}
# half an ulp relative to the value for normal numbers; absolute below the smallest normal
MANTISSA_BITS = {E4M3: 3, E5M2: 2}
MIN_SUBNORMAL = {E4M3: 2.0 ** -9, E5M2: 2.0 ** -16}


def _fake(t: torch.Tensor, dtype: torch.dtype, dim=None) -> torch.Tensor:
    """Hand-written quantise-dequantise: scale = fmax / amax, saturate, round via the float8 dtype."""
    t = t.double()
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = (FMAX[dtype] / amax.clamp_min(1e-12)).float()
    q = (t.float() * scale).clamp(-FMAX[dtype], FMAX[dtype]).to(dtype)
    return q.float() * scale.reciprocal()


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_scale_maps_amax_onto_the_format_maximum(dtype):
    t = torch.tensor([0.1, -3.7, 2.0, 1e-3])
    q, inv = fp8.quantise(t, dtype)
    assert q.dtype == dtype and inv.dtype == torch.float32 and inv.dim() == 0
    assert float(inv) == pytest.approx(3.7 / FMAX[dtype], rel=1e-6)
    assert float(q.float().abs().max()) == FMAX[dtype]  # amax lands on the top code, not NaN
    assert float(q.float()[1]) == -FMAX[dtype]


def test_saturation_and_zero_tensor():
    # amax * scale rounds to the format maximum or just below: never past it (no NaN / inf codes)
    t = torch.tensor([1.0 / 3.0, -1.0 / 7.0, 0.3333333])
    q, _ = fp8.quantise(t, E4M3)
    assert not torch.isnan(q.float()).any() and float(q.float().abs().max()) <= 448.0
    z, zinv = fp8.quantise(torch.zeros(5), E5M2)
    assert torch.isfinite(zinv) and torch.equal(z.float(), torch.zeros(5))
    assert float(fp8.fp8_scale(torch.tensor(0.0), E4M3)) == pytest.approx(448.0 / fp8.AMAX_EPS)


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_rounding_matches_torch_float8_and_error_bound(dtype):
    torch.manual_seed(0)
    t = torch.randn(4096) * torch.logspace(-3, 2, 4096)
    q, inv = fp8.quantise(t, dtype)
    scale = FMAX[dtype] / t.abs().max()
    assert torch.equal(q.view(torch.uint8), (t * scale).clamp(-FMAX[dtype], FMAX[dtype]).to(dtype).view(torch.uint8))
    err = (fp8.dequantise(q, inv) - t).abs()
    bound = torch.maximum(t.abs() * 2.0 ** -(MANTISSA_BITS[dtype] + 1), torch.tensor(MIN_SUBNORMAL[dtype] / 2) * inv)
    assert bool((err <= bound * (1 + 1e-5)).all()), float((err / bound).max())


def test_rowwise_scales_follow_each_row():
    t = torch.tensor([[1.0, -2.0], [100.0, 50.0], [0.0, 0.0]])
    q, inv = fp8.quantise(t, E4M3, dim=-1)
    assert inv.shape == (3, 1)
    assert torch.allclose(inv.squeeze(), torch.tensor([2.0, 100.0, 0.0]).clamp_min(1e-12) / 448.0)
    assert torch.equal(q.float()[:, 0], torch.tensor([224.0, 448.0, 0.0]))


def _linear_case(tokens=48, k=64, n=32, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, tokens // 2, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    dy = (torch.randn(2, tokens // 2, n, generator=gen) * 1e-3).to(dtype)
    return x, w, dy


def test_linear_reference_equals_hand_written_fake_quant():
    x, w, dy = _linear_case()
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8.fp8_linear(xg, wg, impl="reference")
    y.backward(dy)
    xq, wq, gq = _fake(x.reshape(-1, 64), E4M3), _fake(w, E4M3), _fake(dy.reshape(-1, 32), E5M2)
    torch.testing.assert_close(y.reshape(-1, 32), xq @ wq.T, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xg.grad.reshape(-1, 64), gq @ wq, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(wg.grad, gq.T @ xq, rtol=1e-6, atol=1e-9)
    # and FP8 stays near the exact linear (3 resp. 2 mantissa bits)
    assert float((y - x @ w.T).norm() / (x @ w.T).norm()) < 0.06
    assert float((xg.grad - dy @ w).norm() / (dy @ w).norm()) < 0.12


def test_scaled_mm_layouts_match_reference_on_cpu():
    """The fast path's operand layouts and scale placement, through torch's CPU _scaled_mm."""
    x, w, dy = _linear_case(tokens=64, k=96, n=48, dtype=torch.bfloat16)
    outs = {}
    for impl in ("reference", "scaled_mm"):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.FP8Linear.apply(xg, wg, impl)
        y.backward(dy)
        outs[impl] = (y, xg.grad, wg.grad)
    for fast, ref in zip(outs["scaled_mm"], outs["reference"]):
        torch.testing.assert_close(fast.float(), ref.float(), rtol=1e-2, atol=1e-5)


def test_refusals():
    with pytest.raises(ValueError, match="multiple of 16.*tokens"):
        fp8.fp8_linear(torch.randn(10, 32), torch.randn(16, 32), impl="reference")
    with pytest.raises(RuntimeError, match="CUDA only"):
        fp8.check_fast_path(torch.device("cpu"))
    with pytest.raises(ValueError, match="impl must be"):
        fp8.gemm(*fp8.quantise(torch.randn(16, 16), E4M3), *fp8.quantise(torch.randn(16, 16), E4M3),
                 torch.float32, "cublas")
    assert fp8.default_impl(torch.zeros(1)) == "reference"


def test_grouped_reference_equals_hand_written_fake_quant():
    gen = torch.Generator().manual_seed(2)
    experts, rows, k, n = 3, 40, 32, 48
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(experts, n, k, generator=gen) * 0.1
    dy = torch.randn(rows, n, generator=gen)
    offsets = torch.tensor([16, 16, rows], dtype=torch.int32)  # expert 1 gets no tokens
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8.fp8_segment_mm(xg, wg, offsets, impl="reference")
    y.backward(dy)
    xq, gq = _fake(x, E4M3, dim=-1), _fake(dy, E4M3, dim=-1)
    wq = _fake(w, E4M3, dim=-1)  # forward: per (expert, output channel)
    wtq = _fake(w.transpose(1, 2), E4M3, dim=-1).transpose(1, 2)  # dgrad: per (expert, input channel)
    seg = [(0, 16), (16, 16), (16, rows)]
    torch.testing.assert_close(y, torch.cat([xq[a:b] @ wq[e].T for e, (a, b) in enumerate(seg)]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xg.grad, torch.cat([gq[a:b] @ wtq[e] for e, (a, b) in enumerate(seg)]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wg.grad, torch.stack([dy[a:b].T @ x[a:b] for a, b in seg]), rtol=1e-6, atol=1e-6)


def test_grouped_scaled_mm_loop_matches_reference_on_cpu():
    """The per-expert rowwise _scaled_mm path's layouts and scale placement, through torch's CPU kernel."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(80, 32, generator=gen).bfloat16()
    w = (torch.randn(3, 48, 32, generator=gen) * 0.1).bfloat16()
    dy = torch.randn(80, 48, generator=gen).bfloat16()
    offsets = torch.tensor([16, 16, 80], dtype=torch.int32)
    outs = {}
    for impl in ("reference", "scaled_mm_loop"):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.fp8_segment_mm(xg, wg, offsets, impl=impl)
        y.backward(dy)
        outs[impl] = (y, xg.grad, wg.grad)
    for fast, ref in zip(outs["scaled_mm_loop"], outs["reference"]):
        torch.testing.assert_close(fast.float(), ref.float(), rtol=1e-2, atol=1e-5)
