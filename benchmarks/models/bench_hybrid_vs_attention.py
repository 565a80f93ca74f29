"""Tokens/s (forward + backward) of one hybrid layer stack vs one attention stack, at 4K/16K/32K/64K.

Stacks are raytron reference layers (no embedding / logits), bf16, batch 1 (with --study: the study sweep's):
  attention: "*-*-*-*-"   hybrid GDN: "G-G-G-*-"   hybrid Mamba2: "M-M-M-*-"  (3:1 linear:attention)
with the hidden sizes of the `hybrid/1b` flavor. Writes benchmarks/results/hybrid_vs_attention_<gpu>.json.
Linear-sequence stacks run once per kernel in --kernels: `default`, whatever the training path picks on this
GPU (no kernel variable set, as the engine runs it); `fused`, the fused Triton kernels asked for by name
(ops/gated_delta_fused.py for Gated DeltaNet, ops/ssd_fused.py for Mamba2: the training defaults on CUDA);
`triton` or `torch`, the chunked PyTorch forms over that state-scan kernel (ops/state_scan.py; `torch` is a
Python loop over chunks). Rows name the kernel (`scan_kernel`) and, for Mamba2 stacks, the SSD path.
Usage (GPU): python benchmarks/models/bench_hybrid_vs_attention.py [--seqs 4096 16384 32768 65536] [--compile]
With --study DIR/results.json the stacks are the study's full_attention, gdn_hybrid and mamba2_hybrid models
(their solved shapes, all their layers) instead, each row carries the study sweep's whole-model tokens/s at that
context and their ratio (each context timed at the sequences per pass the study's sweep used), and the agreement table is appended to DIR/report.md: with a byte-sized vocabulary
the embedding and logits cost next to nothing, so the two measurements should agree within timing noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import os
import pathlib

import torch
from torch import nn

from raytron.models import get_config
from raytron.models.config import ModelConfig
from raytron.models.flops import flops_per_token
from raytron.models.transformer import Layer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # timing.py, also under `python -P`
from timing import median_seconds  # noqa: E402

STACKS = {"attention": "*-*-*-*-", "hybrid-gdn": "G-G-G-*-", "hybrid-mamba2": "M-M-M-*-"}
STUDY_FAMILIES = {"attention": "full_attention", "hybrid-gdn": "gdn_hybrid", "hybrid-mamba2": "mamba2_hybrid"}
AGREEMENT = 0.15  # |bench / study - 1| counted as agreeing: the spread of repeated short timings on one GPU


def stack_configs(study_results: str | None) -> dict[str, tuple[ModelConfig, dict[int, dict]]]:
    """Stack name -> (model config, {context: study sweep row}); hybrid/1b shapes without a study."""
    if study_results is None:
        return {name: (get_config("hybrid", "1b", pattern=pattern), {}) for name, pattern in STACKS.items()}
    families = json.loads(pathlib.Path(study_results).read_text())["families"]
    missing = [fam for fam in STUDY_FAMILIES.values() if fam not in families]
    if missing:
        raise SystemExit(f"--study {study_results}: no measured {', '.join(missing)} in it (failed or not run)")
    return {name: (ModelConfig(**families[fam]["model"]),
                   {r["seq"]: r for r in families[fam]["sweep"] if "tokens_per_s" in r})
            for name, fam in STUDY_FAMILIES.items()}


def agreement_markdown(rows: list[dict]) -> str:
    """The report section comparing the bench's layer-stack tokens/s with the study sweep's."""
    lines = ["## Agreement with benchmarks/models/bench_hybrid_vs_attention.py", "",
             f"Layer stacks of the study's models timed by the benchmark (median of its passes) against the "
             f"study sweep's whole-model forward+backward tokens/s; agreeing within {AGREEMENT:.0%}.", "",
             "| stack | family | context | bench tokens/s | study tokens/s | bench / study | agrees |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ratio" in r:
            lines.append(f"| {r['stack']} | {STUDY_FAMILIES[r['stack']]} | {r['seq']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['study_tokens_per_s']:,.0f} | {r['ratio']:.3f} | "
                         f"{'yes' if abs(r['ratio'] - 1) <= AGREEMENT else 'no'} |")
    return "\n".join(lines) + "\n"


def build_stack(cfg: ModelConfig) -> nn.Module:
    return nn.Sequential(*(Layer(kind, cfg) for kind in cfg.layer_pattern())).cuda().bfloat16()


def time_stack(stack: nn.Module, dim: int, seq: int, steps: int, batch: int = 1) -> float:
    """Median seconds of one forward + backward of `batch` sequences over `steps` timed runs (after 2 warm-ups)."""
    x = torch.randn(batch, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return median_seconds(lambda: stack(x).float().square().mean().backward(), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile each stack")
    parser.add_argument("--kernels", nargs="+", default=["fused", "triton", "torch"],
                        help="kernels for G/M stacks: default (the training path's own choice), fused, or a "
                             "state-scan kernel (triton, torch) under the chunked forms")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--study", default=None, metavar="RESULTS_JSON",
                        help="time the stacks of this `raytron study` results.json and compare with its sweep")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    rows = []
    configs = stack_configs(args.study)
    runs = [(name, cfg, kernel) for name, (cfg, _) in configs.items()
            for kernel in (args.kernels if set(cfg.layer_pattern()) & set("GM") else [None])]
    for name, cfg, kernel in runs:
        pattern = cfg.layer_pattern()
        fused, named = kernel == "fused", kernel not in (None, "default", "fused")
        os.environ["RAYTRON_SCAN_KERNEL"] = kernel if named else ""
        os.environ["RAYTRON_GDN_KERNEL"] = "fused" if fused and "G" in pattern else ""
        os.environ["RAYTRON_SSD_KERNEL"] = ("triton" if fused else "chunked" if named else "") if "M" in pattern else ""
        ssd_kernel = (os.environ["RAYTRON_SSD_KERNEL"] or "default") if "M" in pattern else None
        stack = build_stack(cfg)
        if args.compile:
            stack = torch.compile(stack)
        for seq in args.seqs:
            study_row = configs[name][1].get(seq)
            batch = study_row.get("batch", 1) if study_row else 1
            row = dict(stack=name, pattern=pattern, scan_kernel=kernel, ssd_kernel=ssd_kernel, seq=seq, batch=batch)
            try:
                seconds = time_stack(stack, cfg.dim, seq, args.steps, batch)
            except torch.OutOfMemoryError:
                rows.append(dict(row, error="out of memory"))
                torch.cuda.empty_cache()
                continue
            flops = flops_per_token(cfg, seq)
            layer_flops = flops["total"] - flops["output"]  # MFU convention, layers only
            rows.append(dict(row, seconds=seconds, tokens_per_s=batch * seq / seconds,
                             tflops_per_s=layer_flops * batch * seq / seconds / 1e12))
            if study_row:
                rows[-1].update(study_tokens_per_s=study_row["tokens_per_s"],
                                ratio=rows[-1]["tokens_per_s"] / study_row["tokens_per_s"])
            print(json.dumps(rows[-1]), flush=True)
        del stack
        torch.cuda.empty_cache()
    result = dict(gpu=gpu, torch=torch.__version__, dtype="bfloat16", compile=args.compile, study=args.study,
                  flops_convention="megatron (causal scores halved, matmuls only, layers only)", rows=rows)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"hybrid_vs_attention{'_study' if args.study else ''}_{gpu.replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    if args.study:
        section = agreement_markdown(rows)
        print(section)
        with open(pathlib.Path(args.study).with_name("report.md"), "a") as report:
            report.write("\n" + section)


if __name__ == "__main__":
    main()
