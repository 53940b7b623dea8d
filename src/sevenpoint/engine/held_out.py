"""Fitting what a model carries for inference (`sevenpoint.infer.artifacts`) from predictions of cases it did
not train on: the validation split of a plain run, or the out-of-fold predictions of a cross-fit refit
ensemble (`train.cross_fit`). One call fits, in order:

1. per-task temperatures (NLL on a grid, `metrics.fit_temperature`);
2. the stacked diagnosis (logistic regression on the temperature-scaled criteria and diagnosis
   probabilities, with copies of the cases whose criteria are set at random to the truth, as a
   correction sets them), compared with the image model's own diagnosis by 5-fold cross-validation
   *within* the held-out cases — the stacked model is the default diagnosis only if it is at least as
   accurate;
3. the melanoma referral point on P(MEL) for 90 % sensitivity (`artifacts.triage_point`), per
   diagnosis model;
4. the conformal scores of every task on the probabilities that will be shown (the stacked
   model's cross-validated ones for the diagnosis when it is the default), and both diagnosis models'
   scores, so a corrected case's diagnosis set is scored against the model that gave it.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from ..infer.artifacts import CRITERIA_INDEX, Artifacts, stacker_features, triage_point
from ..config import config_from_dict
from ..schema import DIAG_INDEX, MEL_CLASS, TASKS
from ..infer.temperature import apply_temperatures
from .metrics import temperature_report

STACKER_C = 1.0  # inverse L2 strength; not tuned (on ~200 held-out cases a search would fit noise)


def _stacker_model() -> LogisticRegression:
    return LogisticRegression(C=STACKER_C, max_iter=5000)


TRIAGE_SENSITIVITY = 0.9  # the melanoma referral point's sensitivity (issue 40: a clinic states this one)
MIX_COPIES = 8  # copies of each held-out case with criteria at random set to their true values


def mixed_criteria(probs: list[np.ndarray], targets: np.ndarray, copies: int, seed: int) -> tuple[list[np.ndarray],
                                                                                                   np.ndarray]:
    """`probs` followed by `copies` copies of every case in which each exactly labelled criterion, on its own
    coin (p = 1/2), is replaced by its one-hot true value: what the stacked diagnosis sees once a clinician
    corrects some criteria (an independent bottleneck, Koh et al. 2020). Returns (probs, case index per row)."""
    rng = np.random.default_rng(seed)
    n = len(targets)
    rows = np.concatenate([np.arange(n)] + [np.arange(n)] * copies)
    out = [p[rows].copy() for p in probs]
    for t in CRITERIA_INDEX:
        y = targets[rows, t]
        swap = (rng.random(len(rows)) < 0.5) & (y >= 0)
        swap[:n] = False  # the originals stay as predicted
        out[t][swap] = np.eye(probs[t].shape[1])[y[swap]]
    return out, rows


def fit_stacker(probs: list[np.ndarray], targets: np.ndarray, seed: int = 0) -> tuple[dict | None, np.ndarray | None]:
    """(stacker dict, its cross-validated diagnosis probabilities on the annotated cases) or (None, None)
    when the held-out cases hold fewer than two diagnoses or too few cases to cross-validate.

    Fitted on the held-out cases as predicted plus `MIX_COPIES` copies with criteria set at random to the
    truth (`mixed_criteria`), so it has seen the one-hot values a correction feeds it. The comparison with
    the image model (which decides the default) is on the cases as predicted, by cross-validation whose
    folds keep a case's copies together."""
    y = targets[:, DIAG_INDEX]
    known = np.flatnonzero(y >= 0)
    classes, counts = np.unique(y[known], return_counts=True)
    folds = min(5, int(counts.min())) if len(classes) > 1 else 0
    if folds < 2:
        return None, None
    sub = [p[known] for p in probs]
    mixed, rows = mixed_criteria(sub, targets[known], MIX_COPIES, seed)
    X, Xmix, ymix = stacker_features(sub), stacker_features(mixed), y[known][rows]
    full_cv = np.zeros((len(known), TASKS[DIAG_INDEX].num_classes))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        for train_idx, test_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y[known]):
            fit_rows = np.isin(rows, train_idx)
            fold = _stacker_model().fit(Xmix[fit_rows], ymix[fit_rows])
            full_cv[np.ix_(test_idx, fold.classes_)] = fold.predict_proba(X[test_idx])
        model = _stacker_model().fit(Xmix, ymix)
    image_acc = float((sub[DIAG_INDEX].argmax(axis=1) == y[known]).mean())
    stacked_acc = float((full_cv.argmax(axis=1) == y[known]).mean())
    stacker = {"coef": model.coef_.tolist(), "intercept": model.intercept_.tolist(), "classes": classes.tolist(),
               "C": STACKER_C, "default": stacked_acc >= image_acc, "mixed_copies": MIX_COPIES,
               "held_out": {"cases": int(len(known)), "folds": folds, "image_model_diag_accuracy": image_acc,
                            "stacked_diag_accuracy_cv": stacked_acc}}
    return stacker, full_cv


def _task_scores(probs: np.ndarray, targets: np.ndarray, num_classes: int, folds: np.ndarray | None = None) -> dict:
    known = targets >= 0
    y = targets[known]
    scores = 1.0 - probs[known][np.arange(len(y)), y]
    out = {"scores": np.round(scores, 7).tolist(), "labels": y.astype(int).tolist(),
           "counts": np.bincount(y, minlength=num_classes).astype(int).tolist()}
    if folds is not None:
        out["folds"] = np.asarray(folds)[known].astype(int).tolist()
    return out


SPLIT_METHOD = "split conformal, Mondrian by true class with rare classes pooled, score 1 - p(true class)"
CROSS_METHOD = ("cross-conformal over the cross-fitted members (member k scores a new case against the cases of "
                "fold k, the counts pooled), Mondrian by true class with rare classes pooled, score 1 - p(true class)")


def conformal_scores(probs: list[np.ndarray], targets: np.ndarray, diagnosis: dict[str, np.ndarray] | None = None,
                     folds: np.ndarray | None = None) -> dict:
    """Per task, each annotated case's non-conformity score 1 - p(true class) and its true class;
    `diagnosis`: {"image model": (N, 5), "stacked": (N, 5)}, both diagnosis models' held-out probabilities,
    stored too so a corrected case's set is scored against the model that gave its diagnosis. `folds`: (N,)
    the member that made each case's prediction (a cross-fit ensemble's out-of-fold ones): stored with each
    score, they make the sets cross-conformal (`Artifacts.cross_conformal`)."""
    tasks = {task.name: _task_scores(probs[t], targets[:, t], task.num_classes, folds) for t, task in enumerate(TASKS)}
    out = {"method": SPLIT_METHOD if folds is None else CROSS_METHOD, "tasks": tasks}
    if diagnosis:
        n = TASKS[DIAG_INDEX].num_classes
        out["diagnosis"] = {name: _task_scores(p, targets[:, DIAG_INDEX], n, folds) for name, p in diagnosis.items()}
    return out


def fit_into(section: dict, pred, source: str, seed: int = 0, temperature_on: str = "output") -> Artifacts:
    """`fit_held_out` stored into a checkpoint's `sevenpoint` section (changed in place): the temperatures
    into its config's `infer.temperature`, the rest as its artefacts (the others it holds are kept).

    `temperature_on="members"`: `pred` are single members' predictions (a cross-fit ensemble's out-of-fold
    ones), so the temperatures fitted on them are applied to each member before averaging (calibrate-then-pool,
    RESULTS §13); "output": `pred` are the model's own predictions, and so is what they are applied to."""
    temps, fields = fit_held_out(pred, source, seed)
    saved = config_from_dict(section["config"])
    infer = dataclasses.replace(saved.infer, temperature=tuple(temps), temperature_on=temperature_on)
    section["config"] = dataclasses.replace(saved, infer=infer).to_dict()
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
    shown, diagnosis = list(probs), None
    known = pred.targets[:, DIAG_INDEX] >= 0
    if stacker is not None:
        diag = shown[DIAG_INDEX].copy()
        diag[known] = stacked_cv  # unannotated cases carry no score: their row is never read
        diagnosis = {"image model": probs[DIAG_INDEX], "stacked": diag}
        if stacker["default"]:
            shown[DIAG_INDEX] = diag
    is_mel = pred.targets[known, DIAG_INDEX] == MEL_CLASS
    models = diagnosis or {"image model": probs[DIAG_INDEX]}
    triage = {name: triage_point(p[known, MEL_CLASS], is_mel, TRIAGE_SENSITIVITY) for name, p in models.items()}
    triage = triage if triage.get("image model") else None
    n = len(pred.targets)  # "root (valid)" -> "root (valid, 203 cases)"
    fitted_on = f"{source[:-1]}, {n} cases)" if source.endswith(")") else f"{source} ({n} cases)"
    return temps, {"calibration": {"fitted_on": fitted_on, **report}, "conformal": conformal_scores(shown, pred.targets, diagnosis, pred.folds),
                   "stacker": stacker, "fitted_on": fitted_on, "triage": triage}
