"""Tokens/s of the layers' causal short conv + SiLU, forward + backward, bf16, through the PyTorch path
(`F.silu(short_conv)`: K shifted multiply-adds with a cat per tap) and the fused Triton kernels
(ops/short_conv_triton.py), at the conv widths of `hybrid/1b` (Gated DeltaNet q/k/v, 6144 channels, contiguous)
and `hybrid/1b-mamba` (Mamba2 x/B/C, 2304 channels, a split of the in_proj output), K = 4, the 4K workload's
micro-batch (8 x 4096 tokens) in packed documents of 2K. Each row also holds the relative error of the Triton
y, dx, dweight against the PyTorch path (both bf16, the PyTorch path rounding after every tap: ~5e-3 expected;
the float64 comparisons are tests/ops/test_short_conv_triton_gpu.py's), and milliseconds of the Triton path
under each of TILES.
Usage (GPU): python benchmarks/models/bench_short_conv.py [--batch 8 --seq 4096] [--out benchmarks/results]
Writes short_conv_<gpu>.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import torch
import torch.nn.functional as F

from raytron.models import get_config
from raytron.ops.short_conv import short_conv
from raytron.ops import short_conv_triton
from raytron.ops.short_conv_triton import short_conv_silu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # timing.py, also under `python -P`
from timing import median_seconds  # noqa: E402

KERNELS = {"torch": lambda x, w, d: F.silu(short_conv(x, w, d)), "triton": short_conv_silu}
# (forward, backward) tiles (rows, channels, warps) of ops/short_conv_triton.py: its defaults first, then
# alternatives that also compile for sm_90 without spills at K = 4 (a row's `tiles` field says which is fastest)
TILES = [((32, 128, 4), (16, 64, 4)), ((16, 128, 4), (32, 64, 8)), ((64, 128, 8), (16, 128, 8)),
         ((8, 256, 4), (8, 64, 2))]


def conv_widths() -> dict[str, tuple[int, int, int]]:
    """layer -> (conv channels, their offset in the projection output, that output's width)."""
    gdn, mamba = get_config("hybrid", "1b"), get_config("hybrid", "1b-mamba")
    gdn_c = 3 * gdn.linear_heads * gdn.linear_head_dim
    inner = mamba.linear_heads * mamba.linear_head_dim
    mamba_c = inner + 2 * mamba.ssm_state_dim
    return {"gdn hybrid/1b": (gdn_c, 0, gdn_c), "mamba2 hybrid/1b-mamba": (mamba_c, inner,
                                                                            inner + mamba_c + mamba.linear_heads)}


def run(kernel: str, buf, weight, offset: int, c: int, doc_ids, probe):
    """One forward + backward; returns (y, dx, dweight)."""
    b, w = buf.detach().requires_grad_(), weight.detach().requires_grad_()
    y = KERNELS[kernel](b[..., offset:offset + c], w, doc_ids)
    db, dw = torch.autograd.grad(y, [b, w], probe)
    return y, db[..., offset:offset + c], dw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--doc", type=int, default=2048, help="document length of the packing (0: none)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    gpu, dev, bf = torch.cuda.get_device_name(), "cuda", torch.bfloat16
    doc_ids = None
    if args.doc:
        doc_ids = (torch.arange(args.seq, device=dev) // args.doc).expand(args.batch, -1).contiguous()
    rows = []
    for layer, (c, offset, total) in conv_widths().items():
        buf = torch.randn(args.batch, args.seq, total, device=dev, dtype=bf)
        weight = (torch.randn(c, 4, device=dev) / 2).to(bf)
        probe = torch.randn(args.batch, args.seq, c, device=dev, dtype=bf)
        row = dict(layer=layer, channels=c, batch=args.batch, seq=args.seq, doc=args.doc, k=4)
        outs = {}
        for kernel in KERNELS:
            seconds = median_seconds(lambda: run(kernel, buf, weight, offset, c, doc_ids, probe), args.steps)
            outs[kernel] = run(kernel, buf, weight, offset, c, doc_ids, probe)
            row[f"{kernel}_ms"] = round(seconds * 1e3, 3)
            row[f"{kernel}_tokens_per_s"] = round(args.batch * args.seq / seconds)
        row["speedup"] = round(row["torch_ms"] / row["triton_ms"], 2)
        row["tiles"] = {}
        for fwd, bwd in TILES:
            short_conv_triton.FWD_TILE, short_conv_triton.BWD_TILE = fwd, bwd
            seconds = median_seconds(lambda: run("triton", buf, weight, offset, c, doc_ids, probe), args.steps)
            row["tiles"][f"fwd {fwd} bwd {bwd}"] = round(seconds * 1e3, 3)
        short_conv_triton.FWD_TILE, short_conv_triton.BWD_TILE = TILES[0]
        row["rel_error"] = {name: float((a.double() - r.double()).norm() / r.double().norm())
                            for name, a, r in zip(("y", "dx", "dweight"), outs["triton"], outs["torch"])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = dict(gpu=gpu, torch=torch.__version__, dtype="bfloat16", timing="median of forward + backward",
                  command="python benchmarks/models/bench_short_conv.py " + " ".join(sys.argv[1:]), rows=rows)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"short_conv_{gpu.replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
