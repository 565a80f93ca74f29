# Sourced by the GPU scripts (run from the repo root on the device machine): installs the wheelhouse
# (.whl/, scripts/make_wheelhouse.sh) into /tmp/site, exposes the raytron package through a
# symlink tree (its subpackages are top-level folders of the checkout), and keeps NVLink multicast off
# (the shared device machines require it) with CUDA_DEVICE_MAX_CONNECTIONS=1 unless given (megatron-core's
# setting for its TP layers and grad-reduce overlap). Sets $root.
root=$PWD
if ! python3 -c "import megatron.core, ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheelhouse install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -P -c "import raytron.parallelism" 2>/dev/null; then
  pkg=/tmp/raytron_pkg/raytron; rm -rf /tmp/raytron_pkg; mkdir -p "$pkg"; cp raytron/*.py "$pkg/"
  for sub in launcher parallelism models data_pipeline ops; do ln -s "$root/$sub" "$pkg/$sub"; done
  export PYTHONPATH=/tmp/raytron_pkg${PYTHONPATH:+:$PYTHONPATH}
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export PYTHONUNBUFFERED=1 RAY_TRAIN_ENABLE_PRINT_PATCH=0
