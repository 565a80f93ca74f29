"""Rank program for the FP8 tensor-parallel test (tests/parallelism/test_megatron_fp8.py): one column-
parallel FP8 layer over 2 gloo ranks, under sequence parallelism and with the TP all-reduce of dgrad."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


def column_parallel(rank: int, world: int, out: str) -> None:
    from raytron.ops.fp8 import fp8_linear
    from raytron.parallelism.megatron.fp8 import FP8LinearWithComm

    gen = torch.Generator().manual_seed(0)
    x_full = torch.randn(32, 2, 48, generator=gen)  # [s, b, in]
    w_shards = (torch.randn(64, 48, generator=gen) * 0.1).chunk(world, dim=0)  # column parallel: out split
    dy_full = torch.randn(32, 2, 64, generator=gen).chunk(world, dim=-1)
    # what the layer must compute: each rank's FP8 GEMM on the whole sequence, input gradients summed
    want_y, want_dx = [], torch.zeros_like(x_full)
    for w, dy in zip(w_shards, dy_full):
        x = x_full.clone().requires_grad_()
        want_y.append(fp8_linear(x, w, impl="reference"))
        want_y[-1].backward(dy)
        want_dx += x.grad
    errors = {}
    for mode in ("sequence_parallel", "allreduce_dgrad"):
        sp = mode == "sequence_parallel"
        x = (x_full.chunk(world, dim=0)[rank] if sp else x_full).clone().requires_grad_()
        y = FP8LinearWithComm.apply(x, w_shards[rank].clone().requires_grad_(), False, not sp, sp,
                                    dist.group.WORLD, "reference")
        y.backward(dy_full[rank])
        dx = want_dx.chunk(world, dim=0)[rank] if sp else want_dx
        errors[mode] = {"y": float((y - want_y[rank]).abs().max()), "dx": float((x.grad - dx).abs().max()),
                        "dx_scale": float(dx.abs().max())}
    if rank == 0:
        Path(out).write_text(json.dumps(errors))
