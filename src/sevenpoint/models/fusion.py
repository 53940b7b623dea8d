"""Three-branch hybrid fusion with per-task heads and late fusion (Omeroglu et al. 2023, Sec. 3.4).

Branches (docs/model.md): dermoscopy and clinical (a backbone each -> pooled features -> 8 task
heads) and hybrid-meta (the two exit feature maps concatenated -> [1x1 conv + BN + ReLU + soft
attention] || [soft attention on the concat] -> pooled, + metadata -> 8 task heads).
Every head has its own softmax; the final probability is the (weighted) mean of the available
branches' probabilities (late fusion). A branch runs only on the cases whose inputs it needs, so
a missing clinical photo never trains the clinical branch and never enters BN statistics.
`FusionEnsemble` averages several trained models; the static export graph is in `static_graph`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import VARIANT_BRANCHES, ModelConfig
from ..schema import NUM_CLASSES, meta_dim as _meta_dim
from .attention import SoftAttention
from .backbones import build_backbone

BRANCHES = ("derm", "clinic", "hybrid")
META_DIM = _meta_dim(False)  # one-hot sex + location + elevation


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
    untempered: list[torch.Tensor] | None = None  # an ensemble tempered per member: `probs` without temperatures
    members: list[list[torch.Tensor]] | None = None  # an ensemble's members' own fused probabilities (tempered when
    #                                                  `probs` is tempered per member), 8 x (N, C_t) each: what
    #                                                  cross-conformal sets score (`infer.artifacts`)

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


def _scatter(rows, index: torch.Tensor, n: int):
    """Place `rows` (k, ...) at `index` in an (n, ...) zero tensor (differentiable); lists, tuples
    and dicts of such tensors likewise."""
    if isinstance(rows, (list, tuple)):
        return type(rows)(_scatter(r, index, n) for r in rows)
    if isinstance(rows, dict):
        return {k: _scatter(v, index, n) for k, v in rows.items()}
    return rows.new_zeros((n, *rows.shape[1:])).index_copy(0, index, rows)


def _on_rows(avail: torch.Tensor, fn, *inputs: torch.Tensor):
    """`fn(*inputs)` on the rows where `avail` is true only; its outputs come back with zero rows for
    the others. When every row is available nothing is copied (memory format kept)."""
    if bool(avail.all()):
        return fn(*inputs)
    idx = avail.nonzero().squeeze(1)
    return _scatter(fn(*(x.index_select(0, idx) for x in inputs)), idx, avail.shape[0])


class FusionModel(nn.Module):
    """DIM / CIM / DCIHMM from one `ModelConfig`; see the module docstring."""

    def __init__(self, cfg: ModelConfig, image_size: int, meta_dim: int = META_DIM) -> None:
        """`image_size` and `meta_dim` follow from the data settings (`RunConfig.data.image_size`,
        `RunConfig.meta_dim`), so they are build arguments, not model options."""
        super().__init__()
        if cfg.variant not in VARIANT_BRANCHES:
            raise ValueError(f"variant {cfg.variant!r} is not one of {', '.join(VARIANT_BRANCHES)}")
        self.cfg = cfg
        self.branch_names = cfg.branches
        self.fusion_weights: dict[str, float] = {}  # branch -> late-fusion weight (missing = 1); `infer.clinic_weight`
        derm_bb = build_backbone(cfg, image_size, "derm") if "derm" in self.branch_names else None
        clinic_bb = None
        if "clinic" in self.branch_names:
            clinic_bb = derm_bb if (cfg.share_backbone and derm_bb is not None) else build_backbone(cfg, image_size)
        self.derm = ImageBranch(derm_bb, cfg.dropout) if derm_bb is not None else None
        self.clinic = ImageBranch(clinic_bb, cfg.dropout) if clinic_bb is not None else None
        self.hybrid = None
        if "hybrid" in self.branch_names:
            self.hybrid = HybridBranch(derm_bb.num_features + clinic_bb.num_features, cfg.hybrid_channels,
                                       meta_dim, cfg.attention, cfg.attention_heads, cfg.dropout)

    def read_trunk(self, on: bool = True) -> None:
        """Read each backbone's frozen-trunk output instead of images (`train.trunk_views`: a trunk-feature
        cache); the weights are those of the full model, which `read_trunk(False)` runs on images again."""
        for branch in (self.derm, self.clinic):
            if branch is not None:
                branch.backbone.read_trunk(on)

    def example_inputs(self, n: int, image_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Random (derm, clinic) inputs of the kind `forward` reads now: images, or trunk features."""
        images = [torch.rand(n, 3, image_size, image_size, generator=generator) for _ in range(2)]
        out = []
        for branch, x in zip((self.derm, self.clinic), images):
            if branch is not None and branch.backbone.reads_trunk:
                with torch.no_grad():
                    x = branch.backbone.trunk(x)
            out.append(x)
        return out

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
            out.logits[name], feats[name], maps = _on_rows(avail, branch, images)
            out.attention.update({f"{name}.{key}": m for key, m in maps.items()})
        both = has_derm & has_clinic
        if self.hybrid is not None and "derm" in feats and "clinic" in feats and bool(both.any()):
            out.masks["hybrid"] = both
            out.logits["hybrid"], maps = _on_rows(both, self.hybrid, feats["derm"], feats["clinic"], meta, has_meta)
            out.attention.update({f"hybrid.{key}": m for key, m in maps.items()})
        out.probs = late_fusion(out, self.fusion_weights)
        return out


def mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean of same-shaped tensors (the tensor itself when there is one)."""
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors, dim=0).mean(dim=0)


class FusionEnsemble(nn.Module):
    """Several `FusionModel`s of one config (`train.ensemble`), used like one: each branch's
    probabilities are the members' mean, then the usual late fusion; attention maps are averaged."""

    def __init__(self, cfg: ModelConfig, members: int, image_size: int, meta_dim: int = META_DIM) -> None:
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(FusionModel(cfg, image_size, meta_dim) for _ in range(members))
        self.branch_names = self.members[0].branch_names
        self.fusion_weights: dict[str, float] = {}
        # Per task, a temperature for each member's fused probabilities before averaging (calibrate-then-pool,
        # `infer.temperature_on: members`); None: the members' probabilities averaged as they are.
        self.member_temperature: tuple[float, ...] | None = None

    def can_run(self, has_derm: torch.Tensor, has_clinic: torch.Tensor) -> bool:
        return self.members[0].can_run(has_derm, has_clinic)

    def example_inputs(self, n: int, image_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return self.members[0].example_inputs(n, image_size, generator)

    def forward(self, derm: torch.Tensor, clinic: torch.Tensor, meta: torch.Tensor,
                has_derm: torch.Tensor | None = None, has_clinic: torch.Tensor | None = None,
                has_meta: torch.Tensor | None = None) -> FusionOutput:
        outs = [m(derm, clinic, meta, has_derm, has_clinic, has_meta) for m in self.members]
        out = FusionOutput(masks=outs[0].masks)
        for b in outs[0].logits:  # log of the mean probability, so `branch_probs` and late fusion see the mean
            out.logits[b] = [mean_of([o.logits[b][t].float().softmax(dim=-1) for o in outs]).log()
                             for t in range(len(NUM_CLASSES))]
        out.attention = {k: mean_of([o.attention[k].float() for o in outs]) for k in outs[0].attention}
        # late fusion is linear: fusing the members' mean = the mean of the members' fused probabilities
        out.probs = late_fusion(out, self.fusion_weights)
        out.members = [late_fusion(o, self.fusion_weights) for o in outs]
        if self.member_temperature is not None:
            out.untempered = out.probs
            out.members = [[tempered(f[t], temp) for t, temp in enumerate(self.member_temperature)]
                           for f in out.members]
            out.probs = [mean_of([f[t] for f in out.members]) for t in range(len(NUM_CLASSES))]
        return out


def tempered(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T) over the last dimension: `infer.temperature.apply_temperature` in torch."""
    return (probs.clamp_min(1e-12).log() / temperature).softmax(dim=-1)


def weighted_branch_mean(probs: dict[str, list[torch.Tensor]], availability: dict[str, torch.Tensor],
                         weights: dict[str, float] | None = None, eps: float = 0.0) -> list[torch.Tensor]:
    """Per task, the mean of the branches' probabilities (8 x (N, C_t) each), case by case over the
    branches available for it (`availability`: (N,) 0/1), each branch weighted by `weights`
    (missing = 1). With `eps` = 0 a case with no available branch gets NaN."""
    weights = weights or {}
    branches = list(probs)
    w = torch.stack([availability[b].float() * weights.get(b, 1.0) for b in branches], dim=0)  # (B, N)
    denom = w.sum(dim=0).clamp_min(eps)[:, None] if eps else w.sum(dim=0)[:, None]
    out = []
    for t in range(len(NUM_CLASSES)):
        stacked = torch.stack([probs[b][t] for b in branches], dim=0)  # (B, N, C)
        out.append((stacked * w[..., None]).sum(dim=0) / denom)
    return out


def late_fusion(out: FusionOutput, weights: dict[str, float] | None = None) -> list[torch.Tensor]:
    """The fused probabilities of a forward pass: `weighted_branch_mean` over the branches that ran.

    A case with no available branch gets NaN probabilities (callers must refuse it).
    """
    if not out.logits:
        raise ValueError("no branch could run: every input the model needs is missing")
    return weighted_branch_mean({b: out.branch_probs(b) for b in out.logits}, out.masks, weights)
