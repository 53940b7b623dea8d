"""Give a cross-fitted run trained before calibration scores carried their fold (before 2026-12-05) the
cross-conformal prediction sets of today's `train.cross_fit` (`sevenpoint.infer.artifacts`), without
retraining: the folds are re-derived from the run's config (`engine.ensemble.cross_fit_folds`, seeded),
attached to its saved out-of-fold predictions (`RUN/out_of_fold.npz`), and everything `train.calibrate`
fits is fitted again from them into a copy of `best.ckpt`. The temperatures come out as before (same
predictions); only the sets change.

    .venv/bin/python scripts/cross_conformal_refit.py RUN --data D --out RUN/checkpoints/cross.ckpt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from sevenpoint.checkpoint import atomic_torch_save, read_checkpoint
from sevenpoint.config import config_from_dict
from sevenpoint.engine.ensemble import cross_fit_folds
from sevenpoint.engine.evaluate import load_predictions
from sevenpoint.engine.held_out import fit_into
from sevenpoint.engine.train import load_training_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cfg = config_from_dict(yaml.safe_load((args.run / "config.yaml").read_text()))
    if not cfg.train.cross_fit:
        raise SystemExit(f"{args.run}: not a cross-fitted run (train.cross_fit is false)")
    data = load_training_data(args.data, cfg, extra=False)
    fold_of = {data.cases[r].case_id: k for k, rows in enumerate(cross_fit_folds(data, cfg)) for r in rows}
    pred = load_predictions(args.run / "out_of_fold.npz")
    pred.folds = np.array([fold_of[i] for i in pred.ids])
    ckpt = read_checkpoint(args.run / "checkpoints" / "best.ckpt")
    section = ckpt["sevenpoint"]
    before = section["config"]["infer"]["temperature"]
    source = f"{data.root} (valid, out of fold: each case by the member that never saw it)"
    fit_into(section, pred, source, cfg.seed, "members")
    after = section["config"]["infer"]["temperature"]
    if not np.allclose(before, after):
        raise SystemExit(f"temperatures changed ({before} -> {after}): these are not the run's own predictions")
    atomic_torch_save(ckpt, args.out)
    counts = np.bincount(pred.folds)
    print(f"{args.out}: cross-conformal sets over {len(counts)} folds ({', '.join(map(str, counts))} cases); "
          f"temperatures unchanged")


if __name__ == "__main__":
    main()
