#!/usr/bin/env bash
# Regenerates the "Scaling" section of docs/performance.md on 8 simulated CPU devices:
#   1. collective bytes per device per step and temporary memory of configs/small.yaml's
#      compiled train step on three meshes (fsdp=8 at batch 32 and 256, data=8 at both,
#      fsdp=2 x tensor=4), counted from the HLO, and dry-run's analytic model beside it;
#   2. compile time of the whole train step (`jaxtrain bench` compile_s) against depth;
#   3. the roofline of configs/gpt350m.yaml on 8 x H100 and a TPU v5p-64 slice (32 chips).
# With BEFORE=DIR (a checkout of an older jaxtrain) 1 and 2 are also measured there, in the
# same run. About 10 minutes on 2 CPU cores (20 with BEFORE).
#   bash docs/scaling.sh            BEFORE=/tmp/old bash docs/scaling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
HERE=$PWD
PY=$HERE/.venv/bin/python
OUT=runs/scaling
mkdir -p $OUT
export XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
export JAX_PLATFORMS=cpu
MESHES=("mesh.fsdp=8" "mesh.fsdp=8 train.batch_size=256" "mesh.data=8 mesh.fsdp=1"
        "mesh.data=8 mesh.fsdp=1 train.batch_size=256" "mesh.fsdp=2 mesh.tensor=4")

measure_tree() {  # $1 label, $2 tree
  for mesh in "${MESHES[@]}"; do
    (cd "$2" && PYTHONPATH="$2" $PY "$HERE/docs/performance/collectives.py" \
       "$HERE/jaxtrain/hlo_collectives.py" configs/small.yaml $mesh) | sed "s/^/$1 /"
  done
}
{
  [ -n "${BEFORE:-}" ] && measure_tree before "$BEFORE"
  measure_tree after "$HERE"
} | tee $OUT/collectives.txt

for mesh in "mesh.fsdp=8" "mesh.data=8 mesh.fsdp=1" "mesh.fsdp=2 mesh.tensor=4"; do
  echo "## dry-run --compile $mesh"
  .venv/bin/jaxtrain dry-run configs/small.yaml --devices 8 --compile $(printf -- '--set %s ' $mesh) \
    | sed -n '/# collectives per device/,$p'
done | tee $OUT/dry_run_compile.txt

compile_time() {  # $1 label, $2 tree, $3 extra --set
  for L in 4 8 16 32; do
    (cd "$2" && PYTHONPATH="$2" $PY -m jaxtrain bench configs/bench_cpu.yaml --steps 1 --warmup 0 \
       --set model.n_layers=$L $3) \
      | $PY -c "import json,sys; r=json.load(sys.stdin); print('$1', 'layers=$L', 'compile_s=%.2f' % r['compile_s'])"
  done
}
unset XLA_FLAGS  # bench's own default: one CPU device
{
  if [ -n "${BEFORE:-}" ]; then
    compile_time before_loop "$BEFORE" ""
    compile_time before_scan "$BEFORE" "--set model.scan_layers=true"
  fi
  compile_time after_scan "$HERE" ""
  compile_time after_unrolled "$HERE" "--set model.scan_layers=false"
} | tee $OUT/compile_vs_depth.txt

{
  .venv/bin/jaxtrain dry-run configs/gpt350m.yaml --devices 8 --backend gpu --target h100 | sed -n '/# collectives per device/,$p'
  .venv/bin/jaxtrain dry-run configs/gpt350m.yaml --devices 32 --backend tpu --target tpu-v5p | sed -n '/# collectives per device/,$p'
} | tee $OUT/roofline.txt
