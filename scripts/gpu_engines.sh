#!/usr/bin/env bash
# Both engines on one H200 in one device call (480 s at most: DEADLINE_S):
#   run(command="bash scripts/gpu_engines.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=540)
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
# 2. then, nothing timed: `pytest -m gpu tests/gpu` at RAYTRON_GPU_WORLDS=1 (single-GPU equivalence of every
#    family, init_from, kernels), limited to 250 s or what is left of DEADLINE_S (from the script's start,
#    less 20 s for the kill grace and the tarball): ~180 s at the default 480. It did not finish in 190 s
#    before; DEADLINE_S=560 with timeout_s=600 gives it the full 250 s.
# To $OUT: gpus.csv, bench_<job>.jsonl (one per bench job), timeline.json (each job's start, end, exit code),
#   junit_gpu.xml, logs.tar.gz. Then, on the CPU machine (the lead), copy $OUT to tests/gpu/results/<folder>/
#   and write benchmarks/results/engines_NVIDIA_H200.json:
#   python tests/gpu/summarize_results.py tests/gpu/results/<folder> --engines benchmarks/results/engines_NVIDIA_H200.json \
#     --command '<the run(...) call>' --commit <tree it ran>
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
job pytest_gpu tests 250 env RAYTRON_GPU_WORLDS=1 python3 -P -m pytest -m gpu -p no:cacheprovider -q -rfE \
  --log-level=WARNING --junitxml="$out/junit_gpu.xml" tests/gpu
[ -f "$logs/pytest_gpu.log" ] && tail -4 "$logs/pytest_gpu.log"
python3 -c "import json, sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=1))" \
  "$logs/timeline.jsonl" > "$out/timeline.json"
tar czf "$out/logs.tar.gz" -C "$logs" .
echo "[engines] done in $((SECONDS - start)) s"
