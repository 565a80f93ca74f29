"""Stand-ins for the apex / Transformer Engine kernels megatron-core calls on its hot paths, where neither
is installed (the lent GPU image has neither). Without them megatron-core 0.16.1 falls back to slow
Python loops; each stand-in here is a plain torch implementation of the same contract, installed only
where megatron would otherwise use its local fallback (a real apex / TE binding is always kept).

- `wgrad_gemm_accum_fp32(input, grad_output, main_grad)`: apex's fused_weight_gradient_mlp_cuda.
  Accumulates a linear layer's weight gradient straight into megatron's fp32 `main_grad` buffer with one
  bf16 GEMM that writes fp32 (torch.addmm with out_dtype, i.e. cuBLAS with an fp32 C matrix and beta=1),
  instead of a bf16 `.grad` rounded to bf16 and then added by the DDP hook. Turns on megatron's
  `gradient_accumulation_fusion`. More exact than the unfused path (no bf16 rounding of the product).
- `foreach_l2_norm` / `foreach_scale`: amp_C's multi_tensor_l2norm / multi_tensor_scale, used by
  gradient clipping. megatron's local fallback computes one norm per tensor and builds a tensor from
  their Python floats (one device-to-host sync per parameter); these use torch._foreach_* (no sync).
- `use_fused_adam(optimizer)`: megatron picks torch.optim.AdamW without TE/apex, in its default
  multi-tensor (foreach) mode; the fused CUDA kernel is about 3x faster on fp32 master weights.
"""

from __future__ import annotations

import torch

_state = {"wgrad": None}  # None: not checked yet; True/False: the fused GEMM works and matches


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad (fp32, [out, in]) += grad_output[tokens, out]^T @ total_input[tokens, in], fp32 accumulate."""
    if main_grad.is_cuda and grad_output.dtype != torch.float32:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)
    else:
        main_grad.add_(grad_output.t().float() @ total_input.float())


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """Same for a bf16/fp16 main_grad (grad_reduce_in_fp32=False)."""
    torch.addmm(main_grad, grad_output.t(), total_input, out=main_grad)


def _wgrad_fusion_works() -> bool:
    """One small fused accumulation on the current GPU against an fp32 reference (cached)."""
    if _state["wgrad"] is None:
        try:
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(256, 64, device="cuda", generator=g).bfloat16()
            dy = torch.randn(256, 32, device="cuda", generator=g).bfloat16()
            acc = torch.randn(32, 64, device="cuda", generator=g)
            want = acc + dy.t().float() @ x.float()
            wgrad_gemm_accum_fp32(x, dy, acc)
            _state["wgrad"] = bool(torch.allclose(acc, want, rtol=1e-4, atol=1e-3))
        except (RuntimeError, TypeError):  # torch without addmm(out_dtype=) on this GPU
            _state["wgrad"] = False
    return _state["wgrad"]


def install_wgrad_accumulation_fusion() -> bool:
    """Give megatron's linear layers the fused weight-gradient accumulation (see the module docstring).
    Returns whether `gradient_accumulation_fusion` may be turned on: True where apex provides it or the
    stand-in works on this GPU; False on CPU or where the fused GEMM is unavailable."""
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "_grad_accum_fusion_available", False):
        return True  # apex's kernel, or ours installed before
    if not torch.cuda.is_available() or not _wgrad_fusion_works():
        return False
    import sys
    import types

    module = types.ModuleType("raytron_fused_weight_gradient")
    module.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
    module.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16
    layers.fused_weight_gradient_mlp_cuda = module
    layers._grad_accum_fusion_available = True
    sys.modules.setdefault("raytron_fused_weight_gradient", module)
    return True


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract: (global L2 norm as a 1-element fp32 tensor, the per-tensor
    norms as one fp32 tensor if `per_tensor` else None)."""
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensor_lists[0])])
    return torch.linalg.vector_norm(norms).reshape(1), (norms if per_tensor else None)


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """amp_C.multi_tensor_scale's contract: dst[i] = src[i] * scale (in place when src is dst)."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install_multi_tensor_kernels() -> None:
    """Replace megatron's per-tensor local fallbacks in gradient clipping and the fp16 optimizer."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = foreach_scale


def inner_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron optimizer (chained or not)."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [opt.optimizer for opt in chained]


def use_fused_adam(optimizer) -> bool:
    """Switch megatron's torch AdamW to the fused CUDA kernel (before its first step, while its state is
    empty). Returns True if switched; kept as is on CPU, for non-fp32 masters, or non-AdamW optimizers."""
    torch_opts = inner_optimizers(optimizer)
    for opt in torch_opts:
        params = [p for g in opt.param_groups for p in g["params"]]
        if (not isinstance(opt, torch.optim.AdamW) or opt.state
                or not all(p.is_cuda and p.dtype == torch.float32 for p in params)):
            return False
    for opt in torch_opts:
        for group in opt.param_groups:
            group["fused"], group["foreach"] = True, False
    return True


def new_step_counter(group: dict, param: torch.Tensor, value: float) -> torch.Tensor:
    """An Adam `step` state tensor the way torch creates it for this group (on the device, fp32, for the
    fused and capturable kernels; a CPU scalar otherwise)."""
    if group.get("fused") or group.get("capturable"):
        return torch.tensor(value, dtype=torch.float32, device=param.device)
    return torch.tensor(value)
