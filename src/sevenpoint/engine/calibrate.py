"""`calibrate_checkpoint()`: per-task temperatures fitted on the validation split, written into a
copy of the checkpoint (`infer.temperature`) with the prediction sets and stacked diagnosis fitted on the
same predictions, which `evaluate`, `predict`, `serve` and `export` then apply by default. The temperatures
go on the model's output (for an ensemble: on the members' average, pool-then-calibrate, which tied with
calibrate-then-pool on NLL in RESULTS §13; only a cross-fit ensemble has each member's held-out cases to
calibrate members on). A temperature rescales a task's probabilities without changing its argmax, so
accuracies stay exactly the same; what changes is how far the probabilities can be trusted.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import atomic_torch_save, load_model, read_checkpoint
from ..data import load_dataset
from ..data.base import DatasetError
from .evaluate import predict_measured
from .held_out import fit_into
from .metrics import temperature_report


class CalibrateError(ValueError):
    pass


def fit_on_validation(model, cfg, data, precision: str = "auto", progress: bool = True):
    """(temperatures, per-task report, validation predictions) of `model` on `data`'s validation split,
    with the checkpoint's TTA and late fusion and `evaluate`'s numerics; earlier temperatures ignored."""
    if "valid" not in data.splits:
        raise DatasetError(f"{data.root}: temperatures are fitted on a validation split; this {data.format} "
                           "dataset has none")
    pred = predict_measured(model, cfg, data, "valid", progress=progress, precision=precision)
    temps, report = temperature_report(pred.probs, pred.targets)
    return temps, report, pred


def write_with_temperatures(source: str | os.PathLike, dest: str | os.PathLike, data, pred) -> dict:
    """`source` checkpoint with what `train.calibrate` fits (temperatures, prediction sets, the stacked
    diagnosis: engine/held_out.py) from `data`'s validation predictions `pred`, written atomically to
    `dest` (may be `source`). Returns the per-task temperature report."""
    raw = read_checkpoint(source)
    art = fit_into(raw["sevenpoint"], pred, f"{data.root} (valid)")
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(raw, dest)
    return {k: v for k, v in art.calibration.items() if k != "fitted_on"}


def calibrate_checkpoint(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike,
                         precision: str = "auto", progress: bool = True) -> dict:
    """Fit one temperature per task on `data_dir`'s validation split and write the checkpoint with
    them to `out` (never over an existing file). Returns per task: temperature, validation NLL and
    ECE before / after."""
    out = Path(out)
    if out.exists():
        raise CalibrateError(f"{out}: already exists; give another --out (nothing overwritten)")
    model, cfg, _ = load_model(checkpoint)
    model.member_temperature = None  # earlier temperatures ignored: the new ones go on the output
    if cfg.train.refit:
        raise CalibrateError(f"{checkpoint}: refit on train + valid, so its validation split is training data and "
                             "temperatures fitted there would be too low; calibrate the model before refitting")
    data = load_dataset(data_dir, include_leaky_meta=cfg.data.include_leaky_meta)
    _, _, pred = fit_on_validation(model, cfg, data, precision, progress)
    return write_with_temperatures(checkpoint, out, data, pred)
