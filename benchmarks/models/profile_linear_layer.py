"""Where the time of one linear-sequence layer goes: torch.profiler table (CUDA time, top kernels) of
forward + backward of one Gated DeltaNet and one Mamba2 layer of `hybrid/1b`, bf16, batch 1.
Usage (GPU): python benchmarks/models/profile_linear_layer.py [--seq 16384] [--out DIR]
Writes profile_<kind>_<seq>.txt under --out (not committed: a diagnosis aid, not a result)."""

from __future__ import annotations

import argparse
import pathlib

import torch
from torch.profiler import ProfilerActivity, profile

from raytron.models import get_config
from raytron.models.transformer import Layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for kind, flavor in (("G", "1b"), ("M", "1b-mamba")):
        cfg = get_config("hybrid", flavor)
        layer = Layer(kind, cfg).cuda().bfloat16()
        x = torch.randn(1, args.seq, cfg.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2):
            layer(x).float().square().mean().backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            layer(x).float().square().mean().backward()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        (out / f"profile_{kind}_{args.seq}.txt").write_text(table)
        print(f"== layer {kind} seq {args.seq}\n{table}", flush=True)


if __name__ == "__main__":
    main()
