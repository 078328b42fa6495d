#!/usr/bin/env bash
# Regenerates docs/moe/ (docs/moe.md "Expert parallelism"): configs/moe350m.yaml compiled
# deviceless by the TPU and GPU compilers of .venv-compile (`make compile-venv`) on its
# expert meshes, and the markdown table of what the compilers say beside the analytic model.
# About 4 minutes on the 2-core CPU machine (the TPU compile is most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
make -s compile-venv
out=docs/moe
jaxtrain=.venv-compile/bin/jaxtrain
mkdir -p $out
$jaxtrain dry-run configs/moe350m.yaml --target tpu-v5p-8 --compile --json 2>/dev/null > $out/moe350m-tpu-v5p-8.json
$jaxtrain dry-run configs/moe350m.yaml --target h100x8 --compile --json --set mesh.expert=8 2>/dev/null \
  > $out/moe350m-h100x8-expert8.json
$jaxtrain dry-run configs/moe350m.yaml --target h100x8 --compile --json --set mesh.expert=4 --set mesh.fsdp=2 \
  2>/dev/null > $out/moe350m-h100x8-expert4-fsdp2.json
.venv/bin/python docs/moe_table.py $out/*.json > $out/table.md
cat $out/table.md
