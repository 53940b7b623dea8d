"""`evaluate()`: a checkpoint on one split -> metrics.json, report.md, predictions.csv, PNG plots."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpoint import load_model
from ..config import RunConfig
from ..data import Derm7pt, Derm7ptDataset
from ..data.cache import make_cache
from ..data.transforms import transforms_for, tta_views
from ..models import BRANCHES, FusionModel
from ..schema import TASKS
from .metrics import apply_temperature, compute_metrics, ece, fit_temperature, nll
from .module import forward_batch
from .report import plot_confusion, plot_roc, write_report
from ..runtime import bf16_autocast, use_bf16, use_channels_last


@dataclass
class Predictions:
    """Fused probabilities (8 x (N, C_t)), targets (N, 8), case ids, and each branch's own
    probabilities with the (N,) mask of the cases it ran on (TTA views averaged throughout)."""

    probs: list[np.ndarray]
    targets: np.ndarray
    ids: list[str]
    branch_probs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    branch_masks: dict[str, np.ndarray] = field(default_factory=dict)


@torch.no_grad()
def predict_loader(model: FusionModel, loader: DataLoader, tta: str = "none", bf16: bool = False,
                   channels_last: bool = False, progress: bool = True, device: str = "cpu") -> Predictions:
    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dev_type = torch.device(device).type
    names = ["fused", *model.branch_names]
    chunks: dict[str, list[list[np.ndarray]]] = {b: [[] for _ in TASKS] for b in names}
    masks: dict[str, list[np.ndarray]] = {b: [] for b in model.branch_names}
    targets, ids = [], []
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        views_d, views_c = tta_views(batch["derm"], tta), tta_views(batch["clinic"], tta)
        acc: dict[str, list[torch.Tensor]] = {}
        for vd, vc in zip(views_d, views_c):
            with bf16_autocast(bf16, dev_type):
                out = forward_batch(model, {**batch, "derm": vd, "clinic": vc}, channels_last)
            view = {"fused": out.probs, **{b: out.branch_probs(b) for b in model.branch_names}}
            for b, ps in view.items():
                ps = [p.float().cpu() for p in ps]
                acc[b] = ps if b not in acc else [a + p for a, p in zip(acc[b], ps)]
        for b in names:
            for t in range(len(TASKS)):
                chunks[b][t].append((acc[b][t] / len(views_d)).numpy())
        used = out.branches_used().cpu().numpy()  # (N, 3) over BRANCHES; the same for every view
        for b in model.branch_names:
            masks[b].append(used[:, BRANCHES.index(b)])
        targets.append(batch["targets"].cpu().numpy())
        ids += list(batch["case_id"])
    probs = {b: [np.concatenate(p) for p in chunks[b]] for b in names}
    return Predictions(probs.pop("fused"), np.concatenate(targets), ids, probs,
                       {b: np.concatenate(m) for b, m in masks.items()})


def predict_split(model: FusionModel, cfg: RunConfig, data: Derm7pt, split: str, tta: str = "none",
                  batch_size: int = 32, bf16: bool = False, channels_last: bool = False, progress: bool = True,
                  device: str = "cpu") -> Predictions:
    """`predict_loader` over one split, with the images prepared exactly as for validation in training."""
    ds = Derm7ptDataset(data, split, make_cache(cfg), transforms_for(cfg.data)[1],
                        clinic_fallback=cfg.model.clinic_only)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    return predict_loader(model, dl, tta, bf16, channels_last, progress, device)


def branch_accuracy(pred: Predictions) -> dict[str, dict]:
    """Each branch on its own (on the cases it ran on): how much it contributes to the fused result."""
    out = {}
    for b, probs in pred.branch_probs.items():
        m = pred.branch_masks[b]
        if not m.any():
            out[b] = {"cases": 0, "average_accuracy": None, "tasks": {}}
            continue
        accs = [float((probs[t][m].argmax(axis=1) == pred.targets[m, t]).mean()) for t in range(len(TASKS))]
        out[b] = {"cases": int(m.sum()), "average_accuracy": float(np.mean(accs)),
                  "tasks": {task.name: {"accuracy": a} for task, a in zip(TASKS, accs)}}
    return out


def majority_baseline(data: Derm7pt, split: str) -> dict[str, float]:
    """Accuracy of predicting each task's most frequent TRAINING class on `split`."""
    train, target = data.targets("train"), data.targets(split)
    out = {}
    for t, task in enumerate(TASKS):
        mode = np.bincount(train[:, t], minlength=task.num_classes).argmax()
        out[task.name] = float((target[:, t] == mode).mean())
    out["AVG"] = float(np.mean([out[t.name] for t in TASKS]))
    return out


def evaluate(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
             split: str = "test", tta: str | None = None, calibrate: bool = False, batch_size: int = 32,
             precision: str = "auto", progress: bool = True, device: str = "auto") -> dict:
    """Evaluate once on `split`. Temperatures (with `calibrate`) are fitted on the validation split.

    `tta=None` applies the checkpoint's own inference setting (`infer.tta`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, cfg, _ = load_model(checkpoint)
    tta = cfg.infer.tta if tta is None else tta
    data = Derm7pt.load(data_dir, include_leaky_meta=cfg.data.include_leaky_meta)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = use_bf16(precision, cfg.model.backbone, on_gpu=device.startswith("cuda"))
    channels_last = use_channels_last(cfg.train.channels_last)

    def run(which: str):
        return predict_split(model, cfg, data, which, tta, batch_size, bf16, channels_last, progress, device)

    pred = run(split)
    probs, targets, ids = pred.probs, pred.targets, pred.ids
    metrics = compute_metrics(probs, targets)
    metrics["branches"] = branch_accuracy(pred)
    fallback = sum(c.clinic is None for c in data.split_cases(split)) if cfg.model.clinic_only else 0
    metrics.update({"checkpoint": str(checkpoint), "split": split, "tta": tta, "clinic_fallback_cases": fallback,
                    "precision": "bf16" if bf16 else "fp32", "variant": cfg.model.variant,
                    "backbone": cfg.model.backbone, "attention": cfg.model.attention})
    if calibrate:
        val = run("valid")
        val_probs, val_targets = val.probs, val.targets
        cal = {}
        for t, task in enumerate(TASKS):
            temp = fit_temperature(val_probs[t], val_targets[:, t])
            before = compute_metrics(val_probs, val_targets)["tasks"][task.name]
            scaled_val = apply_temperature(val_probs[t], temp)
            cal[task.name] = {
                "temperature": temp,
                "valid_nll_before": before["nll"],
                "valid_nll_after": nll(scaled_val, val_targets[:, t]),
                "valid_ece_before": before["ece"], "valid_ece_after": ece(val_targets[:, t], scaled_val),
                f"{split}_ece_before": metrics["tasks"][task.name]["ece"],
            }
            probs[t] = apply_temperature(probs[t], temp)
            cal[task.name][f"{split}_ece_after"] = ece(targets[:, t], probs[t])
        metrics["calibration"] = cal  # argmax is unchanged by a temperature: accuracies stay the same
    baseline = majority_baseline(data, split)
    metrics["majority_baseline"] = baseline

    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_predictions(out_dir / "predictions.csv", ids, probs, targets)
    plot_confusion(metrics, out_dir / "confusion_matrices.png")
    plot_roc(probs, targets, out_dir / "roc_curves.png")
    write_report(out_dir / "report.md", {f"sevenpoint {cfg.model.variant} ({split})": metrics}, baseline, split)
    return metrics


def write_predictions(path: Path, ids: list[str], probs: list[np.ndarray], targets: np.ndarray) -> None:
    cols: dict[str, object] = {"case_id": ids}
    for t, task in enumerate(TASKS):
        for c, name in enumerate(task.classes):
            cols[f"{task.name}_p_{name}"] = np.round(probs[t][:, c], 6)
        cols[f"{task.name}_pred"] = probs[t].argmax(axis=1)
        cols[f"{task.name}_true"] = targets[:, t]
    pd.DataFrame(cols).to_csv(path, index=False)
