#!/usr/bin/env bash
# The one-GPU parts of the GPU tier at this tree, in one device call (~300 s):
#   run(command="bash scripts/gpu_one_gpu.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=400)
# 1. alone on the GPU: one profiled FP8 step of dense-1b (benchmarks/megatron/bench_throughput.py --profile: the
#    kernel table that attributes FP8's cost);
# 2. side by side (nothing timed): `pytest -m gpu` on the one-GPU cases of tests/gpu (RAYTRON_GPU_WORLDS=1:
#    single-GPU equivalence of every family, init_from, kernels) and of tests/ops (Triton scans, FlexAttention
#    masks, grouped experts, FP8 fast paths); and `raytron submit` of moe/deepseek-small-mla (sigmoid router
#    with the aux-loss-free bias, shared experts, MLA) on the megatron engine, 20 steps.
# To $OUT: gpus.csv, bench.jsonl, junit_gpu.xml, junit_ops.xml, logs.tar.gz (logs, the profile, the run's metrics).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
out=${OUT:-$root/benchmarks/results/local}; mkdir -p "$out"; logs=/tmp/one_gpu_logs; mkdir -p "$logs"
runs=/tmp/one_gpu_runs; rm -rf "$runs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1
timeout 100 torchrun --nproc_per_node=1 benchmarks/megatron/bench_throughput.py --impls raytron --workloads dense-1b \
  --precisions fp8 --warmup 1 --timed 2 --profile "$logs/profile" --out "$out/bench.jsonl" > "$logs/bench.log" 2>&1
echo "[bench] rc=$?"; grep -h '^\[bench\]' "$logs/bench.log" | tail -2
pytest_gpu() {  # name, paths...
  local name=$1; shift
  RAYTRON_GPU_WORLDS=1 timeout 190 python3 -P -m pytest -m gpu -p no:cacheprovider -q -rfE --log-level=WARNING \
    --junitxml="$out/junit_$name.xml" "$@" > "$logs/pytest_$name.log" 2>&1
  echo "[pytest $name] rc=$?"; tail -4 "$logs/pytest_$name.log"
}
pytest_gpu gpu tests/gpu &
pytest_gpu ops tests/ops &
(cd /tmp && timeout 190 python3 -P -m raytron.launcher.cli submit "$root/cluster_configs/gpu_megatron_2gpu.yaml" \
   --name deepseek-small-mla --set resources.workers=1 --set layout.ep=1 --set layout.dp=1 \
   --set model.flavor=deepseek-small-mla --set train.steps=20 --set train.seq_len=1024 --set train.micro_batch_size=4 \
   --set train.global_batch_size=8 --set train.eval_every=10 --set checkpoint.every=20 --set "checkpoint.uri=$runs" \
   > "$logs/mla_submit.log" 2>&1
 echo "[submit] deepseek-small-mla rc=$?"; grep -E 'step (1|10|20)/20|error|Error' "$logs/mla_submit.log" | tail -4
 cp "$runs/deepseek-small-mla/metrics.jsonl" "$logs/mla_metrics.jsonl" 2>/dev/null) &
wait
tar czf "$out/logs.tar.gz" -C "$logs" .
