#!/usr/bin/env bash
# Both engines on one H200 in one device call (DEADLINE_S at most; it took 293 s on one H200):
#   run(command="DEADLINE_S=585 bash scripts/gpu_engines.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=600)
# 1. each timed run alone on the GPU, one after another (benchmarks/megatron/bench_throughput.py, bf16, one
#    launch each so a hang or crash costs only its own time limit):
#      deepspeed dense-1b      ~70 s  (torchrun + DeepSpeed import ~15 s, fp32 reference init on the host and
#                                      the copy to the GPU ~15 s, ZeRO-2 setup, 2 warm-up + 5 timed steps of
#                                      32 x 4096 tokens; no op is JIT-built: torch AdamW, no DeepSpeed kernels)
#      deepspeed moe-olmoe-4l  ~80 s  (DeepSpeed-MoE runs its 64 experts one by one: 1 warm-up + 3 timed)
#      raytron dense-1b + moe-olmoe-4l  ~60 s (one launch: megatron init, Triton/compile warm-up, 2 + 5 each;
#                                      56 s on an H200 before)
#      raytron moe-deepseek-small-mla   ~50 s
#    limits 110 + 120 + 110 + 80 s; ~280 s expected with the wheelhouse install (~20 s);
# 2. then, nothing timed: the single-GPU equivalence of every family (tests/gpu/megatron_equivalence.py
#    --only single, 50 steps against the fp32 reference) in SHARDS (5) programs side by side on the GPU, at
#    most 300 s or what DEADLINE_S leaves less 60 s; then pytest judges their records (~15 s).
# Run one after another the 14 families take ~700 s on one GPU.
# To $OUT: gpus.csv, bench_<job>.jsonl (one per bench job), timeline.json (each job's start, end, exit code),
#   junit_gpu.xml, megatron_equivalence_w1_s<i>.jsonl, logs.tar.gz. Then, on the CPU machine, copy $OUT to
#   tests/gpu/results/<folder>/ (tests/gpu/test_committed_results.py NEWER_RUNS names it) and write
#   benchmarks/results/engines_NVIDIA_H200.json:
#   python tests/gpu/summarize_results.py tests/gpu/results/<folder> \
#     --engines benchmarks/results/engines_NVIDIA_H200.json --command '<the run(...) call>' --commit <tree it ran>
set -uo pipefail
start=$SECONDS  # the deadline counts the wheelhouse install too
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
out=${OUT:-$root/benchmarks/results/local}; mkdir -p "$out"; logs=/tmp/engines_logs; rm -rf "$logs"; mkdir -p "$logs"
deadline=${DEADLINE_S:-480}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1
: > "$logs/timeline.jsonl"

job() {  # name phase limit_s command... : runs it under timeout, logs to $logs/<name>.log, notes it in the timeline
  local name=$1 phase=$2 limit=$3; shift 3
  local left=$((deadline - (SECONDS - start) - 20)); ((left < limit)) && limit=$left  # 20 s: kill grace, tar
  if ((limit <= 10)); then echo "[$name] skipped: no time left"; return; fi
  local t0=$((SECONDS - start)) rc
  # SIGINT first: pytest then still writes its junit of the tests that finished; torchrun forwards it
  timeout -s INT -k 15 "$limit" "$@" > "$logs/$name.log" 2>&1; rc=$?
  printf '{"job": "%s", "phase": "%s", "gpus": [0], "start_s": %d, "end_s": %d, "rc": %d, "limit_s": %d}\n' \
    "$name" "$phase" "$t0" "$((SECONDS - start))" "$rc" "$limit" >> "$logs/timeline.jsonl"
  echo "[$name] rc=$rc $((SECONDS - start - t0)) s"; grep -h '^\[bench\]' "$logs/$name.log" | tail -3
}
bench() {  # name limit_s bench_throughput args...
  local name=$1 limit=$2; shift 2
  job "$name" bench "$limit" python3 -P -m torch.distributed.run --standalone --nproc_per_node=1 \
    benchmarks/megatron/bench_throughput.py --out "$out/bench_$name.jsonl" "$@"
}
bench deepspeed_dense 110 --impls deepspeed --workloads dense-1b
bench deepspeed_moe 120 --impls deepspeed --workloads moe-olmoe-4l --warmup 1 --timed 3
bench raytron 110 --impls raytron --workloads dense-1b,moe-olmoe-4l
bench raytron_mla 80 --impls raytron --workloads moe-deepseek-small-mla
# 2. the single-GPU equivalence program in SHARDS shards side by side on the one GPU (debug models: the time is
#    compilation and Python, not the GPU), then pytest judges their records (RAYTRON_GPU_RECORDS)
shards=${SHARDS:-5}; records=/tmp/engines_records; rm -rf "$records"; mkdir -p "$records"
eq_limit=$((deadline - (SECONDS - start) - 60)); ((eq_limit > 300)) && eq_limit=300
for i in $(seq 0 $((shards - 1))); do
  job "equivalence_$i" tests "$eq_limit" python3 -P -m torch.distributed.run --nproc_per_node=1 --master_port=$((29600 + i)) \
    tests/gpu/megatron_equivalence.py --only single --shard "$i/$shards" \
    --out "$records/megatron_equivalence_w1_s$i.jsonl" &
done
wait
cp "$records"/*.jsonl "$out/" 2>/dev/null  # the raw records, judged again on CPU by tests/gpu/test_committed_results.py
job pytest_gpu tests 40 env RAYTRON_GPU_WORLDS=1 RAYTRON_GPU_RECORDS="$records" python3 -P -m pytest -m gpu \
  -p no:cacheprovider -q -rfE --log-level=WARNING --junitxml="$out/junit_gpu.xml" tests/gpu/test_megatron_equivalence.py
[ -f "$logs/pytest_gpu.log" ] && tail -4 "$logs/pytest_gpu.log"
python3 -c "import json, sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=1))" \
  "$logs/timeline.jsonl" > "$out/timeline.json"
tar czf "$out/logs.tar.gz" -C "$logs" .
pack_out timeline.json gpus.csv 'junit_*.xml'
echo "[engines] done in $((SECONDS - start)) s"
