#!/usr/bin/env bash
# All GPU-only tests in one command, meant for the device tool (tests/gpu/README.md):
#   run(command="bash scripts/gpu_tests.sh", carry=[".whl"], kind="nvidia-h100-x4")
# Installs the wheelhouse (.whl/, built by scripts/make_wheelhouse.sh), exposes the raytron
# package without pip (scripts/gpu_env.sh), runs `pytest -m gpu` and writes the
# results (JSON lines, JUnit XML, full log) under $OUT (or tests/gpu/results/local when $OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-$root/tests/gpu/results/local}
mkdir -p "$out"
source scripts/gpu_env.sh  # wheelhouse, raytron package tree (raytron/*.py included), NCCL settings
export PYTHONUNBUFFERED=1 RAYTRON_GPU_RESULTS="$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1
python3 -P -m pytest -m gpu -p no:cacheprovider -q -rA --junitxml="$out/junit.xml" tests/gpu "$@" 2>&1 | tee "$out/pytest.log"
rc=${PIPESTATUS[0]}
pack_out junit.xml pytest.log gpus.csv
exit "$rc"
