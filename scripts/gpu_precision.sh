#!/usr/bin/env bash
# One-GPU evidence for train.precision (FP8), train.recompute, the training-time MFU/memory metrics and
# model.init_from, in one device call:
#   run(command="bash scripts/gpu_precision.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=600)
# 1. throughput, each run alone on the GPU: dense-1b and moe-olmoe-4l in bf16 then fp8, dense-3b with
#    selective recomputation unless WITH_3B=0 (benchmarks/megatron/bench_throughput.py);
# 2. then side by side (nothing timed is compared across them): FP8 loss parity over PARITY_STEPS steps
#    (benchmarks/megatron/fp8_parity.py), the GPU tests of the FP8 fast paths and of init_from, and
#    `raytron submit` in fp8 on one GPU: 30 steps, --resume to 60, and an uninterrupted 60-step run
#    (scripts/compare_resume.py: the resumed curve must equal the uninterrupted one).
# To $OUT: gpus.csv, bench.jsonl, profile/ (kernel tables of one step per config), fp8_parity_<gpu>.json/.png, resume_compare.json, logs.tar.gz, submit.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
out=${OUT:-$root/benchmarks/results/local}; mkdir -p "$out"; logs=/tmp/precision_logs; mkdir -p "$logs"
runs=/tmp/precision_runs; rm -rf "$runs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1
bench() { timeout "$1" torchrun --nproc_per_node=1 benchmarks/megatron/bench_throughput.py --impls raytron \
  --out "$out/bench.jsonl" "${@:2}" >> "$logs/bench.log" 2>&1; grep -h '^\[bench\]' "$logs/bench.log" | tail -4; }
bench 180 --workloads dense-1b,moe-olmoe-4l --precisions bf16,fp8 --profile "$out/profile"
[ "${WITH_3B:-1}" = 1 ] && bench 120 --workloads dense-3b --recompute selective
(timeout 240 python3 -P benchmarks/megatron/fp8_parity.py --steps "${PARITY_STEPS:-500}" --batch 8 --out "$out" \
  > "$logs/parity.log" 2>&1; echo "[parity] rc=$?"; tail -3 "$logs/parity.log") &
cfg=cluster_configs/gpu_megatron_2gpu.yaml
one=(--set resources.workers=1 --set layout.ep=1 --set layout.dp=1 --set train.precision=fp8 --set "checkpoint.uri=$runs")
submit() {  # log name, extra args
  local name=$1; shift
  (cd /tmp && timeout 75 python3 -P -m raytron.launcher.cli submit "$root/$cfg" "${one[@]}" "$@" > "$logs/$name.log" 2>&1)
  echo "[submit] $name rc=$?"; grep -iE '^\[raytron\] (step|resumed|checkpoint step 60)|mfu|error' "$logs/$name.log" | tail -3
}
(timeout 60 python3 -P -m pytest -m gpu -p no:cacheprovider -q -rfE --log-level=WARNING \
   tests/gpu/test_megatron_init_from.py "tests/ops/test_fp8_gpu.py::test_grouped_fast_matches_reference" > "$logs/gpu_tests.log" 2>&1; tail -15 "$logs/gpu_tests.log"
 submit first
 submit straight --name gpu-megatron-2gpu-straight --set train.steps=60
 submit resumed --set train.steps=60 --resume
 python3 scripts/compare_resume.py "$runs/gpu-megatron-2gpu" "$runs/gpu-megatron-2gpu-straight" 30 > "$out/resume_compare.json"
 python3 -c "import json; r = json.load(open('$out/resume_compare.json')); print('[submit] fp8 resume:', {k: r.get(k) for k in
   ('steps_logged', 'repeated_steps', 'missing_steps', 'max_abs_dloss_before_resume', 'max_abs_dloss_after_resume')})") &
wait
(cd "$(dirname "$runs")" && tar czf "$out/submit.tar.gz" --exclude='_data_cache' --exclude='state-*.pt' "$(basename "$runs")")
tar czf "$out/logs.tar.gz" -C "$logs" .
pack_out resume_compare.json bench.jsonl gpus.csv 'fp8_parity_*.json'
