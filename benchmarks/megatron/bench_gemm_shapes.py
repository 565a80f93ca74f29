"""The GEMMs of one dense training step, timed alone: how fast cuBLAS runs the exact matmuls of the megatron
engine's dense-1b step (bench_throughput.py: micro-batch 8, seq 4096, 4 micro-batches a step) on this GPU.

Every linear layer of a step runs three GEMMs per micro-batch: forward Y = X W^T, input gradient dX = dY W,
and weight gradient main_grad += dY^T X. Variants, each timed alone after warm-up with CUDA events:
- `bf16`: what the engine runs (parallelism/megatron/kernels.py): bf16 mm forward and dgrad, the weight
  gradient as one bf16 GEMM accumulating into the fp32 main_grad (addmm, out_dtype fp32, beta 1);
- `bf16_wgrad_bf16_out`: the weight gradient written as bf16 without accumulation (what the fp32 C costs);
- `fp8`: torch._scaled_mm, e4m3 inputs with per-tensor scales, bf16 out (FP8 training's GEMMs; casts and
  scaling not counted), where the GPU has FP8 tensor cores.
Per shape: ms per call and TF/s; per variant: the GEMM time of one optimizer step (sum over shapes x calls),
to set against the GEMM kernels of a profiled step (kernel_budget.py).

    python benchmarks/megatron/bench_gemm_shapes.py --out FILE.jsonl [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from raytron import models

MICRO_BATCH, SEQ, GRAD_ACCUM = 8, 4096, 4  # bench_throughput.py's dense-1b on one GPU


def linear_shapes(cfg, micro_batch: int = MICRO_BATCH, seq: int = SEQ, grad_accum: int = GRAD_ACCUM) -> list[dict]:
    """The linear layers of a dense model's step: name, tokens M, out N, in K, calls per step (each call is
    one forward, one dgrad and one wgrad GEMM). Fused QKV (GQA) and fused gate/up as in megatron-core."""
    hd = cfg.head_dim or cfg.dim // cfg.num_heads
    per_layer = cfg.num_layers * grad_accum
    m = micro_batch * seq
    return [dict(name="qkv", m=m, n=(cfg.num_heads + 2 * cfg.num_kv_heads) * hd, k=cfg.dim, calls=per_layer),
            dict(name="proj", m=m, n=cfg.dim, k=cfg.num_heads * hd, calls=per_layer),
            dict(name="fc1", m=m, n=2 * cfg.ffn_dim, k=cfg.dim, calls=per_layer),
            dict(name="fc2", m=m, n=cfg.dim, k=cfg.ffn_dim, calls=per_layer),
            dict(name="output", m=m, n=cfg.vocab_size, k=cfg.dim, calls=grad_accum)]


def step_gemm_flops(shapes: list[dict]) -> float:
    return sum(3 * 2 * s["m"] * s["n"] * s["k"] * s["calls"] for s in shapes)


def _time_ms(fn, reps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _passes(s: dict, variant: str):
    """name -> zero-argument GEMM call, for one shape and variant (operands allocated here)."""
    m, n, k, dev = s["m"], s["n"], s["k"], "cuda"
    x, dy = torch.randn(m, k, device=dev, dtype=torch.bfloat16), torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    if variant == "fp8":
        f8, one = torch.float8_e4m3fn, torch.ones((), device=dev)
        x8, dy8, w8 = x.to(f8), dy.to(f8), w.to(f8)
        w8_kn = w8.t().contiguous().t()          # dgrad's right operand, column-major
        dyt8, x8_cm = dy8.t().contiguous(), x8.t().contiguous().t()
        mm8 = torch._scaled_mm
        return {"fwd": lambda: mm8(x8, w8.t(), one, one, out_dtype=torch.bfloat16),
                "dgrad": lambda: mm8(dy8, w8_kn, one, one, out_dtype=torch.bfloat16),
                "wgrad": lambda: mm8(dyt8, x8_cm, one, one, out_dtype=torch.bfloat16)}
    main_grad = torch.zeros(n, k, device=dev, dtype=torch.float32)
    wgrad = (lambda: torch.mm(dy.t(), x)) if variant == "bf16_wgrad_bf16_out" else \
        (lambda: torch.addmm(main_grad, dy.t(), x, out_dtype=torch.float32, out=main_grad))
    return {"fwd": lambda: torch.mm(x, w.t()), "dgrad": lambda: torch.mm(dy, w), "wgrad": wgrad}


def run(reps: int, variants: list[str]) -> list[dict]:
    cfg = models.get_config("dense", "1b")
    shapes, gpu = linear_shapes(cfg), torch.cuda.get_device_name()
    records = []
    for variant in variants:
        step_ms = 0.0
        for s in shapes:
            for name, fn in _passes(s, variant).items():
                ms = _time_ms(fn, reps)
                step_ms += ms * s["calls"]
                records.append(dict(kind="gemm", variant=variant, shape=s["name"], gemm_pass=name, m=s["m"], n=s["n"],
                                    k=s["k"], calls_per_step=s["calls"], ms=ms, tflops=2 * s["m"] * s["n"] * s["k"] / ms / 1e9,
                                    gpu=gpu))
            torch.cuda.empty_cache()
        flops = step_gemm_flops(shapes)
        records.append(dict(kind="step", variant=variant, workload="dense-1b", micro_batch=MICRO_BATCH, seq=SEQ,
                            grad_accum=GRAD_ACCUM, gemm_ms_per_step=step_ms, gemm_tflops=flops / step_ms / 1e9,
                            gemm_flops_per_step=flops, gpu=gpu))
        print(f"[gemm] {variant}: {step_ms:.1f} ms of GEMMs a step, {flops / step_ms / 1e9:.0f} TF/s", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--variants", default="bf16,bf16_wgrad_bf16_out,fp8")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (run it through the device tool: benchmarks/megatron/README.md)")
    variants = args.variants.split(",")
    if "fp8" in variants and torch.cuda.get_device_capability() < (8, 9):
        variants.remove("fp8")
    records = run(args.reps, variants)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
