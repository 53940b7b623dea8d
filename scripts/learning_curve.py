"""Train one model on a stratified fraction of the official training split and select on the full
validation split: a point of the learning curve (docs/RESULTS.md §2, the refit decision).
Validation only; the test split is never loaded by `train`.

    .venv/bin/python scripts/learning_curve.py --data ~/data/derm7pt --out runs/lc/f67-seed0 --fraction 0.667 \
        --seed 0 --config cpu-recipe-v5 train.ensemble=1 train.calibrate=false train.epochs=45

The subset is stratified on the diagnosis and drawn with the run's seed. Scale `train.epochs` by
1 / fraction to keep the number of optimiser steps (and the schedule's length in steps) unchanged.
"""

import argparse

import numpy as np
from sklearn.model_selection import train_test_split

from sevenpoint.config import load_config
from sevenpoint.data import load_dataset
from sevenpoint.engine.cv import diag_strata
from sevenpoint.engine.run import train

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--fraction", type=float, required=True)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--config", default="cpu-recipe-v5")
parser.add_argument("--no-progress", action="store_true")
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()

cfg = load_config(args.config, args.overrides, seed=args.seed)
data = load_dataset(args.data, cfg.data.format)
rows = data.splits["train"]
subset, _ = train_test_split(rows, train_size=args.fraction, stratify=diag_strata(data, rows, 2), random_state=args.seed)
print(f"training on {len(subset)} of {len(rows)} training cases; validation: all {len(data.splits['valid'])}", flush=True)
summary = train(cfg, args.data, args.out, progress=not args.no_progress,
                splits={"train": np.sort(subset), "valid": data.splits["valid"]})
print(f"best validation average accuracy {100 * summary['best_val_avg_acc']:.2f} "
      f"({summary['epochs_run']} epochs, {summary['train_seconds']} s)")
