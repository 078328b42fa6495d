#!/usr/bin/env bash
# Seeds 1 and 2 (train.seed = data.seed) at each (gamma, width)'s best grid lambda of
# docs/weight_decay_transfer.sh's sweep (seed 0); one JSON line per cell. About 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
J=${JAXTRAIN:-.venv/bin/jaxtrain}
OUT=${OUT:-runs/sweeps}
for cell in $(.venv/bin/python -c "
import json
runs = json.load(open('$OUT/weight_decay/results.json'))['runs']
for g, w in sorted({(r['parametrization.gamma'], r['model.d_model']) for r in runs}):
    best = min((r for r in runs if (r['parametrization.gamma'], r['model.d_model']) == (g, w) and not r['diverged']),
               key=lambda r: r['val_loss'])
    print(f\"{g}:{w}:{best['optimizer.weight_decay']}\")"); do
  IFS=: read -r G W WD <<< "$cell"
  for S in 1 2; do
    $J sweep configs/mup_sweep.yaml --grid parametrization.gamma=$G --grid model.d_model=$W \
        --grid optimizer.weight_decay=$WD --x optimizer.weight_decay \
        --set schedule.name=wsd --set optimizer.weight_decay_mode=independent --set optimizer.lr=3.90625e-3 \
        --set train.batch_size=8 --set train.steps=640 --set train.eval_every=640 \
        --set checkpoint.every_steps=640 --set train.seed=$S --set data.seed=$S \
        --out $OUT/weight_decay_seeds/g${G}_w${W}_s$S > /dev/null
  done
  .venv/bin/python - "$OUT" "$G" "$W" "$WD" <<'PY'
import json, sys
out, g, w, wd = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
seed0 = [r["val_loss"] for r in json.load(open(f"{out}/weight_decay/results.json"))["runs"]
         if (r["parametrization.gamma"], r["model.d_model"], r["optimizer.weight_decay"]) == (g, w, wd)]
seeds = seed0 + [json.load(open(f"{out}/weight_decay_seeds/g{sys.argv[2]}_w{w}_s{s}/results.json"))["runs"][0]["val_loss"]
                 for s in (1, 2)]
print(json.dumps({"gamma": g, "width": w, "wd": wd, "val_loss_seeds_0_1_2": seeds,
                  "mean": sum(seeds) / 3, "spread": max(seeds) - min(seeds)}))
PY
done
