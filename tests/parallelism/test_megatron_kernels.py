"""CPU checks of parallelism/megatron/kernels.py (the fused CUDA paths are in tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from raytron.parallelism.megatron import kernels as mk


def test_wgrad_accumulation_adds_the_weight_gradient():
    torch.manual_seed(0)
    x, dy, acc = torch.randn(64, 8), torch.randn(64, 4), torch.randn(4, 8)
    want = acc + dy.t() @ x
    mk.wgrad_gemm_accum_fp32(x, dy, acc)
    torch.testing.assert_close(acc, want)
    half = torch.zeros(4, 8, dtype=torch.bfloat16)
    mk.wgrad_gemm_accum_fp16(x.bfloat16(), dy.bfloat16(), half)
    torch.testing.assert_close(half.float(), dy.t() @ x, rtol=0.05, atol=0.2)


def test_foreach_l2_norm_is_the_global_norm():
    tensors = [torch.randn(n, dtype=torch.float64) for n in (3, 100, 17)]
    norm, none = mk.foreach_l2_norm(0, None, [tensors], False)
    assert norm.shape == (1,) and none is None
    torch.testing.assert_close(norm.double()[0], torch.cat(tensors).norm(), rtol=1e-6, atol=0)
    total, per_tensor = mk.foreach_l2_norm(0, None, [tensors], True)
    torch.testing.assert_close(total, norm)
    torch.testing.assert_close(per_tensor.double(), torch.stack([t.norm() for t in tensors]), rtol=1e-6, atol=0)


def test_foreach_scale_in_place_and_into_other_dtype():
    src = [torch.randn(5), torch.randn(7)]
    copies = [t.clone() for t in src]
    mk.foreach_scale(0, None, [copies, copies], 0.5)
    for c, s in zip(copies, src):
        torch.testing.assert_close(c, s * 0.5)
    dst = [torch.empty(5, dtype=torch.bfloat16), torch.empty(7, dtype=torch.bfloat16)]
    mk.foreach_scale(0, None, [src, dst], 2.0)
    for d, s in zip(dst, src):
        assert d.dtype == torch.bfloat16
        torch.testing.assert_close(d, (s * 2.0).bfloat16())


def test_install_multi_tensor_kernels_replaces_only_megatrons_local_fallbacks():
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    before = (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl)
    try:
        mk.install_multi_tensor_kernels()
        if before[0] is utils.local_multi_tensor_l2_norm:
            assert clip_grads.l2_norm_impl is mk.foreach_l2_norm
        else:  # a real apex / TE kernel stays
            assert clip_grads.l2_norm_impl is before[0]
        mk.install_multi_tensor_kernels()  # idempotent
        assert optimizer.multi_tensor_scale_impl in (mk.foreach_scale, before[2])
    finally:
        clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl = before


def test_fused_adam_is_not_used_off_gpu_and_step_counters_follow_the_mode():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p])

    class Wrapped:
        optimizer = opt

    assert not mk.use_fused_adam(Wrapped())  # CPU masters: torch's default mode stays
    assert not opt.param_groups[0]["fused"]
    step = mk.new_step_counter(opt.param_groups[0], p, 3.0)
    assert step.device.type == "cpu" and float(step) == 3.0
    fused_step = mk.new_step_counter({"fused": True}, p, 3.0)
    assert fused_step.dtype == torch.float32 and float(fused_step) == 3.0


def test_wgrad_fusion_is_not_installed_without_cuda(monkeypatch):
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "_grad_accum_fusion_available", False):
        pytest.skip("apex's fused_weight_gradient_mlp_cuda is installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mk.install_wgrad_accumulation_fusion() is False
    assert not layers._grad_accum_fusion_available
