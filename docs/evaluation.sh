#!/usr/bin/env bash
# Regenerates docs/evaluation/ (about 4 minutes on 2 CPU cores): evaluation tasks built from
# the standard library's held-out files (`jaxtrain data make-tasks`), the default run
# (configs/small.yaml) scoring them in the loop every 25 steps, `jaxtrain eval --tasks` on
# its step-0 and final checkpoints (checkpoint.keep=7 keeps step 0 beside the six every 50
# steps), and the figure. Runs land in runs/evaluation/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${JAXTRAIN:-}" ] || make venv
J=${JAXTRAIN:-.venv/bin/jaxtrain}
OUT=runs/evaluation
rm -rf $OUT && mkdir -p $OUT docs/evaluation

$J data make-tasks --out $OUT/tasks | tee docs/evaluation/tasks.json
$J train configs/small.yaml --workdir $OUT/small --set eval.every=25 --set checkpoint.keep=7 \
  --set "eval.tasks=[{name: next_line, kind: multiple_choice, path: $OUT/tasks/next_line.jsonl, target_delimiter: \"\\n\"},
                     {name: heldout, kind: bits_per_byte, path: $OUT/tasks/heldout.jsonl}]" | tail -1 \
  | tee docs/evaluation/final.txt
for step in 0 300; do  # the same numbers as the loop's rows at these steps
  $J eval $OUT/small --step $step --tasks | tee docs/evaluation/eval_step$step.json
done
grep -E '"step": (0|300),' $OUT/small/metrics.jsonl > docs/evaluation/rows_0_300.jsonl
$J plot $OUT/small --metric 'eval/*,val_bits_per_byte' --out docs/evaluation/curves.png
