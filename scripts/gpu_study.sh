#!/usr/bin/env bash
# The GPU efficient-architecture study (cluster_configs/study_h200.yaml) on one H200, in two or three device calls:
#   run(command="bash scripts/gpu_study.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=540)
#   run(command="STUDY_SEED=study_seed.tar.gz bash scripts/gpu_study.sh", carry=[".whl"], kind="nvidia-h200", ...)
# (.whl/ from scripts/make_wheelhouse.sh). A device call starts a fresh machine, so the second call continues
# the study from the first call's records: STUDY_SEED is the first call's logs.tar.gz, copied into the checkout
# (untracked, so it travels). The families it completed are not retrained (their outcome says so; their
# checkpoints stayed behind) and the report covers all of them. Measured on one H200 (the estimate and its
# assumptions: tests/study/test_study_gpu_config.py): wheelhouse install ~25 s; Ray start and data prepare
# ~40 s; per family 44-76 s (worker start, megatron init, compiles, 3-10 s of training on 655K tokens, eval,
# final checkpoint): six families trained in the first call, three in the second; the forward+backward sweep at
# 2K-64K; report ~5 s; then bench_hybrid_vs_attention.py --study on the study's models (<= 45 s, its agreement
# table appended to report.md). The study runs under `timeout` so the call ends in time, and with --time-limit
# so that families it could not finish are reported as not run rather than losing the report; a family that
# fails is listed with its error in report.md and the others are still measured (raytron study exits 1 then).
# To $OUT (commit them under benchmarks/results/study_<gpu>/): report.md, results.json, the three plots and
# logs.tar.gz (command.txt: this call and the study command; gpus.csv; the study's console log and each
# family's config, metrics, outcome and sweep, no checkpoints; the benchmark's log).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
source scripts/gpu_env.sh
out=${OUT:-$root/benchmarks/results/local}; mkdir -p "$out"
study=/tmp/study_h200; logs=/tmp/study_logs; rm -rf "$study" "$logs"; mkdir -p "$logs" "$study"
[ -n "${STUDY_SEED:-}" ] && tar xzf "$STUDY_SEED" -C "$study" --exclude=./study.log --exclude=./bench.log \
  --exclude=./command.txt --exclude=./gpus.csv
limit=${STUDY_TIMEOUT_S:-$((505 - (SECONDS - start)))}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$logs/gpus.csv" 2>&1
cat > "$logs/command.txt" <<EOF
device call: STUDY_SEED=${STUDY_SEED:-} bash scripts/gpu_study.sh (commit ${RAYTRON_COMMIT:-$(git rev-parse HEAD 2>/dev/null)})
study: raytron study cluster_configs/study_h200.yaml --out $study --time-limit $((limit - 190))   (under timeout ${limit}s)
EOF
echo "[gpu_study] setup took $((SECONDS - start)) s; study limit ${limit} s"
# full console log to a file; the study's own progress lines (family, ETA, done, failures) to stdout
# --time-limit: no family starts that would leave the sweep and report less than 190 s
timeout -k 5 "$limit" python3 -P -m raytron.launcher.cli study cluster_configs/study_h200.yaml --out "$study" \
  --time-limit $((limit - 190)) 2>&1 | tee "$logs/study.log" | grep --line-buffered -E '^\[study\]|^\[raytron\] (data ready|outcome)|Error|error:'
rc=${PIPESTATUS[0]}
echo "[gpu_study] study rc=$rc after $((SECONDS - start)) s"
for f in report.md results.json loss_vs_tokens.png bpb_vs_tokens_per_s.png tokens_per_s_vs_context.png; do
  [ -f "$study/$f" ] && cp "$study/$f" "$out/" || echo "[gpu_study] missing $f"
done
# every family's small records, not its checkpoints (GBs) or data cache
(cd "$study" 2>/dev/null && find . -maxdepth 2 -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.yaml' \) \
   -not -path './_data_cache/*' -print0 | xargs -0 -r cp --parents -t "$logs")
# the hybrid-speed benchmark on the study's own models: its agreement table is appended to $out/report.md
if [ -f "$out/results.json" ]; then
  timeout 45 python3 -P benchmarks/models/bench_hybrid_vs_attention.py --study "$out/results.json" --seqs 8192 32768 \
    --steps 3 --kernels default --out "$logs" > "$logs/bench.log" 2>&1
  echo "[gpu_study] bench rc=$? after $((SECONDS - start)) s"; sed -n '/^## Agreement/,$p' "$logs/bench.log"
fi
tar czf "$out/logs.tar.gz" -C "$logs" .
[ -f "$out/report.md" ] && sed -n '/## The survey/,/^Plots/p' "$out/report.md"
echo "[gpu_study] total $((SECONDS - start)) s"
pack_out report.md results.json '*.png' logs.tar.gz
exit "$rc"
