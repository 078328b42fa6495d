#!/usr/bin/env bash
# Regenerates docs/performance/targets/*.json and the table of docs/performance.md
# "Compiled for real targets": each shipped accelerator config compiled deviceless for its
# targets by the TPU and GPU compilers of .venv-compile (`make compile-venv`), plus the
# refused request and its --fit plan. About 5 minutes on the 2-core CPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s compile-venv
out=docs/performance/targets
jaxtrain=.venv-compile/bin/jaxtrain
for pair in gpt350m:h100 gpt350m:tpu-v5p-8 gpt350m:h100x8 llama1b:tpu-v5p-32 llama1b:h100x8; do
  config=${pair%%:*} target=${pair#*:}
  $jaxtrain dry-run configs/$config.yaml --target "$target" --compile --json 2>/dev/null > "$out/$config-$target.json"
done
# the request the issue refuses, and the plan --fit finds for it
request=(--set model.remat=none --set train.batch_size=256)
$jaxtrain dry-run configs/gpt350m.yaml --target tpu-v5p-8 --compile "${request[@]}" 2>&1 >/dev/null \
  | grep '^jaxtrain: error' > "$out/refused.txt" || true
$jaxtrain dry-run configs/gpt350m.yaml --target tpu-v5p-8 --fit "${request[@]}" 2>/dev/null > "$out/fit.txt"
.venv/bin/python docs/performance/targets_table.py "$out"/*.json > "$out/table.md"
cat "$out/table.md" "$out/refused.txt" "$out/fit.txt"
