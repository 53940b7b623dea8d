"""Checkpoints: atomic writes, safe reads (never unpickle code), model rebuilt from the saved config."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import torch

from .atomic import atomic_path
from .config import RunConfig, config_from_dict
from .models import FusionEnsemble, FusionModel
from .schema import TASKS

SCHEMA_FINGERPRINT = [[t.name, list(t.classes)] for t in TASKS]


class CheckpointError(ValueError):
    """A file that is not a usable sevenpoint checkpoint; the message says why."""


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save through `atomic_path`: never a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict with `weights_only=True` (a pickle that would run code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused: the file needs code to be unpickled, or is not a "
                              f"checkpoint ({str(exc).splitlines()[0]})") from exc
    except Exception as exc:  # zip/EOF/runtime errors from torch.load
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "sevenpoint" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a sevenpoint checkpoint (no 'sevenpoint' section)")
    schema = ckpt["sevenpoint"].get("schema")
    if schema != SCHEMA_FINGERPRINT:
        raise CheckpointError(f"{path}: label schema differs from this version's: file has "
                              f"{schema}, expected {SCHEMA_FINGERPRINT}")
    return ckpt


def build_model(cfg: RunConfig) -> FusionModel | FusionEnsemble:
    """The inference model a config describes, without weights: one model, or `train.ensemble` members,
    with the checkpoint's late-fusion weights (`infer.clinic_weight`)."""
    # The packaged ImageNet weights are overwritten by the checkpoint anyway.
    cfg_build = dataclasses.replace(cfg.model, pretrained=False, backbone_checkpoint=None, derm_init=None)
    size, meta = cfg.data.image_size, cfg.meta_dim
    model = (FusionEnsemble(cfg_build, cfg.train.ensemble, size, meta) if cfg.train.ensemble > 1
             else FusionModel(cfg_build, size, meta))
    model.fusion_weights = {"clinic": cfg.infer.clinic_weight}
    if isinstance(model, FusionEnsemble) and cfg.infer.temperature_on == "members":
        model.member_temperature = cfg.infer.temperature
    return model


def load_model(path: str | os.PathLike) -> tuple[FusionModel | FusionEnsemble, RunConfig, dict]:
    """Rebuild the model from a checkpoint's own config and load its weights (eval mode)."""
    return model_from(read_checkpoint(path), path)


def model_from(ckpt: dict, path: str | os.PathLike = "checkpoint") -> tuple[FusionModel | FusionEnsemble, RunConfig,
                                                                             dict]:
    """`load_model` on a checkpoint dict already in memory (`path` only names it in errors)."""
    cfg = config_from_dict(ckpt["sevenpoint"]["config"])
    model = build_model(cfg)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # e.g. a tensor whose stored shape was damaged
        raise CheckpointError(f"{path}: weights do not fit a {cfg.model.variant}/{cfg.model.backbone_text} model "
                              f"({str(exc).splitlines()[-1].strip()})") from exc
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit a {cfg.model.variant}/{cfg.model.backbone_text} model "
                              f"of {cfg.train.ensemble} member(s): missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    model.eval()
    return model, cfg, ckpt["sevenpoint"]


def _shape(cfg: RunConfig) -> tuple:
    """What ensemble members must share: the model and the image pipeline (not where images are cached, nor how
    deep the trunk was frozen in training: inference runs the whole network either way)."""
    return (dataclasses.replace(cfg.model, freeze_blocks=0),
            dataclasses.replace(cfg.data, cache_dir=None, num_workers=0))


def assemble_ensemble(members: list[str | os.PathLike], out: str | os.PathLike,
                      infer: dict | None = None) -> RunConfig:
    """Write one checkpoint holding the trained models `members` (same model and data config) as a
    `train.ensemble` model; `infer` overrides inference settings (e.g. {"clinic_weight": 0.5})."""
    ckpt = ensemble_checkpoint(members, infer)
    atomic_torch_save(ckpt, out)
    return config_from_dict(ckpt["sevenpoint"]["config"])


def ensemble_checkpoint(members: list[str | os.PathLike], infer: dict | None = None) -> dict:
    """`assemble_ensemble`'s checkpoint dict, in memory (`train` adds what the ensemble carries, then writes
    it once). Held-out artefacts of a member (temperatures, sets, stacker) do not fit the average: dropped."""
    if len(members) < 2:
        raise CheckpointError(f"an ensemble needs at least 2 checkpoints, got {len(members)}")
    state, configs, ood, majority = {}, [], None, None
    for i, path in enumerate(members):
        ckpt = read_checkpoint(path)
        # the first member's (all saw the same training images)
        ood = ood or ckpt["sevenpoint"].get("ood")
        majority = majority or ckpt["sevenpoint"].get("train_majority")
        cfg = config_from_dict(ckpt["sevenpoint"]["config"])
        if cfg.train.ensemble > 1:
            raise CheckpointError(f"{path}: is already an ensemble; give its members instead")
        if configs and _shape(cfg) != _shape(configs[0]):
            raise CheckpointError(f"{path}: model or data config differs from {members[0]}'s; "
                                  "members must share both")
        configs.append(cfg)
        state.update({f"model.members.{i}.{k.removeprefix('model.')}": v
                      for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    values = configs[0].to_dict()
    values["train"]["ensemble"] = len(members)
    if len({c.model.freeze_blocks for c in configs}) > 1:  # members frozen at different cuts: no one cut for all
        values["model"]["freeze_blocks"], values["train"]["trunk_views"] = 0, 0
    values["train"]["refit"] = any(c.train.refit for c in configs)  # then validation was training data for one
    values["infer"]["temperature"] = None  # a member's temperatures do not fit the average: calibrate the ensemble
    values["infer"]["temperature_on"] = "output"
    values["infer"].update(infer or {})
    cfg = config_from_dict(values)
    return {"state_dict": state, "sevenpoint": {
        "config": cfg.to_dict(), "schema": SCHEMA_FINGERPRINT, "ood": ood, "train_majority": majority,
        "members": [{"checkpoint": str(p), "seed": c.seed} for p, c in zip(members, configs)]}}


def load_derm_backbone(model: FusionModel, path: str | os.PathLike) -> int:
    """Copy the dermoscopy backbone of the checkpoint at `path` (any variant with a dermoscopy branch;
    an ensemble's first member) into `model`'s (`model.derm_init`); returns the number of tensors.
    Refuses a checkpoint whose dermoscopy backbone is another network."""
    if model.derm is None:
        raise CheckpointError(f"model.derm_init={path}: this {model.cfg.variant} model has no dermoscopy branch")
    source, cfg, _ = load_model(path)
    source = source.members[0] if isinstance(source, FusionEnsemble) else source
    if source.derm is None:
        raise CheckpointError(f"model.derm_init={path}: that {cfg.model.variant} checkpoint has no dermoscopy branch")
    try:
        model.derm.backbone.load_state_dict(source.derm.backbone.state_dict())
    except RuntimeError as exc:
        raise CheckpointError(f"model.derm_init={path}: its dermoscopy backbone ({cfg.model.backbone_text}) does not "
                              f"fit this model's ({model.cfg.backbone_text}): {str(exc).splitlines()[0]}") from None
    return len(source.derm.backbone.state_dict())
