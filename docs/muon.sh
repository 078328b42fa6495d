#!/usr/bin/env bash
# Regenerates docs/muon/ (about 1.2 hours on 2 CPU cores; docs/muon.md reads it).
# Sweep runs land in runs/muon_transfer/ (git-ignored); rerunning reuses finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv
J=.venv/bin/jaxtrain
CFG=configs/muon_sweep.yaml
LRS=0.0078125,0.015625,0.03125,0.0625,0.125,0.25     # 2^-7 .. 2^-2
OUT=runs/muon_transfer
DOCS=docs/muon
mkdir -p $DOCS

# Width x learning rate, Muon with the spectral scale vs no scale, widths 32 -> 256 (8x).
$J sweep $CFG --grid model.d_model=32,64,128,256 --grid optimizer.lr=$LRS \
  --grid optimizer.muon_scale=spectral,none --out $OUT/width

# Widest width, learning rates transferred from the narrowest: Muon (spectral) against
# AdamW under muP (configs/mup_sweep.yaml, its width-32 optimum from docs/mup_transfer/),
# three seeds each, equal tokens.
optimum() {  # results.json, then key=value filters: the fitted optimum of that curve
  .venv/bin/python - "$@" <<'PY'
import json, sys
results, filters = json.load(open(sys.argv[1])), dict(a.split("=", 1) for a in sys.argv[2:])
print(next(o["optimum"]["opt"] for o in results["optima"] if all(str(o[k]) == v for k, v in filters.items())))
PY
}
MUON32=$(optimum $OUT/width/results.json model.d_model=32 optimizer.muon_scale=spectral)
ADAMW32=$(optimum docs/mup_transfer/width/results.json model.d_model=32 parametrization.name=mup)
echo "arm,seed,lr,final_val_loss" > $DOCS/width256_seeds.csv
for s in 0 1 2; do
  for arm in muon adamw; do
    if [ $arm = muon ]; then C=$CFG; LR=$MUON32; else C=configs/mup_sweep.yaml; LR=$ADAMW32; fi
    line=$($J train $C --workdir $OUT/seeds/${arm}_s$s --set model.d_model=256 --set optimizer.lr=$LR \
      --set train.seed=$s --set data.seed=$s | tail -1)
    echo "$arm,$s,$LR,$(echo "$line" | sed -E 's/final val_loss ([0-9.]+).*/\1/')" >> $DOCS/width256_seeds.csv
  done
done

# Reference: AdamW under muP with the output multiplier tuned at the proxy (4, docs/mup_transfer.md),
# its learning rate also transferred from width 32.
ADAMW32_A4=$(optimum docs/mup_transfer/width_a4/results.json model.d_model=32)
for s in 0 1 2; do
  line=$($J train configs/mup_sweep.yaml --workdir $OUT/seeds/adamw_a4_s$s --set model.d_model=256 \
    --set parametrization.output_multiplier=4 --set optimizer.lr=$ADAMW32_A4 --set train.seed=$s --set data.seed=$s | tail -1)
  echo "adamw_alpha_out4,$s,$ADAMW32_A4,$(echo "$line" | sed -E 's/final val_loss ([0-9.]+).*/\1/')" >> $DOCS/width256_seeds.csv
done
$J plot $OUT/seeds/muon_s0 $OUT/seeds/adamw_s0 $OUT/seeds/adamw_a4_s0 --metric loss --out $DOCS/width256_loss.png

# Control: rms_match, whose update RMS is AdamW's at every width (scale 0.2 sqrt(fan), AdamW's
# muP LR row): its spectral norm falls like width^-1/2, so its optimum should move up.
$J sweep $CFG --grid model.d_model=32,64,128,256 --grid optimizer.lr=$LRS \
  --set optimizer.muon_scale=rms_match --out $OUT/width_rms_match

# Depth x learning rate at width 64: residual scaling off (alpha 0) vs CompleteP (alpha 1).
$J sweep $CFG --grid model.n_layers=2,4,8 --grid optimizer.lr=$LRS \
  --grid parametrization.depth_alpha=0,1 --out $OUT/depth

for s in width width_rms_match depth; do
  mkdir -p $DOCS/$s
  cp $OUT/$s/results.json $OUT/$s/results.csv $OUT/$s/sweep.png $DOCS/$s/
done
