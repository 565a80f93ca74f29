#!/usr/bin/env bash
# All GPU-only tests in one command, meant for the device tool (tests/gpu/README.md):
#   run(command="bash scripts/gpu_tests.sh", carry=[".whl"], kind="nvidia-h100-x4")
# Installs the wheelhouse (.whl/, built by ../shared/device/make_wheelhouse.sh), exposes the raytron
# package without pip (its subpackages are top-level folders; -P keeps the bare raytron/ folder of the
# checkout off sys.path), runs `pytest -m gpu` and writes the
# results (JSON lines, JUnit XML, full log) under $OUT (or tests/gpu/results/local when $OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-$root/tests/gpu/results/local}
mkdir -p "$out"
if ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheelhouse install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import raytron.parallelism" 2>/dev/null; then
  pkg=/tmp/raytron_pkg/raytron; rm -rf /tmp/raytron_pkg; mkdir -p "$pkg"
  cp raytron/__init__.py "$pkg/"
  for sub in launcher parallelism models data_pipeline ops; do ln -s "$root/$sub" "$pkg/$sub"; done
  export PYTHONPATH=/tmp/raytron_pkg${PYTHONPATH:+:$PYTHONPATH}
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONUNBUFFERED=1 RAYTRON_GPU_RESULTS="$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1
python3 -P -m pytest -m gpu -p no:cacheprovider -q -rA --junitxml="$out/junit.xml" tests/gpu "$@" 2>&1 | tee "$out/pytest.log"
exit "${PIPESTATUS[0]}"
