"""Freezing a backbone's early layers: no gradients and fixed BN statistics (`model.freeze_blocks`)."""

from __future__ import annotations

from torch import nn


class EarlyFreeze:
    """Mixin for backbones that define `early_layers(n_blocks)`.

    Frozen layers keep their ImageNet weights and running BN statistics: `train()` puts them
    back in eval mode, and since nothing before them needs a gradient, backward stops there.
    """

    _frozen: tuple[nn.Module, ...] = ()
    frozen_blocks: int = 0
    reads_trunk: bool = False  # forward_features takes the frozen part's output (a trunk-feature cache), not images

    def read_trunk(self, on: bool) -> None:
        """Start `forward_features` after the frozen part (its input: `trunk(images)`), or from images."""
        if on and not self.frozen_blocks:
            raise ValueError("a backbone without frozen blocks has no trunk to read (model.freeze_blocks)")
        if on and not hasattr(self, "trunk"):
            raise ValueError(f"{type(self).__name__} cannot start after its frozen blocks (no trunk-feature cache)")
        self.reads_trunk = on

    def freeze_early(self, n_blocks: int) -> None:
        if n_blocks <= 0:
            return
        layers = self.early_layers(n_blocks)
        blocks = len(layers) - len(self.early_layers(0))
        if blocks < n_blocks:
            raise ValueError(f"model.freeze_blocks={n_blocks}: this backbone has only {blocks} blocks")
        for layer in layers:
            layer.requires_grad_(False)
        self._frozen = tuple(layers)
        self.frozen_blocks = n_blocks
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for layer in self._frozen:
            layer.eval()
        return self
