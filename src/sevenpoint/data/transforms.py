"""Augmentation presets (albumentations); train and eval are separate, both label-preserving.

Dermoscopy has no canonical orientation, so flips and 90-degree rotations are free. Colour
changes are kept small: a hue shift could turn a blue-whitish veil into something else.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

from ..config import DataConfig
from .images import center_square


def train_transform(strength: float = 1.0, preset: str = "affine", size: int | None = None) -> A.Compose:
    """Training augmentation; `strength=0` turns it off (then as `eval_transform`).

    `affine`: flips, rot90, mild affine and colour jitter on the (squashed) square image.
    `crop`: for aspect-kept images (`data.short_side`): a random `size` crop inside the
    centred square, flips, rot90, and only contrast/brightness changes (no geometry warp,
    no hue). `size=None` leaves the image size alone (squashed images already have it).
    """
    if strength <= 0:
        return eval_transform(size)
    if preset == "crop":
        if size is None:
            raise ValueError("the crop preset needs the crop size")
        return A.Compose([
            CenterSquare(),
            A.RandomCrop(size, size),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=1.0),
            A.RandomBrightnessContrast(brightness_limit=0.08 * strength, contrast_limit=0.15 * strength, p=1.0),
        ], seed=0)
    if preset != "affine":
        raise ValueError(f"unknown augmentation preset {preset!r} (affine, crop)")
    return A.Compose([
        *_center(size),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=1.0),
        A.Affine(scale=(1 - 0.15 * strength, 1 + 0.15 * strength), rotate=(-30 * strength, 30 * strength),
                 translate_percent=(-0.05 * strength, 0.05 * strength), border_mode=cv2.BORDER_REFLECT_101,
                 p=0.7),
        A.ColorJitter(brightness=0.15 * strength, contrast=0.15 * strength, saturation=0.1 * strength,
                      hue=0.02 * strength, p=0.7),
    ], seed=0)


class CenterSquare(A.ImageOnlyTransform):
    """The centred `size` square, or the largest centred square (side min(H, W)) when `size` is None:
    the window a random crop may move within, whatever the image's orientation."""

    def __init__(self, size: int | None = None) -> None:
        super().__init__(p=1.0)
        self.size = size

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return center_square(img, self.size or min(img.shape[:2]))


def _center(size: int | None) -> list[A.BasicTransform]:
    return [] if size is None else [CenterSquare(size)]


def eval_transform(size: int | None = None) -> A.Compose:
    """Deterministic: the centred `size` x `size` window (none when `size` is None)."""
    return A.Compose(_center(size), seed=0)


def transforms_for(data: DataConfig) -> tuple[A.Compose, A.Compose]:
    """(train, eval) transforms for a data config: the one place that reads its geometry."""
    size = data.image_size if data.short_side else None
    return train_transform(data.augment, data.augmentation, size), eval_transform(size)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1].

    One normalisation for every backbone: the EfficientNet-Lite ports expect (x - 127) / 128
    and ImageNet Xception (x - 127.5) / 127.5; the difference is below a grey level.
    """
    if not img.flags.writeable:  # PIL-backed arrays are read-only; torch wants to own writable memory
        img = img.copy()
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    return t.sub_(127.5).div_(127.5)


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """Test-time views of a (N, 3, H, W) batch: 'none', 'flip' (4 views) or 'flip_rot' (8 views)."""
    if mode == "none":
        return [x]
    views = [x, x.flip(-1), x.flip(-2), x.flip(-1, -2)]
    if mode == "flip":
        return views
    if mode == "flip_rot":
        return views + [v.transpose(-1, -2) for v in views]
    raise ValueError(f"unknown TTA mode {mode!r} (none, flip, flip_rot)")
