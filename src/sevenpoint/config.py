"""Typed configuration: one frozen dataclass per concern, YAML on disk, `key=value` overrides.

Defaults are the paper's settings where known (docs/model.md): Adam 1e-4, batch 32, up to 150
epochs, 299 px, modified Xception, all three branches with soft attention.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .schema import TASK_NAMES
from .schema import meta_dim as schema_meta_dim  # schema imports nothing of ours

PACKAGE_CONFIGS = Path(__file__).parent / "configs"
TTA_MODES = ("none", "flip", "flip_rot")


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 299
    crop: int = 25  # px of scope vignette cut from each border before resizing (official tool: 25)
    cache_dir: str | None = None  # decoded-image cache; None -> ~/.cache/sevenpoint/images
    augment: float = 1.0  # augmentation strength, 0 = off
    augmentation: str = "affine"  # affine (rot90 + affine + colour jitter) | crop (random crop + dihedral + light colour)
    short_side: int = 0  # 0: squash the cropped image to image_size^2; >0: resize its short side to this
    #                      (aspect kept), then crop image_size^2 (random in training, centred otherwise)
    num_workers: int = 0
    include_leaky_meta: bool = False  # management + difficulty: decided after diagnosis, LEAKS the label
    format: str = "auto"  # format of --data: auto (detected) | derm7pt | ph2 | isic
    extra: str | None = None  # auxiliary TRAINING data (any format; its train split, else all of it), e.g.
    #                           ISIC images for the derm branch and DIAG; validation stays on --data
    extra_format: str = "auto"
    extra_soft: str | None = None  # a teacher's probabilities for `extra`'s cases (`sevenpoint teach`, .npz): those
    #                                cases also learn the teacher's 8 tasks (distillation, train.distill_weight)
    extra_labels: bool = True  # false: `extra`'s own labels are left out (with extra_soft: the teacher alone)
    extra_cases: int = 0  # >0: a fixed draw (seed 0, the same for every run) of this many of `extra`'s cases; 0: all


VARIANT_BRANCHES = {"DIM": ("derm",), "CIM": ("clinic",), "DCIHMM": ("derm", "clinic", "hybrid")}


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "DCIHMM"  # DIM (dermoscopy only) | CIM (clinical only) | DCIHMM (all three branches)
    backbone: str = "xception"  # xception | xception_tiny | efficientnet_lite0/1/2
    derm_backbone: str | None = None  # the dermoscopy branch's own backbone; None: `backbone` (both branches alike)
    attention: bool = True
    attention_heads: int = 16
    share_backbone: bool = False
    hybrid_channels: int = 728  # 1x1 conv width in the hybrid branch (paper: 728)
    dropout: float = 0.2
    pretrained: bool | None = None  # the backbone's packaged ImageNet weights; None: yes where it has them (Lite)
    backbone_checkpoint: str | None = None  # user-supplied ImageNet Xception weights (file path)
    derm_init: str | None = None  # a sevenpoint checkpoint whose dermoscopy backbone starts this model's (training only)
    freeze_blocks: int = 0  # freeze each backbone's stem + first N blocks (weights and BN statistics)
    bn_momentum: float | None = None  # backbone BatchNorm momentum; None keeps the builder's (Lite ports: 0.01)

    @property
    def branches(self) -> tuple[str, ...]:
        """The branches this variant has (the one place that interprets `variant`)."""
        return VARIANT_BRANCHES[self.variant]

    @property
    def backbone_text(self) -> str:
        """The backbone(s) in words: "efficientnet_lite0", or "efficientnet_lite2 (derm) + efficientnet_lite0"."""
        if self.derm_backbone in (None, self.backbone):
            return self.backbone
        return f"{self.derm_backbone} (derm) + {self.backbone}"

    @property
    def images(self) -> tuple[str, ...]:
        """The image inputs its branches read: derm and/or clinic."""
        return tuple(b for b in self.branches if b in ("derm", "clinic"))

    @property
    def clinic_only(self) -> bool:
        """Reads clinical photos only: cases without one fall back to their dermoscopy image."""
        return self.images == ("clinic",)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 150
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw (decoupled weight decay)
    backbone_lr_scale: float = 1.0  # backbone lr = lr * scale (pretrained backbones like < 1)
    scheduler: str = "none"  # none | cosine (stepped per epoch) | warmup_cosine (linear warm-up, then cosine per step)
    warmup_epochs: float = 1.0  # warmup_cosine only
    ema_decay: float = 0.0  # >0: validate, select and save an exponential moving average of the weights
    swa_start: float = 0.0  # >0: instead, an equal-weight average of the weights at the end of every epoch from
    #                         this fraction of train.epochs on (stochastic weight averaging); needs ema_decay=0
    label_smoothing: float = 0.0
    class_weights: bool = False  # inverse-frequency CE weights per task
    balanced_sampling: bool = False  # sample train cases to balance DIAG
    meta_dropout: float = 0.1  # chance to hide metadata in training, so "unknown" is learned
    distill_weight: float = 1.0  # weight of the soft-target loss on cases with a teacher's probabilities
    #                              (data.extra_soft); their own labels (e.g. ISIC's diagnosis) still count
    score_weight: float = 0.0  # >0: also fit the 7-point score: the squared error between the score the criteria heads
    #                            expect (sum of points x probability) and the labelled score, on fully labelled cases
    mixup: float = 0.0  # >0: MixUp with lambda ~ Beta(mixup, mixup): each batch mixed with a shuffled copy of itself
    #                     (images or cached trunk features, and metadata), the loss mixed alike; 0 = off
    early_stopping: int = 30  # epochs without val improvement; 0 = off
    precision: str = "auto"  # auto (CPU: fp32 / bf16 timed, runtime.choose_path; GPU: bf16 if supported) | fp32 | bf16
    channels_last: str = "auto"  # auto (timed on CPU, like precision) | on | off
    deterministic: bool = False
    devices: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    limit_train_batches: float = 1.0
    ensemble: int = 1  # >1: train this many members one after another (member i gets seed seed*ensemble + i)
    #                    and save their average as best.ckpt (one model for evaluate, predict, serve, export)
    calibrate: bool = False  # after training: fit infer.temperature, prediction sets and the stacked diagnosis on
    #                          held-out predictions (validation, or out of fold with cross_fit) into best.ckpt
    refit: bool = False  # train on train + valid for `epochs`; best.ckpt = the final (EMA) weights, nothing selected
    #                      on validation (it is training data): choose the recipe first, then refit it
    trunk_views: int = 0  # >0: each backbone's frozen part (model.freeze_blocks) is not run in training but read
    #                       from a trunk-feature cache of this many augmented views per image (plus the un-augmented
    #                       one, for validation), filled once (`sevenpoint cache-trunk`); 0: run it every step
    distill: bool = False  # train the recipe twice: a teacher, then a student that also learns the teacher's
    #                        probabilities on data.extra's unlabelled images; best.ckpt = the student's
    #                        (engine.distill). Without those images the teacher alone is trained and kept
    cross_fit: bool = False  # refit ensemble: member i leaves out fold i of `ensemble` (stratified on DIAG) of the
    #                          validation split, so every validation case has one member that never saw it; those
    #                          out-of-fold predictions fit the temperatures, prediction sets and stacked diagnosis


@dataclass(frozen=True)
class InferConfig:
    """Inference settings that travel in the checkpoint: evaluate, predict and serve apply them by default."""

    tta: str = "none"  # none | flip (4 views) | flip_rot (8 dihedral views); probabilities averaged per branch
    clinic_weight: float = 1.0  # the clinical branch's weight in late fusion (derm and hybrid weigh 1);
    #                             validation during training always weighs the branches equally
    temperature: tuple[float, ...] | None = None  # one per task (schema order), fitted on held-out cases
    #                                               (`train.calibrate`, `sevenpoint calibrate`); None: raw probabilities
    temperature_on: str = "output"  # output: applied to the model's (an ensemble's averaged) probabilities |
    #                                 members: to each ensemble member's probabilities before they are averaged
    #                                 (calibrate-then-pool, RESULTS §13; inside the network, so every engine has it)

    @property
    def output_temperature(self) -> tuple[float, ...] | None:
        """The temperatures left to apply to the model's output (None where the network applies them)."""
        return self.temperature if self.temperature_on == "output" else None

    def calibration_text(self, fitted_on: str | None = None) -> str:
        """Whether and how the probabilities shown are calibrated, in one phrase."""
        if self.temperature is None:
            return "not calibrated: the model's own probabilities"
        how = ("one temperature per task on each member's probabilities before averaging"
               if self.temperature_on == "members" else "one temperature per task on the model's probabilities")
        return how + (f", fitted on {fitted_on}" if fitted_on else "")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    seed: int = 0

    @property
    def meta_dim(self) -> int:
        """Width of the metadata vector the model reads (derived from `data.include_leaky_meta`)."""
        return schema_meta_dim(self.data.include_leaky_meta)

    def to_dict(self) -> dict:
        """Plain dict for YAML / JSON (tuples as lists)."""
        def plain(value):
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return list(value) if isinstance(value, tuple) else value

        return plain(dataclasses.asdict(self))


class ConfigError(ValueError):
    pass


def _coerce(value: object, annotation: object, key: str) -> object:
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is not type(None):
                return _coerce(value, arg, key)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, item, key) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None
    return value


def _build(cls: type, values: dict, prefix: str) -> object:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in sorted(unknown))} "
                          f"(known in {prefix or 'top level'}: {', '.join(fields)})")
    kwargs = {}
    for name, value in values.items():
        f = fields[name]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            kwargs[name] = _build(f.default_factory, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or the name of a packaged config (`paper`, `tiny`, `cpu-recipe`, `demo`)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGE_CONFIGS / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    have = ", ".join(sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config {str(name)!r}: no such file, and not a packaged config ({have})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                seed: int | None = None) -> RunConfig:
    """Defaults <- YAML file <- `section.key=value` overrides <- explicit seed."""
    raw: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at top level")
        raw = _drop_derived(raw)  # a run folder's config.yaml from before 2026-11-28
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    if seed is not None:
        raw["seed"] = seed
    cfg = _build(RunConfig, raw, "")
    _check_user_choices(cfg)
    return finalize(cfg)


def _check_user_choices(cfg: RunConfig) -> None:
    """Choices refused when a user makes them (not when an older checkpoint's saved config is read)."""
    from .models.backbones import BACKBONES  # imported here: models import this module

    m = cfg.model
    if m.pretrained and m.backbone in BACKBONES and not BACKBONES[m.backbone].packaged_weights \
            and not m.backbone_checkpoint:
        raise ConfigError(f"model.pretrained=true: {m.backbone} has no packaged ImageNet weights; give "
                          "model.backbone_checkpoint=FILE or leave model.pretrained unset")


# Numeric options and the values they accept, checked when a config is loaded: (section, field, test, wording).
_RANGES = [
    ("data", "image_size", lambda v: v >= 16, ">= 16"), ("data", "crop", lambda v: v >= 0, ">= 0"),
    ("data", "augment", lambda v: v >= 0, ">= 0"), ("data", "num_workers", lambda v: v >= 0, ">= 0"),
    ("data", "extra_cases", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("model", "hybrid_channels", lambda v: v >= 1, ">= 1"), ("model", "dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train", "epochs", lambda v: v >= 1, ">= 1"), ("train", "batch_size", lambda v: v >= 1, ">= 1"),
    ("train", "lr", lambda v: v > 0, "> 0"), ("train", "weight_decay", lambda v: v >= 0, ">= 0"),
    ("train", "backbone_lr_scale", lambda v: v >= 0, ">= 0"), ("train", "warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("train", "label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train", "meta_dropout", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train", "mixup", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train", "distill_weight", lambda v: v >= 0, ">= 0"),
    ("train", "score_weight", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train", "early_stopping", lambda v: v >= 0, ">= 0 (0 = off)"), ("train", "devices", lambda v: v >= 1, ">= 1"),
    ("train", "limit_train_batches", lambda v: 0 < v <= 1, "in (0, 1]"),
]


def finalize(cfg: RunConfig) -> RunConfig:
    """Resolve defaults that depend on other choices (`model.pretrained`) and validate every option."""
    model = cfg.model
    for section, name, ok, wording in _RANGES:
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{section}.{name}: expected a value {wording}, got {value}")
    from .data.formats import FORMAT_CHOICES

    for name in ("format", "extra_format"):
        if getattr(cfg.data, name) not in FORMAT_CHOICES:
            raise ConfigError(f"data.{name}: {getattr(cfg.data, name)!r} is not one of {', '.join(FORMAT_CHOICES)}")
    if cfg.train.distill and not cfg.data.extra:
        raise ConfigError("train.distill: name the unlabelled images the teacher labels with data.extra=DIR")
    if cfg.train.distill and cfg.data.extra_soft:
        raise ConfigError("data.extra_soft: with train.distill the run writes its own teacher's probabilities; "
                          "leave data.extra_soft unset (or train.distill=false to use a file)")
    if cfg.data.extra_soft and not cfg.data.extra:
        raise ConfigError("data.extra_soft: a teacher's probabilities are for data.extra's cases; set data.extra too")
    if model.variant not in VARIANT_BRANCHES:
        raise ConfigError(f"model.variant: {model.variant!r} is not one of {', '.join(VARIANT_BRANCHES)}")
    from .models.backbones import BACKBONES  # imported here: models import this module

    if model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone: {model.backbone!r} is not one of {', '.join(BACKBONES)}")
    if model.derm_backbone is not None:
        if model.derm_backbone not in BACKBONES:
            raise ConfigError(f"model.derm_backbone: {model.derm_backbone!r} is not one of {', '.join(BACKBONES)}")
        if model.share_backbone and model.derm_backbone != model.backbone:
            raise ConfigError(f"model.derm_backbone: {model.derm_backbone} differs from model.backbone "
                              f"{model.backbone}, so the branches cannot share one (model.share_backbone)")
        if BACKBONES[model.derm_backbone].packaged_weights != BACKBONES[model.backbone].packaged_weights:
            raise ConfigError(f"model.derm_backbone: {model.derm_backbone} and model.backbone {model.backbone} "
                              "must both ship ImageNet weights or both not (model.pretrained applies to both)")
    if model.pretrained is None:
        model = dataclasses.replace(model, pretrained=BACKBONES[model.backbone].packaged_weights)
    if model.backbone_checkpoint and not BACKBONES[model.backbone].user_weights:
        raise ConfigError(f"model.backbone_checkpoint: {model.backbone} does not take user weights; it uses its "
                          "packaged weights (model.pretrained)")
    if model.attention_heads < 1:
        raise ConfigError(f"model.attention_heads: expected >= 1, got {model.attention_heads}")
    if model.freeze_blocks < 0:
        raise ConfigError(f"model.freeze_blocks: expected >= 0, got {model.freeze_blocks}")
    if cfg.train.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision: {cfg.train.precision!r} is not one of auto, fp32, bf16")
    if cfg.data.augmentation not in ("affine", "crop"):
        raise ConfigError(f"data.augmentation: {cfg.data.augmentation!r} is not one of affine, crop")
    if cfg.data.short_side and cfg.data.short_side < cfg.data.image_size:
        raise ConfigError(f"data.short_side: {cfg.data.short_side} is smaller than data.image_size "
                          f"{cfg.data.image_size} (0 = squash instead)")
    if model.bn_momentum is not None and not 0.0 < model.bn_momentum <= 1.0:
        raise ConfigError(f"model.bn_momentum: expected a value in (0, 1], got {model.bn_momentum}")
    if cfg.train.optimizer not in ("adam", "adamw"):
        raise ConfigError(f"train.optimizer: {cfg.train.optimizer!r} is not one of adam, adamw")
    if cfg.train.scheduler not in ("none", "cosine", "warmup_cosine"):
        raise ConfigError(f"train.scheduler: {cfg.train.scheduler!r} is not one of none, cosine, warmup_cosine")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: expected 0 (off) or a value in (0, 1), got {cfg.train.ema_decay}")
    if not 0.0 <= cfg.train.swa_start < 1.0:
        raise ConfigError(f"train.swa_start: expected 0 (off) or a fraction of the epochs in (0, 1), "
                          f"got {cfg.train.swa_start}")
    if cfg.train.swa_start > 0 and cfg.train.ema_decay > 0:
        raise ConfigError("train.swa_start: one weight average at a time; set train.ema_decay=0 to use SWA")
    if cfg.infer.tta not in TTA_MODES:
        raise ConfigError(f"infer.tta: {cfg.infer.tta!r} is not one of {', '.join(TTA_MODES)}")
    if cfg.train.ensemble < 1:
        raise ConfigError(f"train.ensemble: expected >= 1 members, got {cfg.train.ensemble}")
    if not 0.0 < cfg.infer.clinic_weight <= 1.0:
        raise ConfigError(f"infer.clinic_weight: expected a value in (0, 1], got {cfg.infer.clinic_weight}")
    if cfg.infer.temperature_on not in ("output", "members"):
        raise ConfigError(f"infer.temperature_on: {cfg.infer.temperature_on!r} is not one of output, members")
    temps = cfg.infer.temperature
    if temps is not None and (len(temps) != len(TASK_NAMES) or not all(t > 0 for t in temps)):
        raise ConfigError(f"infer.temperature: expected {len(TASK_NAMES)} positive values (one per task: "
                          f"{', '.join(TASK_NAMES)}), got {list(temps)}")
    if cfg.train.refit and cfg.train.calibrate and not cfg.train.cross_fit:
        raise ConfigError("train.refit with train.calibrate: the validation split is training data in a refit, so "
                          "no held-out case is left to fit temperatures on; set train.calibrate=false, or "
                          "train.cross_fit=true (an ensemble whose members each leave out one fold)")
    if cfg.train.cross_fit and not (cfg.train.refit and cfg.train.ensemble > 1):
        raise ConfigError("train.cross_fit: needs train.refit and train.ensemble > 1 (each member of a refit ensemble "
                          "leaves out one fold of the validation split; a plain run keeps the whole split held out)")
    if cfg.train.refit and cfg.train.early_stopping:
        raise ConfigError("train.refit with train.early_stopping: a refit has no validation split to stop on; "
                          "set train.early_stopping=0 (it trains for train.epochs)")
    if cfg.train.trunk_views < 0:
        raise ConfigError(f"train.trunk_views: expected >= 0 (0 = off), got {cfg.train.trunk_views}")
    if cfg.train.trunk_views and not model.freeze_blocks:
        raise ConfigError("train.trunk_views: a trunk-feature cache holds the frozen blocks' output; set "
                          "model.freeze_blocks > 0 (e.g. 11) or train.trunk_views=0")
    if cfg.train.trunk_views and not all(name.startswith("efficientnet_lite")
                                         for name in (model.backbone, model.derm_backbone or model.backbone)):
        raise ConfigError(f"train.trunk_views: only EfficientNet-Lite backbones can start after their frozen "
                          f"blocks, not {model.backbone_text}")
    if cfg.train.channels_last not in ("auto", "on", "off"):
        raise ConfigError(f"train.channels_last: {cfg.train.channels_last!r} is not one of auto, on, off")
    return dataclasses.replace(cfg, model=_home(model, PATH_FIELDS["model"]), data=_home(cfg.data, PATH_FIELDS["data"]))


# Options that name files or folders: a leading ~ is the user's home (the shell leaves `data.extra=~/x` alone).
PATH_FIELDS = {"data": ("cache_dir", "extra", "extra_soft"), "model": ("backbone_checkpoint", "derm_init")}


def _home(section, names: tuple[str, ...]):
    """`section` with `~` expanded in the path options `names`."""
    return dataclasses.replace(section, **{n: os.path.expanduser(getattr(section, n)) for n in names
                                           if getattr(section, n)})


def config_from_dict(values: dict) -> RunConfig:
    """A saved config (run folder, checkpoint). Checkpoints from before 2026-11-28 also saved the
    derived `model.image_size` / `model.meta_dim`; they are dropped (both follow from `data`)."""
    return finalize(_build(RunConfig, _drop_derived(values), ""))


def _drop_derived(values: dict) -> dict:
    """Saved configs from before 2026-11-28 carry the derived model.image_size / model.meta_dim."""
    if not isinstance(values.get("model"), dict):
        return values
    return {**values, "model": {k: v for k, v in values["model"].items() if k not in ("image_size", "meta_dim")}}
