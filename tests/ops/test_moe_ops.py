"""Grouped-GEMM expert path == per-expert loop, outputs and every gradient."""

import pytest
import torch

from raytron.ops.moe import grouped_expert_swiglu, grouped_mm_supported, reference_expert_swiglu

E, D, FF, T, K = 5, 16, 24, 19, 2


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g, dtype=dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[:6, 0] = 3  # skew, and expert 4 unused by first choices
    ids[ids == 4] = 0
    weights = torch.rand(T, K, generator=g, dtype=dtype)
    weights[2, 1] = 0.0  # a dropped assignment
    ws = [torch.randn(E, FF, D, generator=g, dtype=dtype), torch.randn(E, FF, D, generator=g, dtype=dtype),
          torch.randn(E, D, FF, generator=g, dtype=dtype)]
    return [x, ids, weights, *ws]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_matches_loop_with_grads(dtype):
    inputs = _inputs(dtype)
    x, ids, weights, *ws = inputs
    differentiable = [x, weights, *ws]
    for t in differentiable:
        t.requires_grad_()
    out = grouped_expert_swiglu(*inputs)
    ref = reference_expert_swiglu(*inputs)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, ref, **tol)
    for ga, gb in zip(torch.autograd.grad(out.sum(), differentiable), torch.autograd.grad(ref.sum(), differentiable)):
        torch.testing.assert_close(ga, gb, **tol)


def test_grouped_mm_used_where_supported():
    x = torch.randn(4, D)
    assert grouped_mm_supported(x, torch.randn(E, FF, D)) == hasattr(torch, "_grouped_mm")
    assert not grouped_mm_supported(x.double(), torch.randn(E, FF, D, dtype=torch.float64))
    assert not grouped_mm_supported(torch.randn(4, 3), torch.randn(E, 5, 3))  # 12-byte rows
