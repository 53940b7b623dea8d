"""Torch dataset over a `Derm7pt` split; each item is a dict (STYLE.md habit 4)."""

from __future__ import annotations

from collections.abc import Iterator

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .cache import ImageCache
from .derm7pt import Derm7pt
from .transforms import eval_transform, to_tensor


class Derm7ptDataset(Dataset):
    """Items: `derm`, `clinic` (3, S, S) float tensors, `meta` (D,), `targets` (8,) long,
    `has_derm`, `has_clinic`, `has_meta` (bool), `case_id`, `index`.

    A missing clinical photo is a zero tensor with `has_clinic=False`: the model must not see
    a dermoscopy photo standing in for it. The one exception is `clinic_fallback=True`, for
    *evaluating* a clinical-only model (CIM), which has no branch for such a case: it then
    sees the dermoscopy photo, as the official meta.csv itself substitutes it, and the item is
    marked `clinic_is_fallback`. Keys may be an int or an `(index, seed)` pair from
    `EpochSampler`, which makes augmentation a pure function of (seed, epoch, index) and so
    reproducible across `--resume` and worker counts.
    """

    def __init__(self, data: Derm7pt, split: str, cache: ImageCache,
                 transform: A.Compose | None = None, clinic_fallback: bool = False) -> None:
        self.data = data
        self.split = split
        self.cases = data.split_cases(split)
        self.cache = cache
        self.transform = transform or eval_transform()
        self.clinic_fallback = clinic_fallback

    def __len__(self) -> int:
        return len(self.cases)

    def _image(self, path, seed: int | None) -> torch.Tensor:
        img = self.cache.load(path)
        if seed is not None:
            self.transform.set_random_seed(seed)
        return to_tensor(self.transform(image=img)["image"])

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        case = self.cases[index]
        derm = self._image(case.derm, seed)
        has_clinic = case.clinic is not None
        fallback = not has_clinic and self.clinic_fallback
        if has_clinic:
            clinic = self._image(case.clinic, None if seed is None else seed + 1)
        elif fallback:
            clinic = derm.clone()
        else:
            clinic = torch.zeros_like(derm)
        return {
            "derm": derm,
            "clinic": clinic,
            "meta": torch.from_numpy(case.meta.copy()),
            "targets": torch.tensor(case.targets, dtype=torch.long),
            "has_derm": torch.tensor(True),
            "has_clinic": torch.tensor(has_clinic or fallback),
            "clinic_is_fallback": torch.tensor(fallback),
            "has_meta": torch.tensor(True),
            "case_id": case.case_id,
            "index": index,
        }


class EpochSampler(Sampler):
    """Shuffles with a generator seeded by (seed, epoch) and yields `(index, aug_seed)` pairs.

    Lightning calls `set_epoch` on samplers that have it, so epoch k's order and augmentations
    are the same whether the run was resumed or not. `weights` turns it into balanced
    sampling with replacement (one draw per item per epoch).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, weights: np.ndarray | None = None) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        base = (self.seed * 1_000_003 + self.epoch * 10_007) % (2**31 - 2 * self.n - 2)
        for pos, i in enumerate(order.tolist()):
            yield i, base + 2 * pos


def balanced_weights(targets: np.ndarray, task_index: int = 0) -> np.ndarray:
    """Per-item weights that equalise the classes of one task (default DIAG)."""
    y = targets[:, task_index]
    counts = np.bincount(y)
    return 1.0 / counts[y]
