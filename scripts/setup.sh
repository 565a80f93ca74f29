#!/usr/bin/env bash
# Install raytron and its dependencies into the current Python (>= 3.11).
# torch first, pinned to the CPU build this machine kind carries on disk; the project itself asks
# only for a torch range (GPU machines bring their own torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
# DeepSpeed is source-only on PyPI; DS_BUILD_OPS=0 skips compiling its CUDA ops at install time.
DS_BUILD_OPS=0 "$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
"$PY" -c "import raytron, torch, deepspeed, ray, megatron.core; print('raytron', raytron.__version__, '| torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| ray', ray.__version__)" 2>/dev/null
