"""The one timing rule of the model benchmarks (bench_hybrid_vs_attention.py, bench_gated_delta.py,
bench_ssd_kernels.py): a forward + backward timed on the host with the GPU synchronised around it, warm-up
calls (Triton compiles, autotuning, allocator growth) left out, the median kept."""

from __future__ import annotations

import time

import torch


def median_seconds(step, timed: int, warmup: int = 2) -> float:
    """Median wall seconds of `step()` over `timed` calls after `warmup` untimed ones."""
    times = []
    for i in range(warmup + timed):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
