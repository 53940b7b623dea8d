"""Data layer: the dataset seam and its format readers, decoded-image cache, dataset, transforms,
synthetic data."""

from .base import Case, CaseSet, DatasetError
from .cache import ImageCache
from .dataset import CaseDataset, EpochSampler, balanced_weights
from .derm7pt import SPLITS, Derm7pt
from .formats import FORMAT_CHOICES, FORMATS, detect_format, load_dataset
from .images import ImageError, open_rgb
from .synthetic import make_synthetic

__all__ = [
    "FORMATS", "FORMAT_CHOICES", "SPLITS", "Case", "CaseDataset", "CaseSet", "DatasetError", "Derm7pt",
    "EpochSampler", "ImageCache", "ImageError", "balanced_weights", "detect_format", "load_dataset",
    "make_synthetic", "open_rgb",
]
