"""Temperature scaling of per-task probabilities (numpy only: `predict` and `serve` import it at
start-up without the metrics stack)."""

from __future__ import annotations

import numpy as np


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    z = np.log(np.clip(probs, 1e-12, None)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply_temperatures(probs: list[np.ndarray], temperatures) -> list[np.ndarray]:
    """Each task's probabilities at its own temperature (`infer.temperature`); None: unchanged."""
    if temperatures is None:
        return list(probs)
    return [apply_temperature(p, t) for p, t in zip(probs, temperatures, strict=True)]
