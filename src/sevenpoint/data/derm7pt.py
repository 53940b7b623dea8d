"""Reader for the official Derm7pt `release_v0/` layout (format `derm7pt`).

`Derm7pt.load(path)` reads meta.csv and the three index files, maps every raw label onto the
schema's classes (the column names and raw values live here, nowhere else), resolves image
paths (case-insensitively when the exact path is missing), flags cases without a clinical
photo, and validates the splits. Every problem raises `DatasetError` naming the file, row,
column or value.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from ..schema import TASKS, LabelError, encode_meta, meta_dim, meta_fields, seven_point_score
from .base import Case, CaseSet, DatasetError, drop_missing, listing

NAME = "derm7pt"
SPLITS: tuple[str, ...] = ("train", "valid", "test")
META_COLUMNS: tuple[str, ...] = (
    "case_num", "diagnosis", "seven_point_score", "pigment_network", "streaks", "pigmentation",
    "regression_structures", "dots_and_globules", "blue_whitish_veil", "vascular_structures",
    "level_of_diagnostic_difficulty", "elevation", "location", "sex", "management", "clinic",
    "derm", "case_id", "notes",
)
# meta.csv column of each task, and the raw values meta.csv uses for each class (in class order).
COLUMNS: dict[str, str] = {
    "DIAG": "diagnosis", "PN": "pigment_network", "BWV": "blue_whitish_veil", "VS": "vascular_structures",
    "PIG": "pigmentation", "STR": "streaks", "DaG": "dots_and_globules", "RS": "regression_structures",
}
_NEVI = [f"{kind} nevus" for kind in ("blue", "clark", "combined", "congenital", "dermal", "recurrent")]
_MELANOMAS = ["melanoma", "melanoma (in situ)", "melanoma (less than 0.76 mm)", "melanoma (0.76 to 1.5 mm)",
              "melanoma (more than 1.5 mm)", "melanoma metastasis"]
_REGULARITY = [["absent"], ["regular"], ["irregular"]]
RAW_VALUES: dict[str, list[list[str]]] = {
    "DIAG": [["basal cell carcinoma"], [*_NEVI, "reed or spitz nevus"], _MELANOMAS,
             ["dermatofibroma", "lentigo", "melanosis", "miscellaneous", "vascular lesion"], ["seborrheic keratosis"]],
    "PN": [["absent"], ["typical"], ["atypical"]],
    "BWV": [["absent"], ["present"]],
    "VS": [["absent"], ["arborizing", "comma", "hairpin", "within regression", "wreath"], ["dotted", "linear irregular"]],
    "PIG": [["absent"], ["diffuse regular", "localized regular"], ["diffuse irregular", "localized irregular"]],
    "STR": _REGULARITY,
    "DaG": _REGULARITY,
    "RS": [["absent"], ["blue areas", "white areas", "combinations"]],
}
_LOOKUP = {task: {raw: cls for cls, values in enumerate(groups) for raw in values} for task, groups in RAW_VALUES.items()}


def encode_value(task: str, value: object, row: int | str = "?") -> int:
    """Class index of a raw meta.csv value; raises `LabelError` naming row, column and value."""
    key = str(value).strip().lower() if isinstance(value, str) else value
    if key not in _LOOKUP[task]:
        allowed = ", ".join(sorted(_LOOKUP[task]))
        raise LabelError(f"row {row}, column {COLUMNS[task]!r}: unknown value {value!r} (allowed: {allowed})")
    return _LOOKUP[task][key]


def encode_row(row: Mapping[str, object], row_index: int | str = "?") -> tuple[int, ...]:
    """The 8 class indices of one meta.csv row; unknown values raise `LabelError`."""
    return tuple(encode_value(t.name, row.get(COLUMNS[t.name]), row_index) for t in TASKS)


def detect(path: Path) -> bool:
    return any((c / "meta" / "meta.csv").is_file() for c in (path, path / "release_v0"))


DESCRIBE_COLUMNS = ("diagnosis", "level_of_diagnostic_difficulty", "management")


def _text(value) -> bool:
    return value is not None and str(value).strip() not in ("", "nan")


class Derm7pt:
    """The reader of the official `release_v0/` layout (every task annotated, both photos, metadata)."""

    detect = staticmethod(detect)

    @staticmethod
    def load(
        path: str | os.PathLike,
        *,
        include_leaky_meta: bool = False,
        check_images: bool = True,
        skip_missing: bool = False,
    ) -> CaseSet:
        """Read and validate a Derm7pt folder (`release_v0` itself or its parent).

        `include_leaky_meta` adds `management` and `level_of_diagnostic_difficulty` to the
        metadata vector. They are decided after the diagnosis and leak it: research only.
        """
        root = find_release_root(Path(path))
        meta_dir, image_dir = root / "meta", root / "images"
        frame = _read_meta(meta_dir / "meta.csv")
        resolver = _PathResolver(image_dir) if check_images else None
        quirks: list[str] = []
        cases, errors = [], []
        missing: list[tuple[int, str]] = []
        seen_case_nums: dict[int, int] = {}
        for i, rec in enumerate(frame.to_dict("records")):
            try:
                case_num = int(rec["case_num"])
            except (TypeError, ValueError):
                raise DatasetError(f"meta.csv row {i}: case_num {rec['case_num']!r} is not an integer")
            if case_num in seen_case_nums:
                raise DatasetError(
                    f"meta.csv row {i}: case_num {case_num} duplicates row {seen_case_nums[case_num]}"
                )
            seen_case_nums[case_num] = i
            try:
                targets = encode_row(rec, i)
                raw_meta = {k: str(rec[k]) for k in meta_fields(include_leaky_meta)}
                meta = encode_meta(raw_meta, include_leaky_meta, row=i)
                score = int(rec["seven_point_score"])
            except LabelError as exc:
                errors.append(f"meta.csv {exc}")
                continue
            except (TypeError, ValueError):
                errors.append(f"meta.csv row {i}: seven_point_score {rec['seven_point_score']!r} is not an integer")
                continue
            expected = seven_point_score(np.array(targets))
            if score != expected:
                errors.append(
                    f"meta.csv row {i}: seven_point_score is {score} but the criteria give {expected}"
                )
            derm_rel, clinic_rel = str(rec["derm"]), str(rec["clinic"])
            clinic_missing = clinic_rel == derm_rel
            if clinic_missing:
                quirks.append(f"row {i} (case {case_num}): clinic == derm -> clinic photo treated as missing")
            derm_path = clinic_path = None
            if resolver is not None:
                for column, rel in (("derm", derm_rel), ("clinic", clinic_rel)):
                    if column == "clinic" and clinic_missing:
                        continue
                    try:
                        resolved, note = resolver.resolve(rel)
                    except DatasetError as exc:
                        errors.append(f"meta.csv row {i}, column {column!r}: {exc}")
                        continue
                    if resolved is None:
                        missing.append((len(cases), f"row {i}, column {column!r}: {image_dir / rel}"))
                    if note:
                        quirks.append(f"row {i}, column {column!r}: {note}")
                    if column == "derm":
                        derm_path = resolved
                    else:
                        clinic_path = resolved
            else:
                derm_path = image_dir / derm_rel
                clinic_path = None if clinic_missing else image_dir / clinic_rel
            cases.append(Case(
                case_id=str(rec.get("case_id") or f"case{case_num}"), derm=derm_path, clinic=clinic_path,
                targets=targets, meta=meta, raw_meta=raw_meta, row=i, case_num=case_num,
                describe={k: str(rec[k]).strip() for k in DESCRIBE_COLUMNS if k in rec and _text(rec[k])},
            ))
        if errors:
            raise DatasetError(f"{len(errors)} problem(s) in {meta_dir / 'meta.csv'}:" + listing(errors, 20))
        # index files hold meta.csv rows, which are the case positions here (a bad row raised above)
        splits = {s: _read_index(meta_dir / f"{s}_indexes.csv", len(frame)) for s in SPLITS}
        _check_disjoint(splits)
        cases, splits = drop_missing(cases, splits, missing, skip_missing, quirks)
        return CaseSet(NAME, root, cases, splits, quirks, meta_dim(include_leaky_meta), include_leaky_meta)


def find_release_root(path: Path) -> Path:
    """Accept the `release_v0` folder itself or any parent that holds it."""
    if not path.exists():
        raise DatasetError(f"{path}: no such folder")
    for candidate in (path, path / "release_v0"):
        if (candidate / "meta" / "meta.csv").is_file():
            return candidate
    raise DatasetError(f"{path}: not a Derm7pt folder (expected meta/meta.csv or release_v0/meta/meta.csv)")


def _read_meta(csv: Path) -> pd.DataFrame:
    if not csv.is_file():
        raise DatasetError(f"{csv}: file not found")
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{csv}: cannot parse as CSV ({exc})") from exc
    absent = [c for c in META_COLUMNS if c not in frame.columns and c not in ("case_id", "notes")]
    if absent:
        raise DatasetError(f"{csv}: missing column(s) {', '.join(absent)}")
    if frame.empty:
        raise DatasetError(f"{csv}: no rows")
    return frame


def _read_index(csv: Path, n_rows: int) -> np.ndarray:
    if not csv.is_file():
        raise DatasetError(f"{csv}: file not found")
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(f"{csv}: cannot parse as CSV ({exc})") from exc
    if "indexes" not in frame.columns:
        raise DatasetError(f"{csv}: missing column 'indexes'")
    values = []
    for line, raw in enumerate(frame["indexes"], start=2):
        try:
            v = int(raw)
        except ValueError:
            raise DatasetError(f"{csv}, line {line}: index {raw!r} is not an integer") from None
        if not 0 <= v < n_rows:
            raise DatasetError(f"{csv}, line {line}: index {v} is outside meta.csv's rows 0..{n_rows - 1}")
        values.append(v)
    dupes = [v for v, n in Counter(values).items() if n > 1]
    if dupes:
        raise DatasetError(f"{csv}: duplicated index(es) {sorted(dupes)[:10]}")
    if not values:
        raise DatasetError(f"{csv}: no indexes")
    return np.array(values, dtype=np.int64)


def _check_disjoint(splits: dict[str, np.ndarray]) -> None:
    names = list(splits)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            both = np.intersect1d(splits[names[a]], splits[names[b]])
            if both.size:
                raise DatasetError(
                    f"splits {names[a]} and {names[b]} overlap in {both.size} row(s), e.g. {both[:10].tolist()}"
                )


class _PathResolver:
    """Exact path first, then a case-insensitive match (real typo: row 816 `FCl/Fcl068.jpg`)."""

    def __init__(self, image_dir: Path) -> None:
        if not image_dir.is_dir():
            raise DatasetError(f"{image_dir}: image folder not found")
        self.image_dir = image_dir.resolve()
        self._lower: dict[str, Path] | None = None

    def _index(self) -> dict[str, Path]:
        if self._lower is None:
            self._lower = {}
            for dirpath, _, files in os.walk(self.image_dir):
                for f in files:
                    full = Path(dirpath) / f
                    self._lower[full.relative_to(self.image_dir).as_posix().lower()] = full
        return self._lower

    def resolve(self, rel: str) -> tuple[Path | None, str | None]:
        pure = PurePosixPath(rel.replace("\\", "/"))
        if not rel or pure.is_absolute() or ".." in pure.parts or Path(rel).is_absolute():
            raise DatasetError(f"image path {rel!r} escapes the dataset's images/ folder; refused")
        exact = self.image_dir / pure
        if exact.is_file():
            return exact, None
        hit = self._index().get(pure.as_posix().lower())
        if hit is not None:
            return hit, f"{rel!r} resolved case-insensitively to {hit.relative_to(self.image_dir).as_posix()!r}"
        return None, None
