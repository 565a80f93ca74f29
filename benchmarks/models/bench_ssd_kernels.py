"""Milliseconds of one SSD call (forward + backward, bf16, batch 1, packed documents) through the fused
Triton kernels (ops/ssd_fused.py) and through the chunked PyTorch form with the Triton state scan, at the
Mamba2 widths of `hybrid/1b-mamba` and `hybrid/1b`. A kernel-level view beside bench_hybrid_vs_attention.py.
Usage (GPU): python benchmarks/models/bench_ssd_kernels.py [--seqs 4096 16384 32768 65536]
"""

from __future__ import annotations

import argparse
import json
import sys
import os

import torch
import torch.nn.functional as F

from raytron.models import get_config
from raytron.ops.ssd import ssd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # timing.py, also under `python -P`
from timing import median_seconds  # noqa: E402


def time_ssd(kernel: str, seq: int, heads: int, head_dim: int, state: int, chunk: int, steps: int) -> float:
    """Median milliseconds of forward + backward over `steps` timed runs (after 2 warm-ups)."""
    os.environ["RAYTRON_SCAN_KERNEL"] = "triton" if kernel == "chunked" else ""
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(1, seq, heads, head_dim, device=dev, dtype=bf, requires_grad=True)
    dt = F.softplus(torch.randn(1, seq, heads, device=dev) - 3).to(bf).requires_grad_()
    a = (-torch.rand(heads, device=dev) - 0.5).to(bf).requires_grad_()
    b_in, c_in = (torch.randn(1, seq, state, device=dev, dtype=bf, requires_grad=True) for _ in range(2))
    starts = torch.zeros(1, seq, dtype=torch.bool, device=dev)
    starts[:, 1000::1000] = True
    probe = torch.randn_like(x)
    return 1e3 * median_seconds(lambda: (ssd(x, dt, a, b_in, c_in, chunk, starts, kernel=kernel) * probe).sum()
                                .backward(), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    for flavor in ("1b-mamba", "1b"):
        cfg = get_config("hybrid", flavor)
        dims = (cfg.linear_heads, cfg.linear_head_dim, cfg.ssm_state_dim, cfg.chunk_size)
        for seq in args.seqs:
            row = dict(flavor=flavor, heads=dims[0], head_dim=dims[1], state=dims[2], chunk=dims[3], seq=seq)
            for kernel in ("triton", "chunked"):
                try:
                    row[f"{kernel}_ms"] = round(time_ssd(kernel, seq, *dims, args.steps), 3)
                except torch.OutOfMemoryError:
                    row[f"{kernel}_ms"] = "out of memory"
                    torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
