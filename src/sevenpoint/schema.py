"""The Derm7pt label schema as data: 8 tasks, 24 classes, raw-value mapping, checklist points.

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
    """A raw label value that the schema does not know (names row, column and value)."""


@dataclass(frozen=True)
class Task:
    """One classification task of the 8: its meta.csv column, classes and checklist points.

    `raw` maps every raw meta.csv value to a class index; `points` maps the class index that
    scores on the seven-point checklist to its points (2 for major, 1 for minor criteria).
    """

    name: str
    column: str
    classes: tuple[str, ...]
    long_names: tuple[str, ...]
    raw: Mapping[str, int]
    points: Mapping[int, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_criterion(self) -> bool:
        return bool(self.points)

    def encode(self, value: object, row: int | str = "?") -> int:
        """Class index of a raw value; raises `LabelError` naming row, column and value."""
        key = str(value).strip().lower() if isinstance(value, str) else value
        if key not in self.raw:
            allowed = ", ".join(sorted(self.raw))
            raise LabelError(
                f"row {row}, column {self.column!r}: unknown value {value!r} (allowed: {allowed})"
            )
        return self.raw[key]


def _mapping(groups: Sequence[Sequence[str]]) -> Mapping[str, int]:
    return MappingProxyType({raw: index for index, values in enumerate(groups) for raw in values})


_NEVI = [f"{kind} nevus" for kind in ("blue", "clark", "combined", "congenital", "dermal", "recurrent")]
_MELANOMAS = [
    "melanoma",
    "melanoma (in situ)",
    "melanoma (less than 0.76 mm)",
    "melanoma (0.76 to 1.5 mm)",
    "melanoma (more than 1.5 mm)",
    "melanoma metastasis",
]

TASKS: tuple[Task, ...] = (
    Task(
        "DIAG", "diagnosis", ("BCC", "NEV", "MEL", "MISC", "SK"),
        ("basal cell carcinoma", "nevus", "melanoma", "miscellaneous", "seborrheic keratosis"),
        _mapping([
            ["basal cell carcinoma"],
            [*_NEVI, "reed or spitz nevus"],
            _MELANOMAS,
            ["dermatofibroma", "lentigo", "melanosis", "miscellaneous", "vascular lesion"],
            ["seborrheic keratosis"],
        ]),
    ),
    Task(
        "PN", "pigment_network", ("ABS", "TYP", "ATP"), ("absent", "typical", "atypical"),
        _mapping([["absent"], ["typical"], ["atypical"]]), MappingProxyType({2: 2}),
    ),
    Task(
        "BWV", "blue_whitish_veil", ("ABS", "PRS"), ("absent", "present"),
        _mapping([["absent"], ["present"]]), MappingProxyType({1: 2}),
    ),
    Task(
        "VS", "vascular_structures", ("ABS", "REG", "IR"), ("absent", "regular", "irregular"),
        _mapping([
            ["absent"],
            ["arborizing", "comma", "hairpin", "within regression", "wreath"],
            ["dotted", "linear irregular"],
        ]),
        MappingProxyType({2: 2}),
    ),
    Task(
        "PIG", "pigmentation", ("ABS", "REG", "IR"), ("absent", "regular", "irregular"),
        _mapping([
            ["absent"],
            ["diffuse regular", "localized regular"],
            ["diffuse irregular", "localized irregular"],
        ]),
        MappingProxyType({2: 1}),
    ),
    Task(
        "STR", "streaks", ("ABS", "REG", "IR"), ("absent", "regular", "irregular"),
        _mapping([["absent"], ["regular"], ["irregular"]]), MappingProxyType({2: 1}),
    ),
    Task(
        "DaG", "dots_and_globules", ("ABS", "REG", "IR"), ("absent", "regular", "irregular"),
        _mapping([["absent"], ["regular"], ["irregular"]]), MappingProxyType({2: 1}),
    ),
    Task(
        "RS", "regression_structures", ("ABS", "PRS"), ("absent", "present"),
        _mapping([["absent"], ["blue areas", "white areas", "combinations"]]),
        MappingProxyType({1: 1}),
    ),
)

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
            by_points.setdefault(pts, []).append(f"{task.long_names[cls]} {task.column.replace('_', ' ')}")
    terms = " + ".join(f"{pts} x ({', '.join(items)})" for pts, items in sorted(by_points.items(), reverse=True))
    return f"7-point score = {terms}; >= {MELANOMA_THRESHOLD} suggests melanoma"


def seven_point_score(labels: Mapping[str, int] | Sequence[int] | np.ndarray) -> int | np.ndarray:
    """The 7-point checklist score (0-10) from class indices.

    `labels` is either a mapping task name -> class index (criteria only needed), or an
    array whose last axis holds the 8 class indices in `TASK_NAMES` order (any batch shape).
    """
    if isinstance(labels, Mapping):
        return int(sum(t.points.get(int(labels[t.name]), 0) for t in TASKS if t.is_criterion))
    arr = np.asarray(labels)
    if arr.shape[-1] != len(TASKS):
        raise ValueError(f"expected {len(TASKS)} class indices on the last axis, got shape {arr.shape}")
    score = np.zeros(arr.shape[:-1], dtype=np.int64)
    for i, task in enumerate(TASKS):
        for cls, pts in task.points.items():
            score = score + pts * (arr[..., i] == cls)
    return int(score) if score.ndim == 0 else score


def encode_row(row: Mapping[str, object], row_index: int | str = "?") -> tuple[int, ...]:
    """The 8 class indices of one meta.csv row; unknown values raise `LabelError`."""
    return tuple(t.encode(row.get(t.column), row_index) for t in TASKS)
