#!/usr/bin/env bash
# The one-GPU parts of the GPU tier at this tree, in one device call (~330 s):
#   run(command="bash scripts/gpu_one_gpu.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=400)
# 1. alone on the GPU: one profiled step of each PROFILE_WORKLOADS (default hybrid-1b-4k,dense-1b-4k: where a
#    hybrid's step goes against the dense model's; benchmarks/megatron/bench_throughput.py --profile kernel tables);
# 2. side by side (nothing timed): `pytest -m gpu` on the one-GPU cases of tests/gpu (RAYTRON_GPU_WORLDS=1:
#    init_from, kernels, the cross-engine submit, and the single-GPU equivalence unless GPU_TESTS_K deselects it,
#    e.g. GPU_TESTS_K="not equivalence") and of tests/ops (Triton scans, FlexAttention masks, grouped experts,
#    FP8 fast paths); `raytron submit` of moe/deepseek-small-mla (sigmoid router with the aux-loss-free bias,
#    shared experts, MLA), 20 steps; and FP8 with the sigmoid router (moe/debug-sigmoid): 6 steps, --resume to
#    12, and an uninterrupted 12-step run (scripts/compare_resume.py: the resumed curve must equal it).
# To $OUT: gpus.csv, commit.txt, bench.jsonl, profile/, junit_gpu.xml, junit_ops.xml, gpu_results/ (what the
# tests/gpu cases wrote), fp8_sigmoid_resume.json, logs.tar.gz (logs, the runs' metrics).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
out=${OUT:-$root/benchmarks/results/local}; mkdir -p "$out"; logs=/tmp/one_gpu_logs; mkdir -p "$logs"
runs=/tmp/one_gpu_runs; rm -rf "$runs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1
echo "${RAYTRON_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" > "$out/commit.txt"  # the device copy's .git may be stale
timeout 120 torchrun --nproc_per_node=1 benchmarks/megatron/bench_throughput.py --impls raytron \
  --workloads "${PROFILE_WORKLOADS:-hybrid-1b-4k,dense-1b-4k}" --warmup 1 --timed 2 --profile "$out/profile" \
  --out "$out/bench.jsonl" > "$logs/bench.log" 2>&1
echo "[bench] rc=$?"; grep -h '^\[bench\]' "$logs/bench.log" | tail -2
pytest_gpu() {  # name, paths...
  local name=$1; shift
  local select=(); [ -n "${GPU_TESTS_K:-}" ] && [ "$name" = gpu ] && select=(-k "$GPU_TESTS_K")
  RAYTRON_GPU_WORLDS=1 RAYTRON_GPU_RESULTS="$out/gpu_results" timeout 240 python3 -P -m pytest -m gpu -p no:cacheprovider \
    -q -rfE --log-level=WARNING "${select[@]}" --junitxml="$out/junit_$name.xml" "$@" \
    > "$logs/pytest_$name.log" 2>&1
  echo "[pytest $name] rc=$?"; tail -4 "$logs/pytest_$name.log"
}
submit() {  # log name, extra args (the 2-GPU submit config folded onto one GPU)
  local name=$1; shift
  (cd /tmp && timeout 100 python3 -P -m raytron.launcher.cli submit "$root/cluster_configs/gpu_megatron_2gpu.yaml" \
     --set resources.workers=1 --set layout.ep=1 --set layout.dp=1 --set "checkpoint.uri=$runs" "$@" \
     > "$logs/submit_$name.log" 2>&1)
  echo "[submit] $name rc=$?"; grep -E 'step [0-9]+/|resumed|canary|rror' "$logs/submit_$name.log" | tail -3
}
pytest_gpu gpu tests/gpu &
pytest_gpu ops tests/ops &
(submit deepseek-small-mla --name deepseek-small-mla --set model.flavor=deepseek-small-mla --set train.steps=20 \
   --set train.seq_len=1024 --set train.micro_batch_size=4 --set train.global_batch_size=8 --set train.eval_every=10 \
   --set checkpoint.every=20
 cp "$runs/deepseek-small-mla/metrics.jsonl" "$logs/mla_metrics.jsonl" 2>/dev/null) &
(fp8=(--set model.flavor=debug-sigmoid --set train.precision=fp8 --set checkpoint.every=3)
 submit fp8-sigmoid-first --name fp8-sigmoid "${fp8[@]}" --set train.steps=6 &
 submit fp8-sigmoid-straight --name fp8-sigmoid-straight "${fp8[@]}" --set train.steps=12 &
 wait
 submit fp8-sigmoid-resumed --name fp8-sigmoid "${fp8[@]}" --set train.steps=12 --resume
 python3 scripts/compare_resume.py "$runs/fp8-sigmoid" "$runs/fp8-sigmoid-straight" 6 > "$out/fp8_sigmoid_resume.json"
 cat "$out/fp8_sigmoid_resume.json" | head -c 600; echo
 for r in fp8-sigmoid fp8-sigmoid-straight; do cp "$runs/$r/metrics.jsonl" "$logs/${r}_metrics.jsonl" 2>/dev/null; done) &
wait
tar czf "$out/logs.tar.gz" -C "$logs" .
pack_out fp8_sigmoid_resume.json 'junit_*.xml' bench.jsonl commit.txt gpus.csv
