# Sourced by the GPU scripts (run from the repo root on the device machine): installs the wheelhouse
# (.whl/, scripts/make_wheelhouse.sh) into /tmp/site, exposes the raytron package by linking its
# subpackages (top-level folders of the checkout) into raytron/, and keeps NVLink multicast off
# (the shared device machines require it) with CUDA_DEVICE_MAX_CONNECTIONS=1 unless given (megatron-core's
# setting for its TP layers and grad-reduce overlap). Sets $root.
root=$PWD
if ! python3 -c "import megatron.core, ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheelhouse install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -P -c "import raytron.parallelism" 2>/dev/null; then
  # The checkout's raytron/ is the package once its subpackages are linked in: a separate package tree would
  # be shadowed by the bare raytron/ wherever the repository root comes first on sys.path (pytest puts it
  # there for the tests package). The root on PYTHONPATH also makes `tests` importable for programs run by path.
  for sub in launcher parallelism models data_pipeline ops; do ln -sfn "../$sub" "raytron/$sub"; done
  export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export PYTHONUNBUFFERED=1 RAY_TRAIN_ENABLE_PRINT_PATCH=0
# pack_out [KEEP_GLOB...]: the device returns at most 8 files of $OUT (2 folders deep) and leaves the rest
# behind. Past 8, every file of $OUT but the KEEP ones (globs relative to $OUT, at most 7) goes into
# $OUT/outputs.tar.gz. Only with $OUT set (a device call, or a test that names its folder); a no-op otherwise.
pack_out() {
  local dir=${OUT:-} keep=() k
  [ -n "$dir" ] && [ -d "$dir" ] && [ "$(find "$dir" -type f | wc -l)" -gt 8 ] || return 0
  for k in "$@"; do keep+=(! -path "./$k"); done
  (cd "$dir" && find . -type f ! -path ./outputs.tar.gz "${keep[@]}" -print0 \
     | tar czf outputs.tar.gz --null -T - --remove-files && find . -mindepth 1 -type d -empty -delete)
}
