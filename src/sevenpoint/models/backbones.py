"""One factory for every backbone behind the common interface (`num_features`, `forward_features`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

from torch import nn

from .efficientnet import LITE_VARIANTS, NATIVE_SIZE, EfficientNetLiteBackbone
from .xception import XCEPTION_PAPER, XCEPTION_TINY, ModifiedXception, XceptionSpec, load_legacy_xception

if TYPE_CHECKING:  # annotations only: config imports this module to check backbone names
    from ..config import ModelConfig


@dataclass(frozen=True)
class Backbone:
    """What the package knows about one backbone: adding a backbone is one entry in `BACKBONES`."""

    build: Callable[[ModelConfig, int], nn.Module]  # (model config, input size) -> backbone
    native_size: int  # the input size its weights were trained at
    user_weights: bool  # accepts `model.backbone_checkpoint`
    packaged_weights: bool  # ships ImageNet weights (`model.pretrained`, on by default where true)


def _xception(spec: XceptionSpec, cfg: ModelConfig, image_size: int) -> nn.Module:
    if cfg.attention_heads != spec.attention_heads:
        spec = replace(spec, attention_heads=cfg.attention_heads)
    net = ModifiedXception(spec, attention=cfg.attention)
    if cfg.backbone_checkpoint:
        report = load_legacy_xception(net, cfg.backbone_checkpoint)
        net.load_report = report.summary()
    return net


def _lite(name: str, cfg: ModelConfig, image_size: int) -> nn.Module:
    return EfficientNetLiteBackbone(name, image_size, cfg.pretrained, cfg.attention, cfg.attention_heads)


BACKBONES: dict[str, Backbone] = {
    "xception": Backbone(partial(_xception, XCEPTION_PAPER), 299, user_weights=True,
                         packaged_weights=False),
    "xception_tiny": Backbone(partial(_xception, XCEPTION_TINY), 299, user_weights=True,
                              packaged_weights=False),
    **{name: Backbone(partial(_lite, name), NATIVE_SIZE[name], user_weights=False,
                      packaged_weights=True) for name in LITE_VARIANTS},
}


def build_backbone(cfg: ModelConfig, image_size: int, modality: str = "clinic") -> nn.Module:
    """The backbone `cfg` names for `modality` ("derm" reads `derm_backbone` when set), built for
    `image_size` px inputs (static-padding Lite ports need it)."""
    name = cfg.derm_backbone if modality == "derm" and cfg.derm_backbone else cfg.backbone
    if name not in BACKBONES:
        raise ValueError(f"model.backbone: unknown {name!r} (have: {', '.join(BACKBONES)})")
    net = BACKBONES[name].build(cfg, image_size)
    if cfg.bn_momentum is not None:
        set_bn_momentum(net, cfg.bn_momentum)
    net.freeze_early(cfg.freeze_blocks)
    return net


def set_bn_momentum(net: nn.Module, momentum: float) -> int:
    """Set every BatchNorm's running-statistics momentum; returns how many layers changed.

    The EfficientNet-Lite ports build BN with momentum 0.01 (TensorFlow's 0.99 converted): while
    fine-tuning, the running statistics then trail the weights by ~100 steps, several epochs on
    Derm7pt, so validation sees stale statistics. 0.1 follows the weights within ~10 steps.
    """
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.momentum = momentum
    return len(layers)
