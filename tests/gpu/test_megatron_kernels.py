"""GPU checks of parallelism/megatron/kernels.py (the apex stand-ins) against plain torch references."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from raytron.parallelism.megatron import kernels as mk  # noqa: E402


def test_wgrad_accumulation_fusion_installs_and_matches_fp32():
    from megatron.core.tensor_parallel import layers

    assert mk.install_wgrad_accumulation_fusion()
    assert layers._grad_accum_fusion_available
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4096, 2048, device="cuda", generator=g).bfloat16()
    dy = torch.randn(4096, 1024, device="cuda", generator=g).bfloat16()
    acc = torch.randn(1024, 2048, device="cuda", generator=g)
    want = acc.double() + dy.t().double() @ x.double()
    unfused = acc + (dy.t() @ x).float()  # megatron's path without the fusion: bf16 product, then add
    layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(x, dy, acc)
    err_fused = (acc.double() - want).abs().max().item()
    err_unfused = (unfused.double() - want).abs().max().item()
    assert err_fused < 1e-2, err_fused  # fp32 accumulation of exact bf16 products over 4096 terms
    assert err_fused < err_unfused / 4, (err_fused, err_unfused)  # and clearly better than rounding to bf16


def test_fused_adam_matches_foreach_adam():
    torch.manual_seed(0)
    params = [torch.randn(n, device="cuda") for n in (1000, 37, 4096)]
    a = [torch.nn.Parameter(p.clone()) for p in params]
    b = [torch.nn.Parameter(p.clone()) for p in params]
    opt_a = torch.optim.AdamW(a, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_b = torch.optim.AdamW(b, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    class Wrapped:  # megatron's optimizer wrapper exposes the torch optimizer as .optimizer
        optimizer = opt_b

    assert mk.use_fused_adam(Wrapped())
    for step in range(5):
        for pa, pb in zip(a, b):
            grad = torch.randn_like(pa)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    assert opt_b.param_groups[0]["fused"] and opt_b.state[b[0]]["step"].is_cuda
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


def test_foreach_l2_norm_matches_megatron_local_norm():
    from megatron.core.utils import local_multi_tensor_l2_norm

    tensors = [torch.randn(n, device="cuda") for n in (10, 1000, 333)]
    ours, _ = mk.foreach_l2_norm(0, None, [tensors], False)
    theirs, _ = local_multi_tensor_l2_norm(0, None, [tensors], False)
    torch.testing.assert_close(ours, theirs.to(ours.device), rtol=1e-6, atol=0)


def test_compiled_cross_entropy_matches_fp64_reference():
    from raytron.parallelism.megatron.modules import fused_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(2)
    logits = (3 * torch.randn(512, 2, 32000, device="cuda", generator=g)).bfloat16().requires_grad_()
    labels = torch.randint(0, 32000, (512, 2), device="cuda", generator=g)
    loss = fused_cross_entropy(logits, labels, None)
    ref_logits = logits.detach().double().requires_grad_()
    want = -torch.log_softmax(ref_logits, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(loss.double(), want, atol=1e-4, rtol=1e-5)
    weights = torch.rand(512, 2, device="cuda", generator=g)
    (grad,) = torch.autograd.grad((loss * weights).sum(), logits)
    (want_grad,) = torch.autograd.grad((want * weights.double()).sum(), ref_logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-3, rtol=1e-2)  # one bf16 rounding


@pytest.mark.parametrize("seq,batch", [(4096, 2), (16384, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_swiglu_matches_fp64_reference(dtype, seq, batch):
    from raytron.ops import swiglu as sw

    g = torch.Generator(device="cuda").manual_seed(3)
    y = (3 * torch.randn(seq, batch, 2 * 5632, device="cuda", generator=g)).to(dtype).requires_grad_()
    grad_out = torch.randn(seq, batch, 5632, device="cuda", generator=g).to(dtype)
    assert sw.triton_supported(y)
    out = sw.swiglu(y)
    (grad,) = torch.autograd.grad(out, y, grad_out)
    assert sw._verified[dtype] and out.dtype == grad.dtype == dtype
    y64 = y.detach().double().requires_grad_()
    want = sw.swiglu_reference(y64)
    (want_grad,) = torch.autograd.grad(want, y64, grad_out.double())
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}  # one rounding
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(grad.double(), want_grad, **tol)


def test_fused_rope_matches_fp64_megatron_unfused():
    from megatron.core.models.common.embeddings import rope_utils

    from raytron.parallelism.megatron.modules import fused_rope

    g = torch.Generator(device="cuda").manual_seed(4)
    t = torch.randn(4096, 2, 16, 128, device="cuda", generator=g).bfloat16().requires_grad_()
    pos = torch.arange(4096, device="cuda", dtype=torch.float32)[:, None]
    inv = 1.0 / 10000 ** (torch.arange(0, 128, 2, device="cuda", dtype=torch.float32) / 128)
    freqs = torch.cat([pos * inv, pos * inv], -1)[:, None, None, :]  # megatron's RotaryEmbedding layout
    grad_out = torch.randn_like(t)
    out = fused_rope(t, freqs)
    (grad,) = torch.autograd.grad(out, t, grad_out)
    t64 = t.detach().double().requires_grad_()
    want = rope_utils._apply_rotary_pos_emb_bshd(t64, freqs.double())
    (want_grad,) = torch.autograd.grad(want, t64, grad_out.double())
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=8e-3)
    torch.testing.assert_close(grad.double(), want_grad, atol=2e-2, rtol=8e-3)
