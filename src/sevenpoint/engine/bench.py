"""`run_bench()`: training / inference throughput of every CPU path against naive fp32, in one process.

Naive = fp32, default memory layout, JPEG decoded (+ cropped, resized, augmented) every step.
Fast paths = channels_last, bf16 autocast, both, optionally torch.compile; ONNX Runtime for
inference; images from the decoded-image cache. Throughput counts data + compute per case
(a single process, as with `num_workers=0`), so the ratios include the data pipeline.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import resource
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import load_config
from ..data.cache import ImageCache
from ..data.images import load_image
from ..data.transforms import to_tensor, train_transform
from ..models import FusionModel
from ..schema import TASKS
from .loss import multitask_loss
from ..runtime import bf16_autocast, cpu_summary, cpu_supports_bf16, time_round_robin

PATHS = {  # name -> (channels_last, bf16)
    "fp32 (naive)": (False, False),
    "channels_last": (True, False),
    "bf16": (False, True),
    "channels_last+bf16": (True, True),
}


def _timeit(fn, warmup: int, repeats: int, tick=None) -> list[float]:
    """Seconds per call of `fn` over `repeats` calls after `warmup` untimed ones."""
    return _interleaved({"fn": fn}, warmup, repeats, tick=tick)["fn"]


SPREAD_WARN = 0.15  # a speed-up whose rounds spread beyond ±15 % of its median is not conclusive
_interleaved = time_round_robin


def _rates(times: list[float], batch: int, data_s: float) -> dict:
    """Median cases/s (compute only, and with the data pipeline's cost per case) and the rounds' spread."""
    per_round = [batch / t for t in times]
    return {"compute_cases_per_s": round(batch / statistics.median(times), 3),
            "cases_per_s": round(1 / (statistics.median(times) / batch + data_s), 3),
            "compute_cases_per_s_min": round(min(per_round), 3), "compute_cases_per_s_max": round(max(per_round), 3)}


def _round_ratios(times: dict[str, list[float]], path: str, base: str, batch: int, data_s) -> dict:
    """`path`'s speed-up over `base` in each round (cases/s with data costs), summarised."""
    ratios = [(t_base / batch + data_s(base)) / (t / batch + data_s(path))
              for t, t_base in zip(times[path], times[base])]
    return {"median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2), "max": round(max(ratios), 2),
            "rounds": len(ratios)}


def too_wide(ratio: dict) -> bool:
    """Whether a speed-up's rounds spread beyond ±SPREAD_WARN of its median."""
    return ratio["max"] - ratio["min"] > 2 * SPREAD_WARN * ratio["median"]


def _onednn_version() -> str | None:
    import re

    found = re.search(r"(?:oneDNN|MKL-DNN) v([\d.]+)", torch.__config__.show())  # torch 2.13 says "MKL-DNN"
    return found.group(1) if found else None


def _latency_ms(fn, warmup: int, runs: int, tick=None) -> dict:
    """p50 and p95 of `runs` timed calls of `fn`, in milliseconds."""
    times = np.array(_timeit(fn, warmup, runs, tick=tick)) * 1000
    return {"p50": round(float(np.percentile(times, 50)), 2), "p95": round(float(np.percentile(times, 95)), 2)}


def _frozen_call(model: FusionModel, n: int, size: int, meta_dim: int, bf16: bool):
    """A no-argument call of the traced + frozen graph (`freeze_for_inference`) on a batch of `n`."""
    from ..models import freeze_for_inference

    graph = freeze_for_inference(copy.deepcopy(model), n, size, meta_dim, bf16)
    derm, clinic, meta = _inputs(n, size, meta_dim, True)
    flags = torch.ones(n)

    @torch.no_grad()
    def call():
        with bf16_autocast(bf16, tracing=True):
            graph(derm, clinic, meta, flags, flags, flags)

    return call


def _inputs(n: int, size: int, meta_dim: int, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    derm = (torch.rand(n, 3, size, size, generator=g) * 2 - 1).contiguous(memory_format=fmt)
    clinic = (torch.rand(n, 3, size, size, generator=g) * 2 - 1).contiguous(memory_format=fmt)
    meta = torch.zeros(n, meta_dim)
    meta[:, [0, 2, 11]] = 1
    return derm, clinic, meta


def _data_costs(size: int, n_images: int, workdir: Path) -> dict:
    """ms per image: JPEG decode + crop + resize + augment (uncached) vs cache read + augment."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_images):  # real Derm7pt images are 768x512 JPEGs
        arr = (rng.random((512, 768, 3)) * 60 + np.linspace(100, 180, 768)[None, :, None]).astype(np.uint8)
        p = workdir / f"img{i}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    aug = train_transform(1.0)
    cache = ImageCache(workdir / "cache", size=size, crop=25)
    for p in paths:
        cache.load(p)  # warm the cache

    def uncached():
        for p in paths:
            to_tensor(aug(image=load_image(p, size, 25))["image"])

    def cached():
        for p in paths:
            to_tensor(aug(image=cache.load(p))["image"])

    t_unc = statistics.median(_timeit(uncached, 1, 3)) / n_images * 1000
    t_cac = statistics.median(_timeit(cached, 1, 3)) / n_images * 1000
    return {"decode_augment_ms_per_image": round(t_unc, 3), "cached_augment_ms_per_image": round(t_cac, 3),
            "cache_speedup": round(t_unc / t_cac, 2)}


def forward_gflop(model: FusionModel, size: int, meta_dim: int) -> float:
    """FLOPs of one case's eval forward pass (torch.utils.flop_counter; a multiply-add = 2), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size)
    model = copy.deepcopy(model).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, x, torch.zeros(1, meta_dim))
    return round(counter.get_total_flops() / 1e9, 2)


def run_bench(variant: str = "DCIHMM", size: int = 299, backbone: str = "xception", batch: int = 8,
              warmup: int = 2, repeats: int = 5, latency_runs: int = 20, compile: bool = False,
              onnx: bool = True, out: str | Path | None = None, threads: int | None = None,
              freeze: bool = True, int8: bool = False, emulated: bool = False, progress: bool = True) -> dict:
    """Time training and inference paths of one model round robin; `int8` adds ONNX Runtime int8 (static
    QDQ calibrated on random inputs: a speed figure only, outside the best-path choice, because its
    accuracy is only known for trained weights — `sevenpoint export --int8` checks that).

    On a CPU without bf16 units the bf16 paths are emulated (on AVX2 they took most of a 40-minute
    run) and are skipped, saying so, unless `emulated`; the frozen graph and the compiled path then
    run in fp32. `progress` shows a bar over every timed call."""
    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(None, [f"model.variant={variant}", f"data.image_size={size}", f"model.backbone={backbone}",
                             "model.pretrained=false"] + (["model.attention_heads=4", "model.hybrid_channels=32"]
                                                          if backbone == "xception_tiny" else []))
    torch.manual_seed(0)
    base = FusionModel(cfg.model, size, cfg.meta_dim)
    meta_dim = cfg.meta_dim
    result: dict = {"cpu": cpu_summary(), "variant": variant, "backbone": backbone, "image_size": size,
                    "batch": batch, "threads": torch.get_num_threads(), "repeats": repeats, "warmup": warmup,
                    "torch": torch.__version__, "onednn": _onednn_version(),
                    "load_average_before": [round(x, 2) for x in os.getloadavg()], "timing": "round robin"}
    result["gflop_per_case_forward"] = forward_gflop(base, size, meta_dim)
    paths = dict(PATHS)
    native_bf16 = cpu_supports_bf16()
    if not native_bf16 and emulated:
        result["note"] = "this CPU has no native bf16 (AVX512-BF16/AMX): bf16 paths are emulated (timed as asked)"
    elif not native_bf16:
        paths = {k: v for k, v in paths.items() if not v[1]}
        result["note"] = ("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 paths skipped (they would be "
                          "emulated; --emulated times them); the frozen graph runs in fp32")
    result["skipped_paths"] = sorted(set(PATHS) - set(paths))
    fast_bf16 = native_bf16 or emulated  # the frozen / compiled paths' precision
    fast = f"channels_last{'+bf16' if fast_bf16 else ''}"

    with tempfile.TemporaryDirectory() as tmp:
        data = _data_costs(size, 8, Path(tmp))
    result["data"] = data
    images_per_case = len(cfg.model.images)
    naive_data_s = images_per_case * data["decode_augment_ms_per_image"] / 1000
    fast_data_s = images_per_case * data["cached_augment_ms_per_image"] / 1000

    targets = torch.zeros(batch, len(TASKS), dtype=torch.long)
    variants = list(paths.items()) + ([(f"{fast}+compile", (True, fast_bf16))] if compile else [])
    train_fns, infer_fns, keep = {}, {}, []
    for name, (cl, bf16) in variants:
        model = copy.deepcopy(base)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        # static shapes: with automatic dynamic shapes inductor failed on the recompile (ValueRangeError, torch 2.13)
        run_model = torch.compile(model, dynamic=False) if "compile" in name else model
        inputs = _inputs(batch, size, meta_dim, cl)
        opt = torch.optim.Adam(model.parameters(), 1e-4)
        keep.append((model, opt))

        def step(model=model, run_model=run_model, inputs=inputs, opt=opt, bf16=bf16):
            model.train()
            with bf16_autocast(bf16):
                loss, _ = multitask_loss(run_model(*inputs), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        @torch.no_grad()
        def infer_step(model=model, run_model=run_model, inputs=inputs, bf16=bf16):
            model.eval()
            with bf16_autocast(bf16):
                run_model(*inputs)

        train_fns[name], infer_fns[name] = step, infer_step
    if freeze:  # traced + frozen DenseFusion under channels_last (+ bf16 where native; BN folded, oneDNN fusions)
        infer_fns[f"frozen {fast}"] = _frozen_call(base, batch, size, meta_dim, fast_bf16)
    onnx_single = {}
    if onnx or int8:
        for name, (call, single) in _onnx_calls(base, size, meta_dim, batch, fp32=onnx, int8=int8).items():
            infer_fns[name], onnx_single[name] = call, single
    # Round robin: each round times every path once, so load from a neighbour lands on all of them
    # alike and the per-round ratios stay meaningful; medians and spreads come from the rounds.
    from tqdm.auto import tqdm

    n_latency = 2 + bool(freeze) + len(onnx_single)
    bar = tqdm(total=(warmup + repeats) * (len(train_fns) + len(infer_fns)) + n_latency * (warmup + latency_runs),
               desc="bench: training paths", unit="call", disable=not progress, leave=False)
    train_times = _interleaved(train_fns, warmup, repeats, tick=bar.update)
    bar.set_description("bench: inference paths")
    infer_times = _interleaved(infer_fns, warmup, repeats, tick=bar.update)
    bar.set_description("bench: batch-1 latency")
    del keep
    gc.collect()

    def data_s(name):
        return naive_data_s if name == "fp32 (naive)" else fast_data_s

    train = {k: _rates(v, batch, data_s(k)) for k, v in train_times.items()}
    infer = {k: _rates(v, batch, data_s(k)) for k, v in infer_times.items()}
    latency: dict = {}
    # the fastest eager torch path (the frozen graph and ONNX Runtime have their own rows below)
    best_torch = max((k for k in infer if k != "fp32 (naive)" and k in dict(variants)),
                     key=lambda k: infer[k]["compute_cases_per_s"])
    for name in ("fp32 (naive)", best_torch):  # batch-1 latency, both images + metadata
        cl, bf16 = dict(variants).get(name, (True, fast_bf16))
        model = copy.deepcopy(base).eval()
        if cl:
            model = model.to(memory_format=torch.channels_last)
        run_single = torch.compile(model, dynamic=False) if "compile" in name else model  # time what the name says
        one = _inputs(1, size, meta_dim, cl)

        @torch.no_grad()
        def single():
            with bf16_autocast(bf16):
                run_single(*one)

        latency[f"torch {name}"] = _latency_ms(single, warmup, latency_runs, tick=bar.update)
    if freeze:
        latency[f"torch frozen {fast}"] = _latency_ms(
            _frozen_call(base, 1, size, meta_dim, fast_bf16), warmup, latency_runs, tick=bar.update)
    for name, single in onnx_single.items():
        latency[name] = _latency_ms(single, warmup, latency_runs, tick=bar.update)
    bar.close()

    naive = "fp32 (naive)"
    best_train = max(train, key=lambda k: train[k]["cases_per_s"])
    best_infer = max((k for k in infer if k != INT8), key=lambda k: infer[k]["cases_per_s"])
    best_lat = min((k for k in latency if k != INT8), key=lambda k: latency[k]["p50"])
    train_ratio = _round_ratios(train_times, best_train, naive, batch, data_s)
    infer_ratio = _round_ratios(infer_times, best_infer, naive, batch, data_s)
    warnings = [f"{what} speed-up varies {r['min']}x-{r['max']}x over the rounds (more than ±{SPREAD_WARN:.0%} "
                f"of its median): the machine was busy; too wide to conclude, rerun on idle cores"
                for what, r in (("train", train_ratio), ("inference", infer_ratio))
                if too_wide(r)]
    for w in warnings:
        print(f"warning: {w}", flush=True)
    result.update({
        "train": train, "infer": infer, "latency_ms": latency,
        "train_best_path": best_train, "infer_best_path": best_infer, "latency_best_path": best_lat,
        "train_speedup": train_ratio["median"], "infer_speedup": infer_ratio["median"],
        "train_speedup_rounds": train_ratio, "infer_speedup_rounds": infer_ratio, "warnings": warnings,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "int8_infer_speedup_rounds": _round_ratios(infer_times, INT8, naive, batch, data_s) if int8 else None,
        "latency_ms_p50": latency[best_lat]["p50"],
        "latency_ms_p95": latency[best_lat]["p95"],
        "data_fraction_of_epoch": round(fast_data_s / (1 / train[best_train]["compute_cases_per_s"]), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2))
        (out / "bench.md").write_text(bench_table(result))
    return result


def _onnx_calls(model: FusionModel, size: int, meta_dim: int, batch: int, fp32: bool = True,
                int8: bool = False) -> dict:
    """path name -> (no-argument ONNX Runtime call on a batch of `batch`, the same on one case): the
    fp32 export and/or its int8 quantisation (calibrated on a few random batches: speed only)."""
    from ..infer.export import export_model, ort_session, quantize_int8

    def feeds(n):
        d, c, m = _inputs(n, size, meta_dim, False)
        f = np.ones(n, np.float32)
        return {"derm": d.numpy(), "clinic": c.numpy(), "meta": m.numpy(), "has_derm": f, "has_clinic": f, "has_meta": f}

    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_model(copy.deepcopy(model), path, size, meta_dim)
        if fp32:
            sessions["onnxruntime fp32"] = ort_session(path)
        if int8:
            quantize_int8(path, Path(tmp) / "int8.onnx", (feeds(batch) for _ in range(4)))
            sessions[INT8] = ort_session(Path(tmp) / "int8.onnx")
    fb, f1 = feeds(batch), feeds(1)
    return {name: ((lambda s=sess: s.run(None, fb)), (lambda s=sess: s.run(None, f1))) for name, sess in sessions.items()}


INT8 = "onnxruntime int8"


def bench_table(r: dict) -> str:
    lines = [f"CPU: {r['cpu']['processor']} ({r['cpu']['machine']}), {r['threads']} threads; "
             f"AVX512-BF16 {r['cpu']['avx512_bf16']}, AMX-BF16 {r['cpu']['amx_bf16']}"
             + (f"; {r['note']}" if r.get("note") else ""),
             f"{r['variant']} / {r['backbone']} at {r['image_size']} px, batch {r['batch']}, medians of {r['repeats']} "
             f"rounds, paths timed round robin; torch {r['torch']}, oneDNN {r['onednn']}; load average "
             f"{r['load_average_before']} before, {r['load_average_after']} after",
             "", "| path | train cases/s (compute only) | infer cases/s (compute only) |", "|---|---:|---:|"]
    for name in r["infer"]:
        tr = r["train"].get(name)
        tr_s = f"{tr['cases_per_s']:.2f} ({tr['compute_cases_per_s']:.2f})" if tr else "–"
        inf = r["infer"][name]
        lines.append(f"| {name} | {tr_s} | {inf['cases_per_s']:.2f} ({inf['compute_cases_per_s']:.2f}) |")
    tr, inf = r["train_speedup_rounds"], r["infer_speedup_rounds"]
    lines += ["", f"train speed-up (best: {r['train_best_path']}) **{r['train_speedup']}x** (rounds {tr['min']}–"
                  f"{tr['max']}x); inference speed-up (best: {r['infer_best_path']}) **{r['infer_speedup']}x** "
                  f"(rounds {inf['min']}–{inf['max']}x)", *(f"**warning:** {w}" for w in r["warnings"]),
              *([f"int8 inference (ONNX Runtime, random calibration; not in the best-path choice: its accuracy "
                 f"is checked on trained weights by `sevenpoint export --int8`) **{i8['median']}x** "
                 f"(rounds {i8['min']}–{i8['max']}x)"] if (i8 := r.get("int8_infer_speedup_rounds")) else []),
              "", "| latency, batch 1 | p50 ms | p95 ms |", "|---|---:|---:|"]
    for name, v in r["latency_ms"].items():
        lines.append(f"| {name} | {v['p50']} | {v['p95']} |")
    d = r["data"]
    lines += ["", f"data: decode+crop+resize+augment {d['decode_augment_ms_per_image']} ms/image; from the cache "
                  f"{d['cached_augment_ms_per_image']} ms/image ({d['cache_speedup']}x); data pipeline = "
                  f"{100 * r['data_fraction_of_epoch']:.1f} % of an epoch's compute on the best path; "
                  f"peak RSS {r['peak_rss_mb']} MB"]
    return "\n".join(lines) + "\n"
