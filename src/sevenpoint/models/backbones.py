"""One factory for every backbone behind the common interface (`num_features`, `forward_features`)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..config import BACKBONES, ModelConfig
from .efficientnet import LITE_VARIANTS, EfficientNetLiteBackbone
from .xception import XCEPTION_PAPER, XCEPTION_TINY, ModifiedXception, load_legacy_xception

assert set(LITE_VARIANTS) <= set(BACKBONES)


def build_backbone(cfg: ModelConfig) -> nn.Module:
    net = _build(cfg)
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


def _build(cfg: ModelConfig) -> nn.Module:
    if cfg.backbone in ("xception", "xception_tiny"):
        spec = XCEPTION_PAPER if cfg.backbone == "xception" else XCEPTION_TINY
        if cfg.attention_heads != spec.attention_heads:
            spec = replace(spec, attention_heads=cfg.attention_heads)
        net = ModifiedXception(spec, attention=cfg.attention)
        if cfg.backbone_checkpoint:
            report = load_legacy_xception(net, cfg.backbone_checkpoint)
            net.load_report = report.summary()
        return net
    if cfg.backbone in LITE_VARIANTS:
        if cfg.backbone_checkpoint:
            raise ValueError("model.backbone_checkpoint is for the Xception backbone; "
                             "EfficientNet-Lite uses its packaged weights (model.pretrained)")
        return EfficientNetLiteBackbone(cfg.backbone, cfg.image_size, cfg.pretrained,
                                        cfg.attention, cfg.attention_heads)
    raise ValueError(f"model.backbone: unknown {cfg.backbone!r} (have: {', '.join(BACKBONES)})")
