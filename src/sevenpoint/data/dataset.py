"""Torch dataset over one split of a `CaseSet` (any format); each item is a dict of named tensors."""

from __future__ import annotations

from collections.abc import Iterator

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..schema import NUM_CLASSES
from .base import CaseSet, DatasetError
from .cache import ImageCache
from .transforms import eval_transform, to_tensor

SOFT_DIM = sum(NUM_CLASSES)  # a teacher's probabilities for the 8 tasks, concatenated (`Case.soft`)


class CaseDataset(Dataset):
    """Items: `derm`, `clinic` (3, S, S) float tensors, `meta` (D,), `targets` (8,) long (partial
    labels as in schema.NOT_ANNOTATED / PRESENT), `has_derm`, `has_clinic`, `has_meta` (bool),
    `soft` (24,) a teacher's probabilities with `has_soft` (zeros / False without: `Case.soft`), `case_id`,
    `index`.

    A missing photo is a zero tensor with `has_*=False`, missing metadata zeros with
    `has_meta=False`: the model must not see a dermoscopy photo standing in for a clinical one.
    The one exception is `clinic_fallback=True`, for *evaluating* a clinical-only model (CIM),
    which has no branch for such a case: it then sees the dermoscopy photo, as Derm7pt's
    meta.csv itself substitutes it, and the item is marked `clinic_is_fallback`. Keys may be an
    int or an `(index, seed)` pair from `EpochSampler`, which makes augmentation a pure function
    of (seed, epoch, index) and so reproducible across `--resume` and worker counts.
    `meta_dim` is the model's metadata length (default: the dataset's).
    """

    def __init__(self, data: CaseSet, split: str, cache: ImageCache, transform: A.Compose | None = None,
                 clinic_fallback: bool = False, meta_dim: int | None = None) -> None:
        self.data = data
        self.split = split
        self.cases = data.split_cases(split)
        self.cache = cache
        self.transform = transform or eval_transform()
        self.clinic_fallback = clinic_fallback
        self.meta_dim = data.meta_dim if meta_dim is None else meta_dim
        wrong = next((c for c in self.cases if c.meta is not None and c.meta.shape != (self.meta_dim,)), None)
        if wrong is not None:
            raise DatasetError(f"case {wrong.case_id}: metadata has {wrong.meta.shape[0]} values, the model takes "
                               f"{self.meta_dim} (a checkpoint trained with(out) data.include_leaky_meta?)")

    def __len__(self) -> int:
        return len(self.cases)

    def _input(self, modality: str, path, crop: int | None, seed: int | None) -> torch.Tensor:
        """What the model reads for one photo (`TrunkDataset`: its trunk features instead)."""
        img = self.cache.load(path, crop)
        if seed is not None:
            self.transform.set_random_seed(seed)
        return to_tensor(self.transform(image=img)["image"])

    def _blank(self, modality: str) -> torch.Tensor | None:
        """The zeros standing in for a missing photo; None: zeros shaped like the other photo."""
        return None

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        case = self.cases[index]
        derm = None if case.derm is None else self._input("derm", case.derm, case.crop, seed)
        has_clinic = case.clinic is not None
        fallback = not has_clinic and self.clinic_fallback and derm is not None
        if has_clinic:
            clinic = self._input("clinic", case.clinic, case.crop, None if seed is None else seed + 1)
        elif fallback:  # the dermoscopy photo as the clinical branch reads it (with its augmentation)
            clinic = self._input("clinic", case.derm, case.crop, seed)
        else:
            clinic = self._blank("clinic")
            clinic = torch.zeros_like(derm) if clinic is None else clinic
        has_meta = case.meta is not None
        meta = torch.from_numpy(case.meta.copy()) if has_meta else torch.zeros(self.meta_dim)
        if derm is None:
            derm = self._blank("derm")
            derm = torch.zeros_like(clinic) if derm is None else derm
        return {
            "derm": derm,
            "clinic": clinic,
            "meta": meta,
            "targets": torch.tensor(case.targets, dtype=torch.long),
            "has_derm": torch.tensor(derm is not None),
            "has_clinic": torch.tensor(has_clinic or fallback),
            "clinic_is_fallback": torch.tensor(fallback),
            "has_meta": torch.tensor(has_meta),
            "soft": torch.zeros(SOFT_DIM) if case.soft is None else torch.from_numpy(case.soft.astype(np.float32)),
            "has_soft": torch.tensor(case.soft is not None),
            "case_id": case.case_id,
            "index": index,
        }


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside distributed training)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler):
    """Shuffles with a generator seeded by (seed, epoch) and yields `(index, aug_seed)` pairs.

    Lightning calls `set_epoch` on samplers that have it, so epoch k's order and augmentations
    are the same whether the run was resumed or not. `weights` turns it into balanced
    sampling with replacement (one draw per item per epoch). Under distributed training each
    process takes every world-th pair of the same sequence; with `pad` the sequence is first
    padded (repeating its start) so every process gets as many batches (DDP needs that in training).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, weights: np.ndarray | None = None,
                 pad: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch, self.pad = n, seed, shuffle, 0, pad
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        rank, world = rank_and_world()
        return -(-self.n // world) if self.pad else len(range(rank, self.n, world))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        base = (self.seed * 1_000_003 + self.epoch * 10_007) % (2**31 - 2 * self.n - 2)
        pairs = [(i, base + 2 * pos) for pos, i in enumerate(order.tolist())]
        rank, world = rank_and_world()
        if world > 1:
            if self.pad:
                pairs += pairs[: -len(pairs) % world]
            pairs = pairs[rank::world]
        yield from pairs


def balanced_weights(targets: np.ndarray, task_index: int = 0) -> np.ndarray:
    """Per-item weights that equalise the classes of one task (default DIAG); cases without that
    label share the weight of an average class."""
    y = targets[:, task_index]
    labelled = y >= 0
    counts = np.bincount(y[labelled])
    w = np.full(len(y), 1.0 / max(1.0, counts[counts > 0].mean()) if labelled.any() else 1.0)
    w[labelled] = 1.0 / counts[y[labelled]]
    return w
