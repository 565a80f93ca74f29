#!/usr/bin/env bash
# Set everything up, then run the local demo job: a 4-expert MoE on DeepSpeed ZeRO-2 + DeepSpeed-MoE
# (EP=2), 2 CPU workers under an embedded Ray, trained on this machine's Python stdlib sources.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec raytron submit cluster_configs/local_debug.yaml --name "local-debug-$(date +%Y%m%d-%H%M%S)" "$@"
