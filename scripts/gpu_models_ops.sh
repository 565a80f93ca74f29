#!/usr/bin/env bash
# The GPU tier of the architecture zoo (ops/ and models/), one device call:
#   run(command="bash scripts/gpu_models_ops.sh", carry=[".whl"], kind="nvidia-h100-x1")
# 1. pytest -m gpu tests/ops: every fast kernel (Triton state scan, fused Triton SSD, FlexAttention masks,
#    grouped expert GEMM) vs its reference in bf16 at 4K/16K, plus the Triton kernels in float32;
# 2. benchmarks/models/bench_hybrid_vs_attention.py (hybrid vs attention stacks at 4K-64K, both scan
#    kernels, Mamba2 also through the fused Triton SSD kernels);
# 3. benchmarks/models/bench_ssd_kernels.py (one SSD call: fused Triton kernels vs the chunked form);
# 4. benchmarks/models/profile_linear_layer.py (where a GDN / Mamba2 layer's time goes).
# Writes logs and results under $OUT (or benchmarks/results/local).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
out=${OUT:-$root/benchmarks/results/local}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1
python3 -P -m pytest -m gpu -p no:cacheprovider -q -rA tests/ops 2>&1 | tee "$out/gpu_tests_models_ops.log"
status=${PIPESTATUS[0]}
timeout 540 python3 -P benchmarks/models/bench_hybrid_vs_attention.py --out "$out" 2>&1 | tee "$out/bench_hybrid.log"
timeout 240 python3 -P benchmarks/models/bench_ssd_kernels.py 2>&1 | tee "$out/bench_ssd.log"
timeout 120 python3 -P benchmarks/models/profile_linear_layer.py --out "$out/profile" > "$out/profile.log" 2>&1
pack_out gpus.csv
exit "$status"
