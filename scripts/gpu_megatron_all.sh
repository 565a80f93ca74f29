#!/usr/bin/env bash
# Everything GPU-only for the megatron engine, in one device call on 4 GPUs (tests/gpu/README.md):
#   run(command="bash scripts/gpu_megatron_all.sh", carry=[".whl"], kind="nvidia-h100-x4", timeout_s=600)
# Installs the wheelhouse (.whl/) and TorchTitan's wheels (.whl/titan/, benchmarks/megatron/README.md), then
# scripts/gpu_suite.py runs the throughput benchmark (GPUs to itself) and then every GPU test program side by
# side, judged by pytest, all within SUITE_DEADLINE_S (default 580 s). Arguments go to gpu_suite.py
# (e.g. --parts tests). Results under $OUT: suite.log, gpus.csv, bench.jsonl, timeline.json, summary.txt,
# junit.xml, results.tar.gz (every raw record, log and JUnit file).
# dense/3b's throughput and MFU on one H200, with activation recomputation (the 1-GPU bench runs only):
#   run(command="bash scripts/gpu_megatron_all.sh --parts bench --one-gpu-args '--workloads dense-3b
#       --recompute selective'", carry=[".whl"], kind="nvidia-h200", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/benchmarks/results/local}
mkdir -p "$out"
exec > >(tee -a "$out/suite.log") 2>&1
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1
cat "$out/gpus.csv"
if ls .whl/titan/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_titan \
    .whl/titan/*.whl || echo "[all] TorchTitan wheels did not install: not benchmarked"
fi
# the deadline counts from this script's start (the installs above included)
python3 -P scripts/gpu_suite.py --out "$out" --deadline "$(( ${SUITE_DEADLINE_S:-580} - SECONDS ))" "$@"
rc=$?
pack_out summary.txt gpus.csv
exit "$rc"
