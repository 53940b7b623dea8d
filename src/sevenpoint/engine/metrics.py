"""The metrics `evaluate` reports, from probabilities and targets (scikit-learn / torchmetrics underneath)."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score
from torchmetrics.functional.classification import multiclass_calibration_error

from ..infer.temperature import apply_temperature
from ..schema import (DIAG_INDEX, MEL_CLASS, MELANOMA_THRESHOLD, PRESENT, TASKS, annotated, correct,
                      seven_point_score)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def per_class(y: np.ndarray, prob: np.ndarray, num_classes: int) -> dict[str, dict]:
    pred = prob.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(num_classes)))
    out = {}
    for c in range(num_classes):
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        pos = y == c
        auc = roc_auc_score(pos, prob[:, c]) if 0 < pos.sum() < len(y) else float("nan")
        out[str(c)] = {
            "support": int(pos.sum()),
            "sensitivity": _nan_to_none(tp / (tp + fn) if tp + fn else float("nan")),
            "specificity": _nan_to_none(tn / (tn + fp) if tn + fp else float("nan")),
            "precision": _nan_to_none(tp / (tp + fp) if tp + fp else float("nan")),
            "auc": _nan_to_none(auc),
        }
    return out


def ece(y: np.ndarray, prob: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error (top-label, L1) via torchmetrics."""
    return float(multiclass_calibration_error(torch.from_numpy(prob).float(), torch.from_numpy(y).long(),
                                              num_classes=prob.shape[1], n_bins=bins, norm="l1"))


def accuracy(pred: np.ndarray, y: np.ndarray) -> float | None:
    """Fraction of the annotated targets predicted right (PRESENT: any class but ABS); None if none is annotated."""
    scored = annotated(y)
    return float(correct(pred[scored], y[scored]).mean()) if scored.any() else None


def mean_accuracy(values) -> float | None:
    """The average over the tasks that were scored (None values left out); None if none was."""
    scored = [v for v in values if v is not None]
    return float(np.mean(scored)) if scored else None


def compute_metrics(probs: list[np.ndarray], targets: np.ndarray) -> dict:
    """All task metrics, the average accuracy and the melanoma decision; accuracies are fractions.

    Partial labels (schema.NOT_ANNOTATED, PRESENT): each task is scored on its annotated cases
    only; a task with none has accuracy None and stays out of the average. PRESENT targets count
    in the accuracy (any class but ABS is right) and in `presence_confusion`; the per-class
    figures, confusion matrix, ECE and NLL use the exactly labelled cases.
    """
    tasks = {}
    preds = np.stack([p.argmax(axis=1) for p in probs], axis=1)  # (N, 8)
    for t, task in enumerate(TASKS):
        y, p, pred = targets[:, t], probs[t], preds[:, t]
        scored, exact = annotated(y), y >= 0
        entry: dict = {"annotated": int(scored.sum()), "accuracy": accuracy(pred, y)}
        if exact.any():
            ye, pe = y[exact], p[exact]
            entry.update({
                "confusion_matrix": confusion_matrix(ye, pred[exact], labels=list(range(task.num_classes))).tolist(),
                "classes": {task.classes[int(k)]: v for k, v in per_class(ye, pe, task.num_classes).items()},
                "ece": ece(ye, pe), "nll": nll(pe, ye),
            })
        if (y == PRESENT).any():
            truth, said = y[scored] != 0, pred[scored] != 0
            entry["presence_confusion"] = {"rows": "true absent / present", "columns": "predicted absent / present",
                                           "matrix": confusion_matrix(truth, said, labels=[False, True]).tolist()}
        tasks[task.name] = entry
    scored_tasks = [t.name for t in TASKS if tasks[t.name]["accuracy"] is not None]
    has_diag = targets[:, DIAG_INDEX] >= 0
    truth_mel = targets[has_diag, DIAG_INDEX] == MEL_CLASS
    score = seven_point_score(preds[has_diag])
    flag = score >= MELANOMA_THRESHOLD
    both = 0 < truth_mel.sum() < len(truth_mel)
    mel = {
        "rule": f"7-point score from predicted criteria >= {MELANOMA_THRESHOLD}",
        "cases": int(has_diag.sum()),
        "accuracy": _nan_to_none(float((flag == truth_mel).mean()) if has_diag.any() else float("nan")),
        "sensitivity": _nan_to_none(float(flag[truth_mel].mean()) if truth_mel.any() else float("nan")),
        "specificity": _nan_to_none(float((~flag[~truth_mel]).mean()) if (~truth_mel).any() else float("nan")),
        "score_auc": _nan_to_none(roc_auc_score(truth_mel, _expected_score([p[has_diag] for p in probs]))
                                  if both else float("nan")),
        "diag_head_auc": _nan_to_none(roc_auc_score(truth_mel, probs[DIAG_INDEX][has_diag, MEL_CLASS])
                                      if both else float("nan")),
    }
    return {
        "cases": int(len(targets)),
        "average_accuracy": mean_accuracy(tasks[name]["accuracy"] for name in scored_tasks),
        "scored_tasks": scored_tasks,
        "not_annotated": [t.name for t in TASKS if t.name not in scored_tasks],
        "tasks": tasks,
        "melanoma": mel,
    }


def _expected_score(probs: list[np.ndarray]) -> np.ndarray:
    """Expected 7-point score under the predicted criteria probabilities (a continuous rank for AUC)."""
    total = np.zeros(len(probs[0]))
    for t, task in enumerate(TASKS):
        for cls, pts in task.points.items():
            total += pts * probs[t][:, cls]
    return total


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the NLL of softmax(log p / T); T=1 is in the grid, so NLL never rises."""
    grid = np.unique(np.concatenate([np.exp(np.linspace(np.log(0.05), np.log(20.0), 241)), [1.0]]))
    best_t, best_nll = 1.0, nll(apply_temperature(probs, 1.0), y)
    for t in grid:
        value = nll(apply_temperature(probs, t), y)
        if value < best_nll - 1e-12:
            best_t, best_nll = float(t), value
    return best_t


def fit_temperatures(probs: list[np.ndarray], targets: np.ndarray) -> list[float]:
    """One temperature per task fitted on (validation) probabilities; 1 for a task without annotation."""
    out = []
    for t, p in enumerate(probs):
        exact = targets[:, t] >= 0
        out.append(fit_temperature(p[exact], targets[exact, t]) if exact.any() else 1.0)
    return out


def temperature_report(probs: list[np.ndarray], targets: np.ndarray) -> tuple[list[float], dict]:
    """Temperatures fitted per task on (validation) probabilities, and per task the cases used with
    the NLL and ECE before / after (None for a task without annotation, whose temperature is 1)."""
    temps = fit_temperatures(probs, targets)
    report = {}
    for t, task in enumerate(TASKS):
        known = targets[:, t] >= 0
        y, before = targets[known, t], probs[t][known]
        after = apply_temperature(before, temps[t])
        report[task.name] = {"temperature": temps[t], "cases": int(known.sum()),
                             "valid_nll_before": nll(before, y) if known.any() else None,
                             "valid_nll_after": nll(after, y) if known.any() else None,
                             "valid_ece_before": ece(y, before) if known.any() else None,
                             "valid_ece_after": ece(y, after) if known.any() else None}
    return temps, report


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (probabilities clipped at 1e-12)."""
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
