#!/usr/bin/env bash
# Everything GPU-only for the megatron engine (4 GPUs):
#   run(command="bash scripts/gpu_megatron_all.sh", carry=[".whl"], kind="nvidia-h100-x4", timeout_s=600)
# Internal time limits keep the command under DEADLINE_S (default 570 s, the device tool's call limit), but
# all parts together take ~15 minutes on 4x H200: GPU_ALL_PARTS picks parts (default "bench tests submit");
# run them as separate calls (tests/gpu/README.md lists them; DEADLINE_S=1200 where no call limit applies).
# 1. throughput benchmark (exclusive use of the GPUs): benchmarks/megatron/bench_throughput.py on 1 then 4 GPUs,
#    then TorchTitan 0.3.0 on the same workload (benchmarks/megatron/bench_torchtitan.py, its wheels in .whl/titan/:
#    BENCH_TITAN=0 leaves it out; GPU_ALL_PARTS=titan runs it alone; TITAN_CUDA_GRAPHS="on off" by default: its
#    trainer's CUDA-graph capture first, eager if that run fails);
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
parts=${GPU_ALL_PARTS:-bench tests submit}
has() { case " $parts " in *" $1 "*) return 0;; esac; return 1; }
bench() {  # world, time limit, impls, extra bench_throughput.py flags
  timeout "$2" python3 -P -m torch.distributed.run --nproc_per_node="$1" --master_port=29540 \
    benchmarks/megatron/bench_throughput.py --impls "$3" --out "$out/bench.jsonl" ${4:-} > "/tmp/bench/bench_w$1.log" 2>&1
  echo "[all] bench world $1 rc=$? at $(elapsed)s"; grep '^\[bench\]' "/tmp/bench/bench_w$1.log"
}
titan_modes=${TITAN_CUDA_GRAPHS:-on off}
titan() {  # world, time limit: TorchTitan's harness in its own site (/tmp/site_titan), one try per CUDA-graph mode
  local mode rc log
  for mode in $titan_modes; do
    log=/tmp/bench/titan_w$1_graphs_$mode.log
    PYTHONPATH=/tmp/site_titan${PYTHONPATH:+:$PYTHONPATH} timeout "$2" python3 -P -m torch.distributed.run \
      --nproc_per_node="$1" --master_port=29541 benchmarks/megatron/bench_torchtitan.py --cuda-graphs "$mode" \
      --out "$out/bench.jsonl" > "$log" 2>&1
    rc=$?; echo "[all] torchtitan world $1 cuda-graphs $mode rc=$rc at $(elapsed)s"; grep '^\[bench\]' "$log"
    [ "$rc" -eq 0 ] && { titan_modes=$mode; return 0; }  # the larger world uses the mode that ran
  done
}
if has bench; then
  bench 1 "${BENCH_W1_S:-200}" raytron,mcore_local
  [ "$ngpu" -ge 4 ] && bench 4 "${BENCH_W4_S:-150}" "${BENCH_W4_IMPLS:-raytron,mcore_local}" "${BENCH_W4_ARGS:-}"
fi
if { has bench && [ "${BENCH_TITAN:-1}" = 1 ]; } || has titan; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_titan \
       .whl/titan/*.whl; then
    titan 1 "${BENCH_TITAN_W1_S:-270}"
    [ "$ngpu" -ge 4 ] && titan 4 "${BENCH_TITAN_W4_S:-200}"
  else
    echo "[all] torchtitan: no wheels in .whl/titan/ (benchmarks/megatron/README.md says how to add them): not run"
  fi
fi
if has bench || has titan; then tar czf "$out/bench_logs.tar.gz" -C /tmp bench; fi

# ---- 2. GPU tests || raytron submit ---------------------------------------------------------------------
deadline=${DEADLINE_S:-570}  # seconds after the start by which everything must have ended
left() { local l=$(( deadline - $(elapsed) )); [ "$l" -gt 5 ] && echo "$l" || echo 5; }
if has tests; then
  (OUT=/tmp/gpu_tests timeout "$(left)" bash scripts/gpu_tests.sh > /tmp/gpu_tests_console.log 2>&1
   echo $? > /tmp/gpu_tests.rc) &
  tests_pid=$!
fi
has submit && SUBMIT_GPUS=2,3 SUBMIT_BUDGET_S=$(( $(left) - 10 )) bash scripts/gpu_megatron_submit.sh
if has tests; then
  wait $tests_pid
  echo "[all] gpu tests rc=$(cat /tmp/gpu_tests.rc 2>/dev/null) at $(elapsed)s"; tail -40 /tmp/gpu_tests_console.log
  cp /tmp/gpu_tests_console.log /tmp/gpu_tests/console.log 2>/dev/null
  tar czf "$out/gpu_tests.tar.gz" -C /tmp gpu_tests
fi
echo "[all] done at $(elapsed)s"
