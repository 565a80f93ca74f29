#!/usr/bin/env bash
# `raytron submit` across engines on one GPU (cluster_configs/gpu_cross_engine_1gpu.yaml, dense/debug):
#   run(command="bash scripts/gpu_cross_engine_submit.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=180)
# 1. first:    the deepspeed engine, 6 steps (checkpoints at 3 and 6);
# 2. straight: the same config uninterrupted for 12 steps under another name (the curve to match);
# 3. resumed:  run 1 resumed with engine megatron to step 12 (its state converted, canary restore).
# 1 and 2 run side by side, then 3. scripts/compare_resume.py compares 3 with 2 (tests/gpu/
# test_cross_engine_resume.py judges it). To $OUT: cross_engine_compare.json, cross_engine_manifests.json
# (the engine that wrote each committed step), the three submit logs.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
out=${OUT:-$root/benchmarks/results/local}; mkdir -p "$out"
runs=${RUNS:-/tmp/cross_engine_runs}; cfg=$root/cluster_configs/gpu_cross_engine_1gpu.yaml
rm -rf "$runs"
gpu=${SUBMIT_GPU:-0}; name=gpu-cross-engine-1gpu
submit() {  # log name, extra args
  local log=$1; shift
  (cd /tmp && CUDA_VISIBLE_DEVICES=$gpu timeout "${SUBMIT_TIMEOUT_S:-120}" python3 -P -m raytron.launcher.cli submit "$cfg" \
     --set "checkpoint.uri=$runs" "$@" > "$out/cross_engine_$log.log" 2>&1)
  echo "[cross-engine] $log rc=$?"; grep -E '^\[raytron\]|rror' "$out/cross_engine_$log.log" | tail -6
}
submit first &
submit straight --name "$name-straight" --set train.steps=12 &
wait
submit resumed --set engine=megatron --set train.steps=12 --resume
python3 scripts/compare_resume.py "$runs/$name" "$runs/$name-straight" 6 > "$out/cross_engine_compare.json"
python3 -c "
import glob, json, os
paths = sorted(glob.glob('$runs/$name/checkpoints/step-*/manifest.json'))
print(json.dumps({os.path.basename(os.path.dirname(p)): json.load(open(p))['engine'] for p in paths}))
" > "$out/cross_engine_manifests.json"
cat "$out/cross_engine_manifests.json"
