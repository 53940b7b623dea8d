"""The training loss: cross-entropy per task, summed over tasks and over the branches that ran.

Partial labels: a target below 0 (schema.NOT_ANNOTATED, schema.PRESENT) is left out of its
task's mean; a task with no label among a branch's cases adds an exact zero (its heads get no
gradient), still through the graph so every parameter takes part in the step (DDP needs that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import FusionOutput
from ..schema import TASKS, seven_point_score


def task_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the labelled rows (y >= 0), the (class-weighted) mean like F.cross_entropy's."""
    labelled = y >= 0
    per_case = F.cross_entropy(logits.float(), torch.where(labelled, y, torch.zeros_like(y)), weight=weight,
                               label_smoothing=label_smoothing, reduction="none")
    per_case = per_case * labelled
    norm = labelled.to(per_case.dtype) if weight is None else weight[y.clamp_min(0)] * labelled
    return per_case.sum() / norm.sum().clamp_min(1e-12)


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
            branch_loss = branch_loss + task_loss(lg[mask], targets[mask, t], w, label_smoothing)
        parts[branch] = float(branch_loss.detach())
        total = total + branch_loss
    return total, parts


def soft_target_loss(out: FusionOutput, soft: torch.Tensor, has_soft: torch.Tensor) -> torch.Tensor:
    """Distillation: per branch and task, the cross-entropy of the branch's logits against a teacher's
    probabilities (`soft`: (N, 24), the tasks' classes concatenated in schema order), averaged over the cases
    that carry them (`has_soft`) and that the branch ran on; summed over tasks and branches like
    `multitask_loss`. Zero when no case in the batch carries them."""
    total = soft.new_zeros((), dtype=torch.float32)
    for branch, logits in out.logits.items():
        rows = out.masks[branch] & has_soft
        if not bool(rows.any()):
            continue
        start = 0
        for lg in logits:
            q = soft[rows, start:start + lg.shape[1]].float()
            start += lg.shape[1]
            total = total - (q * F.log_softmax(lg[rows].float(), dim=-1)).sum(dim=-1).mean()
    return total


def expected_score(logits: list[torch.Tensor]) -> torch.Tensor:
    """The 7-point score a branch's criteria heads expect: sum over criteria of points x P(the scoring class)."""
    total = logits[0].new_zeros(logits[0].shape[0], dtype=torch.float32)
    for task, lg in zip(TASKS, logits):
        probs = F.softmax(lg.float(), dim=-1)
        for cls, pts in task.points.items():
            total = total + pts * probs[:, cls]
    return total


def score_loss(out: FusionOutput, targets: torch.Tensor) -> torch.Tensor:
    """The 7-point score as an auxiliary target: per branch, the mean squared error (in points) between the
    expected score (`expected_score`) and the labelled one, over the cases whose seven criteria are all labelled
    (a partial or PRESENT label leaves the case out); summed over branches like `multitask_loss`. It couples the
    criteria heads through the checklist's weights: a 2-point criterion's error costs twice a 1-point one's."""
    scoring = [i for i, task in enumerate(TASKS) if task.points]
    labelled = (targets[:, scoring] >= 0).all(dim=1)
    truth = seven_point_score(targets).float()
    total = truth.new_zeros(())
    for branch, logits in out.logits.items():
        rows = out.masks[branch] & labelled
        if bool(rows.any()):
            total = total + (expected_score([lg[rows] for lg in logits]) - truth[rows]).pow(2).mean()
    return total
