"""The training loss: cross-entropy per task, summed over tasks and over the branches that ran."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import FusionOutput


def multitask_loss(out: FusionOutput, targets: torch.Tensor, class_weights: list[torch.Tensor] | None = None,
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over branches and tasks of the cross-entropy, each branch on the cases it ran on."""
    total = targets.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    for branch, logits in out.logits.items():
        mask = out.masks[branch]
        if not bool(mask.any()):
            continue
        branch_loss = total.new_zeros(())
        for t, lg in enumerate(logits):
            w = None if class_weights is None else class_weights[t].to(lg.device)
            branch_loss = branch_loss + F.cross_entropy(lg[mask].float(), targets[mask, t], weight=w,
                                                        label_smoothing=label_smoothing)
        parts[branch] = float(branch_loss.detach())
        total = total + branch_loss
    return total, parts
