"""The label schema as data: 8 tasks, 24 classes, checklist points, partial-label codes, metadata.

Everything else in the package reads this table; nothing here imports
anything of ours. Task order is the official one of Kawahara et al. (2018):
DIAG, PN, BWV, VS, PIG, STR, DaG, RS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np


class LabelError(ValueError):
    """A raw label or metadata value that is not known (names row, column or field, and value)."""


@dataclass(frozen=True)
class Task:
    """One classification task of the 8: its classes and checklist points.

    `points` maps the class index that scores on the seven-point checklist to its points
    (2 for major, 1 for minor criteria). How a dataset spells the classes is the dataset
    reader's business (data/derm7pt.py, data/ph2.py, data/isic.py), not the schema's.
    """

    name: str
    title: str
    classes: tuple[str, ...]
    long_names: tuple[str, ...]
    points: Mapping[int, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_criterion(self) -> bool:
        return bool(self.points)


_PRESENCE = (("ABS", "PRS"), ("absent", "present"))
_REGULARITY = (("ABS", "REG", "IR"), ("absent", "regular", "irregular"))

TASKS: tuple[Task, ...] = (
    Task("DIAG", "diagnosis", ("BCC", "NEV", "MEL", "MISC", "SK"),
         ("basal cell carcinoma", "nevus", "melanoma", "miscellaneous", "seborrheic keratosis")),
    Task("PN", "pigment network", ("ABS", "TYP", "ATP"), ("absent", "typical", "atypical"), MappingProxyType({2: 2})),
    Task("BWV", "blue whitish veil", *_PRESENCE, MappingProxyType({1: 2})),
    Task("VS", "vascular structures", *_REGULARITY, MappingProxyType({2: 2})),
    Task("PIG", "pigmentation", *_REGULARITY, MappingProxyType({2: 1})),
    Task("STR", "streaks", *_REGULARITY, MappingProxyType({2: 1})),
    Task("DaG", "dots and globules", *_REGULARITY, MappingProxyType({2: 1})),
    Task("RS", "regression structures", *_PRESENCE, MappingProxyType({1: 1})),
)

# Partial labels. A dataset that does not annotate a task for a case says NOT_ANNOTATED: the
# loss, the metrics, class weights and baselines ignore it. PRESENT says "present, kind not
# given" (PH2's streaks are only absent / present): never trained on; scored right for any
# class but ABS (class 0).
NOT_ANNOTATED = -1
PRESENT = -2


def annotated(y):
    """Mask of the targets that are scored (anything but NOT_ANNOTATED); numpy or torch."""
    return y != NOT_ANNOTATED


def correct(pred, y):
    """Per-case correctness of class predictions against (possibly partial) targets; numpy or torch.
    NOT_ANNOTATED targets come out False: combine with `annotated(y)`."""
    return ((y == PRESENT) & (pred != 0)) | (pred == y)

TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
TASK_BY_NAME: Mapping[str, Task] = MappingProxyType({t.name: t for t in TASKS})
NUM_CLASSES: tuple[int, ...] = tuple(t.num_classes for t in TASKS)
CRITERIA: tuple[str, ...] = tuple(t.name for t in TASKS if t.is_criterion)
DIAG_INDEX = 0
MEL_CLASS = TASKS[DIAG_INDEX].classes.index("MEL")
MELANOMA_THRESHOLD = 3  # a 7-point score of 3 or more means "suspect melanoma, excise"
# The order in which the paper's tables list the tasks (Omeroglu et al. 2023, Table 5).
PAPER_ORDER: tuple[str, ...] = ("BWV", "DaG", "PIG", "PN", "RS", "STR", "VS", "DIAG")

# --- metadata: one-hot sex 2 + location 9 + elevation 3 = 14 dims
META_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "sex": ("female", "male"),
    "location": (
        "abdomen", "acral", "back", "buttocks", "chest", "genital areas", "head neck",
        "lower limbs", "upper limbs",
    ),
    "elevation": ("flat", "palpable", "nodular"),
})
# Decided *after* the diagnosis: using them as inputs leaks the label (opt-in only).
LEAKY_META_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "management": ("clinical follow up", "excision", "no further examination"),
    "level_of_diagnostic_difficulty": ("low", "medium", "high"),
})


def meta_fields(include_leaky: bool = False) -> dict[str, tuple[str, ...]]:
    """The metadata fields used as model input, in encoding order."""
    fields = dict(META_FIELDS)
    if include_leaky:
        fields.update(LEAKY_META_FIELDS)
    return fields


def meta_dim(include_leaky: bool = False) -> int:
    return sum(len(v) for v in meta_fields(include_leaky).values())


def encode_meta(
    values: Mapping[str, object], include_leaky: bool = False, row: int | str = "?"
) -> np.ndarray:
    """One-hot encode metadata (float32, 14 dims by default); unknown values raise naming the field."""
    parts = []
    for name, allowed in meta_fields(include_leaky).items():
        value = values.get(name)
        key = str(value).strip().lower() if value is not None else None
        if key not in allowed:
            raise LabelError(
                f"row {row}, field {name!r}: unknown value {value!r} (allowed: {', '.join(allowed)})"
            )
        onehot = np.zeros(len(allowed), dtype=np.float32)
        onehot[allowed.index(key)] = 1.0
        parts.append(onehot)
    return np.concatenate(parts)


def score_rule() -> str:
    """The checklist rule in words, written from the table (points, criteria, threshold)."""
    by_points: dict[int, list[str]] = {}
    for task in TASKS:
        for cls, pts in task.points.items():
            by_points.setdefault(pts, []).append(f"{task.long_names[cls]} {task.title}")
    terms = " + ".join(f"{pts} x ({', '.join(items)})" for pts, items in sorted(by_points.items(), reverse=True))
    return f"7-point score = {terms}; >= {MELANOMA_THRESHOLD} suggests melanoma"


def seven_point_score(labels: Mapping[str, int] | Sequence[int] | np.ndarray):
    """The 7-point checklist score (0-10) from class indices.

    `labels` is either a mapping task name -> class index (criteria only needed), or an
    array whose last axis holds the 8 class indices in `TASK_NAMES` order (any batch shape):
    numpy, or a torch tensor of class indices (the score is then a tensor of their dtype on their device).
    """
    if isinstance(labels, Mapping):
        return int(sum(t.points.get(int(labels[t.name]), 0) for t in TASKS if t.is_criterion))
    arr = labels if hasattr(labels, "device") else np.asarray(labels)  # a torch tensor stays one
    if arr.shape[-1] != len(TASKS):
        raise ValueError(f"expected {len(TASKS)} class indices on the last axis, got shape {tuple(arr.shape)}")
    score = np.zeros(arr.shape[:-1], dtype=np.int64) if isinstance(arr, np.ndarray) else arr.new_zeros(arr.shape[:-1])
    for i, task in enumerate(TASKS):
        for cls, pts in task.points.items():
            score = score + pts * (arr[..., i] == cls)
    return int(score) if score.ndim == 0 else score
