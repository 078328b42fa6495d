#!/usr/bin/env bash
# Seeds 1 and 2 (train.seed = data.seed) of the settings docs/schedule_transfer/gaps.py
# chooses: Power at its one a, cosine at its one lr, and WSD at each cell's best grid lr
# (the reference of the gap), all over the batch x horizon grid. About 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
J=${JAXTRAIN:-.venv/bin/jaxtrain}
OUT=${OUT:-runs/sweeps}
CHOICES=$(.venv/bin/python docs/schedule_transfer/gaps.py $OUT --choices)
field() { .venv/bin/python -c "import json,sys; print(json.loads(sys.argv[1])$1)" "$CHOICES"; }
A=$(field "['power_a']"); LR=$(field "['cosine_lr']")
STEPS=(--grid train.steps=40,80,160,320)
for S in 1 2; do
  SEED=(--set train.seed=$S --set data.seed=$S)
  for B in 8 16 32 64; do   # WSD: the learning rates that are best at any horizon of this batch
    LRS=$(field "['wsd_lr']" | .venv/bin/python -c "
import ast, sys; d = ast.literal_eval(sys.stdin.read())
print(','.join(str(v) for v in sorted({v for k, v in d.items() if k.split(',')[0] == '$B'})))")
    $J sweep configs/mup_sweep.yaml --grid train.batch_size=$B "${STEPS[@]}" --grid optimizer.lr=$LRS \
        --branch-horizons --set schedule.name=wsd "${SEED[@]}" --out $OUT/schedule_seeds/wsd_s${S}_b$B > /dev/null
  done
  $J sweep configs/mup_sweep.yaml --grid train.batch_size=8,16,32,64 "${STEPS[@]}" --grid schedule.power_a=$A \
      --x schedule.power_a --branch-horizons --set schedule.name=power --set schedule.power_b=-0.51 \
      --set optimizer.lr=3.125e-2 "${SEED[@]}" --out $OUT/schedule_seeds/power_s$S > /dev/null
  $J sweep configs/mup_sweep.yaml --grid train.batch_size=8,16,32,64 "${STEPS[@]}" --grid optimizer.lr=$LR \
      --set schedule.name=cosine "${SEED[@]}" --out $OUT/schedule_seeds/cosine_s$S > /dev/null
done
