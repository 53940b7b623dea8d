"""Measured path choice: `runtime.autotune` times candidates round robin, keeps the fastest, caches it
per key; `Predictor.from_checkpoint(precision="auto")` uses it on bf16 CPUs and says why."""

import json
import time

import pytest

from sevenpoint import predict, runtime
from sevenpoint.predict import Predictor


def test_autotune_keeps_the_fastest_and_caches_it(tmp_path):
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.01)

    def fast():
        calls["fast"] += 1

    cache = tmp_path / "autotune.json"
    def ready(fn):  # candidates are factories: built only when they must be timed
        def make():
            calls["built"] = calls.get("built", 0) + 1
            return fn
        return make

    choice, why = runtime.autotune("cpu|torch|model", {"slow": ready(slow), "fast": ready(fast)}, rounds=3,
                                   cache=cache)
    assert choice == "fast" and "measured now" in why and why.index("fast") < why.index("slow")
    assert calls == {"slow": 4, "fast": 4, "built": 2}  # one warm-up + 3 rounds each
    assert json.loads(cache.read_text())["cpu|torch|model"]["choice"] == "fast"
    # cached: answered without timing anything, even if the speeds changed since
    choice, why = runtime.autotune("cpu|torch|model", {"slow": ready(fast), "fast": ready(slow)}, cache=cache)
    assert choice == "fast" and "measured earlier" in why and calls == {"slow": 4, "fast": 4, "built": 2}
    # another key (another CPU, torch or model) is measured afresh; a damaged cache is re-measured
    assert runtime.autotune("other", {"a": ready(slow), "b": ready(fast)}, rounds=1, cache=cache)[0] == "b"
    cache.write_text("{not json")
    assert "measured now" in runtime.autotune("cpu|torch|model", {"slow": ready(slow), "fast": ready(fast)}, rounds=1,
                                              cache=cache)[1]


def test_predictor_precision_is_measured_on_bf16_cpus_and_said(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("SEVENPOINT_AUTOTUNE", str(tmp_path / "autotune.json"))
    ckpt = tiny_run["best_checkpoint"]
    assert Predictor.from_checkpoint(ckpt, precision="fp32").choice == "fp32: requested"
    monkeypatch.setattr(predict, "cpu_supports_bf16", lambda: False)
    p = Predictor.from_checkpoint(ckpt)
    assert p.choice.startswith("fp32: this CPU has no bf16") and not p.backend.bf16
    monkeypatch.setattr(predict, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(predict, "autotune", lambda key, candidates: ("bf16", "bf16: measured now (stub)"))
    p = Predictor.from_checkpoint(ckpt, backend="frozen")
    assert p.choice == "bf16: measured now (stub)" and p.backend.bf16 and p.info["precision"] == p.choice
    with pytest.raises(predict.PredictError, match="precision 'fp16'"):
        Predictor.from_checkpoint(ckpt, precision="fp16")


def test_thread_governor_drops_to_one_thread_when_passes_slow_down_and_retries(monkeypatch):
    import torch

    now = [0.0]
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    gov = runtime.ThreadGovernor(full=2, window=3, slow=1.6, retry_s=10, clock=lambda: now[0])
    for t in (0.040, 0.041, 0.039, 0.042):  # idle: stays at full width
        gov.record(1, t)
    gov.record(8, 0.30)  # another batch size has its own reference
    assert gov.threads == 2 and threads == []
    for t in (0.17, 0.18, 0.17):  # a busy neighbour: 4x slower
        gov.record(1, t)
    assert gov.threads == 1 and threads == [1]
    now[0] = 5.0
    gov.record(1, 0.07)
    assert gov.threads == 1  # not before retry_s
    now[0] = 11.0
    gov.record(1, 0.07)
    assert gov.threads == 2 and threads == [1, 2]  # tries the full width again
    for t in (0.041, 0.040, 0.043):  # neighbour gone: fast again, stays
        gov.record(1, t)
    assert gov.threads == 2 and gov.switches == 2
