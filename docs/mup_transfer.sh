#!/usr/bin/env bash
# Regenerates docs/mup_transfer/ and docs/coord_check/ (about 1.5 hours on 2 CPU cores).
# Sweep runs land in runs/mup_transfer/ (git-ignored); rerunning resumes finished grids.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv
J=.venv/bin/jaxtrain
CFG=configs/mup_sweep.yaml
WIDTH_LRS=0.0009765625,0.001953125,0.00390625,0.0078125,0.015625,0.03125      # 2^-10 .. 2^-5
DEPTH_LRS=0.001953125,0.00390625,0.0078125,0.015625,0.03125,0.0625             # 2^-9 .. 2^-4
OUT=runs/mup_transfer

for p in mup sp; do
  $J coord-check $CFG --widths 64,128,256,512 --steps 5 --set parametrization.name=$p --out docs/coord_check/$p
done

# Width x learning rate, SP vs muP (depth 2), widths 32 -> 256 (8x).
$J sweep $CFG --grid model.d_model=32,64,128,256 --grid optimizer.lr=$WIDTH_LRS \
  --grid parametrization.name=sp,mup --out $OUT/width
# Depth x learning rate at width 64, muP, residual scaling off (alpha 0) vs CompleteP (alpha 1).
$J sweep $CFG --grid model.n_layers=2,4,8 --grid optimizer.lr=$DEPTH_LRS \
  --grid parametrization.depth_alpha=0,1 --out $OUT/depth

# Transfer: width 512 under muP at the optimum fitted at width 64.
LR64=$(.venv/bin/python -c "import json; r = json.load(open('$OUT/width/results.json')); \
print(next(o['optimum']['opt'] for o in r['optima'] if o['model.d_model'] == 64 and o['parametrization.name'] == 'mup'))")
# (The SP width-512 reference runs are `jaxtrain train $CFG --set model.d_model=512
#  --set parametrization.name=sp --set optimizer.lr=LR` for LR in 2^-10, 2^-9, 2^-8.)
$J train $CFG --workdir $OUT/transfer512 --set model.d_model=512 --set parametrization.name=mup \
  --set optimizer.lr=$LR64 | tail -1 | tee $OUT/transfer512.txt

# The output multiplier tuned at width 64 as well, then both hyperparameters transferred to 512,
# with SP at 512 given the same multiplier and its own learning-rate sweep.
$J sweep $CFG --grid parametrization.output_multiplier=0.25,1,4,16 \
  --grid optimizer.lr=0.005859375,0.01171875,0.0234375 --x optimizer.lr \
  --curves parametrization.output_multiplier --out $OUT/alpha_out
for s in 0 1 2; do
  $J train $CFG --workdir $OUT/a4/mup_s$s --set model.d_model=512 --set parametrization.name=mup \
    --set parametrization.output_multiplier=4 --set optimizer.lr=0.01171875 --set train.seed=$s --set data.seed=$s | tail -1
  $J train $CFG --workdir $OUT/a4/sp_s$s --set model.d_model=512 --set parametrization.name=sp \
    --set parametrization.output_multiplier=4 --set optimizer.lr=0.0009765625 --set train.seed=$s --set data.seed=$s | tail -1
done
$J sweep $CFG --grid model.d_model=32,64,128,256 --grid optimizer.lr=$WIDTH_LRS \
  --set parametrization.output_multiplier=4 --x optimizer.lr --curves model.d_model --out $OUT/width_a4
for lr in 0.00048828125 0.001953125; do
  $J train $CFG --workdir $OUT/a4/sp_lr$lr --set model.d_model=512 --set parametrization.name=sp \
    --set parametrization.output_multiplier=4 --set optimizer.lr=$lr | tail -1
done

for s in width depth alpha_out width_a4; do
  mkdir -p docs/mup_transfer/$s
  cp $OUT/$s/results.json $OUT/$s/results.csv $OUT/$s/sweep.png docs/mup_transfer/$s/
done
cp $OUT/transfer512.txt docs/mup_transfer/
