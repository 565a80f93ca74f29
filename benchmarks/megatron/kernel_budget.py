"""How much of the dense step megatron-core's local spec x N leaves for everything but the GEMMs and attention.

The throughput target asks the megatron engine for >= 5x megatron-core's local spec (dense-1b, one GPU). This reads the
kernel table of one profiled optimizer step (`bench_throughput.py --profile DIR`, "by self CUDA time") and the
local spec's measured rate from a bench JSON, and answers: at N x that rate, what step time is allowed; how
much of it the GEMMs and the attention kernels already take; and whether the kernels that remain, grouped by
what they do, could fit. The groups named in SINGLE_PASS each read and write their tensors once already (one
fused kernel forward, one backward), so fusing them with each other or dropping launches cannot shrink them
(only folding them into a GEMM's prologue/epilogue could); the rest (residual adds, cats and copies, small
kernels) is what fusions could still take. With --gemm (bench_gemm_shapes.py records) it also sets the
step's GEMMs timed alone, bf16 and FP8, against the budget.

    python benchmarks/megatron/kernel_budget.py \
        --profile benchmarks/results/megatron_profiles_NVIDIA_H100/profile_raytron_dense-1b_w1_mb8.txt \
        --bench benchmarks/results/megatron_throughput_NVIDIA_H100.json [--gemm GEMM.jsonl] [--factor 5] \
        [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# first match wins; kernel names as torch.profiler prints them (truncated at 90 characters)
GROUPS = (
    ("gemm", r"^nvjet_|gemm|cutlass|^sm90_xmma"),
    ("attention", r"cudnn|flash_|fmha"),
    ("swiglu", r"swiglu"),
    ("rmsnorm", r"rms_norm"),
    ("cross_entropy", r"log_softmax|nll_loss"),
    ("optimizer", r"multi_tensor_apply"),
    ("rope", r"_to_copy_add_cat_mul_neg_s"),
    # forward: the compiled bias-dropout-add; backward: autograd summing the residual stream's two gradients
    ("residual_add", r"^triton_poi_fused_add_\d+$|vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add"),
    ("cat_and_copies", r"CatArrayBatchedCopy|elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast|"
                       r"bfloat16_copy_kernel"),
)
SINGLE_PASS = ("swiglu", "rmsnorm", "cross_entropy", "optimizer", "rope")
_UNITS = {"s": 1e3, "ms": 1.0, "us": 1e-3}


def _ms(cell: str) -> float:
    value, unit = re.fullmatch(r"([0-9.]+)(s|ms|us)", cell).groups()
    return float(value) * _UNITS[unit]


def kernel_rows(table: str) -> tuple[list[tuple[str, float, int]], float]:
    """(kernel name, self CUDA ms, calls) of every device kernel in the profile's "by self CUDA time" table
    (rows with no CPU time: operator rows are left out, their kernels are listed on their own), and the table's
    "Self CUDA time total" in ms."""
    section = table.split("by self CUDA time", 1)
    if len(section) != 2:
        raise ValueError("no 'by self CUDA time' table: write the profile with bench_throughput.py --profile")
    rows = []
    for line in section[1].splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        # "#" marks a profiler annotation (e.g. "Optimizer.step#AdamW.step"): its time is its kernels' again
        if len(cells) == 11 and cells[2] == "0.000us" and cells[4] == "0.000us" and "#" not in cells[0]:
            rows.append((cells[0], _ms(cells[6]), int(cells[10])))
    total = re.search(r"Self CUDA time total: ([0-9.]+(?:s|ms|us))", section[1])
    if not rows or not total:
        raise ValueError("the kernel table has no kernel rows or no 'Self CUDA time total' line")
    return rows, _ms(total.group(1))


def group_of(name: str) -> str:
    return next((g for g, pattern in GROUPS if re.search(pattern, name)), "other")


def budget(table: str, bench: dict, factor: float, gemm: list[dict] | None = None, workload: str = "dense-1b") -> dict:
    """The kernel budget of a step at `factor` x the local spec's tokens/s (from `bench`, a bench JSON with
    1-GPU records) against the profiled step's kernels. Kernel time only: host gaps, which the allowed step
    must hold too, are left out, so what is left is an upper bound. `gemm`: bench_gemm_shapes.py records, for
    the same step's GEMMs timed alone."""
    rec = {r["impl"]: r for r in bench["records"] if r["workload"] == workload and r["world"] == 1}
    local, ours = rec["mcore_local"], rec["raytron"]
    tokens = ours["global_batch"] * ours["seq_len"]
    rows, total_ms = kernel_rows(table)
    groups: dict[str, float] = {}
    for name, ms, _ in rows:
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    groups["not in the table"] = total_ms - sum(ms for _, ms, _ in rows)
    allowed_ms = 1e3 * tokens / (factor * local["tokens_per_s_per_gpu"])
    core_ms = groups.get("gemm", 0.0) + groups.get("attention", 0.0)
    single = sum(groups.get(g, 0.0) for g in SINGLE_PASS)
    result = {"factor": factor, "workload": workload, "tokens_per_step": tokens,
              "mcore_local_tokens_per_s": round(local["tokens_per_s_per_gpu"], 1),
              "allowed_step_ms": round(allowed_ms, 1), "profiled_kernel_ms": round(total_ms, 1),
              "groups_ms": {g: round(v, 1) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
              "left_after_gemm_and_attention_ms": round(allowed_ms - core_ms, 1),
              "single_pass_groups": list(SINGLE_PASS), "single_pass_ms": round(single, 1),
              "kernel_ms_to_remove": round(total_ms - allowed_ms, 1),
              "rest_ms": round(total_ms - core_ms - single, 1)}
    if gemm:
        alone = {r["variant"]: r["gemm_ms_per_step"] for r in gemm if r["kind"] == "step"}
        result["gemm_alone_ms"] = {v: round(ms, 1) for v, ms in alone.items()}
        result["left_with_gemm_alone_ms"] = {v: round(allowed_ms - ms - groups.get("attention", 0.0), 1)
                                             for v, ms in alone.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="a profile table written by bench_throughput.py --profile")
    parser.add_argument("--bench", required=True, help="a megatron_throughput_*.json with 1-GPU records")
    parser.add_argument("--gemm", help="bench_gemm_shapes.py records (JSON lines) of the same GPU")
    parser.add_argument("--factor", type=float, default=5.0)
    parser.add_argument("--out", help="write the result as JSON here too")
    args = parser.parse_args(argv)
    gemm = [json.loads(line) for line in Path(args.gemm).read_text().splitlines() if line.strip()] if args.gemm else None
    result = budget(Path(args.profile).read_text(), json.loads(Path(args.bench).read_text()), args.factor, gemm)
    result |= {"profile": args.profile, "bench": args.bench, "gemm": args.gemm}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
