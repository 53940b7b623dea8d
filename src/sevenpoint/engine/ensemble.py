"""Ensembles (`train.ensemble` > 1): the members trained one after another, each an ordinary resumable run
(`engine.train.train_model`), then their average written as one checkpoint; with `train.cross_fit` each
member of a refit leaves out one fold of the validation split, and the out-of-fold predictions are what
`engine.finish` fits the temperatures, prediction sets and stacked diagnosis on."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np

from ..atomic import write_json
from ..config import RunConfig
from ..data import CaseSet
from ..data.base import DatasetError
from ..schema import TASKS
from .finish import finish_checkpoint, training_view
from .train import RunDirError, load_training_data, open_run_dir, saved_train_option, train_model


def is_ensemble_run(run_dir: Path) -> bool:
    return saved_train_option(run_dir, "ensemble", 1) > 1


def member_config(cfg: RunConfig, i: int) -> RunConfig:
    """Member `i` of an ensemble: the same recipe as one model, with seed `seed * ensemble + i`."""
    k = cfg.train.ensemble
    # members are not calibrated: their temperatures would not fit the average (the ensemble is)
    return dataclasses.replace(cfg, seed=cfg.seed * k + i, train=dataclasses.replace(cfg.train, ensemble=1,
                                                                                      calibrate=False, cross_fit=False))


def cross_fit_folds(data: CaseSet, cfg: RunConfig) -> list[np.ndarray]:
    """`train.cross_fit`: the validation split cut into `train.ensemble` folds, stratified on the diagnosis
    (seeded by the run's seed); member i of the refit ensemble trains on everything but fold i."""
    from sklearn.model_selection import StratifiedKFold

    rows = np.asarray(data.splits["valid"])
    diag = data.targets("valid")[:, 0]
    k = cfg.train.ensemble
    if len(rows) < k:
        raise DatasetError(f"{data.root}: train.cross_fit needs at least {k} validation cases, has {len(rows)}")
    with warnings.catch_warnings():  # a diagnosis rarer than k cases is spread as far as it goes
        warnings.filterwarnings("ignore", message=r"The least populated class")
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=cfg.seed).split(rows, diag)
        return [np.sort(rows[held]) for _, held in folds]


def member_splits(data: CaseSet, folds: list[np.ndarray] | None, i: int) -> dict[str, np.ndarray] | None:
    """Member i's train / valid rows: with cross-fitting, the validation split less fold i (a refit member
    trains on train + that valid, so fold i is the only part it never sees)."""
    if folds is None:
        return None
    return {"train": np.asarray(data.splits["train"]), "valid": np.setdiff1d(data.splits["valid"], folds[i])}


def out_of_fold_predictions(members: list[str], folds: list[np.ndarray], data: CaseSet, cfg: RunConfig,
                            progress: bool = True):
    """Each validation case predicted by the one member that never trained on it (`train.cross_fit`),
    gathered in validation-split order, with the ensemble's late-fusion weights and TTA: what each member's
    model predicted of its fold at the end of its training (`train.HELD_OUT_FILE`), or for a member trained
    before those were written, its checkpoint's prediction now."""
    from ..checkpoint import load_model
    from .evaluate import Predictions, load_predictions, predict_rows
    from .train import HELD_OUT_FILE

    parts = []
    for path, rows in zip(members, folds):
        saved = Path(path).parent.parent / HELD_OUT_FILE
        if saved.is_file():
            pred = load_predictions(saved)
        else:
            model, member_cfg, _ = load_model(path)
            model.fusion_weights = {"clinic": cfg.infer.clinic_weight}  # the ensemble's late fusion (its TTA: the same)
            pred = predict_rows(model, member_cfg, data, rows, cfg.train.batch_size, progress)
        if len(pred.ids) != len(rows):
            raise RunDirError(f"{saved.parent}: its held-out predictions hold {len(pred.ids)} cases, its fold "
                              f"{len(rows)}: not this run's member")
        parts.append((rows, pred))
    rows = np.concatenate([r for r, _ in parts])
    order = np.argsort(rows, kind="stable")
    probs = [np.concatenate([p.probs[t] for _, p in parts])[order] for t in range(len(TASKS))]
    targets = np.concatenate([p.targets for _, p in parts])[order]
    ids = [i for _, p in parts for i in p.ids]
    folds = np.concatenate([np.full(len(r), k) for k, (r, _) in enumerate(parts)])[order]
    return Predictions(probs, targets, [ids[j] for j in order], folds=folds)


def train_ensemble(cfg: RunConfig, data_dir: str | os.PathLike, run_dir: str | os.PathLike, resume: bool = False,
                   progress: bool = True, argv: list[str] | None = None, stop_after_epochs: int | None = None,
                   splits: dict[str, np.ndarray] | None = None) -> dict:
    """Train the members one after another in `run_dir/members/m<i>/` (each a normal, resumable run),
    then write their average as `run_dir/checkpoints/best.ckpt` and score it on validation."""
    from ..checkpoint import ensemble_checkpoint, load_model
    from .evaluate import predict_measured, save_predictions
    from .metrics import compute_metrics

    run_dir = Path(run_dir)
    done_file = run_dir / "members" / "finished.json"
    cfg = open_run_dir(cfg, run_dir, resume, argv, taken=("members", "checkpoints/last.ckpt"))
    finished: dict[str, dict] = json.loads(done_file.read_text()) if done_file.is_file() else {}
    data = load_training_data(data_dir, cfg, splits, extra=False)  # folds, and the ensemble's fits below
    folds = None
    if cfg.train.cross_fit:
        folds = cross_fit_folds(data, cfg)
        if not resume:
            print(f"cross-fit: member i leaves out fold i of the validation split ({', '.join(str(len(f)) for f in folds)}"
                  " cases); its predictions there are the out-of-fold predictions", flush=True)
    for i in range(cfg.train.ensemble):
        name = f"m{i}"
        if name in finished:
            continue
        member_dir, member = run_dir / "members" / name, member_config(cfg, i)
        print(f"ensemble member {i + 1}/{cfg.train.ensemble} (seed {member.seed}) -> {member_dir}", flush=True)
        member_rows = splits if folds is None else member_splits(data, folds, i)
        summary = train_model(member, data_dir, member_dir,
                        resume=(member_dir / "checkpoints" / "last.ckpt").is_file(), progress=progress, argv=argv,
                        stop_after_epochs=stop_after_epochs, splits=member_rows,
                        held_out_rows=None if folds is None else folds[i])
        if stop_after_epochs:  # an interrupted run (tests): this member is not finished
            return summary
        finished[name] = {k: summary[k] for k in ("best_checkpoint", "best_val_avg_acc", "epochs_run", "train_seconds")}
        write_json(done_file, finished)
    best = run_dir / "checkpoints" / "best.ckpt"
    members = [finished[f"m{i}"]["best_checkpoint"] for i in range(cfg.train.ensemble)]
    ckpt = ensemble_checkpoint(members, infer=dataclasses.asdict(cfg.infer))
    oof, oof_acc = None, None
    if folds is not None:
        oof = out_of_fold_predictions(members, folds, data, cfg, progress)
        save_predictions(run_dir / "out_of_fold.npz", oof)
    best.parent.mkdir(parents=True, exist_ok=True)
    pred = finish_checkpoint(ckpt, best, data, cfg, held_out=oof, progress=progress,
                             source=f"{data.root} (valid, out of fold: each case by the member that never saw it)",
                             temperature_on="output" if oof is None else "members")
    if oof is not None:  # a member, not the ensemble: reported as such, not as the ensemble's validation score
        oof_acc = compute_metrics(oof.probs, oof.targets)["average_accuracy"]
        pred = None
    elif pred is None and not cfg.train.refit:  # a refit's validation cases are training data: not scored
        model, ens_cfg, _ = load_model(best)
        pred = predict_measured(model, ens_cfg, data, "valid", cfg.train.batch_size, progress)
    summary = {
        "best_checkpoint": str(best),
        "best_val_avg_acc": None if pred is None else compute_metrics(pred.probs, pred.targets)["average_accuracy"],
        "refit": cfg.train.refit,
        "members": finished,
        "epochs_run": sum(m["epochs_run"] for m in finished.values()),
        "train_seconds": round(sum(m["train_seconds"] for m in finished.values()), 1),
        "train_cases": len(training_view(data, cfg).splits["train"]),
        "valid_cases": 0 if pred is None else len(pred.ids),
        "out_of_fold_avg_acc": oof_acc,
        "config": dataclasses.asdict(cfg),
    }
    write_json(run_dir / "train_summary.json", summary)
    return summary
