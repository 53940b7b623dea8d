"""Augmentation presets (albumentations); train and eval are separate, both label-preserving.

Dermoscopy has no canonical orientation, so flips and 90-degree rotations are free. Colour
changes are kept small: a hue shift could turn a blue-whitish veil into something else.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch


def train_transform(strength: float = 1.0) -> A.Compose:
    """Random flips, rot90, mild affine and colour jitter; `strength=0` turns them all off."""
    if strength <= 0:
        return eval_transform()
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=1.0),
        A.Affine(scale=(1 - 0.15 * strength, 1 + 0.15 * strength), rotate=(-30 * strength, 30 * strength),
                 translate_percent=(-0.05 * strength, 0.05 * strength), border_mode=cv2.BORDER_REFLECT_101,
                 p=0.7),
        A.ColorJitter(brightness=0.15 * strength, contrast=0.15 * strength, saturation=0.1 * strength,
                      hue=0.02 * strength, p=0.7),
    ], seed=0)


def eval_transform() -> A.Compose:
    return A.Compose([], seed=0)


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
