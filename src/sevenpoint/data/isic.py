"""Reader for the ISIC challenge format (format `isic`): JPEGs named by image id plus ground-truth
CSVs with an image column and one 0/1 column per class. Diagnosis only: the seven criteria are
not annotated, there is no clinical photo and no metadata we use.

    2017  image_id, melanoma, seborrheic_keratosis      (neither = nevus)
    2018  image, MEL, NV, BCC, AKIEC, BKL, DF, VASC
    2019  image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK

Onto DIAG: MEL -> MEL, NV -> NEV, BCC -> BCC, BKL / seborrheic keratosis -> SK, DF and VASC ->
MISC. AK / AKIEC, SCC and UNK have no Derm7pt class: those images are left out (counted in the
quirks). A 2017 file without the seborrheic_keratosis column (some copies) cannot tell nevi from
keratoses: its non-melanomas are read as NEV, and the quirks say so.

Every ground-truth CSV in the folder is read; its split is taken from its name (`Training` ->
train, `Validation` -> valid, `Test` -> test, otherwise `all`); split `all` always holds every case.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..schema import NOT_ANNOTATED, TASK_NAMES, TASKS
from .base import Case, CaseSet, DatasetError, drop_missing, image_index, listing

NAME = "isic"
IMAGE_COLUMNS = ("image_id", "image")
# ISIC column (lower case) -> our DIAG class; None = no Derm7pt counterpart (image left out)
CLASS_COLUMNS: dict[str, str | None] = {
    "melanoma": "MEL", "seborrheic_keratosis": "SK",
    "mel": "MEL", "nv": "NEV", "bcc": "BCC", "bkl": "SK", "df": "MISC", "vasc": "MISC",
    "akiec": None, "ak": None, "scc": None, "unk": None,
}
_DIAG = TASK_NAMES.index("DIAG")


def _split_of(csv: Path) -> str:
    name = csv.stem.lower()
    for key, split in (("train", "train"), ("valid", "valid"), ("val_", "valid"), ("test", "test")):
        if key in name:
            return split
    return "all"


def _header(csv: Path) -> list[str] | None:
    try:
        with open(csv, encoding="utf-8", errors="replace") as f:
            return [c.strip().lower() for c in f.readline().split(",")]
    except OSError:
        return None


def ground_truth_files(root: Path) -> list[Path]:
    """CSVs whose header is an image column plus at least one ISIC class column."""
    out = []
    for csv in sorted(root.glob("*.csv")):
        head = _header(csv)
        if head and head[0] in IMAGE_COLUMNS and any(c in CLASS_COLUMNS for c in head[1:]):
            out.append(csv)
    return out


def detect(path: Path) -> bool:
    return path.is_dir() and bool(ground_truth_files(path))


def _read(csv: Path) -> tuple[list[tuple[int, str, str | None]], list[str]]:
    """(line, image id, DIAG class or None for 'no counterpart') per row, and the quirks."""
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{csv}: cannot parse as CSV ({exc})") from exc
    frame.columns = [c.strip().lower() for c in frame.columns]
    image_col = frame.columns[0]
    classes = [c for c in frame.columns[1:] if c in CLASS_COLUMNS]
    quirks = []
    year2017 = "melanoma" in classes
    if year2017 and "seborrheic_keratosis" not in classes:
        quirks.append(f"{csv.name}: no seborrheic_keratosis column, so nevi and keratoses cannot be told apart: "
                      "its non-melanomas are read as NEV")
    rows, errors = [], []
    for line, rec in enumerate(frame.to_dict("records"), start=2):
        image = str(rec[image_col]).strip()
        if not image:
            errors.append(f"{csv.name}, line {line}: empty {image_col}")
            continue
        marked = []
        for c in classes:
            try:
                value = float(rec[c])
            except ValueError:
                errors.append(f"{csv.name}, line {line}, column {c!r}: {rec[c]!r} is not 0 or 1")
                break
            if value not in (0.0, 1.0):
                errors.append(f"{csv.name}, line {line}, column {c!r}: {rec[c]!r} is not 0 or 1")
                break
            if value == 1.0:
                marked.append(c)
        else:
            if len(marked) > 1:
                errors.append(f"{csv.name}, line {line}: {len(marked)} classes marked ({', '.join(marked)}), need 1")
            elif not marked and not year2017:
                errors.append(f"{csv.name}, line {line}: no class marked")
            else:
                rows.append((line, image, CLASS_COLUMNS[marked[0]] if marked else "NEV"))
    if errors:
        raise DatasetError(f"{len(errors)} problem(s) in {csv}:" + listing(errors, 20))
    return rows, quirks


def load(path: str | os.PathLike, *, include_leaky_meta: bool = False, check_images: bool = True,
         skip_missing: bool = False) -> CaseSet:
    """Read an ISIC challenge folder (dermoscopy + DIAG only) into a CaseSet."""
    root = Path(path)
    files = ground_truth_files(root) if root.is_dir() else []
    if not files:
        raise DatasetError(f"{root}: no ISIC ground-truth CSV (a header like 'image_id,melanoma,...' "
                           "or 'image,MEL,NV,...')")
    index = image_index(root, (".jpg", ".jpeg", ".png")) if check_images else {}
    diag = TASKS[_DIAG]
    cases, missing, quirks, split_rows, seen = [], [], [], {}, {}
    skipped = 0
    for csv in files:
        split = _split_of(csv)
        if split in split_rows and split != "all":
            raise DatasetError(f"{csv}: a second ground-truth file for split {split!r}")
        rows, file_quirks = _read(csv)
        quirks += file_quirks
        for line, image, cls in rows:
            if cls is None:
                skipped += 1
                continue
            if image.lower() in seen:
                raise DatasetError(f"{csv.name}, line {line}: image {image} already listed in {seen[image.lower()]}")
            seen[image.lower()] = f"{csv.name}, line {line}"
            derm = index.get(image.lower()) if check_images else root / f"{image}.jpg"
            if derm is None:
                missing.append((len(cases), f"{csv.name}, line {line}: no image file {image}.jpg under {root}"))
            targets = [NOT_ANNOTATED] * len(TASKS)
            targets[_DIAG] = diag.classes.index(cls)
            split_rows.setdefault(split, []).append(len(cases))
            cases.append(Case(case_id=image, derm=derm, clinic=None, targets=tuple(targets), row=line, crop=0))
    if skipped:
        quirks.append(f"{skipped} image(s) left out: AK / AKIEC, SCC or UNK have no Derm7pt diagnosis class")
    splits = {s: np.array(idx, dtype=np.int64) for s, idx in split_rows.items() if s != "all"}
    splits["all"] = np.arange(len(cases))
    cases, splits = drop_missing(cases, splits, missing, skip_missing, quirks)
    return CaseSet(NAME, root, cases, splits, quirks, meta_dim=0)
