"""The inference API: `Predictor.from_checkpoint(path).predict(derm=..., clinic=..., meta={...})`.

No training code: a checkpoint (or ONNX export) is loaded, images go through the same crop,
resize and centring as in `evaluate`, and the input gate / out-of-distribution score of `ood`
apply. Any of the three inputs may be missing; the result says which branches ran. Batched
prediction runs one forward pass per batch.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .artifacts import DEFAULT_LEVEL, Artifacts, CorrectionError, parse_corrections, postprocess
from ..checkpoint import load_model
from ..config import TTA_MODES, config_from_dict
from ..data.images import ImageError, crop_and_resize, open_rgb
from ..data.transforms import to_tensor, transforms_for, tta_views
from ..runtime import (PATHS, ThreadGovernor, autotune_cache_file, bf16_autocast, path_candidates, path_key,
                       pick_path, use_bf16, use_channels_last)
from ..models import BRANCHES, freeze_for_inference, split_outputs
from .ood import GateError, OODModel, descriptor, gate
from ..schema import (DIAG_INDEX, MEL_CLASS, MELANOMA_THRESHOLD, META_FIELDS, TASK_BY_NAME, TASKS,
                     encode_meta, score_rule, seven_point_score)

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class PredictError(ValueError):
    """Input the predictor cannot use; the message names the input and the reason."""


@dataclass
class TaskResult:
    task: str
    probabilities: dict[str, float]
    predicted: str
    predicted_name: str
    predicted_index: int


@dataclass
class Prediction:
    """One case's result. `attention` holds aggregated maps (h, w) per `branch.stage`;
    `attention_heads` the per-head maps (K, h, w)."""

    tasks: dict[str, TaskResult]
    diagnosis: str
    diagnosis_name: str
    seven_point_score: int
    melanoma_flag: bool
    melanoma_probability: float
    branches_used: list[str]
    inputs_used: dict[str, bool]
    attention: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    attention_heads: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    # How unlike the training dermoscopy images the derm input looks (sevenpoint.infer.ood); None when
    # there is no derm input or the checkpoint has no OOD statistics.
    ood_score: float | None = None
    ood_threshold: float | None = None
    ood_warning: bool = False
    # Per task, the classes of its conformal prediction set at `set_level` (None: the checkpoint has no
    # sets). `uncertain`: the diagnosis set is not a single class, or, without sets, the most probable
    # diagnosis is below 50 % (`sevenpoint.infer.artifacts.postprocess`); `uncertain_why` says which, in words.
    sets: dict[str, list[str]] | None = None
    set_level: float | None = None
    uncertain: bool = False
    uncertain_why: str | None = None
    # The clinician's values for criteria ({task: class}); the score, the rule and (with a stacked model)
    # the diagnosis follow them (a value equal to the model's own answer changes nothing).
    # `diagnosis_source`: "image model" or "stacked" (criteria + image).
    corrections: dict[str, str] = field(default_factory=dict)
    diagnosis_source: str = "image model"
    # The melanoma referral point: `refer` is P(MEL) >= the threshold fitted on held-out cases for the
    # stated sensitivity (`triage`: threshold, sensitivity, held-out sensitivity / specificity, case counts);
    # None when the checkpoint carries no referral point.
    refer: bool | None = None
    triage: dict | None = None
    # Whether and how the probabilities shown were calibrated, and on what (`InferConfig.calibration_text`).
    calibration: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready (attention maps left out; draw them with `sevenpoint.infer.viz`)."""
        d = asdict(self)
        d.pop("attention")
        d.pop("attention_heads")
        d["score_rule"] = score_rule()
        d["melanoma_threshold"] = MELANOMA_THRESHOLD
        d["triage_text"] = self.triage_text()
        return d

    def triage_text(self) -> str | None:
        """The referral decision in one sentence, with how the point was chosen and what it measured."""
        if self.triage is None:
            return None
        t = self.triage
        spec = t.get("held_out_specificity")
        measured = (f"held out: sensitivity {t['held_out_sensitivity']:.0%}"
                    + (f", specificity {spec:.0%}" if spec is not None else "")
                    + f" on {t['melanomas']} melanomas and {t['others']} other lesions")
        verdict = "refer" if self.refer else "no need to refer"
        sign = "≥" if self.refer else "<"
        return (f"{verdict} at the {t['sensitivity']:.0%}-sensitivity point: P(MEL) {self.melanoma_probability:.0%} "
                f"{sign} {t['threshold']:.0%} ({measured})")


def _image_array(value: ImageInput, name: str) -> Image.Image:
    if isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise PredictError(f"{name}: array of shape {arr.shape} is not an (H, W, 3) image")
        if not np.isfinite(arr).all():
            raise PredictError(f"{name}: array contains NaN or infinite values")
        if arr.dtype != np.uint8:
            scale = 255.0 if arr.max() <= 1.0 else 1.0
            arr = np.clip(arr.astype(np.float64) * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    try:
        return open_rgb(value, name=name if not isinstance(value, (str, os.PathLike)) else None)
    except ImageError as exc:
        raise PredictError(str(exc)) from exc


def validate_meta(meta: Mapping[str, object] | None) -> np.ndarray | None:
    """One-hot metadata or None when absent; a partial or unknown value raises naming the field."""
    if not meta or all(v in (None, "") for v in meta.values()):
        return None
    unknown = set(meta) - set(META_FIELDS)
    if unknown:
        raise PredictError(f"unknown metadata field(s) {sorted(unknown)}; known: {', '.join(META_FIELDS)}")
    missing = [k for k in META_FIELDS if meta.get(k) in (None, "")]
    if missing:
        raise PredictError(f"metadata is partial: missing {', '.join(missing)} (give all of "
                           f"{', '.join(META_FIELDS)}, or none)")
    try:
        return encode_meta(meta, row="input")
    except ValueError as exc:
        raise PredictError(str(exc).replace("row input, ", "")) from exc


class _TorchBackend:
    def __init__(self, model: torch.nn.Module, cfg, precision: str, channels_last: bool | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.bf16 = use_bf16(precision, on_gpu=self.device.type == "cuda")
        self.channels_last = use_channels_last(cfg.train.channels_last) if channels_last is None else channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, derm, clinic, meta, has):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        dev = self.device
        with bf16_autocast(self.bf16, device_type=dev.type):
            out = self.model(derm.to(dev).contiguous(memory_format=fmt), clinic.to(dev).contiguous(memory_format=fmt),
                             meta.to(dev), *(has[k].to(dev) for k in ("derm", "clinic", "meta")))
        heads = {k: v.float().cpu().numpy() for k, v in out.attention.items()}
        members = [[p.float().cpu().numpy() for p in m] for m in out.members or []]
        return ([p.float().cpu().numpy() for p in out.probs], out.branches_used().cpu().numpy(),
                {k: v.sum(axis=1) for k, v in heads.items()}, heads, members)


class _FrozenBackend:
    """The traced + frozen graph (`freeze_for_inference`): the lowest-latency CPU path measured
    (docs/PERFORMANCE.md). Gives aggregated attention maps only (no per-head maps)."""

    def __init__(self, model: torch.nn.Module, cfg, precision: str, channels_last: bool | None = None) -> None:
        self.bf16 = use_bf16(precision, on_gpu=False)  # the graph is always built channels_last
        self.graph = freeze_for_inference(model, 1, cfg.data.image_size, cfg.meta_dim, self.bf16)
        self.names = self.graph.attention_names

    @torch.no_grad()
    def __call__(self, derm, clinic, meta, has):
        fmt = torch.channels_last
        with bf16_autocast(self.bf16, tracing=True):
            out = self.graph(derm.contiguous(memory_format=fmt), clinic.contiguous(memory_format=fmt), meta,
                             *(has[k].float() for k in ("derm", "clinic", "meta")))
        probs, used, maps, members = split_outputs(out, self.names, self.graph.members)
        attention = {k: v.float().numpy() for k, v in zip(self.names, maps)}
        return ([p.float().numpy() for p in probs], used.numpy() > 0.5, attention, {},
                [[p.float().numpy() for p in m] for m in members])


class _OnnxBackend:
    """ONNX Runtime on an exported model (`sevenpoint export`): the fast CPU path for serving."""

    def __init__(self, path: str | os.PathLike) -> None:
        from .export import ort_session

        self.session = ort_session(path)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "sevenpoint_config" not in meta:
            raise PredictError(f"{path}: not a sevenpoint ONNX export (no sevenpoint_config metadata)")
        self.cfg = config_from_dict(json.loads(meta["sevenpoint_config"]))
        self.attention_names = json.loads(meta["sevenpoint_attention"])
        # an ensemble's export also gives each member's probabilities ("member<k>_prob_<task>", after the maps)
        self.members = len({o.name.split("_")[0] for o in self.session.get_outputs() if o.name.startswith("member")})
        self.ood = OODModel.from_dict(json.loads(meta.get("sevenpoint_ood", "null")))
        self.artifacts = Artifacts.from_section(json.loads(meta.get("sevenpoint_artifacts", "{}")))
        # `export --int8`: how it was calibrated and its checked accuracy; None for an fp32 export
        self.quantization = json.loads(meta.get("sevenpoint_quantization", "null"))

    def __call__(self, derm, clinic, meta, has):
        feeds = {"derm": derm.numpy(), "clinic": clinic.numpy(), "meta": meta.numpy(),
                 **{f"has_{k}": v.float().numpy() for k, v in has.items()}}
        probs, used, maps, members = split_outputs(self.session.run(None, feeds), self.attention_names, self.members)
        return probs, used > 0.5, dict(zip(self.attention_names, maps)), {}, members


@dataclass
class Prepared:
    """One case's model inputs after `Predictor.prepare` (decoded, checked, resized)."""

    derm: torch.Tensor
    clinic: torch.Tensor
    meta: torch.Tensor
    has: dict[str, bool]
    ood: float | None
    corrections: dict[str, int] = field(default_factory=dict)


class Predictor:
    """`Predictor.from_checkpoint(path)` (PyTorch) or `Predictor.from_onnx(path)` (ONNX Runtime)."""

    def __init__(self, backend, cfg, tta: str | None = None, ood: OODModel | None = None,
                 artifacts: Artifacts | None = None) -> None:
        self.backend = backend
        self.cfg = cfg
        self.ood = ood
        self.artifacts = artifacts or Artifacts()
        self.set_level = DEFAULT_LEVEL  # the conformal level of the prediction sets (callers may change it)
        self.size = cfg.data.image_size
        self.crop = cfg.data.crop
        self.eval_transform = transforms_for(cfg.data)[1]  # the same centred window as `evaluate`
        self.tta = cfg.infer.tta if tta is None else tta  # the checkpoint's own setting by default
        self.choice = "as given"  # how the numeric path was chosen (from_checkpoint fills it in)
        self.governor: ThreadGovernor | None = None  # serve sets one: fewer threads while a neighbour is busy
        if self.tta not in TTA_MODES:
            raise PredictError(f"tta {self.tta!r}: expected one of {', '.join(TTA_MODES)}")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, precision: str = "auto", backend: str = "auto",
                        tta: str | None = None, device: torch.device | str = "cpu", heads: bool = False) -> Predictor:
        """`backend`: auto (the fastest engine measured on this CPU), torch (eager, per-head attention maps),
        frozen (traced + frozen graph, aggregated maps) or onnx (an exported .onnx file). `tta=None` applies
        the checkpoint's `infer.tta`.

        Measured, not assumed: every open candidate is timed at batch 1 round robin and the fastest kept
        (cached per CPU identity, torch version, threads, engines and model: `runtime.autotune`; `choice`
        says which and why). Candidates: per engine, the numeric paths `runtime.path_candidates` leaves
        open (precision: fp32 and, on a CPU with bf16 units, bf16 — `fp32` / `bf16` force one; layout:
        channels_last on and off for eager unless the checkpoint's `train.channels_last` pins it; the frozen
        graph is channels_last). With auto, ONNX Runtime fp32 runs on an export of this checkpoint made once
        (parity-checked against eager, kept beside the autotune cache: `onnx_cache`), and ONNX Runtime int8 on
        the int8 export `export --int8` accepted for this checkpoint, if any (`cached_export`). `heads=True`
        (per-head maps wanted) leaves eager alone. `device` (a GPU): eager fp32 unless `precision="bf16"`; no timing."""
        if backend == "onnx" or str(path).endswith(".onnx"):
            return cls.from_onnx(path, tta)
        if backend not in ("auto", "torch", "frozen"):
            raise PredictError(f"backend {backend!r}: expected auto, torch, frozen or onnx")
        if precision not in ("auto", "fp32", "bf16"):
            raise PredictError(f"precision {precision!r}: expected auto, fp32 or bf16")
        device = torch.device(device)
        if device.type != "cpu" and backend == "frozen":
            raise PredictError(f"backend {backend!r} runs on the CPU; use backend torch on {device}")
        model, cfg, section = load_model(path)
        if device.type != "cpu":
            predictor = cls(_TorchBackend(model, cfg, "bf16" if precision == "bf16" else "fp32", device=device), cfg,
                            tta, OODModel.from_dict(section.get("ood")), Artifacts.from_section(section))
            predictor.choice = f"{device}, {'bf16' if precision == 'bf16' else 'fp32'} (as asked; not timed)"
            return predictor
        if backend != "auto":
            engines = [backend]  # as asked (per-head maps or not)
        else:
            engines = ["torch"] if heads else ["torch", "frozen", "onnx"]
            if not heads and cached_export(path, "int8").is_file():  # `export --int8` accepted one for this file
                engines.append("onnx-int8")
        candidates, notes = {}, []  # name -> (engine, numeric path)
        for engine in engines:
            if engine in ("onnx", "onnx-int8"):  # ONNX Runtime: one numeric path each, the export's own
                numeric = "int8" if engine == "onnx-int8" else "fp32"
                name = "onnx int8" if engine == "onnx-int8" else "onnx"
                if precision == "bf16":
                    notes.append(f"ONNX Runtime {numeric} not timed: bf16 asked")
                else:
                    candidates[name] = (engine, numeric)
                continue
            # the open paths: precision as asked (bf16 timed only on a CPU with bf16 units), layout as the
            # checkpoint's train.channels_last says; the frozen graph is always channels_last
            paths, ruled_out = path_candidates(precision, "on" if engine == "frozen" else cfg.train.channels_last)
            if engine == "frozen":
                ruled_out = ruled_out.replace("channels_last on pinned", "the frozen graph is channels_last")
            notes.append(ruled_out)
            for name in paths:
                candidates[name if len(engines) == 1 else f"{engine} {name}"] = (engine, name)
        if heads and backend == "auto":
            notes.append("per-head maps asked: eager only")

        built = {}  # backends autotune had to build for timing (none when the choice is cached or alone)

        def build(name: str):
            engine, numeric = candidates[name]
            if engine == "onnx":
                return _OnnxBackend(onnx_cache(path, model, cfg, section))
            if engine == "onnx-int8":
                return _OnnxBackend(cached_export(path, "int8"))
            cl, bf16 = PATHS[numeric]
            make = _FrozenBackend if engine == "frozen" else _TorchBackend
            return make(copy.deepcopy(model) if len(candidates) > 1 else model, cfg, "bf16" if bf16 else "fp32", cl)

        def timing(name: str):
            def make_call():
                built[name] = build(name)
                x = torch.rand(1, 3, cfg.data.image_size, cfg.data.image_size)
                return functools.partial(built[name], x, x.clone(), torch.zeros(1, cfg.meta_dim),
                                         {k: torch.ones(1, dtype=torch.bool) for k in ("derm", "clinic", "meta")})
            return make_call

        key = path_key(cfg, "+".join(engines), "batch1", "paths",
                       f"ensemble{cfg.train.ensemble}")
        ruled_out = "; ".join(dict.fromkeys(n for n in notes if n))
        choice, why = pick_path(key, candidates, ruled_out, timing, rounds=5)
        impl = built.get(choice) or build(choice)
        predictor = cls(impl, cfg, tta, OODModel.from_dict(section.get("ood")), Artifacts.from_section(section))
        predictor.choice = why
        return predictor

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, tta: str | None = None) -> Predictor:
        backend = _OnnxBackend(path)
        return cls(backend, backend.cfg, tta, backend.ood, backend.artifacts)

    @property
    def info(self) -> dict:
        m = self.cfg.model
        return {"variant": m.variant, "backbone": m.backbone_text, "attention": m.attention,
                "image_size": self.size, "tta": self.tta, "members": self.cfg.train.ensemble,
                "clinic_weight": self.cfg.infer.clinic_weight, "precision": self.choice,
                "temperature": None if self.cfg.infer.temperature is None else list(self.cfg.infer.temperature),
                "calibration": self.cfg.infer.calibration_text(self.artifacts.fitted_on),
                "backend": {_OnnxBackend: "onnx", _FrozenBackend: "frozen"}.get(type(self.backend), "torch"),
                "int8": getattr(self.backend, "quantization", None), "set_level": self.set_level,
                "stacked_diagnosis": None if self.artifacts.stacker is None else
                ("default" if self.artifacts.stacker_default else "for corrections"),
                "fitted_on": self.artifacts.fitted_on, "lacks": self.artifacts.missing()}

    def preprocess(self, image: ImageInput | None, name: str) -> tuple[torch.Tensor, np.ndarray] | None:
        """The model's input tensor and the resized image it came from; refuses what cannot be a lesion photo."""
        if image is None:
            return None
        img = _image_array(image, name)
        try:
            gate(img.size, name)
        except GateError as exc:
            raise PredictError(str(exc)) from None
        arr = crop_and_resize(img, self.size, self.crop, self.cfg.data.short_side)
        return to_tensor(self.eval_transform(image=arr)["image"]), arr

    def predict(self, derm: ImageInput | None = None, clinic: ImageInput | None = None,
                meta: Mapping[str, object] | None = None,
                corrections: Mapping[str, str] | None = None) -> Prediction:
        """One case. `corrections`: the clinician's value for any criterion ({"BWV": "ABS"}); the 7-point
        score, the rule and (with a stacked model in the checkpoint) the diagnosis follow them."""
        return self.predict_batch([{"derm": derm, "clinic": clinic, "meta": meta, "corrections": corrections}])[0]

    def predict_batch(self, cases: Sequence[Mapping[str, object]], batch_size: int = 16) -> list[Prediction]:
        """Many cases, one forward pass per `batch_size` of them."""
        results: list[Prediction] = []
        for start in range(0, len(cases), batch_size):
            chunk = cases[start:start + batch_size]
            labels = [f"case {start + i}" if len(cases) > 1 else "input" for i in range(len(chunk))]
            results += self.run([self.prepare(case, label) for case, label in zip(chunk, labels)])
        return results

    def prepare(self, case: Mapping[str, object], label: str = "input") -> Prepared:
        """Decode, check and resize one case's inputs (and score its OOD distance), without the model:
        every per-case error (`PredictError`) is raised here, so `run` can batch any prepared cases."""
        s = self.size
        derm, clinic = torch.zeros(3, s, s), torch.zeros(3, s, s)
        has = {"derm": False, "clinic": False, "meta": False}
        ood = None
        for key in ("derm", "clinic"):
            done = self.preprocess(case.get(key), f"{label} {key}")
            if done is not None:
                (derm if key == "derm" else clinic).copy_(done[0])
                has[key] = True
                if key == "derm" and self.ood is not None:
                    ood = float(self.ood.scores(descriptor(done[1]))[0])
        m = validate_meta(case.get("meta"))
        meta = torch.zeros(self.cfg.meta_dim)
        if m is not None:
            meta, has["meta"] = torch.from_numpy(m), True
        if not (has["derm"] or has["clinic"]):
            raise PredictError(f"{label}: give a dermoscopy image, a clinical photo, or both")
        if not any(has[k] for k in self.cfg.model.images):
            need = " or ".join({"derm": "a dermoscopy image", "clinic": "a clinical photo"}[k]
                               for k in self.cfg.model.images)
            raise PredictError(f"{label}: this {self.cfg.model.variant} model needs {need}")
        try:
            fixes = parse_corrections(case.get("corrections"))
        except CorrectionError as exc:
            raise PredictError(f"{label}: {exc}" if label != "input" else str(exc)) from None
        return Prepared(derm, clinic, meta, has, ood, fixes)

    def run(self, prepared: Sequence[Prepared]) -> list[Prediction]:
        """One forward pass (per test-time view) over prepared cases; a result per case, in order."""
        n = len(prepared)
        derm = torch.stack([p.derm for p in prepared])
        clinic = torch.stack([p.clinic for p in prepared])
        meta = torch.stack([p.meta for p in prepared])
        has = {k: torch.tensor([p.has[k] for p in prepared]) for k in ("derm", "clinic", "meta")}
        # Test-time views: probabilities averaged over the views, attention maps from the original one.
        views = list(zip(tta_views(derm, self.tta), tta_views(clinic, self.tta)))
        start = time.perf_counter()
        probs, used, attention, heads, members = self.backend(derm, clinic, meta, has)
        for view_derm, view_clinic in views[1:]:
            view = self.backend(view_derm, view_clinic, meta, has)
            probs = [a + b for a, b in zip(probs, view[0])]
            members = [[a + b for a, b in zip(mine, theirs)] for mine, theirs in zip(members, view[4])]
        if self.governor is not None:
            self.governor.record(n, time.perf_counter() - start)
        done = postprocess([p / len(views) for p in probs], self.artifacts, self.cfg.infer.output_temperature,
                           [p.corrections for p in prepared], self.set_level,
                           [[p / len(views) for p in m] for m in members] or None)
        probs, sets, stacked = done.probs, done.sets, done.stacked
        calibration = self.cfg.infer.calibration_text(self.artifacts.fitted_on)
        preds = np.stack([p.argmax(axis=1) for p in probs], axis=1)
        scores = seven_point_score(preds)
        results = []
        for i in range(n):
            tasks = {}
            for t, task in enumerate(TASKS):
                k = int(preds[i, t])
                tasks[task.name] = TaskResult(task.name, {c: float(probs[t][i, j]) for j, c in enumerate(task.classes)},
                                              task.classes[k], task.long_names[k], k)
            d = int(preds[i, DIAG_INDEX])
            branch_ok = dict(zip(BRANCHES, used[i].tolist()))
            keep = [key for key in attention if branch_ok.get(key.split(".")[0])]
            ood = prepared[i].ood
            results.append(Prediction(
                tasks=tasks, diagnosis=TASKS[DIAG_INDEX].classes[d], diagnosis_name=TASKS[DIAG_INDEX].long_names[d],
                seven_point_score=int(scores[i]), melanoma_flag=bool(scores[i] >= MELANOMA_THRESHOLD),
                melanoma_probability=float(probs[DIAG_INDEX][i, MEL_CLASS]),
                branches_used=[b for b in BRANCHES if branch_ok[b]],
                inputs_used={k: bool(v[i]) for k, v in has.items()},
                attention={k: np.asarray(attention[k][i]) for k in keep},
                attention_heads={k: np.asarray(heads[k][i]) for k in keep if k in heads},
                ood_score=ood, ood_threshold=self.ood.threshold if self.ood is not None else None,
                ood_warning=ood is not None and ood > self.ood.threshold,
                sets=None if sets is None else {task.name: [c for c, inside in zip(task.classes, sets[t][i]) if inside]
                                                for t, task in enumerate(TASKS)},
                set_level=None if sets is None else self.set_level,
                uncertain=bool(done.uncertain[i]), uncertain_why=done.why[i],
                corrections={name: TASK_BY_NAME[name].classes[c] for name, c in prepared[i].corrections.items()},
                diagnosis_source="stacked" if stacked[i] else "image model",
                refer=None if done.refer is None else bool(done.refer[i]),
                triage=None if done.triage is None else dict(done.triage[i]),
                calibration=calibration,
            ))
        return results


def cached_export(path: str | os.PathLike, kind: str = "fp32") -> Path:
    """Where the ONNX export of checkpoint `path` is kept (`kind` fp32: `onnx_cache`; int8: the one
    `export --int8` accepted): under the autotune cache's folder (`onnx/`), named by the checkpoint's absolute
    path, size and modification time, so a changed checkpoint never meets an old export."""
    import hashlib

    src = Path(path).resolve()
    stat = src.stat()
    # "|members": the graph's outputs include an ensemble's members' probabilities (exports before lacked them)
    name = hashlib.sha1(f"{src}|{stat.st_size}|{stat.st_mtime_ns}|members".encode()).hexdigest()[:20]
    return autotune_cache_file().parent / "onnx" / (f"{name}.onnx" if kind == "fp32" else f"{name}.{kind}.onnx")


def onnx_cache(path: str | os.PathLike, model: torch.nn.Module, cfg, section: dict) -> Path:
    """An ONNX export of checkpoint `path`, made once and kept (`cached_export`). Written only after its
    probabilities match eager fp32 within 1e-3 (else PredictError)."""
    from .export import check_parity, export_loaded

    target = cached_export(path)
    folder = target.parent
    name = target.name.removesuffix(".onnx")
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f"{name}.{os.getpid()}.tmp.onnx"
    try:
        export_loaded(copy.deepcopy(model), cfg, section, staged)
        gap = check_parity(path, staged)
        if gap > 1e-3:
            raise PredictError(f"{path}: its ONNX export differs from PyTorch by {gap:.2g} in probability; "
                               "use --backend torch or frozen")
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)
    return target


def save_heatmaps(prediction: Prediction, images: Mapping[str, ImageInput], out_dir: str | os.PathLike,
                  prefix: str = "") -> list[Path]:
    """Per input image: the image with its aggregated attention overlaid, and a grid of per-head maps."""
    from .viz import overlay_attention, head_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, maps in prediction.attention.items():
        branch, stage = key.split(".")
        source = images.get(branch)
        if source is None:  # hybrid maps are drawn on the dermoscopy image
            source = images.get("derm")
        if source is None:
            continue
        img = _image_array(source, branch)
        path = out_dir / f"{prefix}{branch}_{stage}_overlay.png"
        overlay_attention(img, maps).save(path)
        written.append(path)
        if key in prediction.attention_heads:  # per-head maps (PyTorch backend)
            path = out_dir / f"{prefix}{branch}_{stage}_heads.png"
            head_grid(prediction.attention_heads[key]).save(path)
            written.append(path)
    return written
