"""The paper's modified Xception (Omeroglu et al. 2023, Sec. 3.3; docs/model.md), as block-spec data.

Chollet's Xception = entry flow (stem + 3 down-sampling residual blocks), middle flow (8
residual blocks of 3 separable convs at 728), exit flow (a down-sampling residual block,
separable convs 1536 and 2048). The paper keeps ONE middle-flow block and removes two
exit-flow layers without saying which; `XceptionSpec.exit_convs` is that knob. Our default
keeps the exit flow whole (728->1024 block, sep 1536, sep 2048) so that the published
ImageNet weights load into every layer we keep, and documents it (docs/model.md).

Module names mirror the widely used `legacy_xception` state dict (conv1, bn1, conv2, bn2,
blockN.rep.K..., conv3, bn3, conv4, bn4), so a user-supplied ImageNet checkpoint loads
by name: entry block i <- block{i+1}, middle block i <- block{4+i}, exit block <- block12.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .attention import SoftAttention
from .freeze import EarlyFreeze


@dataclass(frozen=True)
class BlockSpec:
    """A residual block: separable convs of these widths; stride 2 adds max-pool + 1x1 s2 shortcut."""

    channels: tuple[int, ...]
    stride: int = 1
    start_with_relu: bool = True


@dataclass(frozen=True)
class XceptionSpec:
    stem: tuple[int, int] = (32, 64)
    entry: tuple[BlockSpec, ...] = (
        BlockSpec((128, 128), stride=2, start_with_relu=False),
        BlockSpec((256, 256), stride=2),
        BlockSpec((728, 728), stride=2),
    )
    middle: tuple[BlockSpec, ...] = (BlockSpec((728, 728, 728)),)  # original Xception: 8 of these
    exit: tuple[BlockSpec, ...] = (BlockSpec((728, 1024), stride=2),)
    exit_convs: tuple[int, ...] = (1536, 2048)
    attention_heads: int = 16


XCEPTION_PAPER = XceptionSpec()
# Same topology with few channels: for tests (milliseconds per forward/backward).
XCEPTION_TINY = XceptionSpec(
    stem=(8, 16),
    entry=(BlockSpec((16, 16), 2, False), BlockSpec((24, 24), 2), BlockSpec((32, 32), 2)),
    middle=(BlockSpec((32, 32, 32)),),
    exit=(BlockSpec((32, 48), 2),),
    exit_convs=(48, 64),
    attention_heads=4,
)
# Legacy state-dict block numbers for each flow (see module docstring).
_LEGACY_FIRST_BLOCK = {"entry": 1, "middle": 4, "exit": 12}


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 (`conv1`) then pointwise 1x1 (`pointwise`), no bias (a BN follows)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.conv1(x))


class Block(nn.Module):
    """Xception residual block: [ReLU, SepConv, BN] x n (+ max-pool), plus shortcut."""

    def __init__(self, cin: int, spec: BlockSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        for i, cout in enumerate(spec.channels):
            if i > 0 or spec.start_with_relu:
                layers.append(nn.ReLU(inplace=i > 0))  # the first ReLU must not modify the shortcut input
            layers += [SeparableConv2d(c, cout), nn.BatchNorm2d(cout)]
            c = cout
        if spec.stride != 1:
            layers.append(nn.MaxPool2d(3, spec.stride, padding=1))
        self.rep = nn.Sequential(*layers)
        if spec.stride != 1 or cin != c:
            self.skip = nn.Conv2d(cin, c, 1, stride=spec.stride, bias=False)
            self.skipbn = nn.BatchNorm2d(c)
        else:
            self.skip = self.skipbn = None
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.skip is None else self.skipbn(self.skip(x))
        return self.rep(x) + shortcut


class ModifiedXception(EarlyFreeze, nn.Module):
    """Backbone interface: `num_features`, `forward_features(x) -> (features, {name: maps})`.

    At 299 px: stem 147x147, entry flow 19x19 x 728, middle flow 19x19 (soft attention here),
    exit flow 10x10 x num_features (soft attention again when `attention`).
    """

    def __init__(self, spec: XceptionSpec = XCEPTION_PAPER, attention: bool = True) -> None:
        super().__init__()
        self.spec = spec
        c1, c2 = spec.stem
        self.conv1, self.bn1 = nn.Conv2d(3, c1, 3, 2, bias=False), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, bias=False), nn.BatchNorm2d(c2)
        self.act = nn.ReLU(inplace=True)
        c = c2
        self.flows = nn.ModuleDict()
        for flow in ("entry", "middle", "exit"):
            blocks = []
            for bspec in getattr(spec, flow):
                blocks.append(Block(c, bspec))
                c = blocks[-1].out_channels
            self.flows[flow] = nn.Sequential(*blocks)
            if flow == "middle":
                self.middle_attention = SoftAttention(c, spec.attention_heads) if attention else None
        tail: list[nn.Module] = []
        for i, cout in enumerate(spec.exit_convs, start=3):
            self.add_module(f"conv{i}", SeparableConv2d(c, cout))
            self.add_module(f"bn{i}", nn.BatchNorm2d(cout))
            tail.append(f"{i}")
            c = cout
        self._tail = tail
        self.exit_attention = SoftAttention(c, spec.attention_heads) if attention else None
        self.num_features = c

    def early_layers(self, n_blocks: int) -> list[nn.Module]:
        """The stem and the first `n_blocks` blocks (entry flow first), in forward order."""
        blocks = [*self.flows["entry"], *self.flows["middle"], *self.flows["exit"]]
        return [self.conv1, self.bn1, self.conv2, self.bn2, *blocks[:n_blocks]]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        maps: dict[str, torch.Tensor] = {}
        x = self.act(self.bn1(self.conv1(x)))  # (N, 32, 149, 149) at 299 px
        x = self.act(self.bn2(self.conv2(x)))  # (N, 64, 147, 147)
        x = self.flows["entry"](x)  # (N, 728, 19, 19)
        x = self.flows["middle"](x)  # (N, 728, 19, 19)
        if self.middle_attention is not None:
            x, maps["middle"] = self.middle_attention(x)  # maps (N, K, 19, 19)
        x = self.flows["exit"](x)  # (N, 1024, 10, 10)
        for i in self._tail:
            x = self.act(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))  # (N, 1536|2048, 10, 10)
        if self.exit_attention is not None:
            x, maps["exit"] = self.exit_attention(x)  # maps (N, K, 10, 10)
        return x, maps

    def legacy_names(self) -> dict[str, str]:
        """Our state-dict key -> the `legacy_xception` key it corresponds to."""
        mapping = {}
        for key in self.state_dict():
            parts = key.split(".")
            if parts[0] == "flows":
                legacy_block = _LEGACY_FIRST_BLOCK[parts[1]] + int(parts[2])
                mapping[key] = ".".join([f"block{legacy_block}", *parts[3:]])
            elif not key.startswith(("middle_attention", "exit_attention")):
                mapping[key] = key
        return mapping


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ours, not in the file (e.g. attention)
    unused: list[str] = field(default_factory=list)  # in the file, not kept by the modified net

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; not in the file: {len(self.missing)} "
                f"({', '.join(self.missing[:6])}{'...' if len(self.missing) > 6 else ''}); "
                f"unused from the file: {len(self.unused)}")


class CheckpointMismatch(ValueError):
    pass


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A tensor dict from a safetensors or torch file; never unpickles code (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise CheckpointMismatch(f"{path}: not a loadable weights file ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(f"{path}: expected a dict of tensors")
    return obj


def load_legacy_xception(model: ModifiedXception, path: str | os.PathLike) -> LoadReport:
    """Load an ImageNet Xception state dict (legacy_xception names) into the kept layers.

    Shape mismatches raise `CheckpointMismatch` naming every offending tensor; a file that
    matches none of our names raises too (it is probably not an Xception checkpoint).
    """
    source = read_state_dict(path)
    source = {k.removeprefix("module."): v for k, v in source.items()}
    ours = model.state_dict()
    report, update, bad = LoadReport(), {}, []
    names = model.legacy_names()
    for key, legacy in names.items():
        if legacy not in source:
            report.missing.append(key)
            continue
        if source[legacy].shape != ours[key].shape:
            bad.append(f"{legacy}: file {tuple(source[legacy].shape)} vs model {tuple(ours[key].shape)}")
            continue
        update[key] = source[legacy]
        report.loaded.append(key)
    report.missing += [k for k in ours if k not in names]
    used = set(names.values())
    report.unused = sorted(k for k in source if k not in used)
    if bad:
        raise CheckpointMismatch(f"{path}: {len(bad)} tensor(s) with the wrong shape:\n  " + "\n  ".join(bad))
    if not update:
        raise CheckpointMismatch(f"{path}: no tensor matches a legacy_xception name (e.g. conv1.weight, "
                                 f"block1.rep.0.conv1.weight); is it an Xception checkpoint?")
    model.load_state_dict(update, strict=False)
    return report
