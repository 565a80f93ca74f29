#!/usr/bin/env bash
# Everything GPU-only for the megatron engine in one device call (4 GPUs):
#   run(command="bash scripts/gpu_megatron_all.sh", carry=[".whl"], kind="nvidia-h100-x4", timeout_s=600)
# Internal time limits keep the whole command under ~570 s (DEADLINE_S).
# 1. throughput benchmark (exclusive use of the GPUs): benchmarks/megatron/bench_throughput.py on 1 then 4 GPUs;
# 2. in parallel (timings not taken): the GPU test suite (scripts/gpu_tests.sh, all GPUs) and `raytron submit`
#    on GPUs 2,3 (scripts/gpu_megatron_submit.sh: train, --resume, uninterrupted twin, resume under PP2).
# Results under $OUT (at most 8 files): all.log, bench.jsonl, bench_logs.tar.gz, gpu_tests.tar.gz,
# submit.tar.gz, resume_compare.json, relayout_compare.json, gpus.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/benchmarks/results/local}
mkdir -p "$out"
exec > >(tee -a "$out/all.log") 2>&1
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1
cat "$out/gpus.csv"; ngpu=$(nvidia-smi -L | wc -l)
echo "[all] installed at $(elapsed)s; $ngpu GPUs"

# ---- 1. benchmark ------------------------------------------------------------------------------------
mkdir -p /tmp/bench
bench() {  # world, time limit
  timeout "$2" python3 -P -m torch.distributed.run --nproc_per_node="$1" --master_port=29540 \
    benchmarks/megatron/bench_throughput.py --out "$out/bench.jsonl" > "/tmp/bench/bench_w$1.log" 2>&1
  echo "[all] bench world $1 rc=$? at $(elapsed)s"; grep '^\[bench\]' "/tmp/bench/bench_w$1.log"
}
bench 1 "${BENCH_W1_S:-130}"
[ "$ngpu" -ge 4 ] && bench 4 "${BENCH_W4_S:-140}"
tar czf "$out/bench_logs.tar.gz" -C /tmp bench

# ---- 2. GPU tests || raytron submit ---------------------------------------------------------------------
deadline=${DEADLINE_S:-570}  # seconds after the start by which everything must have ended
left() { local l=$(( deadline - $(elapsed) )); [ "$l" -gt 5 ] && echo "$l" || echo 5; }
(OUT=/tmp/gpu_tests timeout "$(left)" bash scripts/gpu_tests.sh > /tmp/gpu_tests_console.log 2>&1
 echo $? > /tmp/gpu_tests.rc) &
tests_pid=$!
SUBMIT_GPUS=2,3 SUBMIT_BUDGET_S=$(( $(left) - 10 )) bash scripts/gpu_megatron_submit.sh
wait $tests_pid
echo "[all] gpu tests rc=$(cat /tmp/gpu_tests.rc 2>/dev/null) at $(elapsed)s"; tail -40 /tmp/gpu_tests_console.log
cp /tmp/gpu_tests_console.log /tmp/gpu_tests/console.log 2>/dev/null
tar czf "$out/gpu_tests.tar.gz" -C /tmp gpu_tests
echo "[all] done at $(elapsed)s"
