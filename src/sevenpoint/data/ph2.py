"""Reader for PH2 (Mendonça et al. 2013) as distributed (format `ph2`): an external test set.

200 dermoscopy images, no clinical photo, no metadata, no official split (one split, `all`).
Labels come from `PH2_dataset.xlsx` only: a dozen title rows, then a header row starting with
`Image Name` (cells may hold line breaks; "Clinical Diagnosis" may be a merged title over
sub-headers in the next row), then one row per image, then legends. Mapping onto our tasks:

    DIAG  Melanoma -> MEL; Common Nevus, Atypical Nevus -> NEV
    PN    T -> TYP, AT -> ATP              (PH2 has no "absent" pigment network)
    DaG   A -> ABS, T -> REG, AT -> IR
    STR   A -> ABS, P -> PRESENT           (regular or irregular: scored as absent vs present)
    RS    A -> ABS, P -> PRS
    BWV   A -> ABS, P -> PRS
    VS, PIG: not annotated

The reduced `PH2_dataset.txt` / `.csv` some copies carry are refused: the xlsx is the reference.
A criterion column the xlsx lacks leaves that task not annotated, and says so in the quirks.
PH2 is never trained or selected on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..schema import NOT_ANNOTATED, PRESENT, TASK_NAMES
from .base import Case, CaseSet, DatasetError, drop_missing, image_index, listing

NAME = "ph2"
XLSX = "PH2_dataset.xlsx"
REDUCED = ("PH2_dataset.txt", "PH2_dataset.csv")
IMAGE_FOLDERS = ("PH2 Dataset images", "PH2_Dataset_images")
DIAGNOSIS_COLUMNS = {"common nevus": "NEV", "atypical nevus": "NEV", "melanoma": "MEL"}
# task -> (header prefix after normalising, {PH2 value: our target})
CRITERIA: dict[str, tuple[str, dict[str, int]]] = {
    "PN": ("pigment network", {"T": 1, "AT": 2}),
    "DaG": ("dots/globules", {"A": 0, "T": 1, "AT": 2}),
    "STR": ("streaks", {"A": 0, "P": PRESENT}),
    "RS": ("regression areas", {"A": 0, "P": 1}),
    "BWV": ("blue-whitish veil", {"A": 0, "P": 1}),
}
_IMAGE_NAME = re.compile(r"^IMD\d+$", re.IGNORECASE)


def _norm(cell: object) -> str:
    """A header cell as one lower-case line: line breaks and repeated spaces collapsed, ' / ' -> '/'."""
    text = re.sub(r"\s+", " ", str(cell or "")).strip().lower()
    return re.sub(r"\s*([/-])\s*", r"\1", text).replace("blue whitish", "blue-whitish")


def find_root(path: Path) -> Path:
    for candidate in (path, path / "PH2Dataset"):
        if any((candidate / name).is_file() for name in (XLSX, *REDUCED)):
            return candidate
    raise DatasetError(f"{path}: not a PH2 folder (expected {XLSX} in it or in PH2Dataset/)")


def detect(path: Path) -> bool:
    try:
        find_root(path)
        return True
    except DatasetError:
        return False


def _header(rows: list[tuple], xlsx: Path) -> tuple[int, list[str]]:
    """(index of the first data row, column names). Sub-headers under a merged title win."""
    for h, row in enumerate(rows):
        first = next((_norm(c) for c in row if _norm(c)), "")
        if first == "image name":
            break
    else:
        raise DatasetError(f"{xlsx}: no header row starting with 'Image Name' (is this the PH2 spreadsheet?)")
    names = [_norm(c) for c in rows[h]]
    start = h + 1
    while start < len(rows) and not any(_IMAGE_NAME.match(str(c or "").strip()) for c in rows[start][:2]):
        below = [_norm(c) for c in rows[start]]
        if not any(below):
            start += 1
            continue
        names = [b or n for n, b in zip(names, below)] + below[len(names):]
        start += 1
    return start, names


def _read_xlsx(xlsx: Path) -> tuple[list[tuple[int, list]], list[str]]:
    import openpyxl

    try:
        book = openpyxl.load_workbook(xlsx, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types (zipfile, XML, KeyError) for a damaged file
        raise DatasetError(f"{xlsx}: cannot read as an xlsx workbook ({type(exc).__name__}: {exc})") from exc
    try:
        rows = [tuple(r) for r in book.worksheets[0].iter_rows(values_only=True)]
    finally:
        book.close()
    start, names = _header(rows, xlsx)
    data = [(i + 1, list(r)) for i, r in enumerate(rows[start:], start=start)
            if r and _IMAGE_NAME.match(str(r[0] or "").strip())]
    if not data:
        raise DatasetError(f"{xlsx}: no image rows (IMDnnn) under the header")
    return data, names


def load(path: str | os.PathLike, *, include_leaky_meta: bool = False, check_images: bool = True,
         skip_missing: bool = False) -> CaseSet:
    """Read PH2's distributed layout (dermoscopy only, split `all`) into a CaseSet."""
    root = find_root(Path(path))
    xlsx = root / XLSX
    if not xlsx.is_file():
        reduced = next(root / n for n in REDUCED if (root / n).is_file())
        raise DatasetError(f"{reduced}: a reduced copy of PH2's labels (criteria columns are missing from it); "
                           f"put the distributed {XLSX} in {root} — it is the reference")
    rows, names = _read_xlsx(xlsx)
    diag_cols = {j: DIAGNOSIS_COLUMNS[n] for j, n in enumerate(names) if n in DIAGNOSIS_COLUMNS}
    if sorted(names[j] for j in diag_cols) != sorted(DIAGNOSIS_COLUMNS):
        raise DatasetError(f"{xlsx}: header must have the columns Common Nevus, Atypical Nevus and Melanoma "
                           f"(found: {', '.join(n for n in names if n) or 'none'})")
    crit_cols: dict[str, int] = {}
    for task, (prefix, _) in CRITERIA.items():
        hits = [j for j, n in enumerate(names) if n.startswith(prefix)]
        if hits:
            crit_cols[task] = hits[0]
    quirks = []
    absent = [t for t in CRITERIA if t not in crit_cols]
    if absent:
        quirks.append(f"{xlsx.name} has no column for {', '.join(absent)}: not annotated "
                      "(the distributed spreadsheet has them; this looks like a reduced copy)")
    quirks.append("VS and PIG are not annotated in PH2" +
                  ("; STR is scored as absent vs present" if "STR" in crit_cols else ""))
    folder = next((root / f for f in IMAGE_FOLDERS if (root / f).is_dir()), None)
    if check_images and folder is None:
        raise DatasetError(f"{root}: image folder not found (expected one of: {', '.join(IMAGE_FOLDERS)})")
    index = image_index(folder, (".bmp", ".png", ".jpg", ".jpeg")) if check_images else {}
    cases, errors, missing, seen = [], [], [], {}
    for excel_row, values in rows:
        name = str(values[0]).strip().upper()
        where = f"{xlsx.name} row {excel_row} ({name})"
        if name in seen:
            errors.append(f"{where}: duplicates row {seen[name]}")
            continue
        seen[name] = excel_row
        marked = [diag for j, diag in diag_cols.items() if str(values[j] or "").strip().upper() == "X"]
        if len(marked) != 1:
            errors.append(f"{where}: {len(marked)} of Common Nevus / Atypical Nevus / Melanoma marked X, need 1")
            continue
        targets = [NOT_ANNOTATED] * len(TASK_NAMES)
        targets[TASK_NAMES.index("DIAG")] = {"NEV": 1, "MEL": 2}[marked[0]]
        for task, j in crit_cols.items():
            raw = str(values[j] if j < len(values) and values[j] is not None else "").strip().upper()
            mapping = CRITERIA[task][1]
            if raw not in mapping:
                errors.append(f"{where}, column {names[j]!r}: unknown value {raw!r} "
                              f"(allowed: {', '.join(mapping)})")
                continue
            targets[TASK_NAMES.index(task)] = mapping[raw]
        derm = None
        if check_images:
            derm = index.get(name.lower())
            if derm is None:
                missing.append((len(cases), f"{where}: {folder / name / f'{name}_Dermoscopic_Image' / f'{name}.bmp'}"))
        cases.append(Case(case_id=name, derm=derm, clinic=None, targets=tuple(targets), row=excel_row))
    if errors:
        raise DatasetError(f"{len(errors)} problem(s) in {xlsx}:" + listing(errors, 20))
    cases, splits = drop_missing(cases, {"all": np.arange(len(cases))}, missing, skip_missing, quirks)
    return CaseSet(NAME, root, cases, splits, quirks, meta_dim=0)
