"""Fitting what a model carries for inference (`sevenpoint.artifacts`) from predictions of cases it did
not train on: the validation split of a plain run, or the out-of-fold predictions of a cross-fit refit
ensemble (`train.cross_fit`). One call fits, in order:

1. per-task temperatures (NLL on a grid, `metrics.fit_temperature`);
2. the stacked diagnosis (logistic regression on the temperature-scaled criteria and diagnosis
   probabilities), compared with the image model's own diagnosis by 5-fold cross-validation *within*
   the held-out cases — the stacked model is the default diagnosis only if it is at least as accurate;
3. the conformal scores of every task on the probabilities that will be shown (the stacked
   model's cross-validated ones for the diagnosis when it is the default).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from ..artifacts import Artifacts, stacker_features
from ..config import config_from_dict
from ..schema import DIAG_INDEX, TASKS
from ..temperature import apply_temperatures
from .metrics import temperature_report

STACKER_C = 1.0  # inverse L2 strength; not tuned (on ~200 held-out cases a search would fit noise)


def _stacker_model() -> LogisticRegression:
    return LogisticRegression(C=STACKER_C, max_iter=5000)


def fit_stacker(probs: list[np.ndarray], targets: np.ndarray, seed: int = 0) -> tuple[dict | None, np.ndarray | None]:
    """(stacker dict, its cross-validated diagnosis probabilities on the annotated cases) or (None, None)
    when the held-out cases hold fewer than two diagnoses or too few cases to cross-validate."""
    y = targets[:, DIAG_INDEX]
    known = y >= 0
    classes, counts = np.unique(y[known], return_counts=True)
    folds = min(5, int(counts.min())) if len(classes) > 1 else 0
    if folds < 2:
        return None, None
    X = stacker_features(probs)[known]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        cv = cross_val_predict(_stacker_model(), X, y[known], method="predict_proba",
                               cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
        model = _stacker_model().fit(X, y[known])
    full_cv = np.zeros((len(cv), TASKS[DIAG_INDEX].num_classes))
    full_cv[:, classes] = cv
    image_acc = float((probs[DIAG_INDEX][known].argmax(axis=1) == y[known]).mean())
    stacked_acc = float((full_cv.argmax(axis=1) == y[known]).mean())
    stacker = {"coef": model.coef_.tolist(), "intercept": model.intercept_.tolist(), "classes": classes.tolist(),
               "C": STACKER_C, "default": stacked_acc >= image_acc,
               "held_out": {"cases": int(known.sum()), "folds": folds, "image_model_diag_accuracy": image_acc,
                            "stacked_diag_accuracy_cv": stacked_acc}}
    return stacker, full_cv


def conformal_scores(probs: list[np.ndarray], targets: np.ndarray) -> dict:
    """Per task, each annotated case's non-conformity score 1 - p(true class) and its true class."""
    tasks = {}
    for t, task in enumerate(TASKS):
        known = targets[:, t] >= 0
        y = targets[known, t]
        scores = 1.0 - probs[t][known][np.arange(len(y)), y]
        tasks[task.name] = {"scores": np.round(scores, 7).tolist(), "labels": y.astype(int).tolist(),
                            "counts": np.bincount(y, minlength=task.num_classes).astype(int).tolist()}
    return {"method": "split conformal, Mondrian by true class (crepes), score 1 - p(true class)", "tasks": tasks}


def fit_into(section: dict, pred, source: str, seed: int = 0) -> Artifacts:
    """`fit_held_out` stored into a checkpoint's `sevenpoint` section (changed in place): the temperatures
    into its config's `infer.temperature`, the rest as its artefacts (the others it holds are kept)."""
    temps, fields = fit_held_out(pred, source, seed)
    saved = config_from_dict(section["config"])
    section["config"] = dataclasses.replace(saved, infer=dataclasses.replace(saved.infer,
                                                                             temperature=tuple(temps))).to_dict()
    art = Artifacts.from_section(section)
    for key, value in fields.items():
        setattr(art, key, value)
    section.update(art.to_section())
    return art


def fit_held_out(pred, source: str, seed: int = 0) -> tuple[list[float], dict]:
    """(temperatures, artefact fields: calibration, conformal, stacker, fitted_on) from held-out `pred`."""
    temps, report = temperature_report(pred.probs, pred.targets)
    probs = apply_temperatures(pred.probs, temps)
    stacker, stacked_cv = fit_stacker(probs, pred.targets, seed)
    shown = list(probs)
    if stacker is not None and stacker["default"]:
        known = pred.targets[:, DIAG_INDEX] >= 0
        diag = shown[DIAG_INDEX].copy()
        diag[known] = stacked_cv
        shown[DIAG_INDEX] = diag
    n = len(pred.targets)  # "root (valid)" -> "root (valid, 203 cases)"
    fitted_on = f"{source[:-1]}, {n} cases)" if source.endswith(")") else f"{source} ({n} cases)"
    return temps, {"calibration": {"fitted_on": fitted_on, **report}, "conformal": conformal_scores(shown, pred.targets),
                   "stacker": stacker, "fitted_on": fitted_on}
