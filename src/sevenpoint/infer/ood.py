"""Is this image like the dermoscopy images the model was trained on? An input gate and an
out-of-distribution (OOD) score.

The gate refuses what cannot be a lesion photo (too small, too elongated). The score is the
Mahalanobis distance of a small colour-and-texture descriptor of the image from the training
images' descriptors (Ledoit-Wolf covariance, scikit-learn); the warning threshold is a high
percentile of the validation images' scores, so about 1 % of real validation images would be
flagged. Both are stored in the checkpoint by `train` and apply to every backend. The score
knows only the training images' look: a lesion photographed differently (another scope,
lighting, a clinical photo) also scores high — a warning to look twice, not a verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

MIN_SIDE = 32  # px: below this nothing of a lesion can be seen
MAX_ASPECT = 4.0  # long side / short side: dermoscopy and clinical photos are near 3:2
WARN_PERCENTILE = 99.0  # of the validation images' scores


class GateError(ValueError):
    """An image that cannot be a lesion photo; the message names it and says why."""


def gate(size: tuple[int, int], name: str) -> None:
    """Refuse images too small or too elongated to show a lesion."""
    w, h = size
    if min(w, h) < MIN_SIDE:
        raise GateError(f"{name}: {w}x{h} px is too small to be a lesion photo (need at least {MIN_SIDE} px a side)")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise GateError(f"{name}: {w}x{h} px is too elongated to be a lesion photo "
                        f"(aspect {max(w, h) / min(w, h):.1f}:1, at most {MAX_ASPECT:g}:1)")


def descriptor(image: np.ndarray) -> np.ndarray:
    """A 75-value summary of an RGB uint8 image (any size): a 4x4x4 colour histogram (square-rooted),
    per-channel mean and spread, and the mean gradient and Laplacian energy (texture)."""
    small = np.asarray(Image.fromarray(np.ascontiguousarray(image[..., :3])).resize((64, 64), Image.BILINEAR),
                       dtype=np.float64) / 255.0
    bins = np.minimum((small * 4).astype(int), 3)
    hist = np.bincount((bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).ravel(), minlength=64) / (64 * 64)
    gray = small.mean(axis=2)
    gy, gx = np.gradient(gray)
    lap = np.abs(4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:])
    return np.concatenate([np.sqrt(hist), small.mean(axis=(0, 1)), small.std(axis=(0, 1)),
                           [np.hypot(gx, gy).mean(), lap.mean(), gray.std()],
                           [np.percentile(gray, 10), np.percentile(gray, 90)]])


@dataclass
class OODModel:
    """Training descriptors' mean and precision matrix, and the warning threshold."""

    mean: list[float]
    precision: list[list[float]]
    threshold: float
    fitted_on: int

    @classmethod
    def fit(cls, train: np.ndarray, valid: np.ndarray) -> OODModel:
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf().fit(train)
        model = cls(lw.location_.tolist(), lw.precision_.tolist(), 0.0, len(train))
        model.threshold = float(np.percentile(model.scores(valid), WARN_PERCENTILE))
        return model

    def scores(self, descriptors: np.ndarray) -> np.ndarray:
        d = np.atleast_2d(descriptors) - np.asarray(self.mean)
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, np.asarray(self.precision), d), 0.0))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> OODModel | None:
        return cls(**values) if values else None


def non_lesion_examples() -> dict[str, np.ndarray]:
    """Images no dermoscope took, to measure the score: noise, text on plain backgrounds, a
    gradient, and the photos that ship with matplotlib (offline, nothing downloaded)."""
    from pathlib import Path

    import matplotlib
    from PIL import ImageDraw

    rng = np.random.default_rng(0)
    out = {f"noise{i}": rng.integers(0, 256, (200, 300, 3), dtype=np.uint8) for i in range(3)}
    for i, colour in enumerate(["white", "black", (30, 90, 200)]):
        img = Image.new("RGB", (300, 200), colour)
        ImageDraw.Draw(img).text((10, 80), "Quarterly report 2026 - page 3", fill="gray")
        out[f"text{i}"] = np.asarray(img)
    out["gradient"] = np.repeat(np.linspace(0, 255, 300, dtype=np.uint8)[None, :, None], 200, 0).repeat(3, 2)
    samples = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        out[name] = np.asarray(Image.open(samples / name).convert("RGB"))
    return out
