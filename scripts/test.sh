#!/usr/bin/env bash
# Set up (idempotent) and run the CPU test suite: unit and multi-process tiers. GPU tests are
# marked `gpu` and run through the device tool (tests/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest -m "not gpu" -q -p no:cacheprovider --durations=15 "$@"
