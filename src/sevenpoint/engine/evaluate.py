"""`evaluate()`: a checkpoint on one split -> metrics.json, report.md, predictions.csv, PNG plots."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpoint import load_model
from ..config import RunConfig
from ..data import CaseDataset, CaseSet, DatasetError, load_dataset
from ..data.cache import make_cache
from ..data.transforms import transforms_for, tta_views
from ..models import BRANCHES, FusionModel
from ..infer.artifacts import DEFAULT_LEVEL, Artifacts, postprocess
from ..schema import TASKS
from ..infer.temperature import apply_temperatures
from .metrics import accuracy, compute_metrics, ece, mean_accuracy, nll, temperature_report
from .module import forward_batch
from .report import plot_confusion, plot_reliability, plot_roc, write_report
from .trust import bootstrap_intervals, breakdown, case_fields, diagnosis_models, set_report, triage_report
from ..runtime import bf16_autocast, choose_path


@dataclass
class Predictions:
    """Fused probabilities (8 x (N, C_t)), targets (N, 8), case ids, and each branch's own
    probabilities with the (N,) mask of the cases it ran on (TTA views averaged throughout)."""

    probs: list[np.ndarray]
    targets: np.ndarray
    ids: list[str]
    branch_probs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    branch_masks: dict[str, np.ndarray] = field(default_factory=dict)
    untempered: list[np.ndarray] | None = None  # a model tempered inside the network: `probs` without it
    members: list[list[np.ndarray]] | None = None  # an ensemble's members' own probabilities (FusionOutput.members)
    folds: np.ndarray | None = None  # (N,) out-of-fold predictions: the member (= fold) that made each row


@torch.no_grad()
def predict_loader(model: FusionModel, loader: DataLoader, tta: str = "none", bf16: bool = False,
                   channels_last: bool = False, progress: bool = True, device: str = "cpu") -> Predictions:
    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dev_type = torch.device(device).type
    chunks: dict[str, list[list[np.ndarray]]] = {}
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
            if out.untempered is not None:
                view["untempered"] = out.untempered
            for k, member in enumerate(out.members or []):
                view[f"member{k}"] = member
            for b, ps in view.items():
                ps = [p.float().cpu() for p in ps]
                acc[b] = ps if b not in acc else [a + p for a, p in zip(acc[b], ps)]
        for b in acc:
            for t in range(len(TASKS)):
                chunks.setdefault(b, [[] for _ in TASKS])[t].append((acc[b][t] / len(views_d)).numpy())
        used = out.branches_used().cpu().numpy()  # (N, 3) over BRANCHES; the same for every view
        for b in model.branch_names:
            masks[b].append(used[:, BRANCHES.index(b)])
        targets.append(batch["targets"].cpu().numpy())
        ids += list(batch["case_id"])
    joined = {b: [np.concatenate(p) for p in parts] for b, parts in chunks.items()}
    members = [joined.pop(f"member{k}") for k in range(sum(b.startswith("member") for b in joined))]
    untempered = joined.pop("untempered", None)
    return Predictions(joined.pop("fused"), np.concatenate(targets), ids, joined,
                       {b: np.concatenate(m) for b, m in masks.items()}, untempered, members or None)


def inference_path(model: FusionModel, cfg: RunConfig, batch_size: int, precision: str = "auto",
                   device: str = "cpu") -> tuple[bool, bool, str]:
    """(bf16, channels_last, why) for predicting with a checkpoint's model: `precision` as asked;
    `auto` takes the checkpoint's own `train.precision` where its config pins one (a recipe whose
    figures were measured in fp32 stays fp32), else the faster path measured on this machine
    (`runtime.choose_path`, cached); `train.channels_last` likewise."""
    if precision == "auto" and cfg.train.precision != "auto":
        precision = cfg.train.precision
    cl, bf16, why = choose_path("infer", model, cfg, batch_size, precision, cfg.train.channels_last,
                                on_gpu=device.startswith("cuda"))
    return bf16, cl, why


def eval_dataset(cfg: RunConfig, data: CaseSet, split: str) -> CaseDataset:
    """One split's cases with the images prepared exactly as for validation in training."""
    return CaseDataset(data, split, make_cache(cfg), transforms_for(cfg.data)[1],
                       clinic_fallback=cfg.model.clinic_only, meta_dim=cfg.meta_dim)


def predict_split(model: FusionModel, cfg: RunConfig, data: CaseSet, split: str, tta: str = "none",
                  batch_size: int = 32, bf16: bool = False, channels_last: bool = False, progress: bool = True,
                  device: str = "cpu") -> Predictions:
    """`predict_loader` over one split, with the images prepared exactly as for validation in training."""
    dl = DataLoader(eval_dataset(cfg, data, split), batch_size=batch_size, shuffle=False,
                    num_workers=cfg.data.num_workers)
    return predict_loader(model, dl, tta, bf16, channels_last, progress, device)


def predict_measured(model: FusionModel, cfg: RunConfig, data: CaseSet, split: str, batch_size: int = 32,
                     progress: bool = True, precision: str = "auto") -> Predictions:
    """`predict_split` with the checkpoint's own TTA on the numeric path `inference_path` picks (CPU)."""
    bf16, channels_last, _ = inference_path(model, cfg, batch_size, precision)
    return predict_split(model, cfg, data, split, cfg.infer.tta, batch_size, bf16, channels_last, progress)


def predict_rows(model: FusionModel, cfg: RunConfig, data: CaseSet, rows, batch_size: int = 32,
                 progress: bool = True) -> Predictions:
    """`predict_measured` over the dataset rows `rows` (e.g. a cross-fit member's fold), in that order."""
    import copy

    view = copy.copy(data)
    view.splits = {**data.splits, "rows": np.asarray(rows)}
    return predict_measured(model, cfg, view, "rows", batch_size, progress)


def save_predictions(path: str | os.PathLike, pred: Predictions) -> None:
    """`pred`'s ids, targets, one `probs_<TASK>` array per task (and its folds, if any) as an .npz, atomically:
    the one format of `out_of_fold.npz`, a member's `held_out.npz` and a teacher's file (`sevenpoint teach`)."""
    from ..atomic import atomic_path

    extra = {} if pred.folds is None else {"folds": pred.folds}
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez_compressed(tmp, ids=np.asarray(pred.ids), targets=pred.targets, **extra,
                            **{f"probs_{t.name}": p for t, p in zip(TASKS, pred.probs)})


def load_predictions(path: str | os.PathLike) -> Predictions:
    """What `save_predictions` wrote (KeyError / ValueError / OSError on another file)."""
    with np.load(path) as f:
        return Predictions([np.asarray(f[f"probs_{t.name}"]) for t in TASKS], np.asarray(f["targets"]),
                           [str(i) for i in f["ids"]], folds=np.asarray(f["folds"]) if "folds" in f else None)


def branch_accuracy(pred: Predictions) -> dict[str, dict]:
    """Each branch on its own (on the cases it ran on): how much it contributes to the fused result."""
    out = {}
    for b, probs in pred.branch_probs.items():
        m = pred.branch_masks[b]
        if not m.any():
            out[b] = {"cases": 0, "average_accuracy": None, "tasks": {}}
            continue
        accs = {task.name: accuracy(probs[t][m].argmax(axis=1), pred.targets[m, t]) for t, task in enumerate(TASKS)}
        out[b] = {"cases": int(m.sum()), "average_accuracy": mean_accuracy(accs.values()),
                  "tasks": {name: {"accuracy": acc} for name, acc in accs.items()}}
    return out


def train_majority(targets: np.ndarray) -> list[int]:
    """Each task's most frequent annotated class in (N, 8) training targets (-1: none annotated)."""
    out = []
    for t, task in enumerate(TASKS):
        y = targets[:, t]
        out.append(int(np.bincount(y[y >= 0], minlength=task.num_classes).argmax()) if (y >= 0).any() else -1)
    return out


def majority_baseline(majority: list[int], targets: np.ndarray) -> dict[str, float | None]:
    """Accuracy of answering each task's training majority class, on the annotated `targets`."""
    out: dict[str, float | None] = {
        task.name: accuracy(np.full(len(targets), majority[t]), targets[:, t]) if majority[t] >= 0 else None
        for t, task in enumerate(TASKS)}
    out["AVG"] = mean_accuracy(out.values())
    return out


def evaluate(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
             split: str = "test", tta: str | None = None, calibrate: bool = False, batch_size: int = 32,
             precision: str = "auto", progress: bool = True, device: str = "auto", data_format: str = "auto",
             skip_missing: bool = False, baseline_data: str | os.PathLike | None = None, level: float = DEFAULT_LEVEL,
             bootstrap: int = 1000) -> dict:
    """Evaluate once on `split` of a dataset in any format (tasks it does not annotate are not
    scored). Temperatures (with `calibrate`) are fitted on the validation split.

    The diagnosis is the one `predict` shows (the stacked model's where the checkpoint makes it the
    default). Beside the accuracies: 95 % bootstrap intervals (`bootstrap` resamples, 0: none), ECE and
    reliability diagrams, the prediction sets' coverage and size at `level` (checkpoints with sets), a
    breakdown by difficulty, sex, location, elevation and raw diagnosis, and the image model vs the
    stacked diagnosis with an intervention curve (checkpoints with a stacked model).

    `tta=None` applies the checkpoint's own inference setting (`infer.tta`). The majority-class
    baseline answers the training split's majority classes: this dataset's own `train` split, else
    the ones stored in the checkpoint at training time, else `baseline_data`'s train split.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, cfg, extra = load_model(checkpoint)
    tta = cfg.infer.tta if tta is None else tta
    data = load_dataset(data_dir, data_format, include_leaky_meta=cfg.data.include_leaky_meta,
                        skip_missing=skip_missing)
    data.split_cases(split)  # an unknown split fails here, before any work
    if calibrate and cfg.train.refit:
        raise DatasetError(f"{checkpoint}: --calibrate fits temperatures on the validation split, which this refit "
                           "model was trained on")
    trained_on = split == "train" or (split == "valid" and cfg.train.refit)
    if trained_on:
        print(f"warning: {checkpoint} was trained on the {split} split; its figures there are not held-out",
              file=sys.stderr, flush=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16, channels_last, path_why = inference_path(model, cfg, batch_size, precision, device)
    print(f"inference path {path_why}", file=sys.stderr, flush=True)

    def run(which: str):
        return predict_split(model, cfg, data, which, tta, batch_size, bf16, channels_last, progress, device)

    # the checkpoint's own temperatures (`train.calibrate`, `sevenpoint calibrate`), unless --calibrate fits new
    # ones below; an ensemble calibrated per member applies them inside the network (`infer.temperature_on`)
    if calibrate:
        model.member_temperature = None
    pred = run(split)
    temperature = None if calibrate else cfg.infer.output_temperature
    calibrated = not calibrate and cfg.infer.temperature is not None
    targets, ids = pred.targets, pred.ids
    art = Artifacts.from_section(extra)
    image_probs = apply_temperatures(pred.probs, temperature)
    shown = postprocess(pred.probs, art, temperature, level=level, members=pred.members)  # what `predict` shows
    probs, stacked = shown.probs, shown.stacked
    metrics = compute_metrics(probs, targets)
    metrics["diagnosis_source"] = "stacked" if stacked.any() else "image model"
    metrics["lacks"] = art.missing()
    metrics["branches"] = branch_accuracy(pred)
    fallback = sum(c.clinic is None for c in data.split_cases(split)) if cfg.model.clinic_only else 0
    metrics.update({"checkpoint": str(checkpoint), "split": split, "tta": tta, "clinic_fallback_cases": fallback,
                    "precision": "bf16" if bf16 else "fp32",
                    "channels_last": channels_last, "path_choice": path_why, "variant": cfg.model.variant,
                    "backbone": cfg.model.backbone, "derm_backbone": cfg.model.derm_backbone,
                    "attention": cfg.model.attention,
                    "temperature": list(cfg.infer.temperature) if calibrated else None,
                    "temperature_on": cfg.infer.temperature_on if calibrated else None,
                    "split_in_training_data": trained_on})
    metrics["format"] = data.format
    if calibrate:
        if "valid" not in data.splits:
            raise DatasetError(f"{data.root}: --calibrate fits temperatures on the validation split; "
                               f"this {data.format} dataset has none")
        val = run("valid")
        temps, cal = temperature_report(val.probs, val.targets)  # the fit `sevenpoint calibrate` stores
        probs = apply_temperatures(probs, temps)
        for t, task in enumerate(TASKS):
            here = targets[:, t] >= 0
            cal[task.name][f"{split}_ece_before"] = metrics["tasks"][task.name].get("ece")
            cal[task.name][f"{split}_ece_after"] = ece(targets[here, t], probs[t][here]) if here.any() else None
        metrics["calibration"] = cal  # argmax is unchanged by a temperature: accuracies stay the same
    if "train" in data.splits:
        majority, source = train_majority(data.targets("train")), f"{data.format} train split"
    elif extra.get("train_majority"):
        majority, source = extra["train_majority"], "the checkpoint's training data"
    elif baseline_data is not None:
        majority = train_majority(load_dataset(baseline_data, check_images=False).targets("train"))
        source = f"train split of {baseline_data}"
    else:
        majority, source = None, None
    baseline = majority_baseline(majority, targets) if majority else {}
    metrics["majority_baseline"] = baseline
    metrics["majority_baseline_from"] = source

    for name in ("ece", "nll"):
        per_task = [metrics["tasks"][t.name].get(name) for t in TASKS]
        kept = [v for v in per_task if v is not None]
        metrics[f"{name}_mean"] = float(np.mean(kept)) if kept else None
    if calibrated or stacked.any():  # what the temperatures (and the stacked diagnosis) changed
        uncalibrated = pred.probs if pred.untempered is None else pred.untempered  # tempered in the network
        raw, raw_nll = {}, {}
        for t, task in enumerate(TASKS):
            exact = targets[:, t] >= 0
            raw[task.name] = ece(targets[exact, t], uncalibrated[t][exact]) if exact.any() else None
            raw_nll[task.name] = nll(uncalibrated[t][exact], targets[exact, t]) if exact.any() else None
        for name, per_task in (("ece_uncalibrated", raw), ("nll_uncalibrated", raw_nll)):
            kept = [v for v in per_task.values() if v is not None]
            metrics[name] = {"tasks": per_task, "mean": float(np.mean(kept)) if kept else None}
    if bootstrap:
        metrics["intervals"] = bootstrap_intervals(probs, targets, bootstrap)
    if calibrate and shown.sets is not None:  # new temperatures: the sets follow the probabilities now shown
        shown = postprocess(pred.probs, art, temps, level=level, members=pred.members)
    metrics["sets"] = None if shown.sets is None else set_report(shown.sets, targets, level)
    metrics["uncertain_share"] = float(shown.uncertain.mean())
    metrics["triage"] = triage_report(shown, targets)
    by_id = {c.case_id: c for c in data.split_cases(split)}
    metrics["breakdown"] = breakdown(probs, targets, case_fields([by_id[i] for i in ids]))
    metrics["diagnosis_models"] = diagnosis_models(image_probs, targets, art)

    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_reliability(probs, targets, out_dir / "reliability.png")
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
