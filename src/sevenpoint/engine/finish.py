"""What a trained model carries besides its weights, added once training is over (`finish_checkpoint`):
the out-of-distribution statistics, the training majority classes, provenance, and with `train.calibrate`
what `engine.held_out` fits on held-out predictions. Also the facts every run shares: which splits a
trainer may see (`TRAIN_SPLITS`), which cases it trains on (`training_view`) and where it ran (`run_info`).
"""

from __future__ import annotations

import copy
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_torch_save
from ..config import RunConfig
from ..data import CaseSet
from ..data.cache import make_cache
from ..infer.ood import OODModel, descriptor
from ..runtime import cpu_summary

TRAIN_SPLITS = ("train", "valid")  # the trainer never sees "test"


def run_info(argv: list[str] | None = None) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {}
    for pkg in ("sevenpoint", "torch", "lightning", "torchmetrics", "albumentations", "numpy", "efficientnet-lite-pytorch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"git_commit": commit, "versions": versions, "python": platform.python_version(),
            "cpu": cpu_summary(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "command": argv if argv is not None else sys.argv}


def training_view(data: CaseSet, cfg: RunConfig) -> CaseSet:
    """The cases the model trains on: `data` itself, or with `train.refit` the same cases with the
    validation split added to the training split."""
    if not cfg.train.refit:
        return data
    view = copy.copy(data)
    view.splits = {**data.splits, "train": np.union1d(data.splits["train"], data.splits["valid"])}
    return view


def finish_checkpoint(ckpt: dict, path: Path, data: CaseSet, cfg: RunConfig, held_out=None, source: str | None = None,
                      progress: bool = True, temperature_on: str = "output", model=None):
    """Add to the checkpoint dict `ckpt` what the model carries for inference (`sevenpoint.infer.artifacts`)
    and write it to `path` once, atomically. Returns the held-out predictions used (or None).

    Always: the out-of-distribution score (fitted on the training dermoscopy images, threshold from the
    validation ones, also in a refit: it is a descriptor statistic, not the network) and each task's
    majority class in the data the model trained on (the no-skill baseline `evaluate` reports on data
    without a training split, e.g. PH2). With `train.calibrate`: temperatures, prediction sets and the
    stacked diagnosis, fitted on `held_out` predictions (a cross-fit ensemble's out-of-fold ones, each a
    single member's: `temperature_on="members"` then applies the temperatures to each member before
    averaging), else on the model's own predictions of the validation split (applied to its output), made by
    `model` — the trained model in memory, holding `ckpt`'s weights — or, without one (an ensemble assembled
    from its members' files), by the model `ckpt` describes.
    """
    from ..infer.artifacts import Artifacts
    from ..checkpoint import model_from
    from .evaluate import predict_measured, train_majority
    from .held_out import fit_into

    cache = make_cache(cfg)
    desc = {split: np.stack([descriptor(cache.load(c.derm, c.crop)) for c in data.split_cases(split)
                             if c.derm is not None])
            for split in TRAIN_SPLITS}
    section = ckpt["sevenpoint"]
    art = Artifacts.from_section(section)
    art.ood = OODModel.fit(desc["train"], desc["valid"]).to_dict()
    art.train_majority = train_majority(training_view(data, cfg).targets("train"))
    info = run_info()
    art.provenance = {"git_commit": info["git_commit"], "version": info["versions"]["sevenpoint"],
                      "command": [str(a) for a in info["command"]]}
    section.update(art.to_section())
    if cfg.train.calibrate:
        if held_out is None:
            if model is None:
                model, _, _ = model_from(ckpt, path)
            held_out = predict_measured(model.eval(), cfg, data, "valid", cfg.train.batch_size, progress)
            source = f"{data.root} (valid)"
        art = fit_into(section, held_out, source or "held-out predictions", cfg.seed, temperature_on)
        print(_fitted_line(art), flush=True)
    atomic_torch_save(ckpt, path)
    return held_out


def _fitted_line(art) -> str:
    """What `train.calibrate` fitted, in one line."""
    temps = ", ".join(f"{k} {v['temperature']:.2f}" for k, v in art.calibration.items() if isinstance(v, dict))
    stacker = art.stacker
    if stacker is None:
        stacked = "none (too few cases per diagnosis)"
    else:
        verdict = "adopted" if stacker["default"] else "kept for corrections only"
        stacked = (f"{verdict} ({stacker['held_out']['stacked_diag_accuracy_cv']:.1%} vs the image model's "
                   f"{stacker['held_out']['image_model_diag_accuracy']:.1%}, cross-validated)")
    return f"fitted on {art.fitted_on}: temperatures {temps}; stacked diagnosis {stacked}"
