"""`train()`: one run on Lightning, selecting checkpoints on validation average accuracy only
(or, with `train.refit`, training on train + valid and keeping the final weights).

The run folder holds `config.yaml` (resolved), `run_info.json` (git commit, package versions,
CPU, command), `checkpoints/{best,last}.ckpt` (written atomically), `logs/` (CSV) and
`train_summary.json`. The test split is removed from the data the trainer sees.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from ..atomic import write_json
from ..checkpoint import atomic_torch_save
from ..config import RunConfig, config_from_dict
from ..data import CaseDataset, CaseSet, EpochSampler, balanced_weights, load_dataset
from ..data.base import DatasetError, with_extra
from ..data.cache import make_cache
from ..infer.ood import OODModel, descriptor
from ..data.transforms import transforms_for
from ..schema import TASKS
from .loss import multitask_loss
from .module import SevenPointModule
from ..runtime import choose_path, cpu_summary

TRAIN_SPLITS = ("train", "valid")  # the trainer never sees "test"


class RunDirError(ValueError):
    pass


class _NoAdverts(logging.Filter):
    """Drops Lightning's "Tip: try installing ..." advertisement from the console; its other lines stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
# lightning 2.6.6's own pytree helper calls torch's deprecated LeafSpec check on every batch (not our code)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but temp file + fsync + rename: never a half-written file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)


def load_training_data(data_dir: str | os.PathLike, cfg: RunConfig,
                       splits: dict[str, np.ndarray] | None = None, extra: bool = True) -> CaseSet:
    """The dataset with the test split dropped, so nothing downstream can select on it, and
    `data.extra`'s cases added to the training split (with `extra`).

    `splits` replaces the official train / valid rows (cross-validation folds); it may only
    use rows of the official train and valid splits.
    """
    data = load_dataset(data_dir, cfg.data.format, include_leaky_meta=cfg.data.include_leaky_meta)
    missing = [s for s in TRAIN_SPLITS if s not in data.splits]
    if missing:
        raise DatasetError(f"{data.root}: a {data.format} dataset without a {' or '.join(missing)} split cannot be "
                           "trained on (PH2 is an external test set: evaluate on it with --split all)")
    if splits is not None:
        allowed = np.concatenate([data.splits[k] for k in TRAIN_SPLITS])
        for name in TRAIN_SPLITS:
            outside = np.setdiff1d(splits[name], allowed)
            if outside.size:
                raise ValueError(f"split {name!r}: rows {outside[:5].tolist()} are not in the official train/valid "
                                 "splits (the test split is never trained or selected on)")
        data.splits = {k: np.asarray(splits[k]) for k in TRAIN_SPLITS}
    data.splits = {k: v for k, v in data.splits.items() if k in TRAIN_SPLITS}
    if extra and cfg.data.extra:
        more = load_dataset(cfg.data.extra, cfg.data.extra_format)
        if more.format == "ph2":
            raise DatasetError(f"{more.root}: PH2 is an external test set; it is never trained on")
        if more.meta_dim and more.meta_dim != data.meta_dim:
            raise DatasetError(f"{more.root}: metadata has {more.meta_dim} values, {data.root}'s {data.meta_dim}")
        data = with_extra(data, more)
    return data


def build_loaders(data: CaseSet, cfg: RunConfig, model=None, progress: bool = True) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders. Both use `EpochSampler`, which also splits the cases between
    processes under DDP (Lightning's own sampler replacement is switched off in `train`).

    With `train.trunk_views` they read `model`'s frozen-trunk features instead of images (the model must
    then `read_trunk`), and whatever the cache lacks is filled first (`engine.trunk`)."""
    if cfg.train.trunk_views:
        from .trunk import describe, prepare_trunk, stores_for, trunk_datasets

        stores = stores_for(model, cfg)
        sets = trunk_datasets(stores, cfg, data, {"train": False, "valid": cfg.model.clinic_only})
        print(describe(prepare_trunk(stores, cfg, list(sets.values()), progress)), flush=True)
        train_ds, valid_ds = sets["train"], sets["valid"]
    else:
        cache = make_cache(cfg)
        train_tf, eval_tf = transforms_for(cfg.data)
        train_ds = CaseDataset(data, "train", cache, train_tf, meta_dim=cfg.meta_dim)
        valid_ds = CaseDataset(data, "valid", cache, eval_tf, clinic_fallback=cfg.model.clinic_only,
                               meta_dim=cfg.meta_dim)
    weights = balanced_weights(data.targets("train")) if cfg.train.balanced_sampling else None
    sampler = EpochSampler(len(train_ds), cfg.seed, shuffle=True, weights=weights)
    common = {"num_workers": cfg.data.num_workers, "persistent_workers": cfg.data.num_workers > 0}
    train_dl = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=False, **common)
    valid_dl = DataLoader(valid_ds, batch_size=cfg.train.batch_size,
                          sampler=EpochSampler(len(valid_ds), cfg.seed, shuffle=False, pad=False), **common)
    return train_dl, valid_dl


def class_weights_for(targets: np.ndarray) -> list[torch.Tensor]:
    """Inverse-frequency weights per task over its annotated cases, normalised to mean 1 over the
    classes present (all ones for a task with no annotated case)."""
    out = []
    for t, task in enumerate(TASKS):
        y = targets[:, t]
        if not (y >= 0).any():
            out.append(torch.ones(task.num_classes))
            continue
        counts = np.bincount(y[y >= 0], minlength=task.num_classes).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / task.num_classes, 0.0)
        out.append(torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32))
    return out


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


def check_run_dir(run_dir: Path, need_mb: int = 200) -> None:
    """Fail before training when the run folder cannot be written or the disk is nearly full."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"{run_dir}: cannot write the run folder ({exc.strerror or exc})") from exc
    free_mb = shutil.disk_usage(run_dir).free // 2**20
    if free_mb < need_mb:
        raise RunDirError(f"{run_dir}: only {free_mb} MB free on disk; need at least {need_mb} MB for checkpoints")


class StopAfterEpochs(L.Callback):
    """Stop cleanly after `n` epochs (used to simulate an interrupted run in tests)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.n:
            trainer.should_stop = True


def _log_version(run_dir: Path, resume: bool) -> str:
    """A fresh CSV log folder per (re)start: Lightning would otherwise overwrite the earlier epochs' log."""
    if not resume:
        return "run"
    n = 1
    while (run_dir / "logs" / f"resume{n}").exists():
        n += 1
    return f"resume{n}"


def train(cfg: RunConfig, data_dir: str | os.PathLike, run_dir: str | os.PathLike, resume: bool = False,
          progress: bool = True, argv: list[str] | None = None, stop_after_epochs: int | None = None,
          splits: dict[str, np.ndarray] | None = None) -> dict:
    """Train one model (or `train.ensemble` members); returns the summary also written to
    `run_dir/train_summary.json`.

    `splits` (train / valid row indices) replaces the official ones, e.g. for a cross-validation fold.
    """
    if cfg.train.ensemble > 1 or (resume and _saved_ensemble(Path(run_dir))):
        return train_ensemble(cfg, data_dir, run_dir, resume, progress, argv, stop_after_epochs, splits)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if resume:
        if not last.is_file():
            raise RunDirError(f"{run_dir}: nothing to resume (no checkpoints/last.ckpt)")
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        cfg = config_from_dict(saved)  # the run's own config wins over the command line
    elif last.exists() or (run_dir / "members").exists():
        raise RunDirError(f"{run_dir}: already holds a run; pass --resume to continue it or pick a new --out")
    check_run_dir(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_json(run_dir / "run_info.json", run_info(argv))

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts on tensor-core GPUs
    data = load_training_data(data_dir, cfg, splits)
    refit = cfg.train.refit
    on_gpu = cfg.train.accelerator in ("gpu", "cuda") or (cfg.train.accelerator == "auto" and torch.cuda.is_available())
    weights = class_weights_for(data.targets("train")) if cfg.train.class_weights else None
    module = SevenPointModule(cfg, weights)
    # on resume the run's own weights are loaded instead, but a cached trunk is keyed by the frozen weights it starts with
    if cfg.model.derm_init and (not resume or cfg.train.trunk_views):
        from ..checkpoint import load_derm_backbone

        n = load_derm_backbone(module.model, cfg.model.derm_init)
        print(f"dermoscopy backbone initialised from {cfg.model.derm_init} ({n} tensors)", flush=True)
    # the frozen trunk's weights are final here (ImageNet or derm_init): the trunk cache is keyed by them
    train_dl, valid_dl = build_loaders(training_view(data, cfg), cfg, module.model, progress)
    if cfg.train.trunk_views:
        module.model.read_trunk(True)  # best.ckpt still holds the whole model: it reads images like any other
    if refit and not resume:
        print(f"refit: training on train + valid ({len(train_dl.dataset)} cases) for {cfg.train.epochs} epochs; "
              "best.ckpt will be the final weights (nothing is selected on validation)", flush=True)
    channels_last, bf16, why = choose_path("train", module.model, cfg, cfg.train.batch_size, cfg.train.precision,
                                           cfg.train.channels_last, on_gpu, loss=multitask_loss)
    module.set_channels_last(channels_last)
    print(f"training path {why}", flush=True)
    reports = {name: branch.backbone.load_report for name, branch in (("derm", module.model.derm),
                                                                      ("clinic", module.model.clinic))
               if branch is not None and getattr(branch.backbone, "load_report", None)}
    if reports and not resume:  # user Xception weights: say what was loaded, keep it with the run
        text = "\n".join(f"{name} backbone from {cfg.model.backbone_checkpoint}: {r}" for name, r in reports.items())
        print(text, flush=True)
        (run_dir / "backbone_load_report.txt").write_text(text + "\n")

    # A refit has no held-out split: best.ckpt is rewritten after every epoch, so it ends as the final weights.
    best_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=None if refit else "val/avg_acc",
                              mode="max", save_top_k=1, enable_version_counter=False, auto_insert_metric_name=False)
    # Lightning's save_last writes last.ckpt only on epochs that also improved best.ckpt; a second
    # callback without a monitor rewrites it after every epoch, so --resume continues from the last one.
    last_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                              enable_version_counter=False, auto_insert_metric_name=False)
    callbacks = [best_cb, last_cb]
    if cfg.train.early_stopping > 0:
        callbacks.append(EarlyStopping(monitor="val/avg_acc", mode="max", patience=cfg.train.early_stopping))
    if cfg.train.ema_decay > 0:
        # Validation, best.ckpt and the final weights are the average; last.ckpt also keeps the raw weights.
        callbacks.append(EMAWeightAveraging(decay=cfg.train.ema_decay))
    if stop_after_epochs:
        callbacks.append(StopAfterEpochs(stop_after_epochs))
    trainer = L.Trainer(
        default_root_dir=run_dir, max_epochs=cfg.train.epochs, accelerator=cfg.train.accelerator,
        devices=cfg.train.devices, strategy=cfg.train.strategy,
        precision="bf16-mixed" if bf16 else "32-true", callbacks=callbacks,
        logger=CSVLogger(run_dir, name="logs", version=_log_version(run_dir, resume)), plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=cfg.train.deterministic, log_every_n_steps=1,
        limit_train_batches=cfg.train.limit_train_batches, use_distributed_sampler=False,
    )
    if refit:  # on purpose: a refit has no validation split
        warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no `val_dataloader`")
    if cfg.model.freeze_blocks:  # frozen early layers are in eval mode on purpose (BN statistics kept)
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    start = time.perf_counter()
    trainer.fit(module, train_dl, None if refit else valid_dl, ckpt_path=str(last) if resume else None)
    elapsed = time.perf_counter() - start
    if trainer.is_global_zero and (ckpt_dir / "best.ckpt").is_file():
        best = ckpt_dir / "best.ckpt"
        finish_checkpoint(torch.load(best, map_location="cpu", weights_only=True), best, data, cfg, progress=progress)
    summary = {
        "best_checkpoint": str(ckpt_dir / "best.ckpt"),
        "last_checkpoint": str(last),
        "best_val_avg_acc": None if refit or best_cb.best_model_score is None else float(best_cb.best_model_score),
        "refit": refit,
        "epochs_run": int(trainer.current_epoch),
        "train_seconds": round(elapsed, 1),
        "precision": "bf16" if bf16 else "fp32",
        "channels_last": channels_last,
        "path_choice": why,
        "train_cases": len(train_dl.dataset),
        "valid_cases": 0 if refit else len(valid_dl.dataset),
        "config": dataclasses.asdict(cfg),
    }
    if trainer.is_global_zero:
        write_json(run_dir / "train_summary.json", summary)
    return summary


def training_view(data: CaseSet, cfg: RunConfig) -> CaseSet:
    """The cases the model trains on: `data` itself, or with `train.refit` the same cases with the
    validation split added to the training split."""
    if not cfg.train.refit:
        return data
    view = copy.copy(data)
    view.splits = {**data.splits, "train": np.union1d(data.splits["train"], data.splits["valid"])}
    return view


def finish_checkpoint(ckpt: dict, path: Path, data: CaseSet, cfg: RunConfig, held_out=None, source: str | None = None,
                      progress: bool = True, temperature_on: str = "output"):
    """Add to the checkpoint dict `ckpt` what the model carries for inference (`sevenpoint.infer.artifacts`)
    and write it to `path` once, atomically. Returns the held-out predictions used (or None).

    Always: the out-of-distribution score (fitted on the training dermoscopy images, threshold from the
    validation ones, also in a refit: it is a descriptor statistic, not the network) and each task's
    majority class in the data the model trained on (the no-skill baseline `evaluate` reports on data
    without a training split, e.g. PH2). With `train.calibrate`: temperatures, prediction sets and the
    stacked diagnosis, fitted on `held_out` predictions (a cross-fit ensemble's out-of-fold ones, each a
    single member's: `temperature_on="members"` then applies the temperatures to each member before
    averaging), else on the model's own predictions of the validation split (applied to its output).
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
            model, model_cfg, _ = model_from(ckpt, path)
            held_out = predict_measured(model, model_cfg, data, "valid", cfg.train.batch_size, progress)
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


def _saved_ensemble(run_dir: Path) -> bool:
    saved = run_dir / "config.yaml"
    return saved.is_file() and (yaml.safe_load(saved.read_text()) or {}).get("train", {}).get("ensemble", 1) > 1


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
    gathered in validation-split order, with the ensemble's late-fusion weights and TTA."""
    from ..checkpoint import load_model
    from .evaluate import Predictions, predict_measured

    parts = []
    for path, rows in zip(members, folds):
        model, member_cfg, _ = load_model(path)
        model.fusion_weights = {"clinic": cfg.infer.clinic_weight}  # the ensemble's late fusion (its TTA: the same)
        view = copy.copy(data)
        view.splits = {**data.splits, "fold": rows}
        parts.append((rows, predict_measured(model, member_cfg, view, "fold", cfg.train.batch_size, progress)))
    rows = np.concatenate([r for r, _ in parts])
    order = np.argsort(rows, kind="stable")
    probs = [np.concatenate([p.probs[t] for _, p in parts])[order] for t in range(len(TASKS))]
    targets = np.concatenate([p.targets for _, p in parts])[order]
    ids = [i for _, p in parts for i in p.ids]
    return Predictions(probs, targets, [ids[j] for j in order])


def train_ensemble(cfg: RunConfig, data_dir: str | os.PathLike, run_dir: str | os.PathLike, resume: bool = False,
                   progress: bool = True, argv: list[str] | None = None, stop_after_epochs: int | None = None,
                   splits: dict[str, np.ndarray] | None = None) -> dict:
    """Train the members one after another in `run_dir/members/m<i>/` (each a normal, resumable run),
    then write their average as `run_dir/checkpoints/best.ckpt` and score it on validation."""
    from ..checkpoint import ensemble_checkpoint, load_model
    from .evaluate import predict_measured
    from .metrics import compute_metrics

    run_dir = Path(run_dir)
    done_file = run_dir / "members" / "finished.json"
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise RunDirError(f"{run_dir}: nothing to resume (no config.yaml)")
        cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    elif (run_dir / "members").exists() or (run_dir / "checkpoints" / "last.ckpt").exists():
        raise RunDirError(f"{run_dir}: already holds a run; pass --resume to continue it or pick a new --out")
    check_run_dir(run_dir)
    if not resume:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_json(run_dir / "run_info.json", run_info(argv))
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
        summary = train(member, data_dir, member_dir,
                        resume=(member_dir / "checkpoints" / "last.ckpt").is_file(), progress=progress, argv=argv,
                        stop_after_epochs=stop_after_epochs, splits=member_rows)
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
        np.savez_compressed(run_dir / "out_of_fold.npz", ids=np.asarray(oof.ids), targets=oof.targets,
                            **{f"probs_{task.name}": p for task, p in zip(TASKS, oof.probs)})
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
