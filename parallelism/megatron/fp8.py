"""train.precision fp8 in the megatron engine: megatron's tensor-parallel linears and the grouped experts
with their local GEMMs in FP8 (ops/fp8.py), everything around them megatron's own.

- `FP8ColumnParallelLinear` / `FP8RowParallelLinear`: megatron's Column/RowParallelLinear (same
  parameters, names, TP sharding and checkpoints) whose `_forward_impl` runs `FP8LinearWithComm` instead of
  megatron's LinearWithGradAccumulationAndAsyncCommunication. It keeps that function's contract: under
  sequence parallelism the input is all-gathered (bf16) before quantisation and the input gradient
  reduce-scattered; without it a TP > 1 column layer all-reduces the input gradient; with
  gradient_accumulation_fusion the FP8 weight-gradient GEMM writes fp32 and is added into `main_grad`
  (the dummy `.grad` megatron's DDP hooks expect is handed back as megatron does). Deferred embedding
  wgrad is not used by these layers (only by the output layer, which stays bf16).
- `FP8GroupedMLPExperts`: GroupedMLPExperts with `ops.fp8.fp8_segment_mm` for its two grouped GEMMs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from ...ops.fp8 import default_impl, fp8_linear_backward, fp8_linear_forward, fp8_segment_mm
from .modules import GroupedMLPExperts


def _gather_tokens(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty((x.shape[0] * group.size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _weight_grad(weight, dw: torch.Tensor, fused: bool):
    """What backward returns for the weight: dw itself, or (accumulation fusion) dw added into main_grad
    and megatron's placeholder for its DDP hooks."""
    if not fused:
        return dw
    weight.main_grad.add_(dw)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.main_grad.shape, dtype=weight.dtype, device=dw.device)


class FP8LinearWithComm(torch.autograd.Function):
    """megatron's linear_with_grad_accumulation_and_async_allreduce contract, FP8 local GEMMs."""

    @staticmethod
    def forward(ctx, x, weight, fused_wgrad, allreduce_dgrad, sequence_parallel, tp_group, impl):
        total = _gather_tokens(x, tp_group) if sequence_parallel else x
        y, saved = fp8_linear_forward(total.reshape(-1, total.shape[-1]), weight, impl)
        ctx.save_for_backward(*saved)
        ctx.weight = weight  # not saved_tensors: main_grad is read from it (as megatron does)
        ctx.fused = fused_wgrad and hasattr(weight, "main_grad")
        ctx.flags = (allreduce_dgrad, sequence_parallel, tp_group, impl, x.shape, total.shape)
        return y.view(*total.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        allreduce_dgrad, sequence_parallel, tp_group, impl, x_shape, total_shape = ctx.flags
        weight = ctx.weight
        wgrad_dtype = torch.float32 if ctx.fused else weight.dtype
        dx, dw = fp8_linear_backward(dy.reshape(-1, dy.shape[-1]).contiguous(), ctx.saved_tensors, impl,
                                     wgrad_dtype)
        dx = dx.view(total_shape)
        if sequence_parallel:
            local = torch.empty(x_shape, dtype=dx.dtype, device=dx.device)
            dist.reduce_scatter_tensor(local, dx, group=tp_group)
            dx = local
        elif allreduce_dgrad:
            dist.all_reduce(dx, group=tp_group)
        return dx, _weight_grad(weight, dw, ctx.fused), None, None, None, None, None


def _fp8_forward_impl(self, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                      sequence_parallel, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None):
    if not weight.requires_grad or grad_output_buffer is not None:
        raise NotImplementedError(f"{type(self).__name__}: frozen weights and deferred weight gradients are "
                                  "not used by raytron's FP8 layers")
    # megatron hands the column layers their TP group; row layers (None) never communicate here
    out = FP8LinearWithComm.apply(input, weight, gradient_accumulation_fusion, allreduce_dgrad,
                                  sequence_parallel, tp_group, default_impl(input))
    return out + bias if bias is not None else out


class FP8ColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear with FP8 local GEMMs (module docstring)."""
    _forward_impl = _fp8_forward_impl


class FP8RowParallelLinear(RowParallelLinear):
    """RowParallelLinear with FP8 local GEMMs (module docstring)."""
    _forward_impl = _fp8_forward_impl


class FP8GroupedMLPExperts(GroupedMLPExperts):
    """GroupedMLPExperts whose grouped GEMMs run in FP8 (forward and input gradient; ops/fp8.py). Where
    GroupedMLPExperts falls back to megatron's per-expert loop (one local expert, expert TP > 1) the
    experts stay bf16: their ragged per-expert token counts do not meet _scaled_mm's multiples of 16."""

    segment_mm = staticmethod(fp8_segment_mm)
