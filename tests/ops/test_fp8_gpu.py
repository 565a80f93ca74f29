"""GPU: ops/fp8.py's fast paths (torch._scaled_mm, torch._scaled_grouped_mm, compiled quantisation)
against the fake-quantised fp32 reference on the same CUDA tensors. Run through the device tool:
pytest -m gpu tests/ops/test_fp8_gpu.py (needs compute capability >= 8.9).

Both paths multiply the *same* FP8 tensors with the same scales, so they differ only by the GEMM's
accumulation (fast accumulation in the forward) and the bf16 rounding of the output: relative error
||fast - ref|| / ||ref|| below 1e-2 (a wrong transpose, layout or scale placement gives O(1)). Against the
exact bf16 linear, FP8 (3 resp. 2 mantissa bits) stays below 0.1."""

import pytest
import torch

from raytron.ops import fp8
from raytron.ops.fp8 import E4M3, E5M2

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)")]
REL, REL_EXACT = 1e-2, 0.1


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _grads(fn, x, w, dy):
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(xg, wg)
    y.backward(dy)
    return y, xg.grad, wg.grad


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_compiled_quantisation_equals_eager(dtype):
    torch.manual_seed(0)
    t = (torch.randn(4096, 2048, device="cuda") * torch.logspace(-4, 1, 2048, device="cuda")).bfloat16()
    q_c, qt_c, inv_c = fp8.quantise_pair(t, dtype)
    q_e, qt_e, inv_e = fp8._quantise_pair(t, dtype)
    torch.testing.assert_close(inv_c, inv_e, rtol=1e-6, atol=0)
    assert q_c.is_contiguous() and qt_c.is_contiguous() and qt_c.shape == (2048, 4096)
    assert float((q_c.view(torch.uint8) != q_e.view(torch.uint8)).float().mean()) < 1e-4
    assert torch.equal(qt_c.view(torch.uint8), q_c.t().contiguous().view(torch.uint8))


@pytest.mark.parametrize("tokens,k,n", [(8192, 2048, 6144), (8192, 5632, 2048), (4096, 2048, 2048)])
def test_dense_fast_matches_reference(tokens, k, n):
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device="cuda").bfloat16()
    w = (torch.randn(n, k, device="cuda") * k ** -0.5).bfloat16()
    dy = (torch.randn(tokens, n, device="cuda") * 1e-4).bfloat16()
    fast = _grads(lambda a, b: fp8.fp8_linear(a, b), x, w, dy)  # default impl on CUDA: scaled_mm
    ref = _grads(lambda a, b: fp8.fp8_linear(a, b, impl="reference"), x, w, dy)
    exact = _grads(lambda a, b: a.float() @ b.float().T, x.float(), w.float(), dy.float())
    for name, f, r, e in zip(("y", "dx", "dw"), fast, ref, exact):
        assert f.dtype == torch.bfloat16, name
        assert _rel(f, r) < REL, (name, _rel(f, r))
        assert _rel(f, e) < REL_EXACT, (name, _rel(f, e))


def test_dense_fp32_weight_gradient_for_main_grad():
    torch.manual_seed(0)
    x = torch.randn(4096, 1024, device="cuda").bfloat16()
    w = (torch.randn(512, 1024, device="cuda") * 0.03).bfloat16()
    dy = torch.randn(4096, 512, device="cuda").bfloat16()
    _, saved = fp8.fp8_linear_forward(x, w, "scaled_mm")
    dx, dw = fp8.fp8_linear_backward(dy, saved, "scaled_mm", torch.float32)
    dx_r, dw_r = fp8.fp8_linear_backward(dy, saved, "reference", torch.float32)
    assert dw.dtype == torch.float32 and _rel(dw, dw_r) < REL and _rel(dx, dx_r) < REL


@pytest.mark.parametrize("impl", ["scaled_mm", "scaled_mm_loop"])  # grouped kernel (Hopper), per-expert loop
@pytest.mark.parametrize("counts", [[0, 517, 1024, 3, 2048, 400, 96, 0], [512] * 8])
def test_grouped_fast_matches_reference(counts, impl):
    torch.manual_seed(0)
    experts, k, n = len(counts), 2048, 1536
    rows = sum(counts)
    offsets = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(rows, k, device="cuda").bfloat16()
    w = (torch.randn(experts, n, k, device="cuda") * k ** -0.5).bfloat16()
    dy = (torch.randn(rows, n, device="cuda") * 1e-3).bfloat16()
    fast = _grads(lambda a, b: fp8.fp8_segment_mm(a, b, offsets, impl=impl), x, w, dy)
    ref = _grads(lambda a, b: fp8.fp8_segment_mm(a, b, offsets, impl="reference"), x, w, dy)
    bounds = [0] + offsets.tolist()
    exact = _grads(lambda a, b: torch.cat([a[bounds[e]:bounds[e + 1]] @ b[e].T for e in range(experts)]),
                   x.float(), w.float(), dy.float())
    for name, f, r, e in zip(("y", "dx", "dw"), fast, ref, exact):
        assert _rel(f, r) < REL, (name, _rel(f, r))
        assert _rel(f, e) < REL_EXACT, (name, _rel(f, e))


@pytest.mark.parametrize("fused", [False, True])
def test_megatron_fp8_linear_on_cuda(fused):
    """parallelism/megatron/fp8.py's function (tp 1) on the fast path vs the reference, including the
    fp32 main_grad accumulation of gradient_accumulation_fusion."""
    pytest.importorskip("megatron.core")
    from raytron.parallelism.megatron.fp8 import FP8LinearWithComm

    torch.manual_seed(0)
    x = torch.randn(2048, 2, 1024, device="cuda").bfloat16()
    dy = torch.randn(2048, 2, 768, device="cuda").bfloat16()
    w0 = (torch.randn(768, 1024, device="cuda") * 0.03).bfloat16()
    got = {}
    for impl in ("scaled_mm", "reference"):
        w = w0.clone().requires_grad_()
        if fused:
            w.main_grad = torch.ones(768, 1024, device="cuda")
        xg = x.clone().requires_grad_()
        y = FP8LinearWithComm.apply(xg, w, fused, False, False, None, impl)
        y.backward(dy)
        got[impl] = (y, xg.grad, w.main_grad - 1 if fused else w.grad)
    for name, f, r in zip(("y", "dx", "dw"), got["scaled_mm"], got["reference"]):
        assert _rel(f, r) < REL, (name, _rel(f, r))
