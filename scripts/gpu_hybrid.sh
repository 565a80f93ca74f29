#!/usr/bin/env bash
# Hybrid vs attention speed on one H200, in one device call of at most ~540 s:
#   run(command="bash scripts/gpu_hybrid.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=600)
# Phases and honest estimates (wall seconds; each has a timeout, a cut phase keeps what it wrote):
#   0. setup: wheelhouse install (fresh machine), nvidia-smi                                 ~40 s
#   1. alone: layer stacks (benchmarks/models/bench_hybrid_vs_attention.py: attention vs the GDN and Mamba2
#      3:1 stacks at 4K/16K/32K/64K with the training path's own scan kernels; Triton compiles first) ~60 s (limit 110)
#   2. alone: whole models (benchmarks/megatron/bench_throughput.py, megatron engine): dense/1b, hybrid/1b and
#      hybrid/1b-mamba at 65,536 tokens per step, 1 warm-up + 2 timed steps, one torchrun per length: ~20 s
#      of launch + ~25-35 s per model (build, first-step compiles, 3 steps of 0.7-3 s):
#      4K ~100 s and 32K ~120 s always (limit 150 each); 16K (limit 150) and 64K (limit 170) only if phase 3's
#      180 s still fit after them, which on a fresh machine they do not (second call below)
#   3. side by side (nothing timed there): `raytron submit cluster_configs/hybrid_1b_64k_1gpu.yaml` (64K tokens,
#      5 steps, checkpoint at the end; its peak memory is what counts; ~20 s Ray + ~30 s build + ~20 s steps
#      + ~30 s checkpoint) beside `pytest -m gpu tests/ops` (~145 s when last run beside other work)
#                                                                                 ~150 s (limits 170 / 150)
#   4. tests/gpu/summarize_results.py --hybrid: hybrid_<gpu>.json (records, ratios vs targets)   ~5 s
# In all ~480 s; HYBRID_BUDGET_S (default 540) bounds it (phase 3's limits shrink to what is left).
# WHOLE_SEQS (default "4k 32k 16k 64k") picks the phase-2 lengths in order, PARTS (default
# "layers whole submit") the phases. The 16K/64K whole models alone in a second call (~330 s), then one summary
# of both folders:
#   run(command='PARTS=whole WHOLE_SEQS="16k 64k" bash scripts/gpu_hybrid.sh', carry=[".whl"], kind="nvidia-h200",
#       timeout_s=600)
#   python tests/gpu/summarize_results.py --hybrid OUT_FIRST OUT_SECOND --command "..."
# To $OUT: gpus.csv, commit.txt, timeline.json, layers/hybrid_vs_attention_<gpu>.json, whole.jsonl, submit.log,
# submit_metrics.jsonl, submit_committed.txt (checkpoint commit markers), junit_ops.xml, hybrid_<gpu>.json (the
# summary; commit it as benchmarks/results/hybrid_<gpu>.json), logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
out=${OUT:-$root/benchmarks/results/local}; mkdir -p "$out/layers"; logs=/tmp/hybrid_logs; mkdir -p "$logs"
runs=/tmp/hybrid_runs; rm -rf "$runs"
budget=${HYBRID_BUDGET_S:-540}; parts=" ${PARTS:-layers whole submit} "
reserve=0; [[ $parts == *" submit "* ]] && reserve=180  # what phase 3 needs after phase 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1
echo "${RAYTRON_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" > "$out/commit.txt"  # the device copy's .git may be stale
echo "[]" > "$out/timeline.json"
phase() {  # job name, timeout s, log file, command...: runs it, appends {job, start_s, end_s, rc, limit_s} to timeline.json
  local job=$1 limit=$2 log=$3 start=$SECONDS; shift 3
  timeout "$limit" "$@" > "$log" 2>&1; local rc=$?
  flock "$out/timeline.json" python3 -c "import json,sys; p=sys.argv[1]; t=json.load(open(p)); t.append(dict(job=sys.argv[2], start_s=int(sys.argv[3]),
end_s=int(sys.argv[4]), rc=int(sys.argv[5]), limit_s=int(sys.argv[6]))); json.dump(t, open(p, 'w'), indent=1)" \
    "$out/timeline.json" "$job" "$start" "$SECONDS" "$rc" "$limit"
  echo "[$job] rc=$rc after ${SECONDS}s"
}
left() { echo $(( budget - SECONDS )); }

[[ $parts == *" layers "* ]] && phase layers 110 "$logs/layers.log" python3 -P benchmarks/models/bench_hybrid_vs_attention.py --seqs 4096 16384 32768 65536 \
  --kernels default --steps 5 --out "$out/layers"
grep -h '"tokens_per_s"\|error' "$logs/layers.log" | tail -12

[[ $parts == *" whole "* ]] && for tag in ${WHOLE_SEQS:-4k 32k 16k 64k}; do
  limit=150; [ "$tag" = 64k ] && limit=170
  if [ "$tag" != 4k ] && [ "$tag" != 32k ] && [ $(( $(left) - limit )) -lt "$reserve" ]; then
    echo "[whole-$tag] skipped: $(left) s left, needs $limit + $reserve"; continue
  fi
  phase "whole-$tag" "$limit" "$logs/whole_$tag.log" torchrun --nproc_per_node=1 benchmarks/megatron/bench_throughput.py --impls raytron \
    --workloads "dense-1b-$tag,hybrid-1b-$tag,hybrid-1b-mamba-$tag" --warmup 1 --timed 2 --out "$out/whole.jsonl"
  grep -h '^\[bench\]' "$logs/whole_$tag.log" | tail -3
done

if [[ $parts == *" submit "* ]]; then
submit_limit=$(( $(left) - 10 )); [ "$submit_limit" -gt 170 ] && submit_limit=170; [ "$submit_limit" -gt 30 ] || submit_limit=30
(cd /tmp && phase submit-64k "$submit_limit" "$out/submit.log" python3 -P -m raytron.launcher.cli submit \
   "$root/cluster_configs/hybrid_1b_64k_1gpu.yaml" --set "checkpoint.uri=$runs"
 cp "$runs/hybrid-1b-64k-1gpu/metrics.jsonl" "$out/submit_metrics.jsonl" 2>/dev/null
 (cd "$runs" && find . -name COMMITTED | sort) > "$out/submit_committed.txt" 2>/dev/null
 ls -R "$runs" > "$logs/submit_runs.txt" 2>&1) &
ops_limit=$(( submit_limit < 150 ? submit_limit : 150 ))
phase pytest-ops "$ops_limit" "$logs/pytest_ops.log" python3 -P -m pytest -m gpu -p no:cacheprovider -q -rfE --log-level=WARNING \
  --junitxml="$out/junit_ops.xml" tests/ops &
wait
grep -E 'step [0-9]+/|error|Error' "$out/submit.log" | tail -4; tail -3 "$logs/pytest_ops.log"
fi

python3 -P tests/gpu/summarize_results.py --hybrid "$out" --command "PARTS='${parts:1:-1}' WHOLE_SEQS='${WHOLE_SEQS:-4k 32k 16k 64k}' bash scripts/gpu_hybrid.sh" \
  > "$logs/summary.log" 2>&1; echo "[summary] rc=$?"; tail -30 "$logs/summary.log"
tar czf "$out/logs.tar.gz" -C "$logs" .
pack_out 'hybrid_*.json' commit.txt gpus.csv timeline.json whole.jsonl
