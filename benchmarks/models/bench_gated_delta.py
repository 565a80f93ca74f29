"""Forward + backward time of the gated delta rule alone (no projections) per kernel, bf16, hybrid/1b
head geometry (16 heads of 128, chunk 64), packed documents of 2K tokens: `fused` (ops/gated_delta_fused.py)
vs the chunked form with the Triton / PyTorch scan. Prints one JSON line per (kernel, seq).
Usage (GPU): python benchmarks/models/bench_gated_delta.py [--seqs 4096 16384 32768] [--kernels fused triton]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from raytron.ops.gated_delta import gated_delta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # timing.py, also under `python -P`
from timing import median_seconds  # noqa: E402


def time_kernel(kernel: str, seq: int, heads: int, dim: int, chunk: int, steps: int) -> float:
    """Median seconds of one forward + backward over `steps` timed runs (after 2 warm-ups)."""
    q = F.normalize(torch.randn(1, heads, seq, dim, device="cuda"), dim=-1).bfloat16().requires_grad_()
    k = F.normalize(torch.randn(1, heads, seq, dim, device="cuda"), dim=-1).bfloat16().requires_grad_()
    v = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = (-0.1 * torch.rand(1, heads, seq, device="cuda")).requires_grad_()
    beta = torch.rand(1, heads, seq, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    starts = (torch.arange(seq, device="cuda") % 2048 == 0)[None]
    starts[:, 0] = False
    return median_seconds(lambda: gated_delta(q, k, v, g, beta, chunk, starts, kernel=kernel).float().square()
                          .mean().backward(), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--kernels", nargs="+", default=["fused", "triton"])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    for kernel in args.kernels:
        for seq in args.seqs:
            seconds = time_kernel(kernel, seq, args.heads, args.dim, args.chunk, args.steps)
            print(json.dumps(dict(kernel=kernel, seq=seq, heads=args.heads, dim=args.dim, chunk=args.chunk,
                                  ms=round(seconds * 1e3, 3), tokens_per_s=round(seq / seconds))), flush=True)


if __name__ == "__main__":
    main()
