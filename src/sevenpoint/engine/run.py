"""`train()`: the one entry to training. One model (`engine.train.train_model`), an ensemble of them
(`engine.ensemble.train_ensemble`, `train.ensemble`), or either trained as teacher and then as student
(`engine.distill.train_distilled`, `train.distill`); on `resume` the run's own config decides."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import RunConfig
from .distill import is_distill_run, train_distilled
from .ensemble import is_ensemble_run, train_ensemble
from .train import train_model


def train(cfg: RunConfig, data_dir: str | os.PathLike, run_dir: str | os.PathLike, resume: bool = False,
          progress: bool = True, argv: list[str] | None = None, stop_after_epochs: int | None = None,
          splits: dict[str, np.ndarray] | None = None) -> dict:
    """Train what `cfg` describes into `run_dir`; returns the summary also written to
    `run_dir/train_summary.json`. `splits` (train / valid row indices) replaces the official ones, e.g. for
    a cross-validation fold; `stop_after_epochs` interrupts the run (tests)."""
    if cfg.train.distill or (resume and is_distill_run(Path(run_dir))):
        return train_distilled(cfg, data_dir, run_dir, resume, progress, argv, stop_after_epochs, splits)
    if cfg.train.ensemble > 1 or (resume and is_ensemble_run(Path(run_dir))):
        return train_ensemble(cfg, data_dir, run_dir, resume, progress, argv, stop_after_epochs, splits)
    return train_model(cfg, data_dir, run_dir, resume, progress, argv, stop_after_epochs, splits)
