"""The static inference graph: `DenseFusion` runs every branch on every case and applies the
inputs' availability as weights, so one traced graph serves ONNX export (`sevenpoint export`)
and the frozen TorchScript path (`freeze_for_inference`, serve's default backend)."""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import bf16_autocast
from ..schema import NUM_CLASSES
from .fusion import BRANCHES, FusionEnsemble, FusionModel, mean_of, tempered, weighted_branch_mean


def _dense_branches(m: FusionModel, derm: torch.Tensor, clinic: torch.Tensor, meta: torch.Tensor,
                    has_derm: torch.Tensor, has_clinic: torch.Tensor, has_meta: torch.Tensor):
    """Every branch of one model on every case: its probabilities, availability weights and summed maps."""
    probs, weights, maps, feats = {}, {}, {}, {}
    for name, branch, images, avail in (("derm", m.derm, derm, has_derm), ("clinic", m.clinic, clinic, has_clinic)):
        if branch is None:
            continue
        logits, feats[name], branch_maps = branch(images)
        probs[name] = [lg.float().softmax(dim=-1) for lg in logits]
        weights[name] = avail
        maps.update({f"{name}.{k}": v.sum(dim=1) for k, v in branch_maps.items()})
    if m.hybrid is not None:
        logits, hybrid_maps = m.hybrid(feats["derm"], feats["clinic"], meta, has_meta > 0.5)
        probs["hybrid"] = [lg.float().softmax(dim=-1) for lg in logits]
        weights["hybrid"] = has_derm * has_clinic
        maps.update({f"hybrid.{k}": v.sum(dim=1) for k, v in hybrid_maps.items()})
    return probs, weights, maps


class DenseFusion(nn.Module):
    """Every branch on every case, availability applied as weights: a static graph for ONNX export.

    In eval mode this equals `FusionModel.forward` for every case (BatchNorm uses running
    statistics, so running a branch on a placeholder image changes nothing for the others).
    Inputs: images (N, 3, S, S), meta (N, D), availability flags (N,) float 0/1.
    Outputs: the 8 fused probability tensors, the (N, 3) branch-used flags, the aggregated attention
    maps of each branch stage, and for an ensemble each member's 8 fused probability tensors
    (`FusionOutput.members`, member by member): `members` says how many.
    """

    def __init__(self, model: FusionModel | FusionEnsemble) -> None:
        super().__init__()
        self.model = model.eval()
        self.attention_names: list[str] = []
        self.members = len(model.members) if isinstance(model, FusionEnsemble) else 0

    def forward(self, derm: torch.Tensor, clinic: torch.Tensor, meta: torch.Tensor, has_derm: torch.Tensor,
                has_clinic: torch.Tensor, has_meta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        members = list(self.model.members) if isinstance(self.model, FusionEnsemble) else [self.model]
        parts = [_dense_branches(m, derm, clinic, meta, has_derm, has_clinic, has_meta) for m in members]
        weights = parts[0][1]
        maps = {k: mean_of([p[2][k] for p in parts]) for k in parts[0][2]}
        # each member's fused (and, with member temperatures, tempered) probabilities, as `FusionEnsemble.forward`;
        # the output is their mean (late fusion is linear: untempered, that equals fusing the members' mean)
        fused = [weighted_branch_mean(p[0], weights, self.model.fusion_weights, eps=1e-12) for p in parts]
        temps = getattr(self.model, "member_temperature", None)
        if temps is not None:
            fused = [[tempered(f[t], temp) for t, temp in enumerate(temps)] for f in fused]
        probs = [mean_of([f[t] for f in fused]) for t in range(len(NUM_CLASSES))]
        if not self.members:
            fused = []  # a single model: no member outputs
        n = derm.shape[0]
        used = torch.stack([weights.get(b, torch.zeros(n, device=derm.device)) for b in BRANCHES], dim=1)
        self.attention_names = list(maps)
        return (*probs, used, *maps.values(), *(p for f in fused for p in f))


def split_outputs(out, attention_names: list[str], members: int) -> tuple[list, object, list, list[list]]:
    """`DenseFusion`'s flat outputs (torch or ONNX Runtime) -> (probs, branch-used flags, attention maps in
    `attention_names` order, each member's probabilities)."""
    n_tasks = len(NUM_CLASSES)
    start = n_tasks + 1 + len(attention_names)
    member_probs = [list(out[start + k * n_tasks:start + (k + 1) * n_tasks]) for k in range(members)]
    return list(out[:n_tasks]), out[n_tasks], list(out[n_tasks + 1:start]), member_probs


def freeze_for_inference(model: FusionModel, batch: int, size: int, meta_dim: int, bf16: bool,
                         channels_last: bool = True) -> torch.jit.ScriptModule:
    """`DenseFusion` traced and frozen (BatchNorm folded into the convs, oneDNN fusions).

    Measured faster than eager at batch 1 on this CPU (docs/PERFORMANCE.md); outputs as
    `DenseFusion` (aggregated attention maps only). Traced under autocast when `bf16`.
    """
    dense = DenseFusion(model.eval()).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        dense.to(memory_format=torch.channels_last)
    x = torch.zeros(batch, 3, size, size).contiguous(memory_format=fmt)
    flags = torch.ones(batch)
    with torch.no_grad(), bf16_autocast(bf16, tracing=True):
        dense(x, x, torch.zeros(batch, meta_dim), flags, flags, flags)
        traced = torch.jit.trace(dense, (x, x, torch.zeros(batch, meta_dim), flags, flags, flags), check_trace=False)
        frozen = torch.jit.freeze(traced)
        frozen(x, x, torch.zeros(batch, meta_dim), flags, flags, flags)  # first call optimises the graph
    frozen.attention_names = list(dense.attention_names)
    frozen.members = dense.members
    return frozen
