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
  validation) cases; class c enters a case's set when its p-value exceeds 1 - level, so each
  true class is covered at >= `level` of its cases (exchangeability assumed). A class with fewer
  than 1 / (1 - level) - 1 calibration cases is always in the set: that is the honest answer.
- **Stacked diagnosis**: multinomial logistic regression on the 7 criteria's probabilities and the
  image model's own diagnosis probabilities, fitted out of fold. A clinician's correction of a
  criterion replaces that criterion's probabilities by its one-hot value, and the stacked model
  re-derives the diagnosis from the corrected criteria and the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .schema import DIAG_INDEX, TASK_BY_NAME, TASK_NAMES, TASKS

DEFAULT_LEVEL = 0.9
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
    _sets: dict = field(default_factory=dict, repr=False, compare=False)

    KEYS = ("ood", "train_majority", "calibration", "conformal", "stacker", "fitted_on", "provenance")

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
        return out

    # --- prediction sets -------------------------------------------------------------------------
    def _classifier(self, t: int):
        if t not in self._sets:
            from crepes import ConformalClassifier

            part = self.conformal["tasks"][TASKS[t].name]
            self._sets[t] = ConformalClassifier().fit(np.asarray(part["scores"], dtype=np.float64),
                                                      bins=np.asarray(part["labels"], dtype=np.int64))
        return self._sets[t]

    def prediction_sets(self, probs: list[np.ndarray], level: float = DEFAULT_LEVEL) -> list[np.ndarray] | None:
        """Per task, an (N, C) boolean mask of the classes in each case's set at `level`; None without sets."""
        if self.conformal is None:
            return None
        if not 0.0 < level < 1.0:
            raise ValueError(f"prediction-set level {level}: expected a value in (0, 1), e.g. 0.9")
        out = []
        for t, task in enumerate(TASKS):
            alphas = 1.0 - np.asarray(probs[t], dtype=np.float64)  # (N, C): the score each class would have
            cc = self._classifier(t)
            p = np.stack([cc.predict_p(alphas, bins=np.full(len(alphas), c), smoothing=False)[:, c]
                          for c in range(task.num_classes)], axis=1)
            out.append(p > 1.0 - level)
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
