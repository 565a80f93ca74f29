"""Tokens/s (forward + backward) of one hybrid layer stack vs one attention stack, at 4K/16K/32K.

Stacks are raytron reference layers (no embedding / logits), bf16, batch 1:
  attention: "*-*-*-*-"   hybrid GDN: "G-G-G-*-"   hybrid Mamba2: "M-M-M-*-"  (3:1 linear:attention)
with the hidden sizes of the `hybrid/1b` flavor. Writes benchmarks/results/hybrid_vs_attention_<gpu>.json.
Linear-sequence stacks run once per kernel in --kernels: `fused` (GDN only: ops/gated_delta_fused.py, the
GDN training default on CUDA), and the chunked form with the state-scan kernel `triton` (Mamba2's
training default) or `torch` (a Python loop over chunks).
Usage (GPU): python benchmarks/models/bench_hybrid_vs_attention.py [--seqs 4096 16384 32768] [--compile]
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
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile each stack")
    parser.add_argument("--kernels", nargs="+", default=["fused", "triton", "torch"],
                        help="kernels for G/M stacks: fused (G only) or a state-scan kernel")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    rows = []
    runs = [(name, pattern, kernel) for name, pattern in STACKS.items()
            for kernel in (args.kernels if set(pattern) & set("GM") else [None])
            if kernel != "fused" or "G" in pattern]
    for name, pattern, kernel in runs:
        os.environ["RAYTRON_GDN_KERNEL"] = kernel or ""
        os.environ["RAYTRON_SCAN_KERNEL"] = "" if kernel == "fused" else kernel or ""
        stack, cfg = build_stack(pattern)
        if args.compile:
            stack = torch.compile(stack)
        for seq in args.seqs:
            row = dict(stack=name, pattern=pattern, scan_kernel=kernel, seq=seq)
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
