"""Three-branch hybrid fusion with per-task heads and late fusion (Omeroglu et al. 2023, Sec. 3.4).

Branches (DESIGN.md §3): dermoscopy and clinical (a backbone each -> pooled features -> 8 task
heads) and hybrid-meta (the two exit feature maps concatenated -> [1x1 conv + BN + ReLU + soft
attention] || [soft attention on the concat] -> pooled, + metadata -> 8 task heads).
Every head has its own softmax; the final probability is the (weighted) mean of the available
branches' probabilities (late fusion). `FusionEnsemble` averages several trained models. A branch runs only on the cases whose inputs it needs, so a
missing clinical photo never trains the clinical branch and never enters BN statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..schema import NUM_CLASSES
from .attention import SoftAttention
from .backbones import build_backbone

BRANCHES = ("derm", "clinic", "hybrid")
VARIANT_BRANCHES = {"DIM": ("derm",), "CIM": ("clinic",), "DCIHMM": ("derm", "clinic", "hybrid")}


class TaskHeads(nn.Module):
    """One linear layer per task (8 tasks, 24 classes); softmax is taken per task, never over all 24."""

    def __init__(self, in_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(in_features, n) for n in NUM_CLASSES)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        f = self.dropout(features)
        return [head(f) for head in self.heads]  # 8 x (N, C_t)


class ImageBranch(nn.Module):
    """backbone(image) -> global average pool -> task heads. Instantiated per modality."""

    def __init__(self, backbone: nn.Module, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = TaskHeads(backbone.num_features, dropout)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        feat, maps = self.backbone.forward_features(x)  # (n, C, h, w)
        return self.heads(feat.mean(dim=(2, 3))), feat, maps


class HybridBranch(nn.Module):
    """Concat of both exit maps -> (1x1 conv + BN + ReLU + SA) || (SA on the concat) -> pool + meta -> heads.

    Missing metadata is replaced by a learned "unknown" vector (trained through
    `TrainConfig.meta_dropout`), so the branch still runs without it.
    """

    def __init__(self, in_channels: int, hybrid_channels: int, meta_dim: int, attention: bool,
                 heads: int, dropout: float) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, hybrid_channels, 1, bias=False),
            nn.BatchNorm2d(hybrid_channels),
            nn.ReLU(inplace=True),
        )
        self.reduce_attention = SoftAttention(hybrid_channels, heads) if attention else None
        self.concat_attention = SoftAttention(in_channels, heads) if attention else None
        self.unknown_meta = nn.Parameter(torch.zeros(meta_dim))
        self.heads = TaskHeads(hybrid_channels + in_channels + meta_dim, dropout)

    def forward(self, feat_derm: torch.Tensor, feat_clinic: torch.Tensor, meta: torch.Tensor,
                has_meta: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        maps: dict[str, torch.Tensor] = {}
        t = torch.cat([feat_derm, feat_clinic], dim=1)  # (n, Cd + Cc, h, w)
        a = self.reduce(t)  # (n, hybrid_channels, h, w)
        if self.reduce_attention is not None:
            a, maps["reduce"] = self.reduce_attention(a)
        b = t
        if self.concat_attention is not None:
            b, maps["concat"] = self.concat_attention(t)
        meta = torch.where(has_meta[:, None], meta, self.unknown_meta.to(meta.dtype).expand_as(meta))
        pooled = torch.cat([a.mean(dim=(2, 3)), b.mean(dim=(2, 3)), meta.to(a.dtype)], dim=1)
        return self.heads(pooled), maps


@dataclass
class FusionOutput:
    """Per-branch logits (rows of unavailable cases are zero), availability masks, fused probabilities."""

    logits: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # branch -> 8 x (N, C_t)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # branch -> (N,) bool
    probs: list[torch.Tensor] = field(default_factory=list)  # 8 x (N, C_t), late fusion
    attention: dict[str, torch.Tensor] = field(default_factory=dict)  # "derm.exit" -> (N, K, h, w)

    def branch_probs(self, branch: str) -> list[torch.Tensor]:
        """One branch's own probabilities; rows it did not run on are uniform (zero logits), including
        every row when it ran on none of the batch (see `masks` / `branches_used`)."""
        if branch not in self.logits:
            return [torch.full_like(p, 1.0 / p.shape[-1]) for p in self.probs]
        return [lg.float().softmax(dim=-1) for lg in self.logits[branch]]

    def branches_used(self) -> torch.Tensor:
        """(N, 3) bool: which of derm, clinic, hybrid ran for each case."""
        n = self.probs[0].shape[0]
        cols = [self.masks.get(b, torch.zeros(n, dtype=torch.bool, device=self.probs[0].device)) for b in BRANCHES]
        return torch.stack(cols, dim=1)


def _scatter(rows: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Place `rows` (k, ...) at `index` in an (n, ...) zero tensor (differentiable)."""
    out = rows.new_zeros((n, *rows.shape[1:]))
    return out.index_copy(0, index, rows)


class FusionModel(nn.Module):
    """DIM / CIM / DCIHMM from one `ModelConfig`; see the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.variant not in VARIANT_BRANCHES:
            raise ValueError(f"variant {cfg.variant!r} is not one of {', '.join(VARIANT_BRANCHES)}")
        self.cfg = cfg
        self.branch_names = VARIANT_BRANCHES[cfg.variant]
        self.fusion_weights: dict[str, float] = {}  # branch -> late-fusion weight (missing = 1); `infer.clinic_weight`
        derm_bb = build_backbone(cfg) if "derm" in self.branch_names else None
        clinic_bb = None
        if "clinic" in self.branch_names:
            clinic_bb = derm_bb if (cfg.share_backbone and derm_bb is not None) else build_backbone(cfg)
        self.derm = ImageBranch(derm_bb, cfg.dropout) if derm_bb is not None else None
        self.clinic = ImageBranch(clinic_bb, cfg.dropout) if clinic_bb is not None else None
        self.hybrid = None
        if "hybrid" in self.branch_names:
            self.hybrid = HybridBranch(derm_bb.num_features + clinic_bb.num_features, cfg.hybrid_channels,
                                       cfg.meta_dim, cfg.attention, cfg.attention_heads, cfg.dropout)

    def can_run(self, has_derm: torch.Tensor, has_clinic: torch.Tensor) -> bool:
        """Whether at least one case of the batch has an input one of our branches needs."""
        return bool((self.derm is not None and has_derm.any()) or (self.clinic is not None and has_clinic.any()))

    def forward(self, derm: torch.Tensor, clinic: torch.Tensor, meta: torch.Tensor,
                has_derm: torch.Tensor | None = None, has_clinic: torch.Tensor | None = None,
                has_meta: torch.Tensor | None = None) -> FusionOutput:
        n = derm.shape[0] if derm is not None else clinic.shape[0]
        device = (derm if derm is not None else clinic).device
        ones = torch.ones(n, dtype=torch.bool, device=device)
        has_derm = ones if has_derm is None else has_derm.bool()
        has_clinic = ones if has_clinic is None else has_clinic.bool()
        has_meta = ones if has_meta is None else has_meta.bool()
        if derm is None:
            has_derm = ~ones
        if clinic is None:
            has_clinic = ~ones
        out = FusionOutput()
        feats: dict[str, torch.Tensor] = {}
        for name, branch, images, avail in (("derm", self.derm, derm, has_derm),
                                            ("clinic", self.clinic, clinic, has_clinic)):
            if branch is None or not bool(avail.any()):
                continue
            out.masks[name] = avail
            if bool(avail.all()):  # the common case: no gather/scatter copies, memory format kept
                logits, feats[name], maps = branch(images)
                out.logits[name] = logits
                out.attention.update({f"{name}.{key}": m for key, m in maps.items()})
                continue
            idx = avail.nonzero().squeeze(1)
            logits, feat, maps = branch(images.index_select(0, idx))
            out.logits[name] = [_scatter(lg, idx, n) for lg in logits]
            feats[name] = _scatter(feat, idx, n)
            for key, m in maps.items():
                out.attention[f"{name}.{key}"] = _scatter(m, idx, n)
        both = has_derm & has_clinic
        if self.hybrid is not None and "derm" in feats and "clinic" in feats and bool(both.any()):
            out.masks["hybrid"] = both
            if bool(both.all()):
                logits, maps = self.hybrid(feats["derm"], feats["clinic"], meta, has_meta)
                out.logits["hybrid"] = logits
                out.attention.update({f"hybrid.{key}": m for key, m in maps.items()})
            else:
                idx = both.nonzero().squeeze(1)
                logits, maps = self.hybrid(feats["derm"].index_select(0, idx), feats["clinic"].index_select(0, idx),
                                           meta.index_select(0, idx), has_meta.index_select(0, idx))
                out.logits["hybrid"] = [_scatter(lg, idx, n) for lg in logits]
                for key, m in maps.items():
                    out.attention[f"hybrid.{key}"] = _scatter(m, idx, n)
        out.probs = late_fusion(out, self.fusion_weights)
        return out


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors, dim=0).mean(dim=0)


class FusionEnsemble(nn.Module):
    """Several `FusionModel`s of one config (`train.ensemble`), used like one: each branch's
    probabilities are the members' mean, then the usual late fusion; attention maps are averaged."""

    def __init__(self, cfg: ModelConfig, members: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(FusionModel(cfg) for _ in range(members))
        self.branch_names = self.members[0].branch_names
        self.fusion_weights: dict[str, float] = {}

    def can_run(self, has_derm: torch.Tensor, has_clinic: torch.Tensor) -> bool:
        return self.members[0].can_run(has_derm, has_clinic)

    def forward(self, derm: torch.Tensor, clinic: torch.Tensor, meta: torch.Tensor,
                has_derm: torch.Tensor | None = None, has_clinic: torch.Tensor | None = None,
                has_meta: torch.Tensor | None = None) -> FusionOutput:
        outs = [m(derm, clinic, meta, has_derm, has_clinic, has_meta) for m in self.members]
        out = FusionOutput(masks=outs[0].masks)
        for b in outs[0].logits:  # log of the mean probability, so `branch_probs` and late fusion see the mean
            out.logits[b] = [_mean([o.logits[b][t].float().softmax(dim=-1) for o in outs]).log()
                             for t in range(len(NUM_CLASSES))]
        out.attention = {k: _mean([o.attention[k].float() for o in outs]) for k in outs[0].attention}
        out.probs = late_fusion(out, self.fusion_weights)
        return out


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
    Outputs: the 8 fused probability tensors, the (N, 3) branch-used flags, and the
    aggregated attention maps of each branch stage.
    """

    def __init__(self, model: FusionModel | FusionEnsemble) -> None:
        super().__init__()
        self.model = model.eval()
        self.attention_names: list[str] = []

    def forward(self, derm: torch.Tensor, clinic: torch.Tensor, meta: torch.Tensor, has_derm: torch.Tensor,
                has_clinic: torch.Tensor, has_meta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        members = list(self.model.members) if isinstance(self.model, FusionEnsemble) else [self.model]
        parts = [_dense_branches(m, derm, clinic, meta, has_derm, has_clinic, has_meta) for m in members]
        weights = parts[0][1]
        maps = {k: _mean([p[2][k] for p in parts]) for k in parts[0][2]}
        fusion_weights = self.model.fusion_weights
        w = torch.stack([weights[b] * fusion_weights.get(b, 1.0) for b in weights], dim=0)  # (B, N)
        denom = w.sum(dim=0).clamp_min(1e-12)[:, None]
        probs = []
        for t in range(len(NUM_CLASSES)):
            stacked = torch.stack([_mean([p[0][b][t] for p in parts]) for b in weights], dim=0)  # (B, N, C)
            probs.append((stacked * w[..., None]).sum(dim=0) / denom)
        n = derm.shape[0]
        used = torch.stack([weights.get(b, torch.zeros(n, device=derm.device)) for b in BRANCHES], dim=1)
        self.attention_names = list(maps)
        return (*probs, used, *maps.values())


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
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        dense(x, x, torch.zeros(batch, meta_dim), flags, flags, flags)
        traced = torch.jit.trace(dense, (x, x, torch.zeros(batch, meta_dim), flags, flags, flags), check_trace=False)
        frozen = torch.jit.freeze(traced)
        frozen(x, x, torch.zeros(batch, meta_dim), flags, flags, flags)  # first call optimises the graph
    frozen.attention_names = list(dense.attention_names)
    return frozen


def late_fusion(out: FusionOutput, weights: dict[str, float] | None = None) -> list[torch.Tensor]:
    """Mean over the available branches of their per-task softmax probabilities, each branch
    weighted by `weights` (a branch not named there weighs 1).

    A case with no available branch gets NaN probabilities (callers must refuse it).
    """
    probs = []
    branches = list(out.logits)
    if not branches:
        raise ValueError("no branch could run: every input the model needs is missing")
    weights = weights or {}
    weight = torch.stack([out.masks[b].float() * weights.get(b, 1.0) for b in branches], dim=0)  # (B, N)
    denom = weight.sum(dim=0)  # (N,)
    for t in range(len(NUM_CLASSES)):
        stacked = torch.stack([out.logits[b][t].float().softmax(dim=-1) for b in branches], dim=0)  # (B, N, C)
        probs.append((stacked * weight[..., None]).sum(dim=0) / denom[:, None])
    return probs


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
