"""Tokens/s (forward + backward) of one hybrid layer stack vs one attention stack, at 4K/16K/32K/64K.

Stacks are raytron reference layers (no embedding / logits), bf16, batch 1:
  attention: "*-*-*-*-"   hybrid GDN: "G-G-G-*-"   hybrid Mamba2: "M-M-M-*-"  (3:1 linear:attention)
with the hidden sizes of the `hybrid/1b` flavor. Writes benchmarks/results/hybrid_vs_attention_<gpu>.json.
Linear-sequence stacks run once per state-scan kernel in --kernels (ops/state_scan.py: `triton`, the
training default on CUDA, and `torch`, the same chunked math with a Python loop over chunks; `default`: no
RAYTRON_SCAN_KERNEL, whatever the training path picks on this GPU, as the engine runs it). Mamba2 stacks under
`default` run the fused Triton SSD kernels (ops/ssd_fused.py, the training default on CUDA); under a named scan
kernel, the chunked PyTorch SSD form over that scan (`ssd_kernel` chunked).
Usage (GPU): python benchmarks/models/bench_hybrid_vs_attention.py [--seqs 4096 16384 32768 65536] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import torch
from torch import nn

from raytron.models import get_config
from raytron.models.flops import flops_per_token
from raytron.models.transformer import Layer

STACKS = {"attention": "*-*-*-*-", "hybrid-gdn": "G-G-G-*-", "hybrid-mamba2": "M-M-M-*-"}


def build_stack(pattern: str) -> tuple[nn.Module, object]:
    cfg = get_config("hybrid", "1b", pattern=pattern)
    stack = nn.Sequential(*(Layer(kind, cfg) for kind in pattern)).cuda().bfloat16()
    return stack, cfg


def time_stack(stack: nn.Module, dim: int, seq: int, steps: int) -> float:
    """Median seconds of one forward + backward over `steps` timed runs (after 2 warm-ups)."""
    x = torch.randn(1, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        stack(x).float().square().mean().backward()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile each stack")
    parser.add_argument("--kernels", nargs="+", default=["triton", "torch"],
                        help="scan kernels for G/M stacks: triton, torch or default (the training path's own choice)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    rows = []
    runs = [(name, pattern, kernel) for name, pattern in STACKS.items()
            for kernel in (args.kernels if set(pattern) & set("GM") else [None])]
    for name, pattern, kernel in runs:
        named = kernel not in (None, "default")
        os.environ["RAYTRON_SCAN_KERNEL"] = kernel if named else ""
        ssd_kernel = ("chunked" if named else "default") if "M" in pattern else None
        os.environ["RAYTRON_SSD_KERNEL"] = "chunked" if ssd_kernel == "chunked" else ""
        stack, cfg = build_stack(pattern)
        if args.compile:
            stack = torch.compile(stack)
        for seq in args.seqs:
            row = dict(stack=name, pattern=pattern, scan_kernel=kernel, ssd_kernel=ssd_kernel, seq=seq)
            try:
                seconds = time_stack(stack, cfg.dim, seq, args.steps)
            except torch.OutOfMemoryError:
                rows.append(dict(row, error="out of memory"))
                torch.cuda.empty_cache()
                continue
            flops = flops_per_token(cfg, seq)
            layer_flops = flops["total"] - flops["output"]  # MFU convention, layers only
            rows.append(dict(row, seconds=seconds, tokens_per_s=seq / seconds,
                             tflops_per_s=layer_flops * seq / seconds / 1e12))
            print(json.dumps(rows[-1]), flush=True)
        del stack
        torch.cuda.empty_cache()
    result = dict(gpu=gpu, torch=torch.__version__, dtype="bfloat16", batch=1, compile=args.compile,
                  flops_convention="megatron (causal scores halved, matmuls only, layers only)", rows=rows)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"hybrid_vs_attention_{gpu.replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
