"""The registry of dataset formats: detected from the folder, or forced with `--format`.

A format is a reader (a class or a module) with `detect(path) -> bool` and `load(path, *, include_leaky_meta,
check_images, skip_missing) -> CaseSet` (data/base.py). Adding one = a new module + a line here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import CaseSet, DatasetError
from .derm7pt import Derm7pt
from . import isic, ph2

FORMATS = {
    "derm7pt": Derm7pt,
    "ph2": ph2,  # a module with detect() and load() is a reader too
    "isic": isic,
}
FORMAT_CHOICES = ("auto", *FORMATS)


def detect_format(path: str | os.PathLike) -> str:
    """The one format whose layout `path` has; an error naming the formats otherwise."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such folder")
    found = [name for name, reader in FORMATS.items() if reader.detect(path)]
    if not found:
        raise DatasetError(f"{path}: not a dataset folder this version reads (formats: {', '.join(FORMATS)}); "
                           "see `sevenpoint check-data --help`")
    if len(found) > 1:
        raise DatasetError(f"{path}: looks like several formats ({', '.join(found)}); pick one with --format")
    return found[0]


def load_dataset(path: str | os.PathLike, format: str = "auto", *, include_leaky_meta: bool = False,
                 check_images: bool = True, skip_missing: bool = False) -> CaseSet:
    """Read and validate a dataset folder in `format` (or the detected one)."""
    name = detect_format(path) if format in (None, "auto") else format
    if name not in FORMATS:
        raise DatasetError(f"unknown dataset format {name!r} (have: {', '.join(FORMATS)})")
    return FORMATS[name].load(path, include_leaky_meta=include_leaky_meta, check_images=check_images,
                              skip_missing=skip_missing)
