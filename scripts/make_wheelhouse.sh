#!/usr/bin/env bash
# Builds .whl/ in the current repo root: the Python packages that the GPU machine lacks
# (megatron-core, deepspeed, ray, and what they need), for Python 3.12 / x86-64, under 64 MiB.
# Usage, from the repo root:  bash scripts/make_wheelhouse.sh [extra-requirement ...]
# (the GPU tests add: pytest pluggy iniconfig pygments PyYAML packaging). The GPU scripts install it through
# scripts/gpu_env.sh; pass carry [".whl"] to the device call. .whl/ is git-ignored (.gitignore).
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
mkdir -p .whl; tmp=$(mktemp -d)
plat="--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl "$@" 2>&1 | grep -v 'is ignored' || true; }
# Pins: megatron-core 0.16.1 is the newest that also installs on Python 3.11 (the CI machines); keep both sides equal.
for p in megatron-core==0.16.1 jsonschema jsonschema-specifications referencing rpds-py hjson pydantic pydantic-core \
         annotated-types typing-inspection tensorboardX "$@"; do dl "$p"; done
# deepspeed ships only as a source archive: build a pure-Python wheel (ops are JIT-built on first use).
[ -n "$(ls .whl/deepspeed-*.whl 2>/dev/null)" ] || DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl 2>&1 | grep -v 'is ignored' || true
# ray's wheel is ~79 MB; drop its Java jar and dashboard source maps so the carry stays under 64 MiB.
if [ -z "$(ls .whl/ray-*.whl 2>/dev/null)" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d "$tmp" ray==2.60.0 2>&1 | grep -v 'is ignored' || true
  python3 -m pip install -q wheel 2>&1 | grep -v 'is ignored' || true
  (cd "$tmp" && python3 -m wheel unpack ray-*.whl >/dev/null && cd ray-2.60.0 && rm -f ray/jars/ray_dist.jar \
     && find ray/dashboard/client/build -name '*.map' -delete \
     && python3 - <<'PY'
import glob, os
rec = glob.glob('*.dist-info/RECORD')[0]
keep = [l for l in open(rec) if os.path.exists(l.split(',')[0]) or l.startswith(rec)]
open(rec, 'w').writelines(keep)
PY
  ) && (cd "$tmp" && python3 -m wheel pack ray-2.60.0 -d "$root/.whl" >/dev/null)
fi
rm -rf "$tmp"
du -sh .whl; ls .whl
size=$(du -sm .whl | cut -f1); [ "$size" -lt 64 ] || { echo "wheelhouse is ${size} MiB: over the 64 MiB carry limit" >&2; exit 1; }
