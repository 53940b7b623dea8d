"""Distillation targets: a trained model (the teacher, e.g. the recipe's ensemble) writes its probabilities
for the 8 tasks on every case of another dataset (`sevenpoint teach`, e.g. ISIC images that carry no
criteria), and a student trains on them as `data.extra` with `data.extra_soft` (`train.distill_weight`).

The file is written by `evaluate.save_predictions`, like `out_of_fold.npz`: `ids`, `targets` and one
`probs_<TASK>` array per task, the probabilities the teacher shows (its temperatures applied; no
corrections, no stacked diagnosis: the image model's own).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..data import CaseSet, DatasetError, load_dataset
from ..data.base import extra_rows
from ..schema import TASKS

def teach(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike, split: str = "all",
          data_format: str = "auto", batch_size: int = 32, progress: bool = True, extra_cases: int = 0) -> dict:
    """Write the teacher's probabilities for every case of `split` of the dataset at `data_dir` to `out`; with
    `extra_cases` > 0, for the cases `data.extra_cases` draws from it instead (`data.base.extra_rows`)."""
    from ..checkpoint import load_model
    from ..infer.temperature import apply_temperatures
    from .evaluate import predict_measured, save_predictions

    model, cfg, _ = load_model(checkpoint)
    data = load_dataset(data_dir, data_format, include_leaky_meta=cfg.data.include_leaky_meta)
    if extra_cases:
        data.splits = {**data.splits, "drawn": extra_rows(data, extra_cases)}
        split = "drawn"
    data.split_cases(split)  # an unknown split fails here, before any work
    pred = predict_measured(model, cfg, data, split, batch_size, progress)
    pred.probs = apply_temperatures(pred.probs, cfg.infer.output_temperature)
    save_predictions(out, pred)
    return {"out": str(out), "cases": len(pred.ids), "dataset": str(data.root), "split": split,
            "teacher": str(checkpoint)}


def with_soft_targets(data: CaseSet, path: str | os.PathLike) -> CaseSet:
    """`data` whose cases named in the teacher's file `path` carry its probabilities (`Case.soft`)."""
    from .evaluate import load_predictions

    try:
        saved = load_predictions(path)
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"{path}: not a teacher's probabilities file from `sevenpoint teach` ({exc})") from exc
    ids, probs = saved.ids, [p.astype(np.float32) for p in saved.probs]
    for task, p in zip(TASKS, probs):
        if p.shape != (len(ids), task.num_classes):
            raise DatasetError(f"{path}: probs_{task.name} has shape {p.shape}, expected ({len(ids)}, "
                               f"{task.num_classes})")
    row_of = {cid: i for i, cid in enumerate(ids)}
    soft = np.concatenate(probs, axis=1)
    cases = [dataclasses.replace(c, soft=soft[row_of[c.case_id]]) if c.case_id in row_of else c for c in data.cases]
    if not any(c.soft is not None for c in cases):
        raise DatasetError(f"{path}: none of its {len(ids)} case ids is a case of {data.root}")
    found = sum(c.soft is not None for c in cases)
    note = f"teacher's probabilities for {found} of {len(cases)} case(s) from {path}"
    return dataclasses.replace(data, cases=cases, quirks=[*data.quirks, note])
