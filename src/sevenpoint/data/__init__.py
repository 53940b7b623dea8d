"""Data layer: Derm7pt reader, decoded-image cache, dataset, transforms, synthetic data."""

from .cache import ImageCache
from .dataset import Derm7ptDataset, EpochSampler, balanced_weights
from .derm7pt import SPLITS, Case, DatasetError, Derm7pt
from .images import ImageError, open_rgb
from .synthetic import make_synthetic

__all__ = [
    "SPLITS", "Case", "DatasetError", "Derm7pt", "Derm7ptDataset", "EpochSampler", "ImageCache",
    "ImageError", "balanced_weights", "make_synthetic", "open_rgb",
]
