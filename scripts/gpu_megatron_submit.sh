#!/usr/bin/env bash
# `raytron submit` with the megatron engine on a GPU machine (2 GPUs; SUBMIT_GPUS picks them), end to end:
#   run(command="bash scripts/gpu_megatron_submit.sh", carry=[".whl"], kind="nvidia-h100-x2", timeout_s=420)
# 1. first:     cluster_configs/gpu_megatron_2gpu.yaml, 30 steps (MoE EP2, checkpoints at 10, 20, 30);
# 2. resumed:   the same run, --resume --set train.steps=60 (continues from step 30);
# 3. straight:  the same config uninterrupted for 60 steps under another name (the curve to match);
# 4. relayout:  a copy of run 1 at step 30 resumed under PP2 (ep 1) to step 45: the canary restore checks
#               every resharded tensor against the checkpoint before training continues.
# 1 and 3 run side by side, then 2 and 4 (each submit its own embedded Ray; 3 and 4 on SUBMIT_GPUS_B),
# or one after another when SUBMIT_GPUS_B is SUBMIT_GPUS (the default: a 2-GPU machine). Then scripts/compare_resume.py compares 2 and 4
# with 3 (tests/gpu/test_megatron_submit.py judges them). To $OUT: resume_compare.json,
# relayout_compare.json, the four submit logs (written there as they run), submit.tar.gz (the run
# directories without the data cache and checkpoint tensors).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
out=${OUT:-$root/benchmarks/results/local}; mkdir -p "$out"  # logs go there as they are written (a cut run keeps them)
runs=${RUNS:-/tmp/runs}; cfg=$root/cluster_configs/gpu_megatron_2gpu.yaml
t0=$(date +%s); budget=${SUBMIT_BUDGET_S:-400}
gpus_a=${SUBMIT_GPUS:-0,1}; gpus_b=${SUBMIT_GPUS_B:-$gpus_a}
submit() {  # log name, GPUs, extra args
  local name=$1 gpus=$2; shift 2
  local left=$(( budget - ($(date +%s) - t0) )); [ "$left" -lt 170 ] || left=170; [ "$left" -gt 5 ] || left=5
  (cd /tmp && CUDA_VISIBLE_DEVICES=$gpus timeout "$left" python3 -P -m raytron.launcher.cli submit "$cfg" \
     --set "checkpoint.uri=$runs" "$@" > "$out/$name.log" 2>&1)
  echo "[submit] $name rc=$? after $(( $(date +%s) - t0 ))s"; grep -E '^\[raytron\]|error' "$out/$name.log" | tail -6
}
# Side by side only on separate GPUs: two runs sharing GPUs were seen to drift apart (2x H200: 0.17 in loss
# by step 29, where the bar is bitwise equality; float atomics ordered differently under contention, likely).
shared=$([ "$gpus_a" = "$gpus_b" ] && echo 1 || echo 0)
submit first "$gpus_a" & [ "$shared" = 1 ] && wait
submit straight "$gpus_b" --name gpu-megatron-2gpu-straight --set train.steps=60 &
wait
cp -r "$runs/gpu-megatron-2gpu" "$runs/gpu-megatron-2gpu-relayout"
submit resumed "$gpus_a" --set train.steps=60 --resume & [ "$shared" = 1 ] && wait
submit relayout "$gpus_b" --name gpu-megatron-2gpu-relayout --set train.steps=45 --set layout.pp=2 --set layout.dp=1 \
  --set layout.ep=1 --resume &
wait
python3 scripts/compare_resume.py "$runs/gpu-megatron-2gpu" "$runs/gpu-megatron-2gpu-straight" 30 > "$out/resume_compare.json"
python3 scripts/compare_resume.py "$runs/gpu-megatron-2gpu-relayout" "$runs/gpu-megatron-2gpu-straight" 30 \
  > "$out/relayout_compare.json"
for f in resume relayout; do python3 -c "
import json; r = json.load(open('$out/${f}_compare.json'))
print('[submit] $f:', {k: r[k] for k in ('steps_logged', 'repeated_steps', 'missing_steps', 'loss_at', 'straight_loss_at',
      'max_abs_dloss_before_resume', 'max_abs_dloss_after_resume', 'steps_compared_after_resume', 'committed_checkpoints')})"; done
grep -h "canary\|resumed from" "$out"/{first,straight,resumed,relayout}.log | sort | uniq
(cd "$(dirname "$runs")" && tar czf "$out/submit.tar.gz" --exclude='_data_cache' --exclude='state-*.pt' "$(basename "$runs")")
pack_out 'resume_compare*.json' gpus.csv
