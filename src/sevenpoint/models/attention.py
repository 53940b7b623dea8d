"""Soft attention (Omeroglu et al. 2023, Sec. 3.2; docs/model.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftAttention(nn.Module):
    """Multi-head spatial soft attention with a residual, learnable gate.

    A 3x3 conv maps C channels to K head logits (+ ReLU); each head is normalised by a softmax
    over its H*W positions, so every head map sums to 1 over space; the K maps are summed into
    alpha. Output o = t + gamma * alpha * t with gamma a learnable scalar starting at 0, so the
    module begins as the identity and learns how much attention to apply.

    forward(x) returns (o, maps) with maps the per-head spatial maps (N, K, H, W);
    `maps.sum(1)` is the aggregated alpha that gets drawn on the image.
    """

    def __init__(self, in_channels: int, heads: int = 16) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        self.heads = heads
        self.conv = nn.Conv2d(in_channels, heads, kernel_size=3, padding=1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        logits = F.relu(self.conv(x))  # (N, K, H, W)
        # softmax in fp32: bf16 over ~100-400 positions loses the small weights
        maps = logits.float().flatten(2).softmax(dim=-1).view(n, self.heads, h, w)  # (N, K, H, W)
        alpha = maps.sum(dim=1, keepdim=True).to(x.dtype)  # (N, 1, H, W)
        return x + self.gamma.to(x.dtype) * alpha * x, maps
