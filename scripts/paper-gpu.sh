#!/usr/bin/env bash
# The paper recipe (configs/paper.yaml: modified Xception, 299 px, Adam 1e-4, batch 32, up to
# 150 epochs) and its ablations on one GPU, within a wall-clock budget, each model evaluated
# once on the test split from its best-on-validation checkpoint.
#   scripts/paper-gpu.sh DATA_DIR OUT_DIR [BUDGET_SECONDS] [extra key=value overrides...]
# DATA_DIR may hold images already cropped and resized to 299 px (then pass data.crop=0).
set -uo pipefail
data=${1:?DATA_DIR}; out=${2:?OUT_DIR}; budget=${3:-480}; shift 3 || shift $#
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
run() {  # name, per-run cap (s), overrides...
  local name=$1 cap=$2; shift 2
  local t=$(left); (( t < 60 )) && { echo "skip $name: ${t}s left"; return; }
  (( cap > t - 30 )) && cap=$(( t - 30 ))
  echo "== $name (cap ${cap}s) $(date -u +%T)"
  timeout --signal=TERM "$cap" "${PYTHON:-python3}" -m sevenpoint.cli train --data "$data" --out "$out/$name" --config paper \
      --no-progress "$@" || echo "$name: training ended early (rc $?) — evaluating its best checkpoint"
  if [ -f "$out/$name/checkpoints/best.ckpt" ]; then
    "${PYTHON:-python3}" -m sevenpoint.cli evaluate --checkpoint "$out/$name/checkpoints/best.ckpt" --data "$data" \
        --split test --out "$out/$name/test" --no-progress | grep -E "sevenpoint|majority|average accuracy"
  fi
}
run DCIHMM 270 "$@"
run DIM 120 model.variant=DIM "$@"
run DCIHMM-noSA 150 model.attention=false "$@"
run CIM 120 model.variant=CIM "$@"
echo "total $(( $(date +%s) - start ))s"
