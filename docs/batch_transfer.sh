#!/usr/bin/env bash
# The optimal learning rate across batch size at equal tokens (WSD under muP) and Adam's
# beta2 at the smallest and largest batch, and the law lr_opt = a B^alpha T^b over a batch x
# horizon grid (horizons branched from one long run): docs/batch_transfer.md. About 30 minutes on 2
# CPU cores. Sweeps are caches: rerunning resumes them.
set -euo pipefail
cd "$(dirname "$0")/.."
J=${JAXTRAIN:-.venv/bin/jaxtrain}
OUT=${OUT:-runs/sweeps}
LRS=9.765625e-4,1.953125e-3,3.90625e-3,7.8125e-3,1.5625e-2,3.125e-2,6.25e-2   # 2^-10 .. 2^-4
COMMON=(--set schedule.name=wsd --set train.steps=320 --equal-tokens)   # 320 x 16 sequences of 64 tokens

# 1. batch 8..128 (16x) at 327,680 tokens each, the law lr_opt = a * B^alpha
$J sweep configs/mup_sweep.yaml --grid train.batch_size=8,16,32,64,128 --grid optimizer.lr=$LRS \
    --curves train.batch_size --fit lr~batch "${COMMON[@]}" --out $OUT/batch
# 2. beta2 0.95 / 0.99 / 0.999 at batch 8 and 128
$J sweep configs/mup_sweep.yaml --grid train.batch_size=8,128 --grid optimizer.b2=0.95,0.99,0.999 \
    --grid optimizer.lr=$LRS --curves optimizer.b2 "${COMMON[@]}" --out $OUT/beta2
# 3. batch 8..64 x horizon 40..320 steps (8x each; tokens = steps x batch x 64), WSD, the longest
#    horizon of each (batch, lr) trained once and the others branched from it as cooldowns
$J sweep configs/mup_sweep.yaml --grid train.batch_size=8,16,32,64 --grid train.steps=40,80,160,320 \
    --grid optimizer.lr=$LRS --curves train.steps --fit lr~batch,tokens --branch-horizons \
    --set schedule.name=wsd --out $OUT/horizons
.venv/bin/python docs/batch_transfer/holdout.py $OUT/horizons/results.json > docs/batch_transfer/holdout.json
mkdir -p docs/batch_transfer
cp $OUT/batch/sweep.png docs/batch_transfer/batch.png
cp $OUT/batch/fits.png docs/batch_transfer/batch_fit.png
cp $OUT/beta2/sweep.png docs/batch_transfer/beta2.png
cp $OUT/batch/results.json docs/batch_transfer/batch_results.json
cp $OUT/beta2/results.json docs/batch_transfer/beta2_results.json
cp $OUT/horizons/sweep.png docs/batch_transfer/horizons.png
cp $OUT/horizons/fits.png docs/batch_transfer/horizons_fit.png
cp $OUT/horizons/results.json docs/batch_transfer/horizons_results.json
