"""The dataset seam: what every format reader produces, whatever the folder looked like.

A reader (data/derm7pt.py, data/ph2.py, data/isic.py) turns a folder into a `CaseSet`: cases
with an optional dermoscopy image, clinical photo and metadata vector, one target per task
(`schema.NOT_ANNOTATED` where the dataset does not say, `schema.PRESENT` where it only says
"present"), and named splits. Everything downstream — the torch dataset, training, metrics,
reports — reads only this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..schema import NOT_ANNOTATED, PRESENT, TASKS


class DatasetError(ValueError):
    """A dataset folder that cannot be used as it is; the message says where and why."""


@dataclass(frozen=True)
class Case:
    """One lesion: image paths (None = not available), one target per task, metadata (None = none)."""

    case_id: str
    derm: Path | None
    clinic: Path | None
    targets: tuple[int, ...]
    meta: np.ndarray | None = None
    raw_meta: dict[str, str] = field(default_factory=dict)
    row: int = -1                # row in the dataset's own label file
    case_num: int | None = None  # Derm7pt's case_num
    crop: int | None = None      # border (px) cut before resizing; None = the run config's `data.crop`
    # descriptive columns never fed to the model (raw diagnosis, diagnostic difficulty): `evaluate` breaks
    # accuracy down by them
    describe: dict[str, str] = field(default_factory=dict)
    # a teacher's probabilities for the 8 tasks, their classes concatenated (schema order): distillation targets
    # (`data.extra_soft`); None for a case without them
    soft: np.ndarray | None = None


@dataclass
class CaseSet:
    """A validated dataset: cases in file order plus named splits of case indices.

    `meta_dim` is the length of its metadata vectors (0 when it has none).
    """

    format: str
    root: Path
    cases: list[Case]
    splits: dict[str, np.ndarray]
    quirks: list[str] = field(default_factory=list)
    meta_dim: int = 0
    include_leaky_meta: bool = False

    def split_cases(self, split: str) -> list[Case]:
        if split not in self.splits:
            raise DatasetError(f"{self.root}: unknown split {split!r} for this {self.format} dataset "
                               f"(have: {', '.join(self.splits)})")
        return [self.cases[i] for i in self.splits[split]]

    def targets(self, split: str) -> np.ndarray:
        """(N, 8) targets of a split (class indices, NOT_ANNOTATED or PRESENT)."""
        cases = self.split_cases(split)
        return np.array([c.targets for c in cases], dtype=np.int64).reshape(len(cases), len(TASKS))

    def annotated_tasks(self, split: str | None = None) -> list[str]:
        """The tasks with at least one annotated case (in `split`, or anywhere)."""
        y = self.targets(split) if split else np.array([c.targets for c in self.cases]).reshape(-1, len(TASKS))
        return [t.name for i, t in enumerate(TASKS) if (y[:, i] != NOT_ANNOTATED).any()]

    def verify_images(self, progress: bool = False) -> int:
        """Decode every image once; raise `DatasetError` naming every unusable file. Returns the count."""
        from tqdm.auto import tqdm

        from .images import ImageError, open_rgb

        paths = sorted({p for c in self.cases for p in (c.derm, c.clinic) if p is not None})
        bad = []
        for path in tqdm(paths, desc="decoding images", disable=not progress, leave=False):
            try:
                open_rgb(path).close()
            except ImageError as exc:
                bad.append(str(exc))
        if bad:
            raise DatasetError(f"{len(bad)} unusable image file(s):" + listing(bad, 50))
        return len(paths)

    def summary(self) -> dict:
        """Counts a human (or `check-data`) wants: cases per split, classes per task per split
        (with "not annotated" and "present" counts where a task has them)."""
        annotated = self.annotated_tasks()
        out: dict = {"format": self.format, "root": str(self.root), "cases": len(self.cases), "splits": {},
                     "classes": {}, "not_annotated": [t.name for t in TASKS if t.name not in annotated],
                     "has": {"derm": sum(c.derm is not None for c in self.cases),
                             "clinic": sum(c.clinic is not None for c in self.cases),
                             "meta": sum(c.meta is not None for c in self.cases)}}
        for split, idx in self.splits.items():
            out["splits"][split] = int(len(idx))
            targets = self.targets(split)
            for t, task in enumerate(TASKS):
                y = targets[:, t]
                counts = dict(zip(task.classes, map(int, np.bincount(y[y >= 0], minlength=task.num_classes))))
                for code, name in ((PRESENT, "present (kind not given)"), (NOT_ANNOTATED, "not annotated")):
                    if (y == code).any():
                        counts[name] = int((y == code).sum())
                out["classes"].setdefault(task.name, {})[split] = counts
        out["clinic_missing"] = [c.case_num if c.case_num is not None else c.case_id
                                 for c in self.cases if c.clinic is None] if out["has"]["clinic"] else []
        out["quirks"] = list(self.quirks)
        return out


def extra_rows(extra: CaseSet, limit: int = 0) -> np.ndarray:
    """The rows of `extra` that serve as auxiliary training data: its own `train` split when it has one, else all
    of it; with `limit` > 0 a fixed draw of that many of them (seed 0, the same for every run and seed)."""
    own = extra.splits.get("train", extra.splits["all"] if "all" in extra.splits else np.arange(len(extra.cases)))
    own = np.asarray(own, dtype=np.int64)
    if 0 < limit < len(own):
        own = np.sort(np.random.default_rng(0).choice(own, size=limit, replace=False))
    return own


def with_extra(data: CaseSet, extra: CaseSet, split: str = "train", limit: int = 0) -> CaseSet:
    """`data` with `extra`'s cases added to `split` (auxiliary training data, `extra_rows`). The other splits are
    `data`'s alone."""
    from dataclasses import replace

    own = extra_rows(extra, limit)
    offset = len(data.cases)
    splits = dict(data.splits)
    splits[split] = np.concatenate([data.splits[split], offset + own])
    drawn = f" (data.extra_cases={limit})" if limit else ""
    note = f"{len(own)} {extra.format} case(s) from {extra.root} added to {split!r}{drawn}"
    return replace(data, cases=data.cases + extra.cases, splits=splits, quirks=[*data.quirks, note])


def listing(items: list[str], limit: int) -> str:
    """An indented list for an error message, cut after `limit` lines with a count of the rest."""
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {shown}{more}"


def drop_missing(cases: list[Case], splits: dict[str, np.ndarray], missing: list[tuple[int, str]],
                 skip_missing: bool, quirks: list[str]) -> tuple[list[Case], dict[str, np.ndarray]]:
    """Cases with a missing image (`missing`: (case position, message) per file): an error listing
    every file, or, with `skip_missing`, those cases left out of the cases and of every split
    (`splits` hold case positions, renumbered here) and each file named in `quirks`."""
    if not missing:
        return cases, splits
    if not skip_missing:
        raise DatasetError(f"{len(missing)} image file(s) not found (--skip-missing leaves those cases out):"
                           + listing([m for _, m in missing], 50))
    quirks += [f"case left out, image not found: {m}" for _, m in missing]
    gone = {i for i, _ in missing}
    kept = [i for i in range(len(cases)) if i not in gone]
    position = {old: new for new, old in enumerate(kept)}
    return ([cases[i] for i in kept],
            {s: np.array([position[i] for i in idx if i in position], dtype=np.int64) for s, idx in splits.items()})


def image_index(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files under `folder` by lower-case stem (first found wins, in sorted order)."""
    index: dict[str, Path] = {}
    for dirpath, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            p = Path(dirpath) / f
            if p.suffix.lower() in suffixes:
                index.setdefault(p.stem.lower(), p)
    return index
