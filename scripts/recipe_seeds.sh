#!/usr/bin/env bash
# A recipe's headline figure: train seeds one after another, read each seed's test split (and PH2) once,
# then summarise over the seeds that have finished (`sevenpoint summarize`: mean ± sd of every figure).
#
#   scripts/recipe_seeds.sh DATA OUT [key=value overrides...]
#   SEEDS="0 1 2" CONFIG=cpu-recipe PH2=~/data/PH2Dataset scripts/recipe_seeds.sh ~/data/derm7pt runs/v14
#
# Resumable: run it again after an interruption (a session's end, a reboot) and it goes on where it stopped —
# a trained seed is not retrained, an interrupted one continues from its last checkpoint (`train --resume`),
# an evaluation already written is not redone. Seeds run one at a time (a lock file in OUT): two trainings side
# by side on 2 cores slow each other far more than 2x. Each seed's wall-clock training time goes to
# OUT/sS/train_wall_seconds (only for a training that ran start to end in one go).
set -euo pipefail
data=${1:?DATA (Derm7pt folder)}; out=${2:?OUT folder}; shift 2
sp=${SEVENPOINT:-sevenpoint}
config=${CONFIG:-cpu-recipe}
seeds=${SEEDS:-0 1 2}
mkdir -p "$out"
exec 9>"$out/.lock"
flock -n 9 || { echo "$out is in use by another recipe_seeds.sh" >&2; exit 1; }
for s in $seeds; do
  run="$out/s$s"
  if [ ! -e "$run/trained" ]; then
    resume=(); [ -e "$run/config.yaml" ] && resume=(--resume)
    echo "== seed $s: training ($(date -u +%T) UTC)"
    start=$(date +%s)
    "$sp" train --data "$data" --out "$run" --config "$config" --seed "$s" "${resume[@]}" "$@"
    [ ${#resume[@]} -eq 0 ] && echo $(( $(date +%s) - start )) > "$run/train_wall_seconds"
    touch "$run/trained"
  fi
  [ -e "$run/test/metrics.json" ] || "$sp" evaluate --checkpoint "$run/checkpoints/best.ckpt" --data "$data" \
      --split test --out "$run/test"
  if [ -n "${PH2:-}" ] && [ ! -e "$run/ph2/metrics.json" ]; then
    "$sp" evaluate --checkpoint "$run/checkpoints/best.ckpt" --data "$PH2" --split all --out "$run/ph2"
  fi
done
for split in test ph2; do
  evals=()
  for s in $seeds; do [ -e "$out/s$s/$split/metrics.json" ] && evals+=("$out/s$s/$split"); done
  [ ${#evals[@]} -gt 0 ] && "$sp" summarize "${evals[@]}" --out "$out/summary-$split"
done
echo "summaries: $out/summary-test${PH2:+ and $out/summary-ph2}"
