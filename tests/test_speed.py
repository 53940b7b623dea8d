import json

import numpy as np
import pytest
import torch

from sevenpoint.engine.bench import run_bench
from sevenpoint.engine.evaluate import evaluate
from sevenpoint.models import FusionModel
from sevenpoint.config import load_config
from sevenpoint.schema import TASKS


def test_bench_tiny_writes_all_fields(tmp_path, monkeypatch):
    import sevenpoint.engine.bench as bench

    real_calls = bench._onnx_calls

    def int8_made_fastest(*args, **kwargs):  # the real int8 model is built; its timed calls then cost nothing
        calls = real_calls(*args, **kwargs)
        assert "onnxruntime int8" in calls
        return {**calls, "onnxruntime int8": (lambda: None, lambda: None)}

    monkeypatch.setattr(bench, "_onnx_calls", int8_made_fastest)
    monkeypatch.setattr(bench, "cpu_supports_bf16", lambda: True)  # every path, whatever CPU runs the test
    r = run_bench("DCIHMM", size=32, backbone="xception_tiny", batch=2, warmup=1, repeats=3, latency_runs=2,
                  onnx=True, out=tmp_path, int8=True)
    saved = json.loads((tmp_path / "bench.json").read_text())
    for key in ("train_speedup", "infer_speedup", "latency_ms_p50", "latency_ms_p95", "peak_rss_mb", "cpu",
                "data", "train", "infer", "data_fraction_of_epoch", "torch", "onednn", "load_average_before",
                "load_average_after", "threads", "warnings"):
        assert key in saved, key
    for what in ("train", "infer"):
        rounds = saved[f"{what}_speedup_rounds"]
        assert rounds["rounds"] == 3 and rounds["min"] <= saved[f"{what}_speedup"] == rounds["median"] <= rounds["max"]
    assert set(saved["train"]) >= {"fp32 (naive)", "channels_last", "bf16", "channels_last+bf16"}
    assert "onnxruntime fp32" in saved["infer"]
    # int8 is timed (batch and batch 1) and reported beside, never chosen as the best path (here the fastest)
    assert "onnxruntime int8" in saved["infer"] and "onnxruntime int8" in saved["latency_ms"]
    assert "int8" not in saved["infer_best_path"] + saved["latency_best_path"]
    assert saved["int8_infer_speedup_rounds"]["rounds"] == 3 and "int8 inference" in (tmp_path / "bench.md").read_text()
    # batch-1 rows name what they time: the eager row is an eager torch path
    eager = [k for k in saved["latency_ms"] if k.startswith("torch ") and k != "torch fp32 (naive)"
             and "frozen" not in k]
    assert eager and all(k.removeprefix("torch ") in saved["train"] for k in eager)
    assert saved["train_speedup"] > 0 and saved["latency_ms_p50"] > 0
    assert (tmp_path / "bench.md").read_text().startswith("CPU:")
    if "DNN v" in torch.__config__.show():  # oneDNN's version is recorded (torch 2.13 names it MKL-DNN)
        assert saved["onednn"] and saved["onednn"][0].isdigit()
    assert r["data"]["decode_augment_ms_per_image"] > 0


@pytest.mark.parametrize("emulated", [False, True])
def test_bench_skips_emulated_bf16_unless_asked_and_shows_progress(tmp_path, monkeypatch, capsys, emulated):
    """On a CPU without bf16 units the bf16 paths would be emulated (most of a 40-minute run on AVX2):
    skipped and said so, unless --emulated; the frozen graph then runs in fp32. A bar shows progress."""
    import sevenpoint.engine.bench as bench

    monkeypatch.setattr(bench, "cpu_supports_bf16", lambda: False)
    r = run_bench("DIM", size=32, backbone="xception_tiny", batch=2, warmup=0, repeats=1, latency_runs=1,
                  onnx=False, out=tmp_path, emulated=emulated, progress=True)
    timed = set(r["train"]) | set(r["infer"]) | set(r["latency_ms"])
    if emulated:
        assert {"bf16", "channels_last+bf16"} <= set(r["train"]) and "emulated (timed as asked)" in r["note"]
        assert "frozen channels_last+bf16" in r["infer"] and r["skipped_paths"] == []
    else:
        assert not any("bf16" in name for name in timed), timed
        assert r["skipped_paths"] == ["bf16", "channels_last+bf16"] and "skipped" in r["note"]
        assert "frozen channels_last" in r["infer"] and "torch frozen channels_last" in r["latency_ms"]
        assert "skipped" in (tmp_path / "bench.md").read_text()
    assert "bench: " in capsys.readouterr().err  # the progress bar


def test_bench_times_paths_round_robin_and_ratios_per_round(monkeypatch):
    """A neighbour that slows one round slows every path in it: the per-round ratio stays put."""
    import sevenpoint.engine.bench as bench

    clock = {"t": 0.0, "round": 0}
    cost = {"naive": 1.0, "fast": 0.25}

    def fn(name):
        def call():
            slow = 4.0 if clock["round"] == 1 else 1.0  # round 1 shares the machine with something
            clock["t"] += cost[name] * slow
            if name == "fast":
                clock["round"] += 1
        return call

    import time

    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])  # the timer runtime.time_round_robin reads
    times = bench._interleaved({"naive": fn("naive"), "fast": fn("fast")}, warmup=0, repeats=3)
    assert times == {"naive": [1.0, 4.0, 1.0], "fast": [0.25, 1.0, 0.25]}
    r = bench._round_ratios(times, "fast", "naive", batch=1, data_s=lambda name: 0.0)
    assert r == {"median": 4.0, "min": 4.0, "max": 4.0, "rounds": 3} and not bench.too_wide(r)
    # timed one after the other, the same neighbour would have hit one path only
    skewed = {"naive": [1.0, 4.0, 1.0], "fast": [0.25, 0.25, 0.25]}
    wide = bench._round_ratios(skewed, "fast", "naive", batch=1, data_s=lambda name: 0.0)
    assert wide["min"] == 4.0 and wide["max"] == 16.0 and bench.too_wide(wide)


@pytest.mark.parametrize("channels_last, bf16, tol", [(True, False, 1e-4), (False, True, 0.05), (True, True, 0.05)])
def test_fast_paths_match_fp32(channels_last, bf16, tol):
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = FusionModel(cfg.model, cfg.data.image_size).eval()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    c = torch.rand(4, 3, 64, 64) * 2 - 1
    meta = torch.zeros(4, 14)
    with torch.no_grad():
        ref = model(x, c, meta).probs
        fast = model.to(memory_format=torch.channels_last) if channels_last else model
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            got = fast(x.contiguous(memory_format=fmt), c.contiguous(memory_format=fmt), meta).probs
    for a, b in zip(ref, got):
        assert float((a - b.float()).abs().max()) < tol


def test_bf16_and_fp32_evaluation_agree(tiny_run, synth_root, tmp_path):
    fp32 = evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path / "a", precision="fp32", progress=False)
    bf16 = evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path / "b", precision="bf16", progress=False)
    import pandas as pd

    a = pd.read_csv(tmp_path / "a" / "predictions.csv")
    b = pd.read_csv(tmp_path / "b" / "predictions.csv")
    # bf16 keeps ~3 significant digits: the probabilities move little (only near-ties can flip an answer, and a
    # 2-epoch model has many, so the answers themselves are not compared one by one)
    probs = [f"{t.name}_p_{c}" for t in TASKS for c in t.classes]
    moved = np.abs(a[probs].to_numpy() - b[probs].to_numpy()).max()
    assert moved <= 0.03, moved
    assert abs(fp32["average_accuracy"] - bf16["average_accuracy"]) <= 0.02
    assert np.isfinite(bf16["average_accuracy"])


def test_frozen_backend_matches_eager_and_handles_missing_inputs(tiny_run, synth_root):
    from sevenpoint.data import Derm7pt
    from sevenpoint.infer.predict import Predictor

    eager = Predictor.from_checkpoint(tiny_run["best_checkpoint"], precision="fp32")
    frozen = Predictor.from_checkpoint(tiny_run["best_checkpoint"], precision="fp32", backend="frozen")
    assert frozen.info["backend"] == "frozen"
    cases = Derm7pt.load(synth_root).split_cases("test")[:3]
    for case in cases:
        for kwargs in ({"derm": case.derm, "clinic": case.clinic, "meta": case.raw_meta}, {"derm": case.derm}):
            a, b = eager.predict(**kwargs), frozen.predict(**kwargs)
            assert a.branches_used == b.branches_used
            for name in a.tasks:
                assert a.tasks[name].probabilities == pytest.approx(b.tasks[name].probabilities, abs=1e-4)
    batch = frozen.predict_batch([{"derm": c.derm, "clinic": c.clinic, "meta": c.raw_meta} for c in cases])
    assert len(batch) == 3  # a graph traced at batch 1 also runs larger batches


def test_flop_count_behind_performance_md():
    """docs/PERFORMANCE.md's 18.2 GFLOP per case: `sevenpoint bench` records it as gflop_per_case_forward."""
    from sevenpoint.engine.bench import forward_gflop

    def gflop(variant):
        cfg = load_config("paper", [f"model.variant={variant}"])
        return forward_gflop(FusionModel(cfg.model, cfg.data.image_size), cfg.data.image_size, cfg.meta_dim)

    full, derm_only = gflop("DCIHMM"), gflop("DIM")
    assert full == pytest.approx(18.2, abs=0.1)
    assert 1.9 < full / derm_only < 2.1  # two backbones; the hybrid branch adds little
