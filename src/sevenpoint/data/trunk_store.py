"""Trunk-feature cache on disk: a frozen backbone trunk's output per image and augmented view.

A frozen layer's output depends on the image and its augmentation only, not on the epoch, the
member, the seed or the fold, so it is computed once (`engine.trunk.fill`) and read here. One
entry per (trunk, image): a header, a CRC32 per view and an fp16 array (1 + V, C, h, w). View 0
is the un-augmented image (validation); views 1..V are drawn from the training augmentation with
a seed fixed per (image, view) (`view_seed`), so an entry filled with 16 views also serves a run
that asks for 8. Entries live under `<image cache>/trunk/<trunk key>/`, where the trunk key names
everything that decides the features (backbone, its frozen weights, the cut, the image geometry,
the augmentation recipe), and are named like the decoded-image cache's (source path, size, mtime,
crop): a changed image or recipe is a miss, never a stale hit. Every view read is CRC-checked;
entries are written atomically, so a killed fill leaves whole entries or none.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_bytes
from .base import CaseSet
from .cache import ImageCache
from .dataset import CaseDataset

_MAGIC = b"7PTF"
_HEADER = struct.Struct("<4sHHHH")  # magic, views stored (view 0 included), channels, height, width


class TrunkCacheError(RuntimeError):
    """A trunk-feature entry that is missing, short or damaged; the message names the file."""


def view_seed(image: Path, view: int) -> int:
    """The augmentation seed of `view` (>= 1) of `image`: fixed, so every fill draws the same views."""
    return zlib.crc32(f"{Path(image).resolve()}|{view}".encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class TrunkStore:
    """The entries of one trunk (`key`) under `root`; images are named by `images.key` (path, size, mtime, crop)."""

    root: Path
    images: ImageCache
    shape: tuple[int, int, int]  # (C, h, w) of one view

    @property
    def view_bytes(self) -> int:
        return int(np.prod(self.shape)) * 2

    def entry(self, image: str | os.PathLike, crop: int | None = None) -> Path:
        k = self.images.key(Path(image), crop)
        return self.root / k[:2] / f"{k}.feat"

    def views_stored(self, image: str | os.PathLike, crop: int | None = None) -> int:
        """How many views (view 0 included) a valid-looking entry holds; 0 when there is none."""
        try:
            with open(self.entry(image, crop), "rb") as f:
                head = f.read(_HEADER.size)
                size = os.fstat(f.fileno()).st_size
        except OSError:
            return 0
        if len(head) < _HEADER.size:
            return 0
        magic, n, c, h, w = _HEADER.unpack(head)
        if magic != _MAGIC or (c, h, w) != self.shape or size != _HEADER.size + n * (4 + self.view_bytes):
            return 0
        return n

    def verify(self, image: str | os.PathLike, crop: int | None = None) -> bool:
        """Every view of the entry matches its CRC (the entry read once)."""
        n = self.views_stored(image, crop)
        try:
            data = self.entry(image, crop).read_bytes() if n else b""
        except OSError:
            return False
        crcs = struct.unpack_from(f"<{n}I", data, _HEADER.size) if n else ()
        body = _HEADER.size + 4 * n
        return n > 0 and all(zlib.crc32(data[body + v * self.view_bytes: body + (v + 1) * self.view_bytes]) == crc
                             for v, crc in enumerate(crcs))

    def read(self, image: str | os.PathLike, crop: int | None, view: int) -> np.ndarray:
        """View `view` of `image` as fp16 (C, h, w); raises `TrunkCacheError` naming the entry."""
        n = self.views_stored(image, crop)
        where = f"{self.entry(image, crop)} (trunk features of {image})"
        if view >= n:
            raise TrunkCacheError(f"{where}: holds {n} views, view {view} asked; fill it with `sevenpoint cache-trunk`")
        arr = self._read(image, crop, view, n)
        if arr is None:
            raise TrunkCacheError(f"{where}: view {view} fails its checksum; `sevenpoint cache-trunk` rebuilds it")
        return arr

    def _read(self, image, crop, view: int, n: int) -> np.ndarray | None:
        fd = os.open(self.entry(image, crop), os.O_RDONLY)
        try:
            (crc,) = struct.unpack("<I", os.pread(fd, 4, _HEADER.size + 4 * view))
            body = os.pread(fd, self.view_bytes, _HEADER.size + 4 * n + view * self.view_bytes)
        finally:
            os.close(fd)
        if len(body) != self.view_bytes or zlib.crc32(body) != crc:
            return None
        return np.frombuffer(bytearray(body), dtype=np.float16).reshape(self.shape)  # writable for torch

    def write(self, image: str | os.PathLike, crop: int | None, views: np.ndarray) -> None:
        """Store (1 + V, C, h, w) features (view 0 = un-augmented) for `image`, atomically."""
        views = np.ascontiguousarray(views, dtype=np.float16)
        if views.ndim != 4 or tuple(views.shape[1:]) != self.shape:
            raise ValueError(f"trunk features of shape {views.shape}, this store holds (views, {self.shape})")
        bodies = [v.tobytes() for v in views]
        crcs = struct.pack(f"<{len(bodies)}I", *(zlib.crc32(b) for b in bodies))
        write_bytes(self.entry(image, crop), _HEADER.pack(_MAGIC, len(bodies), *self.shape) + crcs + b"".join(bodies))


class TrunkDataset(CaseDataset):
    """`CaseDataset` whose `derm` / `clinic` are trunk features read from `stores` (one per modality) instead
    of images: with an `(index, seed)` key (training) a view in 1..`views` drawn from the seed, else view 0
    (the un-augmented image). A missing photo is zeros of the feature shape, as it is zeros of the image shape."""

    def __init__(self, data: CaseSet, split: str, stores: dict[str, TrunkStore], views: int,
                 clinic_fallback: bool = False, meta_dim: int | None = None) -> None:
        super().__init__(data, split, next(iter(stores.values())).images, None, clinic_fallback, meta_dim)
        self.stores, self.views = stores, views

    def needed(self) -> list[tuple[str, Path, int | None]]:
        """(modality, image, crop) of every entry this split reads."""
        out = []
        for case in self.cases:
            if case.derm is not None and "derm" in self.stores:
                out.append(("derm", Path(case.derm), case.crop))
            clinic = case.clinic if case.clinic is not None else (case.derm if self.clinic_fallback else None)
            if clinic is not None and "clinic" in self.stores:
                out.append(("clinic", Path(clinic), case.crop))
        return out

    def _input(self, modality: str, path, crop: int | None, seed: int | None) -> torch.Tensor:
        view = 0 if seed is None else 1 + random.Random(seed).randrange(self.views)
        return torch.from_numpy(self.stores[modality].read(path, crop, view)).float()

    def _blank(self, modality: str) -> torch.Tensor:
        store = self.stores.get(modality) or next(iter(self.stores.values()))
        return torch.zeros(store.shape)
