"""What `evaluate` adds so a reader can see how far to trust a model: 95 % bootstrap intervals, the
prediction sets' measured coverage and size, accuracy broken down by case kind, and the diagnosis as
the image model gives it, as the stacked model gives it, and with the least certain criteria replaced
by the truth (an intervention curve, as concept-bottleneck work reports it: Koh et al. 2020).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from ..infer.artifacts import CRITERIA_INDEX, Artifacts, apply_corrections
from ..schema import DIAG_INDEX, MEL_CLASS, MELANOMA_THRESHOLD, TASKS, annotated, correct, seven_point_score

SMALL_CELL = 20  # breakdown groups with fewer cases are marked: their accuracy moves by > 10 points per case pair
BREAKDOWN_FIELDS = ("level_of_diagnostic_difficulty", "sex", "location", "elevation", "diagnosis")
INTERVENTION_K = (1, 2, 3, 7)


def _auc(truth: np.ndarray, score: np.ndarray) -> float | None:
    return float(roc_auc_score(truth, score)) if 0 < truth.sum() < len(truth) else None


def _interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def bootstrap_intervals(probs: list[np.ndarray], targets: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Percentile 95 % intervals from `n_boot` resamples of the cases (all figures from the same resamples):
    each task's accuracy, the average accuracy, the 7-point rule's accuracy / sensitivity / specificity and
    the two melanoma AUCs. Hand-vectorised: scipy.stats.bootstrap takes one statistic per call and would
    rerun every figure's resampling separately, so the intervals would not share resamples."""
    rng = np.random.default_rng(seed)
    n = len(targets)
    idx = rng.integers(0, n, size=(n_boot, n))  # (B, N)
    preds = np.stack([p.argmax(axis=1) for p in probs], axis=1)
    out: dict = {"resamples": n_boot, "level": 0.95, "tasks": {}}
    accs = np.full((n_boot, len(TASKS)), np.nan)
    for t, task in enumerate(TASKS):
        y = targets[:, t]
        scored = annotated(y)
        if not scored.any():
            continue
        ok = (correct(preds[:, t], y) & scored).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            accs[:, t] = ok[idx].sum(axis=1) / scored[idx].sum(axis=1)
        out["tasks"][task.name] = _interval(accs[:, t])
    scored_cols = [t for t in range(len(TASKS)) if np.isfinite(accs[:, t]).any()]
    out["average_accuracy"] = _interval(np.nanmean(accs[:, scored_cols], axis=1)) if scored_cols else None
    y = targets[:, DIAG_INDEX]
    has = y >= 0
    if has.any():
        truth = (y == MEL_CLASS) & has
        flag = seven_point_score(preds) >= MELANOMA_THRESHOLD
        hit = ((flag == truth) & has).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["melanoma_rule"] = {
                "accuracy": _interval(hit[idx].sum(1) / has[idx].sum(1)),
                "sensitivity": _interval((flag & truth)[idx].sum(1) / truth[idx].sum(1)),
                "specificity": _interval((~flag & has & ~truth)[idx].sum(1) / (has & ~truth)[idx].sum(1))}
        expected = np.zeros(n)
        for t, task in enumerate(TASKS):
            for cls, pts in task.points.items():
                expected += pts * probs[t][:, cls]
        # the AUCs on resamples of the cases with a diagnosis (the same resamples when every case has one)
        sub = np.flatnonzero(has)[idx % has.sum()] if not has.all() else idx
        out["melanoma_rule"]["diag_head_auc"] = _interval(_rank_auc(probs[DIAG_INDEX][:, MEL_CLASS][sub], truth[sub]))
        out["melanoma_rule"]["score_auc"] = _interval(_rank_auc(expected[sub], truth[sub]))
    return out


def _rank_auc(score: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Row-wise ROC AUC of (B, N) scores against (B, N) booleans (Mann-Whitney U from average ranks, ties
    counted half, as roc_auc_score); NaN for a row with one class only."""
    ranks = rankdata(score, axis=1)
    pos = truth.sum(axis=1).astype(np.float64)
    neg = truth.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * truth).sum(axis=1) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def set_report(sets: list[np.ndarray], targets: np.ndarray, level: float) -> dict:
    """Per task: the measured coverage (how often the true class is in the set; a PRESENT target is covered
    by any set holding a class other than ABS), the mean set size, the share of single-class sets and the
    coverage per true class."""
    out: dict = {"level": level, "tasks": {}}
    for t, task in enumerate(TASKS):
        y = targets[:, t]
        scored = annotated(y)
        if not scored.any():
            out["tasks"][task.name] = None
            continue
        s = sets[t][scored]
        ys = y[scored]
        exact = ys >= 0
        covered = np.where(exact, s[np.arange(len(ys)), np.clip(ys, 0, None)], s[:, 1:].any(axis=1))
        size = s.sum(axis=1)
        out["tasks"][task.name] = {
            "cases": int(scored.sum()), "coverage": float(covered.mean()), "mean_size": float(size.mean()),
            "single": float((size == 1).mean()),
            "coverage_by_class": {task.classes[c]: float(covered[ys == c].mean()) for c in range(task.num_classes)
                                  if (ys == c).any()}}
    rows = [v for v in out["tasks"].values() if v]
    out["mean_coverage"] = float(np.mean([v["coverage"] for v in rows])) if rows else None
    out["mean_size"] = float(np.mean([v["mean_size"] for v in rows])) if rows else None
    return out


def triage_report(shown, targets: np.ndarray) -> dict | None:
    """The melanoma referral point as the checkpoint stores it (the default diagnosis model's) and what it
    does on these cases: sensitivity, specificity and the share referred, on the cases with a diagnosis."""
    if shown.refer is None:
        return None
    y = targets[:, DIAG_INDEX]
    has = y >= 0
    mel, refer = (y == MEL_CLASS)[has], shown.refer[has]
    point = dict(shown.triage[0])
    point.update({"sensitivity_here": float(refer[mel].mean()) if mel.any() else None,
                  "specificity_here": float((~refer[~mel]).mean()) if (~mel).any() else None,
                  "referred_here": float(refer.mean()) if has.any() else None, "cases_here": int(has.sum())})
    return point


def breakdown(probs: list[np.ndarray], targets: np.ndarray, fields: list[dict[str, str]]) -> dict:
    """Average accuracy and DIAG accuracy per value of each descriptive field (difficulty, sex, location,
    elevation, raw diagnosis), with case counts; a group under SMALL_CELL cases is marked `small`."""
    from .metrics import accuracy, mean_accuracy

    preds = np.stack([p.argmax(axis=1) for p in probs], axis=1)
    out: dict = {}
    for name in BREAKDOWN_FIELDS:
        values = [f.get(name) for f in fields]
        if not any(values):
            continue
        groups = {}
        for value in sorted({v for v in values if v}):
            m = np.array([v == value for v in values])
            accs = [accuracy(preds[m, t], targets[m, t]) for t in range(len(TASKS))]
            groups[value] = {"cases": int(m.sum()), "average_accuracy": mean_accuracy(accs),
                             "diag_accuracy": accs[DIAG_INDEX], "small": bool(m.sum() < SMALL_CELL)}
        out[name] = groups
    return out


def least_sure_corrections(probs: list[np.ndarray], targets: np.ndarray, k: int) -> list[dict[str, int]]:
    """Per case, the k criteria the model is least sure of (lowest top probability) that the data labels
    exactly, set to their true class."""
    conf = np.stack([probs[t].max(axis=1) for t in CRITERIA_INDEX], axis=1)  # (N, 7)
    out = []
    for i in range(len(targets)):
        order = [CRITERIA_INDEX[j] for j in np.argsort(conf[i], kind="stable")]
        chosen = [t for t in order if targets[i, t] >= 0][:k]
        out.append({TASKS[t].name: int(targets[i, t]) for t in chosen})
    return out


def random_corrections(targets: np.ndarray, k: int, seed: int = 0) -> list[dict[str, int]]:
    """Per case, k criteria the data labels exactly, drawn at random (seeded), set to their true class: the
    control for `least_sure_corrections` (does asking about the least sure criteria beat asking about any?)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(targets)):
        labelled = [t for t in CRITERIA_INDEX if targets[i, t] >= 0]
        chosen = rng.permutation(labelled)[:k] if labelled else []
        out.append({TASKS[t].name: int(targets[i, t]) for t in chosen})
    return out


def _diag_figures(diag: np.ndarray, criteria_probs: list[np.ndarray], targets: np.ndarray) -> dict:
    y = targets[:, DIAG_INDEX]
    has = y >= 0
    preds = np.stack([p.argmax(axis=1) for p in criteria_probs], axis=1)
    flag = seven_point_score(preds)[has] >= MELANOMA_THRESHOLD
    truth = y[has] == MEL_CLASS
    return {"diag_accuracy": float((diag[has].argmax(1) == y[has]).mean()) if has.any() else None,
            "melanoma_auc": _auc(truth, diag[has, MEL_CLASS]),
            "rule_accuracy": float((flag == truth).mean()) if has.any() else None}


def diagnosis_models(probs: list[np.ndarray], targets: np.ndarray, art: Artifacts) -> dict | None:
    """DIAG accuracy and melanoma AUC (a) of the image model, (b) of the stacked model on the predicted
    criteria, (c) of the stacked model with the k least certain criteria replaced by the truth (k = 1, 2,
    3, 7), and (d) with k criteria drawn at random replaced instead (the control); the 7-point rule's
    accuracy beside each (it follows the corrected criteria too)."""
    if art.stacker is None:
        return None
    out = {"image_model": _diag_figures(probs[DIAG_INDEX], probs, targets),
           "stacked": _diag_figures(art.stacked_diagnosis(probs), probs, targets),
           "default": "stacked" if art.stacker_default else "image model", "intervention": {},
           "intervention_random": {}, "correction_effects": correction_effects(probs, art)}
    for k in INTERVENTION_K:
        fixed = apply_corrections(probs, least_sure_corrections(probs, targets, k))
        out["intervention"][str(k)] = _diag_figures(art.stacked_diagnosis(fixed), fixed, targets)
        fixed = apply_corrections(probs, random_corrections(targets, k))
        out["intervention_random"][str(k)] = _diag_figures(art.stacked_diagnosis(fixed), fixed, targets)
    return out


def correction_effects(probs: list[np.ndarray], art: Artifacts) -> dict[str, dict[str, float]] | None:
    """What a clinician's correction does to the stacked model's P(MEL): per criterion and non-absent value,
    the mean over the cases of P(MEL) with the criterion set to that value minus P(MEL) with it set to ABS
    (class 0), everything else as predicted. The checklist's melanoma signs (PN atypical, BWV present, VS,
    PIG, STR, DaG irregular, RS present) should each come out positive. None without a stacked model."""
    if art.stacker is None:
        return None
    n = len(probs[DIAG_INDEX])

    def p_mel(t: int, value: int) -> np.ndarray:
        return art.stacked_diagnosis(apply_corrections(probs, [{TASKS[t].name: value}] * n))[:, MEL_CLASS]

    out = {}
    for t in CRITERIA_INDEX:
        absent = p_mel(t, 0)
        out[TASKS[t].name] = {TASKS[t].classes[c]: float((p_mel(t, c) - absent).mean())
                              for c in range(1, TASKS[t].num_classes)}
    return out


def case_fields(cases) -> list[dict[str, str]]:
    return [{**c.raw_meta, **c.describe} for c in cases]

