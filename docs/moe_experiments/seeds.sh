#!/usr/bin/env bash
# Seeds 1 and 2 (train.seed = data.seed) of the three arms of docs/moe_experiments.md
# section 2, each at its best grid learning rate of seed 0. About 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
J=${JAXTRAIN:-.venv/bin/jaxtrain}
OUT=${OUT:-runs/sweeps/moe}
CFG=configs/moe_sweep.yaml
best() {  # the best grid lr of a sweep's runs matching the filter "key=value,..."
  .venv/bin/python - "$1" "$2" <<'PY'
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
want = dict(kv.split("=") for kv in sys.argv[2].split(",") if kv)
ok = [r for r in runs if not r["diverged"] and all(str(r[k]) == v for k, v in want.items())]
print(min(ok, key=lambda r: r["val_loss"])["optimizer.lr"])
PY
}
LR_MOE=$(best $OUT/width/results.json "model.d_model=64,parametrization.name=mup")
LR_ACTIVE=$(best $OUT/dense_active/results.json "")
LR_TOTAL=$(best $OUT/dense_total/results.json "")
for S in 1 2; do
  SEED=(--set train.seed=$S --set data.seed=$S)
  $J sweep $CFG --grid optimizer.lr=$LR_MOE --grid model.d_model=64 --x optimizer.lr "${SEED[@]}" --out $OUT/seeds/moe_s$S > /dev/null
  $J sweep $CFG --grid optimizer.lr=$LR_ACTIVE --grid model.d_ff=384 --x optimizer.lr --set model.moe.n_experts=0 \
    "${SEED[@]}" --out $OUT/seeds/dense_active_s$S > /dev/null
  $J sweep $CFG --grid optimizer.lr=$LR_TOTAL --grid model.d_ff=1536 --x optimizer.lr --set model.moe.n_experts=0 \
    "${SEED[@]}" --out $OUT/seeds/dense_total_s$S > /dev/null
done
