"""What a trained model carries for inference besides its weights: one home, one read, one write.

`Artifacts` is everything `train` fits from data other than the weights — the out-of-distribution
score, each task's training-majority class, the temperatures (kept in `infer.temperature` of the
config, which every reader already applies), the class-conditional conformal calibration scores
and the criteria-aware (stacked) diagnosis model — built in memory at the end of `train`, written
into the checkpoint's `sevenpoint` section once, and read by `evaluate`, `predict`, `serve` and
`export` through `Artifacts.from_section`. An older checkpoint without some of them still loads;
`missing()` says what it lacks.

The applying side is numpy (and crepes for the p-values): no training stack at inference.

- **Prediction sets** (split conformal, Mondrian by true class — Vovk et al. 2005; crepes'
  `ConformalClassifier`): non-conformity = 1 - p(true class) on out-of-fold (or held-out
  validation) cases; class c enters a case's set when its p-value exceeds 1 - level. A class whose
  bin holds enough calibration cases to be left out at `level` (n >= level / (1 - level): 9 at 90 %)
  keeps its own bin, and that class is covered at >= `level` of its cases. Classes below that count are
  pooled into one bin (clustered conformal, Ding et al. 2023: covered at >= `level` on average over
  the pooled classes), and when the pool is still too small they are scored against every class's
  calibration cases (marginal coverage only). So no class is in every set merely because its bin is
  small. An empty set (every class scores as unusual as fewer than 1 - level of the calibration
  cases) is never shown: it becomes the most probable class alone, which only adds coverage.
  Split conformal (a plain run calibrated on validation): the calibration cases are predicted by the
  same model as new ones, so under exchangeability the level holds exactly (>= `level`).
- **Cross-conformal sets** for a cross-fitted ensemble (`train.cross_fit`, Vovk 2015): member k never
  trained on fold k of the validation split, and each calibration score is stored with its fold. A
  new case is scored by each member k against fold k's scores only, and the counts are pooled over
  the folds (`_cross_p_values`), so every comparison is between a member and cases it never saw.
  Guarantee (Barber et al. 2021's K-fold argument, as stated for cross-conformal by Gasparin & Ramdas
  2025; per bin for the Mondrian bins): with a = 1 - level, K folds and n calibration cases, coverage
  >= 1 - 2a - 2 (1 - a)(K - 1) / (n + K), i.e. >= 78 % at a 90 % level for Derm7pt's 203 validation
  cases in 3 folds; in practice it is close to `level` (measured in RESULTS). Not covered by it: the
  stacked diagnosis model and the temperatures were fitted on all the held-out cases, calibration
  cases included.
- **Stacked diagnosis**: multinomial logistic regression on the 7 criteria's probabilities and the
  image model's own diagnosis probabilities, fitted out of fold. A clinician's correction of a
  criterion replaces that criterion's probabilities by its one-hot value, and the stacked model
  re-derives the diagnosis from the corrected criteria and the image. A correction equal to the
  model's own answer for that criterion changes nothing. After a correction the diagnosis set is
  scored against the stacked model's own calibration scores.
- **Referral point** (`triage`): a threshold on P(MEL) chosen on the held-out melanomas so that a new
  melanoma is referred with probability >= the stated sensitivity (default 90 %): refer when P(MEL) is
  at least the k-th smallest held-out melanoma's, k = floor((1 - sensitivity) (n + 1)) — a conformal
  bound on the melanomas' ranks, under the same exchangeability as the sets. Its held-out sensitivity
  and specificity are stored beside it.
- **Doubt**: `postprocess` marks a case uncertain when its diagnosis set holds more than one class,
  or — for a model without sets — when the most probable diagnosis has probability below
  `DOUBT_BELOW` (50 %); `why` says which rule fired.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..schema import DIAG_INDEX, MEL_CLASS, TASK_BY_NAME, TASK_NAMES, TASKS

DEFAULT_LEVEL = 0.9
DOUBT_BELOW = 0.5  # a model without sets calls a diagnosis below this probability uncertain
CRITERIA_INDEX = tuple(t for t, task in enumerate(TASKS) if task.is_criterion)


class CorrectionError(ValueError):
    """A correction that names an unknown criterion or value (the message names it)."""


def parse_corrections(values: Mapping[str, object] | None) -> dict[str, int]:
    """{criterion: class} from names (`{"BWV": "ABS"}`, case-insensitive, long names too) -> class indices."""
    out: dict[str, int] = {}
    for name, value in (values or {}).items():
        key = {t.lower(): t for t in TASK_BY_NAME}.get(str(name).strip().lower())
        task = TASK_BY_NAME.get(key) if key else None
        if task is None or not task.is_criterion:
            known = ", ".join(t.name for t in TASKS if t.is_criterion)
            raise CorrectionError(f"correction {name!r}: not a criterion (known: {known}; the diagnosis follows them)")
        text = str(value).strip().lower()
        choices = {c.lower(): i for i, c in enumerate(task.classes)} | {c.lower(): i for i, c in
                                                                          enumerate(task.long_names)}
        if text not in choices:
            raise CorrectionError(f"correction {task.name}={value!r}: unknown value (allowed: "
                                  f"{', '.join(task.classes)})")
        out[task.name] = choices[text]
    return out


def apply_corrections(probs: list[np.ndarray], corrections: list[Mapping[str, int]]) -> list[np.ndarray]:
    """Each case's corrected criteria set to their one-hot value (per case: {task name: class})."""
    probs = [p.copy() for p in probs]
    for i, fix in enumerate(corrections):
        for name, cls in fix.items():
            t = TASK_NAMES.index(name)
            probs[t][i] = 0.0
            probs[t][i, cls] = 1.0
    return probs


def stacker_features(probs: list[np.ndarray]) -> np.ndarray:
    """(N, 24): the criteria's probabilities (19) then the image model's diagnosis probabilities (5)."""
    return np.concatenate([probs[t] for t in CRITERIA_INDEX] + [probs[DIAG_INDEX]], axis=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Artifacts:
    """See the module docstring. `conformal`: per task, the calibration cases' non-conformity scores and
    true classes; `stacker`: the logistic model (coef (5, 24), intercept (5,)), whether it is the default
    diagnosis, and the out-of-fold comparison that decided it; `fitted_on`: where those came from."""

    ood: dict | None = None
    train_majority: list[int] | None = None
    calibration: dict | None = None
    conformal: dict | None = None
    stacker: dict | None = None
    fitted_on: str | None = None
    provenance: dict | None = None  # git commit, sevenpoint version, the training command
    triage: dict | None = None  # the melanoma referral threshold on P(MEL) per diagnosis model (`triage_point`)
    _sets: dict = field(default_factory=dict, repr=False, compare=False)

    KEYS = ("ood", "train_majority", "calibration", "conformal", "stacker", "fitted_on", "provenance", "triage")

    @classmethod
    def from_section(cls, section: Mapping) -> Artifacts:
        return cls(**{k: section.get(k) for k in cls.KEYS})

    def to_section(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}

    def missing(self) -> list[str]:
        """What this checkpoint lacks, in words (empty: nothing)."""
        out = []
        if self.conformal is None:
            out.append("prediction sets (no out-of-fold or validation scores were stored)")
        if self.stacker is None:
            out.append("a criteria-aware diagnosis model (corrections change the score and rule, not the diagnosis)")
        if self.ood is None:
            out.append("out-of-distribution statistics")
        if self.triage is None:
            out.append("a melanoma referral point (only the checklist's score rule flags melanoma)")
        return out

    # --- prediction sets -------------------------------------------------------------------------
    def _part(self, t: int, source: str | None = None) -> Mapping:
        """Task t's stored calibration; for the diagnosis, `source` picks the model ("image model" or
        "stacked") when the checkpoint stores both (older ones store the default's only)."""
        part = self.conformal["tasks"][TASKS[t].name]
        if source is not None and source in (self.conformal.get("diagnosis") or {}):
            part = self.conformal["diagnosis"][source]
        return part

    def _calibration(self, t: int, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, true classes) of task t's calibration cases (see `_part`)."""
        part = self._part(t, source)
        return np.asarray(part["scores"], dtype=np.float64), np.asarray(part["labels"], dtype=np.int64)

    @property
    def cross_conformal(self) -> bool:
        """True when the sets are cross-conformal: each calibration score carries the fold (= the member)
        that made it, and a new case is scored with each member against that member's fold."""
        return bool(self.conformal) and "folds" in self.conformal["tasks"][TASKS[0].name]

    def set_bins(self, t: int, level: float, source: str | None = None) -> dict[int, str]:
        """Per class of task t, how its p-values are computed at `level`: "own" (its own bin), "pooled" (with
        the other classes too rare for a bin of their own) or "marginal" (against every calibration case)."""
        _, labels = self._calibration(t, source)
        need = _bin_minimum(level)
        counts = np.bincount(labels, minlength=TASKS[t].num_classes)
        rare = [c for c in range(TASKS[t].num_classes) if counts[c] < need]
        pooled = "pooled" if rare and counts[rare].sum() >= need else "marginal"
        return {c: pooled if c in rare else "own" for c in range(TASKS[t].num_classes)}

    def _p_values(self, t: int, alphas: np.ndarray, level: float, source: str | None = None) -> np.ndarray:
        """(N, C) conformal p-values of every class of task t for the cases' non-conformity scores `alphas`."""
        key = (t, level, source)
        if key not in self._sets:
            from crepes import ConformalClassifier

            scores, labels = self._calibration(t, source)
            bins = self.set_bins(t, level, source)
            pool = -1  # the bin id of the pooled rare classes
            bin_of = {c: (c if how == "own" else pool) for c, how in bins.items()}
            binned = ConformalClassifier().fit(scores, bins=np.array([bin_of[int(y)] for y in labels]))
            marginal = ConformalClassifier().fit(scores)
            self._sets[key] = (bins, bin_of, binned, marginal)
        bins, bin_of, binned, marginal = self._sets[key]
        cols = []
        for c in range(TASKS[t].num_classes):
            a = alphas[:, c:c + 1]
            if bins[c] == "marginal":
                cols.append(marginal.predict_p(a, smoothing=False)[:, 0])
            else:
                cols.append(binned.predict_p(a, bins=np.full(len(a), bin_of[c]), smoothing=False)[:, 0])
        return np.stack(cols, axis=1)

    def _cross_p_values(self, t: int, member_alphas: list[np.ndarray], level: float,
                        source: str | None = None) -> np.ndarray:
        """(N, C) cross-conformal p-values of every class of task t: member k's scores `member_alphas[k]`
        counted against the calibration scores of fold k (the cases member k never trained on), the counts
        pooled over the folds within the class's bin: p = (1 + sum_k #{i in fold k and the bin: score_i >=
        alpha_k}) / (n_bin + 1). With one fold this is the split-conformal p-value of `_p_values`."""
        part = self._part(t, source)
        scores, labels = self._calibration(t, source)
        folds = np.asarray(part["folds"], dtype=np.int64)
        if folds.max() >= len(member_alphas):
            raise ValueError(f"{TASKS[t].name}: calibration scores from {folds.max() + 1} folds but "
                             f"{len(member_alphas)} members' probabilities")
        bins = self.set_bins(t, level, source)
        bin_of = {c: (c if how == "own" else -1) for c, how in bins.items()}
        cal_bin = np.array([bin_of[int(y)] for y in labels])
        cols = []
        for c, how in bins.items():
            in_bin = np.ones(len(labels), dtype=bool) if how == "marginal" else cal_bin == bin_of[c]
            count = np.zeros(len(member_alphas[0]))
            for k, alphas in enumerate(member_alphas):
                ref = np.sort(scores[in_bin & (folds == k)])
                count += len(ref) - np.searchsorted(ref, alphas[:, c], side="left")  # #{ref >= alpha}
            cols.append((count + 1.0) / (in_bin.sum() + 1.0))
        return np.stack(cols, axis=1)

    def prediction_sets(self, probs: list[np.ndarray], level: float = DEFAULT_LEVEL,
                        stacked: np.ndarray | None = None,
                        members: list[list[np.ndarray]] | None = None) -> list[np.ndarray] | None:
        """Per task, an (N, C) boolean mask of the classes in each case's set at `level`; None without sets.
        `stacked`: (N,) True where the diagnosis came from the stacked model (its own scores are used there
        when the checkpoint stores them). `members`: each member's probabilities (as `probs`, corrections and
        diagnosis applied alike), needed by cross-conformal sets. Never empty: an empty set becomes the most
        probable class."""
        if self.conformal is None:
            return None
        if not 0.0 < level < 1.0:
            raise ValueError(f"prediction-set level {level}: expected a value in (0, 1), e.g. 0.9")
        cross = self.cross_conformal
        if cross and not members:
            raise ValueError("this model's prediction sets are cross-conformal: they need each member's "
                             "probabilities (an export made before they were added? export it again)")
        out = []
        for t, task in enumerate(TASKS):
            alphas = 1.0 - np.asarray(probs[t], dtype=np.float64)  # (N, C): the score each class would have
            by_source = [(np.ones(len(alphas), dtype=bool), None)]  # the shown model's scores for every case
            if t == DIAG_INDEX and stacked is not None and stacked.any() and self.conformal.get("diagnosis"):
                by_source = [(~stacked, "image model"), (stacked, "stacked")]
            inside = np.zeros(alphas.shape, dtype=bool)
            for rows, source in by_source:
                if not rows.any():
                    continue
                if cross:
                    mine = [1.0 - np.asarray(m[t], dtype=np.float64)[rows] for m in members]
                    inside[rows] = self._cross_p_values(t, mine, level, source) > 1.0 - level
                else:
                    inside[rows] = self._p_values(t, alphas[rows], level, source) > 1.0 - level
            empty = ~inside.any(axis=1)
            inside[empty, np.asarray(probs[t])[empty].argmax(axis=1)] = True
            out.append(inside)
        return out

    # --- stacked diagnosis -----------------------------------------------------------------------
    @property
    def stacker_default(self) -> bool:
        return bool(self.stacker and self.stacker.get("default"))

    def stacked_diagnosis(self, probs: list[np.ndarray]) -> np.ndarray | None:
        """(N, 5) diagnosis probabilities from the criteria and the image model's diagnosis; None without one."""
        if self.stacker is None:
            return None
        coef = np.asarray(self.stacker["coef"], dtype=np.float64)
        z = stacker_features(probs) @ coef.T + np.asarray(self.stacker["intercept"], dtype=np.float64)
        full = np.full((len(z), TASKS[DIAG_INDEX].num_classes), -np.inf)
        full[:, self.stacker["classes"]] = z  # a diagnosis absent from the fitting cases stays at 0
        return _softmax(full)

    def diagnosis_probs(self, probs: list[np.ndarray], corrected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(diagnosis probabilities, (N,) True where they came from the stacked model): the stacked model
        where a case was corrected or where it is the default, the image model's own otherwise."""
        stacked = self.stacked_diagnosis(probs)
        use = np.zeros(len(probs[DIAG_INDEX]), dtype=bool) if stacked is None else (corrected | self.stacker_default)
        if not use.any():
            return probs[DIAG_INDEX], use
        return np.where(use[:, None], stacked, probs[DIAG_INDEX]), use


def _bin_minimum(level: float) -> int:
    """The fewest calibration cases with which a bin can leave its class out of a set at `level`
    (p-values are at least 1 / (n + 1); the set keeps p > 1 - level)."""
    return int(np.ceil(level / (1.0 - level) - 1e-9))


@dataclass
class Processed:
    """What `postprocess` makes of a batch of model probabilities (per task (N, C) arrays)."""

    probs: list[np.ndarray]           # shown: temperatures, corrections and the chosen diagnosis applied
    corrections: list[dict[str, int]]  # per case, the corrections that changed something
    stacked: np.ndarray                # (N,) True where the diagnosis came from the stacked model
    sets: list[np.ndarray] | None      # per task (N, C) masks at `level`, or None without sets
    uncertain: np.ndarray              # (N,) bool
    why: list[str | None]              # per case, the rule that made it uncertain (None when it is not)
    refer: np.ndarray | None = None    # (N,) bool: P(MEL) at or above the referral point; None without one
    triage: list[dict] | None = None   # per case, the referral point used (threshold, sensitivity, ...)


def postprocess(probs: list[np.ndarray], art: Artifacts, temperature=None,
                corrections: list[Mapping[str, int]] | None = None, level: float = DEFAULT_LEVEL,
                members: list[list[np.ndarray]] | None = None) -> Processed:
    """The one path from a model's probabilities to what a user sees (predict, batch, serve, evaluate):
    temperatures, then the clinician's corrections (those equal to the model's own answer dropped: they
    change nothing), then the diagnosis (the stacked model's where a case was corrected or where it is the
    default), then the prediction sets (a corrected criterion's set is the clinician's value), then doubt.
    `members`: an ensemble's members' own probabilities (`FusionOutput.members`), taken through the same
    steps for cross-conformal sets; ignored by a model whose sets are not cross-conformal."""
    from .temperature import apply_temperatures

    probs = apply_temperatures(probs, temperature)
    n = len(probs[0])
    given = list(corrections) if corrections is not None else [{} for _ in range(n)]
    fixes = [{name: cls for name, cls in fix.items() if int(probs[TASK_NAMES.index(name)][i].argmax()) != cls}
             for i, fix in enumerate(given)]
    corrected = np.array([bool(f) for f in fixes], dtype=bool)
    probs = apply_corrections(probs, fixes)
    probs[DIAG_INDEX], stacked = art.diagnosis_probs(probs, corrected)
    shown_members = None
    if members and art.cross_conformal:
        shown_members = []
        for m in members:
            m = apply_corrections(apply_temperatures(m, temperature), fixes)
            m[DIAG_INDEX] = art.diagnosis_probs(m, corrected)[0]
            shown_members.append(m)
    sets = art.prediction_sets(probs, level, stacked, shown_members)
    if sets is not None:
        for i, fix in enumerate(fixes):
            for name, cls in fix.items():
                t = TASK_NAMES.index(name)
                sets[t][i] = np.arange(TASKS[t].num_classes) == cls
    diag = TASKS[DIAG_INDEX]
    why: list[str | None] = []
    for i in range(n):
        if sets is not None:
            inside = [diag.classes[c] for c in np.flatnonzero(sets[DIAG_INDEX][i])]
            why.append(None if len(inside) == 1 else
                       f"its {level:.0%} prediction set holds {len(inside)} diagnoses ({' or '.join(inside)})")
        else:
            top = float(probs[DIAG_INDEX][i].max())
            why.append(None if top >= DOUBT_BELOW else
                       f"the most probable diagnosis has {top:.0%} (< {DOUBT_BELOW:.0%}; this model carries no "
                       "prediction sets)")
    refer, points = None, None
    if art.triage:
        points = [art.triage.get("stacked" if s else "image model") or art.triage["image model"] for s in stacked]
        refer = np.array([probs[DIAG_INDEX][i, MEL_CLASS] >= pt["threshold"] for i, pt in enumerate(points)], dtype=bool)
    return Processed(probs, fixes, stacked, sets, np.array([w is not None for w in why], dtype=bool), why, refer,
                     points)


def triage_point(mel_prob: np.ndarray, is_mel: np.ndarray, sensitivity: float = 0.9) -> dict | None:
    """The referral threshold on P(MEL) for `sensitivity` from held-out cases (see the module docstring):
    None with no melanoma among them. Refer when P(MEL) >= threshold (0: refer everyone, too few
    melanomas for the sensitivity asked)."""
    pos = np.sort(mel_prob[is_mel])
    if len(pos) == 0:
        return None
    k = int(np.floor((1.0 - sensitivity) * (len(pos) + 1) + 1e-9))
    threshold = float(pos[k - 1]) if k >= 1 else 0.0
    neg = mel_prob[~is_mel]
    return {"threshold": threshold, "sensitivity": sensitivity, "melanomas": int(len(pos)), "others": int(len(neg)),
            "held_out_sensitivity": float((pos >= threshold).mean()),
            "held_out_specificity": float((neg < threshold).mean()) if len(neg) else None}
