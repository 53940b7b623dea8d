"""The Lightning module: loss, optimiser, validation average accuracy, resumable RNG state."""

from __future__ import annotations

import functools
import math

import lightning as L
import torch
from torchmetrics import SumMetric

from ..checkpoint import SCHEMA_FINGERPRINT
from ..config import RunConfig
from ..models import FusionModel, FusionOutput
from .loss import multitask_loss, score_loss, soft_target_loss
from ..schema import TASK_NAMES, TASKS, annotated, correct


def forward_batch(model: FusionModel, batch: dict, channels_last: bool = False,
                  meta_dropout: float = 0.0) -> FusionOutput:
    """Run the model on a dataset batch dict (the one place that unpacks batches)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    has_meta = batch["has_meta"]
    if meta_dropout > 0 and model.training:
        has_meta = has_meta & (torch.rand(has_meta.shape, device=has_meta.device) >= meta_dropout)
    return model(batch["derm"].contiguous(memory_format=fmt), batch["clinic"].contiguous(memory_format=fmt),
                 batch["meta"], batch["has_derm"], batch["has_clinic"], has_meta)


def mix_batch(batch: dict, lam: float, perm: torch.Tensor) -> dict:
    """MixUp's inputs: each case blended with case `perm[i]` at weight `lam` (images or cached trunk features, and
    metadata, and a teacher's probabilities); a modality (or a teacher's answer) counts as present only where both
    cases have it. Targets are left as they are: the loss mixes them (`SevenPointModule.training_step`)."""
    mixed = dict(batch)
    for key in ("derm", "clinic", "meta", "soft"):
        if key in batch:
            mixed[key] = lam * batch[key] + (1.0 - lam) * batch[key][perm]
    for key in ("has_derm", "has_clinic", "has_meta", "has_soft"):
        if key in batch:
            mixed[key] = batch[key] & batch[key][perm]
    return mixed


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """lr multiplier: linear from ~0 to 1 over `warmup` steps, then cosine from 1 to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class SevenPointModule(L.LightningModule):
    def __init__(self, cfg: RunConfig, class_weights: list[torch.Tensor] | None = None,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = FusionModel(cfg.model, cfg.data.image_size, cfg.meta_dim)
        self.class_weights = class_weights
        self.set_channels_last(channels_last)
        # Validation accuracy per task over its annotated cases: correct and scored counts as
        # torchmetrics sums, so they are exact over all cases, also across DDP ranks.
        self.val_correct = torch.nn.ModuleList(SumMetric() for _ in TASKS)
        self.val_scored = torch.nn.ModuleList(SumMetric() for _ in TASKS)

    def set_channels_last(self, on: bool) -> None:
        """Run (and keep the weights) in channels_last memory layout, or not."""
        self.channels_last = on
        self.model.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if not self.model.can_run(batch["has_derm"], batch["has_clinic"]):
            return None  # e.g. a clinical-only model and a batch with no clinical photo: skip the step
        tc = self.cfg.train
        targets = batch["targets"]
        n = targets.shape[0]
        if tc.mixup > 0:  # the RNG draws are torch's, saved with the checkpoint: a resumed run mixes alike
            lam = float(torch.distributions.Beta(tc.mixup, tc.mixup).sample())
            perm = torch.randperm(n, device=targets.device)
            batch = mix_batch(batch, lam, perm)
        out = forward_batch(self.model, batch, self.channels_last, tc.meta_dropout)
        loss, parts = multitask_loss(out, targets, self.class_weights, tc.label_smoothing)
        if tc.mixup > 0:  # the same outputs scored against the shuffled cases' labels, weighted 1 - lam
            other, other_parts = multitask_loss(out, targets[perm], self.class_weights, tc.label_smoothing)
            loss = lam * loss + (1.0 - lam) * other
            parts = {b: lam * v + (1.0 - lam) * other_parts[b] for b, v in parts.items()}
        if tc.score_weight > 0:  # under MixUp, scored against both cases' scores like the cross-entropy
            scored = score_loss(out, targets)
            if tc.mixup > 0:
                scored = lam * scored + (1.0 - lam) * score_loss(out, targets[perm])
            self.log("train/loss_score", scored, on_step=False, on_epoch=True, batch_size=n)
            loss = loss + tc.score_weight * scored
        if tc.distill_weight > 0 and "has_soft" in batch and bool(batch["has_soft"].any()):
            distill = soft_target_loss(out, batch["soft"], batch["has_soft"])
            self.log("train/loss_distill", distill, on_step=False, on_epoch=True, batch_size=n)
            loss = loss + tc.distill_weight * distill
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for branch, value in parts.items():
            self.log(f"train/loss_{branch}", value, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = forward_batch(self.model, batch, self.channels_last)
        loss, _ = multitask_loss(out, batch["targets"])
        self.log("val/loss", loss, on_epoch=True, batch_size=batch["targets"].shape[0], sync_dist=True)
        for t in range(len(TASKS)):
            y = batch["targets"][:, t]
            scored = annotated(y)
            hit = correct(out.probs[t].detach().float().argmax(dim=1), y) & scored
            self.val_correct[t].update(hit.sum().float())
            self.val_scored[t].update(scored.sum().float())

    def on_validation_epoch_end(self) -> None:
        if not self.val_scored[0].update_called:
            return
        accs = []
        for name, hits, scored in zip(TASK_NAMES, self.val_correct, self.val_scored):
            n = scored.compute()
            if n > 0:  # a task the validation data does not annotate is left out of the average
                accs.append(hits.compute() / n)
                self.log(f"val/acc_{name}", accs[-1])
            hits.reset()
            scored.reset()
        if not accs:
            return
        # The checkpoint-selection metric: validation average accuracy over the (annotated) tasks.
        self.log("val/avg_acc", torch.stack(accs).mean(), prog_bar=True)

    def configure_optimizers(self):
        tc = self.cfg.train
        backbone, rest = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue  # frozen early backbone layers (model.freeze_blocks)
            (backbone if ".backbone." in f".{name}" else rest).append(p)
        groups = [{"params": rest, "lr": tc.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": tc.lr * tc.backbone_lr_scale})
        opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        opt = opt_cls(groups, lr=tc.lr, weight_decay=tc.weight_decay)
        if tc.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, tc.epochs))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if tc.scheduler == "warmup_cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warmup = min(total - 1, round(tc.warmup_epochs * total / max(1, tc.epochs)))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(warmup_cosine, warmup=warmup, total=total))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sevenpoint"] = {
            "config": self.cfg.to_dict(),
            "schema": SCHEMA_FINGERPRINT,
            # Dropout and meta-dropout draw from torch's RNG; augmentation is seeded per item by
            # EpochSampler. Saving this state makes a resumed run continue like an uninterrupted one.
            "rng": {"torch": torch.get_rng_state()},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("sevenpoint", {}).get("rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
