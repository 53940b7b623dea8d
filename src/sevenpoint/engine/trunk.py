"""The trunk-feature cache's fill: each backbone's frozen part run once per image and view.

`train.trunk_views = V` trains on the frozen trunk's output read from disk (`data.trunk_store`) instead
of running the stem and the first `model.freeze_blocks` blocks, forward and backward, at every step.
`stores_for` names one store per branch (keyed by the trunk's frozen weights, so two branches with the
same ImageNet trunk share entries), `fill` computes the missing entries on the fastest engine this
machine has (eager, channels_last or ONNX Runtime, timed on the first batch and checked against eager
fp32), with a progress bar, optionally over several processes or GPUs. `prepare_trunk` is what `train`
calls: it fills whatever its datasets need and is not there, and a damaged entry is rebuilt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError, RunConfig
from ..data.cache import ImageCache, default_cache_dir, make_cache
from ..data.transforms import to_tensor, transforms_for
from ..data.trunk_store import TrunkDataset, TrunkStore, view_seed
from ..runtime import time_round_robin

ENGINES = ("eager", "channels_last", "onnxruntime")
PARITY = 1e-3  # max |engine - eager fp32| / max |eager fp32|: below fp16's own rounding of what is stored


class Trunk(nn.Module):
    """A backbone's frozen part as a module of its own (images -> trunk features), in eval mode."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone).eval()
        self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.trunk(x)


def trunk_root(cfg: RunConfig) -> Path:
    """Where trunk entries live: beside the decoded images (`data.cache_dir`, else the default cache)."""
    return (Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()) / "trunk"


def trunk_key(backbone: nn.Module, name: str, cfg: RunConfig) -> str:
    """What decides a view's features: the backbone, the cut and its frozen weights (hashed), the image
    geometry and the augmentation recipe (its settings and the library's version)."""
    d = cfg.data
    recipe = {"backbone": name, "cut": backbone.frozen_blocks, "image_size": d.image_size, "crop": d.crop,
              "short_side": d.short_side, "augmentation": d.augmentation, "augment": d.augment,
              "albumentations": metadata.version("albumentations"), "format": 1}
    h = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode())
    for layer in backbone.early_layers(backbone.frozen_blocks):
        for k, t in layer.state_dict().items():
            h.update(k.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def stores_for(model: nn.Module, cfg: RunConfig) -> dict[str, tuple[TrunkStore, Trunk]]:
    """modality -> (its store, its trunk) for each image branch of `model` (a `FusionModel`)."""
    images, root, size = make_cache(cfg), trunk_root(cfg), cfg.data.image_size
    out = {}
    for modality, branch in (("derm", model.derm), ("clinic", model.clinic)):
        if branch is None:
            continue
        name = cfg.model.derm_backbone if modality == "derm" and cfg.model.derm_backbone else cfg.model.backbone
        trunk = Trunk(branch.backbone)
        with torch.no_grad():
            shape = tuple(trunk(torch.zeros(1, 3, size, size)).shape[1:])
        out[modality] = (TrunkStore(root / trunk_key(branch.backbone, name, cfg), images, shape), trunk)
    return out


def image_views(images: ImageCache, cfg: RunConfig, path: Path, crop: int | None, views: int,
                transforms=None) -> torch.Tensor:
    """(1 + views, 3, S, S): the un-augmented image, then views 1..V of the training augmentation
    (`transforms`: `transforms_for(cfg.data)`, built once by a caller that makes many)."""
    train_tf, eval_tf = transforms or transforms_for(cfg.data)
    img = images.load(path, crop)
    out = [to_tensor(eval_tf(image=img)["image"])]
    for v in range(1, views + 1):
        train_tf.set_random_seed(view_seed(path, v))
        out.append(to_tensor(train_tf(image=img)["image"]))
    return torch.stack(out)


def _ort_runner(trunk: Trunk, sample: torch.Tensor):
    from ..infer.export import ort_session

    with tempfile.TemporaryDirectory(prefix="sevenpoint-trunk-") as folder:  # the session keeps the graph in memory
        path = Path(folder) / "trunk.onnx"
        with warnings.catch_warnings():  # the exporter's notes on constant folding of the static padding
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(trunk, (sample[:2],), str(path), input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=17,
                              dynamo=False)
        session = ort_session(path)
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def engine_runners(trunk: Trunk, sample: torch.Tensor, engines: tuple[str, ...] = ENGINES) -> dict:
    """name -> (images -> features) for each engine that can run here."""
    runners = {}
    for name in engines:
        if name == "eager":
            runners[name] = lambda x: trunk(x)
        elif name == "channels_last":
            cl = copy.deepcopy(trunk).to(memory_format=torch.channels_last)
            runners[name] = lambda x, cl=cl: cl(x.contiguous(memory_format=torch.channels_last)).contiguous()
        elif name == "onnxruntime":
            try:
                runners[name] = _ort_runner(trunk, sample)
            except Exception as exc:  # noqa: BLE001 - any export or runtime failure rules the engine out
                print(f"trunk fill: ONNX Runtime ruled out ({type(exc).__name__}: {exc})", flush=True)
        else:
            raise ValueError(f"unknown fill engine {name!r} (have: {', '.join(ENGINES)})")
    return runners


def choose_engine(trunk: Trunk, sample: torch.Tensor, engine: str = "auto") -> tuple[str, object, dict]:
    """(name, runner, report): the fastest engine on `sample` whose output matches eager fp32 within
    `PARITY` (relative to the largest feature); `engine` other than auto takes that one, still checked."""
    runners = engine_runners(trunk, sample, ENGINES if engine == "auto" else (engine,))
    with torch.no_grad():
        ref = trunk(sample)
        scale = float(ref.abs().max()) or 1.0
        parity = {n: float((run(sample) - ref).abs().max()) / scale for n, run in runners.items()}
        timed = {n: run for n, run in runners.items() if parity[n] <= PARITY}
        if not timed:
            raise RuntimeError(f"trunk fill: no engine matches eager fp32 (relative errors {parity})")
        seconds = time_round_robin({n: (lambda r=r: r(sample)) for n, r in timed.items()}, warmup=1,
                                   repeats=3 if len(timed) > 1 else 0)
    ms = {n: 1000 * statistics.median(t) / len(sample) if t else None for n, t in seconds.items()}
    name = min(timed, key=lambda n: ms[n] if ms[n] is not None else 0.0)
    return name, runners[name], {"engine": name, "ms_per_view": ms, "parity_rel_err": parity, "tolerance": PARITY}


def _fill_items(items: list[tuple[TrunkStore, Trunk, Path, int | None]], cfg: RunConfig, views: int, engine: str,
                batch: int, device: str, tick) -> dict:
    """Compute and write the entries `items` name (one process); returns the engine report."""
    report: dict = {}
    runners: dict[int, object] = {}  # per trunk (id), chosen on its first images
    transforms = transforms_for(cfg.data)
    for store, trunk, path, crop in items:
        x = image_views(store.images, cfg, path, crop, views, transforms)
        if device != "cpu":
            trunk = trunk.to(device)
            x = x.to(device)
        if id(trunk) not in runners:
            if device == "cpu":
                name, runners[id(trunk)], report = choose_engine(trunk, x, engine)
            else:
                runners[id(trunk)], report = trunk, {"engine": f"eager on {device}"}
        run = runners[id(trunk)]
        with torch.no_grad():
            feats = torch.cat([run(x[i:i + batch]) for i in range(0, len(x), batch)])
        store.write(path, crop, feats.float().cpu().numpy())
        tick(1)
    return report


def _worker(items, cfg, views, engine, batch, device, threads, queue) -> dict:
    torch.set_num_threads(threads)
    return _fill_items(items, cfg, views, engine, batch, device, lambda n: queue.put(n))


def fill(items: list[tuple[TrunkStore, Trunk, Path, int | None]], cfg: RunConfig, views: int, engine: str = "auto",
         batch: int = 32, processes: int = 1, devices: list[str] | None = None, progress: bool = True) -> dict:
    """Write the entries (1 + `views` views) for `items` (store, trunk, image, crop). With `processes` > 1
    each process takes every n-th image with cores / n threads (or one of `devices`, e.g. cuda:0, cuda:1).
    Returns what was done: images, seconds, the engine report."""
    start = time.perf_counter()
    devices = devices or ["cpu"]
    processes = max(processes, len(devices) if devices != ["cpu"] else 1)
    bar = tqdm(total=len(items), desc=f"trunk features ({views} views + 1)", unit="img", disable=not progress,
               dynamic_ncols=True)
    if processes <= 1 or len(items) < 2:
        report = _fill_items(items, cfg, views, engine, batch, devices[0], bar.update)
    else:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
                      // processes)
        with ctx.Manager() as manager, ctx.Pool(processes) as pool:
            queue = manager.Queue()  # the workers' progress, for the one bar here
            jobs = [pool.apply_async(_worker, (items[k::processes], cfg, views, engine, batch,
                                               devices[k % len(devices)], threads, queue)) for k in range(processes)]
            done = 0
            while done < len(items):
                if all(j.ready() for j in jobs) and queue.empty():
                    break
                try:
                    n = queue.get(timeout=0.5)
                except Exception:  # noqa: BLE001 - queue.Empty through the manager proxy
                    continue
                done += n
                bar.update(n)
            report = [j.get() for j in jobs][0]  # re-raises a worker's error
    bar.close()
    return {"images": len(items), "views": views, "seconds": round(time.perf_counter() - start, 1),
            "processes": processes, **report}


def missing(stores: dict[str, tuple[TrunkStore, Trunk]], needed: list[tuple[str, Path, int | None]], views: int,
            verify: bool = True) -> list[tuple[TrunkStore, Trunk, Path, int | None]]:
    """The (store, trunk, image, crop) of `needed` whose entry is absent, holds fewer than 1 + `views` views
    or (with `verify`) fails a checksum."""
    out, seen = [], set()
    for modality, path, crop in needed:
        store, trunk = stores[modality]
        entry = store.entry(path, crop)
        if entry in seen:
            continue
        seen.add(entry)
        if store.views_stored(path, crop) < views + 1 or (verify and not store.verify(path, crop)):
            out.append((store, trunk, path, crop))
    return out


def prepare_trunk(stores: dict[str, tuple[TrunkStore, Trunk]], cfg: RunConfig, datasets: list, progress: bool = True,
                  **fill_args) -> dict | None:
    """Fill what `datasets` (`TrunkDataset`s) read and the cache lacks, rebuilding damaged entries; returns the
    fill's report (None when everything was there)."""
    needed = [item for ds in datasets for item in ds.needed()]
    todo = missing(stores, needed, cfg.train.trunk_views)
    if not todo:
        return None
    return fill(todo, cfg, cfg.train.trunk_views, progress=progress, **fill_args)


def trunk_datasets(stores: dict[str, tuple[TrunkStore, Trunk]], cfg: RunConfig, data, splits: dict[str, bool]
                   ) -> dict[str, TrunkDataset]:
    """split -> `TrunkDataset` (value: whether a clinical-only model falls back to the dermoscopy photo)."""
    stores = {m: store for m, (store, _) in stores.items()}
    return {split: TrunkDataset(data, split, stores, cfg.train.trunk_views, fallback, cfg.meta_dim)
            for split, fallback in splits.items()}


def describe(report: dict | None) -> str:
    """One line about a fill, for the console."""
    if report is None:
        return "trunk features: every entry already cached"
    ms = ", ".join(f"{k} {v:.1f}" for k, v in report.get("ms_per_view", {}).items() if v is not None)
    return (f"trunk features: {report['images']} images x (1 + {report['views']}) views in {report['seconds']} s "
            f"on {report['engine']}" + (f" (ms per view: {ms})" if ms else ""))


def cache_trunk(cfg: RunConfig, data_dir, splits: tuple[str, ...] = ("train", "valid"), engine: str = "auto",
                processes: int = 1, devices: list[str] | None = None, progress: bool = True) -> dict | None:
    """`sevenpoint cache-trunk`: fill the entries a run of `cfg` on `data_dir` reads (its `splits`), ahead of
    training, e.g. over several processes or on GPUs; None when every entry is already there."""
    from ..data import load_dataset
    from ..models import FusionModel

    if not cfg.train.trunk_views:
        raise ConfigError("train.trunk_views is 0: give the number of views to cache (e.g. train.trunk_views=16)")
    data = load_dataset(data_dir, cfg.data.format, include_leaky_meta=cfg.data.include_leaky_meta)
    unknown = [s for s in splits if s not in data.splits]
    if unknown:
        raise ValueError(f"{data.root}: no split {', '.join(unknown)} (have: {', '.join(data.splits)})")
    model = FusionModel(cfg.model, cfg.data.image_size, cfg.meta_dim)
    if cfg.model.derm_init:
        from ..checkpoint import load_derm_backbone

        load_derm_backbone(model, cfg.model.derm_init)
    stores = stores_for(model, cfg)
    sets = trunk_datasets(stores, cfg, data, {s: cfg.model.clinic_only for s in splits})
    return prepare_trunk(stores, cfg, list(sets.values()), progress, engine=engine, processes=processes,
                         devices=devices)
