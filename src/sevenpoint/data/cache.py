"""Decoded-image cache: each image resized once and stored raw on disk, checksummed.

An entry is keyed by the source file's resolved path, byte size, mtime and the target
geometry, so an edited or replaced image misses the cache instead of returning stale pixels.
Each entry carries a CRC32 of its pixels: a truncated or corrupted entry is detected on read
and rebuilt. Entries are written to a temp file and renamed, so a killed process never
leaves a half-written entry under a valid name.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_bytes
from .images import DEFAULT_CROP, load_image

_MAGIC = b"7PTC"
_HEADER = struct.Struct("<4sHHHI")  # magic, height, width, channels, crc32


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    rebuilt: int = 0


@dataclass
class ImageCache:
    """Load `path` as uint8 (size, size, 3) — or with its short side at `short_side`, aspect
    kept, when that is set — from `root` when a valid entry exists."""

    root: Path | None
    size: int
    crop: int = DEFAULT_CROP
    short_side: int = 0
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        if self.root is not None:
            self.root = Path(self.root)
            self.root.mkdir(parents=True, exist_ok=True)

    def key(self, path: Path, crop: int | None = None) -> str:
        st = path.stat()
        crop = self.crop if crop is None else crop
        geometry = f"{self.size}|{crop}" + (f"|short{self.short_side}" if self.short_side else "")
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{geometry}"
        return hashlib.sha1(ident.encode()).hexdigest()

    def entry_path(self, path: Path, crop: int | None = None) -> Path:
        assert self.root is not None
        k = self.key(path, crop)
        return self.root / k[:2] / f"{k}.img"

    def load(self, path: str | os.PathLike, crop: int | None = None) -> np.ndarray:
        """The decoded image; `crop` overrides the cache's border for this image (another dataset's)."""
        path = Path(path)
        crop = self.crop if crop is None else crop
        if self.root is None:
            return load_image(path, self.size, crop, self.short_side)
        entry = self.entry_path(path, crop)
        if entry.exists():
            arr = _read_entry(entry, self.size, self.short_side)
            if arr is not None:
                self.stats.hits += 1
                return arr
            self.stats.rebuilt += 1
        self.stats.misses += 1
        arr = load_image(path, self.size, crop, self.short_side)
        _write_entry(entry, arr)
        return arr


def _read_entry(entry: Path, size: int, short_side: int = 0) -> np.ndarray | None:
    try:
        data = entry.read_bytes()
    except OSError:
        return None
    if len(data) < _HEADER.size:
        return None
    magic, h, w, c, crc = _HEADER.unpack_from(data)
    body = data[_HEADER.size:]
    shape_ok = min(h, w) == short_side if short_side else (h, w) == (size, size)
    if magic != _MAGIC or not shape_ok or c != 3 or len(body) != h * w * c:
        return None
    if zlib.crc32(body) != crc:
        return None
    return np.frombuffer(bytearray(body), dtype=np.uint8).reshape(h, w, c)  # writable for torch


def _write_entry(entry: Path, arr: np.ndarray) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    body = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    header = _HEADER.pack(_MAGIC, arr.shape[0], arr.shape[1], arr.shape[2], zlib.crc32(body))
    write_bytes(entry, header + body)


def default_cache_dir() -> Path:
    """Where decoded images are cached unless `data.cache_dir` says otherwise ($SEVENPOINT_CACHE)."""
    return Path(os.environ.get("SEVENPOINT_CACHE", Path.home() / ".cache" / "sevenpoint" / "images"))


def make_cache(cfg) -> ImageCache:
    """The decoded-image cache a run config's data section describes."""
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    return ImageCache(root, cfg.data.image_size, cfg.data.crop, cfg.data.short_side)
