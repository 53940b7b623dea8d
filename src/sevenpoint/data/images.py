"""Reading images safely: any PIL mode to RGB, a pixel limit, border crop and resize."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # ~6300x6300; beyond this is treated as a decompression bomb
DEFAULT_CROP = 25  # the official Derm7pt tool crops 25 px of black vignette border


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / int / float grayscale: scale the actual range into 8 bits.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def open_rgb(source: str | os.PathLike | bytes | Image.Image, name: str | None = None,
             max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `source` (path, bytes or PIL image) into an RGB image or raise `ImageError`."""
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<upload>")
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            fp = io.BytesIO(source) if isinstance(source, bytes) else Path(source).open("rb")
        except OSError as exc:
            raise ImageError(f"{label}: cannot open ({exc.strerror or exc})") from exc
        try:
            img = Image.open(fp)
        except UnidentifiedImageError as exc:
            raise ImageError(f"{label}: not a readable image (unknown or corrupt format)") from exc
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{label}: image too large ({exc})") from exc
        except (OSError, ValueError, SyntaxError) as exc:  # e.g. a JPEG cut inside its header
            raise ImageError(f"{label}: cannot decode ({exc})") from exc
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"{label}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    if w < 1 or h < 1:
        raise ImageError(f"{label}: empty image ({w}x{h})")
    try:
        img.load()
        return _to_rgb(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{label}: cannot decode ({exc})") from exc


def crop_and_resize(img: Image.Image, size: int, crop: int = DEFAULT_CROP, short_side: int = 0) -> np.ndarray:
    """Crop `crop` px from each border (when the image is large enough), then resize.

    `short_side=0` squashes to (size, size, 3): the whole lesion stays in view at the price of
    a distortion (Derm7pt is 3:2). `short_side>0` keeps the aspect ratio and scales the short
    side to `short_side` (bicubic); the transforms then cut the `size` x `size` square
    (`center_square`). Returns uint8 (H, W, 3).
    """
    w, h = img.size
    if crop > 0 and min(w, h) > 8 * crop:  # tiny (synthetic) images have no scope border to lose
        img = img.crop((crop, crop, w - crop, h - crop))
        w, h = img.size
    if short_side > 0:
        scale = short_side / min(w, h)
        target = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
        img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    else:
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def center_square(arr: np.ndarray, size: int) -> np.ndarray:
    """The centred `size` x `size` window of an (H, W, 3) array with H, W >= size."""
    h, w = arr.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {w}x{h} is smaller than the {size} px crop")
    top, left = (h - size) // 2, (w - size) // 2
    return arr[top:top + size, left:left + size]


def load_image(path: str | os.PathLike, size: int, crop: int = DEFAULT_CROP, short_side: int = 0) -> np.ndarray:
    return crop_and_resize(open_rgb(path), size, crop, short_side)
