"""`train_model()`: one model's run on Lightning, selecting checkpoints on validation average accuracy only
(or, with `train.refit`, training on train + valid and keeping the final weights). The entry to training
is `engine.run.train`, which also trains ensembles (`engine.ensemble`, built from runs of this one).

The run folder holds `config.yaml` (resolved), `run_info.json` (git commit, package versions,
CPU, command), `checkpoints/{best,last}.ckpt` (written atomically), `logs/` (CSV) and
`train_summary.json`. The test split is removed from the data the trainer sees.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint, WeightAveraging
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from ..atomic import write_json
from ..checkpoint import atomic_torch_save
from ..config import RunConfig, config_from_dict
from ..data import CaseDataset, CaseSet, EpochSampler, balanced_weights, load_dataset
from ..data.base import DatasetError, with_extra
from ..data.cache import make_cache
from ..data.transforms import transforms_for
from ..schema import NOT_ANNOTATED, TASKS
from .finish import TRAIN_SPLITS, finish_checkpoint, run_info, training_view
from .loss import multitask_loss
from .module import SevenPointModule
from ..runtime import choose_path

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
    `data.extra`'s cases added to the training split (with `extra`), carrying a teacher's probabilities
    where `data.extra_soft` gives them.

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
        if cfg.data.extra_soft:
            from .teach import with_soft_targets

            more = with_soft_targets(more, cfg.data.extra_soft)
        if not cfg.data.extra_labels:  # e.g. ISIC 2017's diagnosis, which reads keratoses as nevi
            blank = (NOT_ANNOTATED,) * len(TASKS)
            more = dataclasses.replace(more, cases=[dataclasses.replace(c, targets=blank) for c in more.cases])
        data = with_extra(data, more, limit=cfg.data.extra_cases)
    return data


HELD_OUT_FILE = "held_out.npz"


def save_held_out(model, cfg: RunConfig, data: CaseSet, rows: np.ndarray, path: Path, progress: bool = True) -> None:
    """`model`'s predictions of dataset rows `rows`, written to `path` (`evaluate.save_predictions`)."""
    from .evaluate import predict_rows, save_predictions

    save_predictions(path, predict_rows(model.eval(), cfg, data, rows, cfg.train.batch_size, progress))


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


def saved_train_option(run_dir: Path, name: str, default=None):
    """One `train.` option of the run saved in `run_dir` (its config.yaml), or `default` where there is none."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return default
    return (yaml.safe_load(saved.read_text()) or {}).get("train", {}).get(name, default)


def open_run_dir(cfg: RunConfig, run_dir: Path, resume: bool, argv: list[str] | None, taken: tuple[str, ...]) -> RunConfig:
    """The config a run of several parts (an ensemble, a distilled run) trains with: on `resume` the one saved in
    `run_dir` (it wins over the command line), else `cfg`, saved there with the run's provenance. Refuses to
    resume where nothing was saved, and to start where any of `taken` (paths in `run_dir`) shows a run."""
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise RunDirError(f"{run_dir}: nothing to resume (no config.yaml)")
        cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    elif any((run_dir / path).exists() for path in taken):
        raise RunDirError(f"{run_dir}: already holds a run; pass --resume to continue it or pick a new --out")
    check_run_dir(run_dir)
    if not resume:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_json(run_dir / "run_info.json", run_info(argv))
    return cfg


class StopAfterEpochs(L.Callback):
    """Stop cleanly after `n` epochs (used to simulate an interrupted run in tests)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.n:
            trainer.should_stop = True


class EpochWeightAverage(WeightAveraging):
    """Stochastic weight averaging: the equal-weight mean of the weights (and BN statistics) at the end of every
    epoch from `start_epoch` on (Lightning's WeightAveraging, torch's AveragedModel). Until the first epoch is
    averaged, validation, checkpoints and the final weights are the trained ones, not the untrained copy the
    average starts from."""

    def __init__(self, start_epoch: int) -> None:
        super().__init__()  # no avg_fn: equal weights
        self.start_epoch = start_epoch

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return epoch_idx is not None and epoch_idx >= self.start_epoch

    def _averaging(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    # the average only changes at an epoch's end, after its validation: start and end see the same answer
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._averaging():
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._averaging():
            super().on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._averaging():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._averaging():
            super().on_train_end(trainer, pl_module)


def _log_version(run_dir: Path, resume: bool) -> str:
    """A fresh CSV log folder per (re)start: Lightning would otherwise overwrite the earlier epochs' log."""
    if not resume:
        return "run"
    n = 1
    while (run_dir / "logs" / f"resume{n}").exists():
        n += 1
    return f"resume{n}"


def train_model(cfg: RunConfig, data_dir: str | os.PathLike, run_dir: str | os.PathLike, resume: bool = False,
                progress: bool = True, argv: list[str] | None = None, stop_after_epochs: int | None = None,
                splits: dict[str, np.ndarray] | None = None, held_out_rows: np.ndarray | None = None) -> dict:
    """Train one model (an ensemble member too); returns the summary also written to
    `run_dir/train_summary.json`. Callers go through `engine.run.train`, which also trains ensembles.

    `splits` (train / valid row indices) replaces the official ones, e.g. for a cross-validation fold.
    `held_out_rows`: dataset rows it never trained on (a cross-fit member's fold), predicted at the end by the
    model in memory into `run_dir/held_out.npz` (`HELD_OUT_FILE`; read by `ensemble.out_of_fold_predictions`).
    """
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
    if cfg.train.swa_start > 0:  # the same, with an equal-weight average of the later epochs' weights
        callbacks.append(EpochWeightAverage(int(cfg.train.swa_start * cfg.train.epochs)))
        # resuming before the first averaged epoch: a checkpoint without an average is expected then
        warnings.filterwarnings("ignore", message="The checkpoint was not created with WeightAveraging")
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
        ckpt = torch.load(best, map_location="cpu", weights_only=True)
        # the model in memory, given the selected epoch's weights (it ends training with the last epoch's), reading
        # images again: the held-out fits predict with it instead of building a second model from the file
        module.load_state_dict(ckpt["state_dict"])
        module.model.fusion_weights = {"clinic": cfg.infer.clinic_weight}  # inference's late fusion (build_model's)
        if cfg.train.trunk_views:
            module.model.read_trunk(False)
        finish_checkpoint(ckpt, best, data, cfg, progress=progress, model=module.model)
        if held_out_rows is not None:
            save_held_out(module.model, cfg, data, held_out_rows, run_dir / HELD_OUT_FILE, progress)
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
