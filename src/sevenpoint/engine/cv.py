"""`run_cv()`: K-fold cross-validation over the official train + valid cases (never test).

One validation split of 203 cases has a standard error of ~1-1.5 points on the average
accuracy, too coarse to choose between recipes; K folds over the 616 train + valid cases
score every one of them once. Folds are stratified on the diagnosis and fixed by `fold_seed`,
so two configurations compared with the same `fold_seed` see the same folds (paired).
Resumable like `ablate`: a finished fold is reused, an interrupted one resumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from ..config import ConfigError, RunConfig
from ..data import CaseSet, load_dataset
from ..schema import DIAG_INDEX
from .report import mean_sd
from .finish import TRAIN_SPLITS
from .run import train


def diag_strata(data: CaseSet, rows: np.ndarray, min_count: int) -> np.ndarray:
    """Stratification labels for `rows`: the diagnosis, with classes rarer than `min_count` (which cannot
    be spread over every part) and unlabelled cases stratified together."""
    diag = np.array([data.cases[i].targets[DIAG_INDEX] for i in rows])
    counts = np.bincount(diag[diag >= 0], minlength=diag.max(initial=0) + 1)
    return np.where((diag >= 0) & (counts[diag.clip(0)] >= min_count), diag, -1)


def make_folds(data: CaseSet, k: int, fold_seed: int = 0) -> list[dict[str, np.ndarray]]:
    """K {train, valid} row-index splits over the official train + valid rows, stratified on DIAG."""
    if k < 2:
        raise ValueError(f"--folds: need at least 2, got {k}")
    rows = np.concatenate([data.splits[s] for s in TRAIN_SPLITS])
    strata = diag_strata(data, rows, k)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=fold_seed)
    return [{"train": np.sort(rows[a]), "valid": np.sort(rows[b])} for a, b in splitter.split(rows, strata)]


def run_cv(cfg: RunConfig, data_dir: str | os.PathLike, out: str | os.PathLike, folds: int = 5,
           fold_seed: int = 0, progress: bool = True) -> dict:
    """Train one model per fold; write `cv.json` and `cv.md` (per-fold and mean ± sd validation accuracy)."""
    if cfg.train.refit:
        raise ConfigError("cv scores each fold on held-out cases, and a refit trains on them: add train.refit=false")
    out = Path(out)
    data = load_dataset(data_dir, cfg.data.format, include_leaky_meta=cfg.data.include_leaky_meta)
    splits = make_folds(data, folds, fold_seed)
    scores = []
    for i, split in enumerate(splits):
        run_dir = out / f"fold{i}"
        summary_file = run_dir / "train_summary.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
        else:
            resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
            summary = train(cfg, data_dir, run_dir, resume=resume, progress=progress, splits=split)
            (run_dir / "fold.json").write_text(json.dumps({k: v.tolist() for k, v in split.items()}))
        scores.append(100 * summary["best_val_avg_acc"])
    result = {"folds": folds, "fold_seed": fold_seed, "cases": int(sum(len(s["valid"]) for s in splits)),
              "fold_val_avg_acc": scores, "mean": float(np.mean(scores)), "sd": float(np.std(scores, ddof=1))}
    lines = [f"# {folds}-fold cross-validation over train + valid ({result['cases']} cases, fold seed {fold_seed})",
             "", "| fold | held-out cases | best val avg acc |", "|---|---:|---:|"]
    lines += [f"| {i} | {len(s['valid'])} | {v:.2f} |" for i, (s, v) in enumerate(zip(splits, scores))]
    lines += ["", f"mean ± sd over folds: **{mean_sd(scores)}**", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv.json").write_text(json.dumps(result, indent=2))
    (out / "cv.md").write_text("\n".join(lines))
    return result
