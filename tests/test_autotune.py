"""Measured path choice: `runtime.autotune` times candidates round robin, keeps the fastest, caches it
per key; `Predictor.from_checkpoint(precision="auto")` uses it on bf16 CPUs and says why."""

import json
import time

import pytest
import torch

from sevenpoint import runtime
from sevenpoint.infer import predict
from sevenpoint.engine.loss import multitask_loss
from sevenpoint.infer.predict import Predictor


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
    # prune: a candidate far behind in the warm-up call is not timed again, and the answer says so
    calls.update(slow=0, fast=0)
    choice, why = runtime.autotune("pruned", {"slow": ready(slow), "fast": ready(fast)}, rounds=3, cache=cache,
                                   prune=2.0)
    assert choice == "fast" and calls["slow"] == 1 and calls["fast"] == 4 and "slow dropped after" in why
    cache.write_text("{not json")
    assert "measured now" in runtime.autotune("cpu|torch|model", {"slow": ready(slow), "fast": ready(fast)}, rounds=1,
                                              cache=cache)[1]


def test_autotune_does_not_keep_a_choice_timed_on_shared_cores(tmp_path, monkeypatch):
    """A neighbour's load skews the timings, so such a choice serves this call only; the next measures again."""
    class Share(runtime.CoreShare):  # a chosen neighbour load
        others = 1.9

        def __init__(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(runtime, "CoreShare", Share)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime.torch, "get_num_threads", lambda: 2)
    monkeypatch.delenv("SEVENPOINT_AUTOTUNE_SHARED", raising=False)
    cache = tmp_path / "autotune.json"
    paths = {"slow": lambda: lambda: time.sleep(0.005), "fast": lambda: lambda: None}
    for _ in range(2):  # measured afresh each time, and never written
        choice, why = runtime.autotune("k", paths, rounds=1, cache=cache)
        assert choice == "fast" and "1.9 of 2 cores busy" in why and "not kept" in why and not cache.exists()
    Share.others = 0.3  # a light neighbour: 2 threads on 2 cores lose little to it
    assert "measured now (" in runtime.autotune("k", paths, rounds=1, cache=cache)[1]
    assert "measured earlier" in runtime.autotune("k", paths, rounds=1, cache=cache)[1]
    Share.others = 0.9  # one thread leaves a core free: a one-core neighbour does not count
    monkeypatch.setattr(runtime.torch, "get_num_threads", lambda: 1)
    assert "measured now (" in runtime.autotune("k1", paths, rounds=1, cache=cache)[1]
    Share.others = 1.9
    monkeypatch.setenv("SEVENPOINT_AUTOTUNE_SHARED", "keep")  # asked to keep it anyway
    assert "measured now (" in runtime.autotune("k2", paths, rounds=1, cache=cache)[1]
    assert set(json.loads(cache.read_text())) == {"k", "k1", "k2"}


def test_core_share_counts_other_processes_not_this_one(monkeypatch):
    import subprocess
    import sys

    with subprocess.Popen([sys.executable, "-c", "while True: pass"]) as spinner:
        try:
            time.sleep(0.3)  # the spinner is up
            with runtime.CoreShare() as share:
                time.sleep(1.0)
        finally:
            spinner.kill()
    assert share.others is not None and share.others > 0.6  # the spinner took about one core
    with runtime.CoreShare() as share:  # too short to tell from 10 ms ticks
        pass
    assert share.others is None
    # this process's own work is not a neighbour: 3 busy CPU seconds of which 1 its own -> 2 by others
    busy, own = iter([100.0, 103.0]), iter([5.0, 6.0])
    monkeypatch.setattr(runtime, "_busy_cpu_seconds", lambda: next(busy))
    monkeypatch.setattr(runtime, "_own_cpu_seconds", lambda: next(own))
    with runtime.CoreShare() as share:
        time.sleep(0.6)
    assert share.others == pytest.approx(2.0 / share.wall)


def stub(timed: list, answer: str):
    """An autotune that records the candidates it was offered and answers `answer`."""
    def autotune(key, candidates, **timing):
        timed.append(set(candidates))
        return answer, f"{answer}: measured now (stub)"
    return autotune


def test_predictor_path_is_measured_and_said(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("SEVENPOINT_AUTOTUNE", str(tmp_path / "autotune.json"))
    ckpt = tiny_run["best_checkpoint"]
    p = Predictor.from_checkpoint(ckpt, precision="fp32", backend="frozen")  # one path left: built untimed
    assert p.choice == "channels_last: the only candidate (precision fp32 pinned; the frozen graph is channels_last)"
    assert not p.backend.bf16
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    p = Predictor.from_checkpoint(ckpt, backend="frozen")
    assert "no bf16 units" in p.choice and not p.backend.bf16
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    timed = []

    monkeypatch.setattr(runtime, "autotune", stub(timed, "channels_last+bf16"))
    p = Predictor.from_checkpoint(ckpt, backend="frozen")
    assert timed[-1] == {"channels_last", "channels_last+bf16"}  # the frozen graph: precision only
    assert p.choice.startswith("channels_last+bf16: measured now (stub)") and p.backend.bf16
    assert p.info["precision"] == p.choice
    # the eager backend also times the layout (tiny.yaml leaves train.channels_last at auto) and builds the winner
    monkeypatch.setattr(runtime, "autotune", stub(timed, "fp32"))
    p = Predictor.from_checkpoint(ckpt, backend="torch")
    assert timed[-1] == set(runtime.PATHS) and not p.backend.channels_last and not p.backend.bf16
    monkeypatch.setattr(runtime, "autotune", stub(timed, "channels_last"))
    p = Predictor.from_checkpoint(ckpt, precision="fp32", backend="torch")  # fp32 forced: only the layout is left
    assert timed[-1] == {"fp32", "channels_last"} and p.backend.channels_last and not p.backend.bf16
    with pytest.raises(predict.PredictError, match="precision 'fp16'"):
        Predictor.from_checkpoint(ckpt, precision="fp16")


def test_auto_times_every_engine_and_keeps_the_one_measured_fastest(tiny_run, synth_root, tmp_path, monkeypatch):
    """backend auto: eager, frozen and ONNX Runtime (on an export made once, parity-checked, cached) are all
    candidates; the winner is what runs; per-head maps leave eager alone."""
    from sevenpoint.data import Derm7pt

    monkeypatch.setenv("SEVENPOINT_AUTOTUNE", str(tmp_path / "autotune.json"))
    ckpt = tiny_run["best_checkpoint"]
    timed = []

    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(runtime, "autotune", stub(timed, "onnx"))
    fast = Predictor.from_checkpoint(ckpt, precision="fp32")
    assert timed[-1] == {"torch fp32", "torch channels_last", "frozen channels_last", "onnx"}
    assert fast.info["backend"] == "onnx" and fast.choice.startswith("onnx: measured now")
    exported = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(exported) == 1  # kept for the next start: not exported again
    stamp = exported[0].stat().st_mtime_ns
    Predictor.from_checkpoint(ckpt, precision="fp32")
    assert exported[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "onnx").iterdir())) == 1
    case = Derm7pt.load(synth_root).split_cases("test")[0]
    monkeypatch.setattr(runtime, "autotune", stub(timed, "fp32"))
    eager = Predictor.from_checkpoint(ckpt, precision="fp32", backend="torch")
    a, b = fast.predict(derm=case.derm), eager.predict(derm=case.derm)
    for task in a.tasks:
        for c, v in a.tasks[task].probabilities.items():
            assert v == pytest.approx(b.tasks[task].probabilities[c], abs=1e-3)
    monkeypatch.setattr(runtime, "autotune", stub(timed, "channels_last"))
    heads = Predictor.from_checkpoint(ckpt, precision="fp32", heads=True)
    assert timed[-1] == {"fp32", "channels_last"} and heads.info["backend"] == "torch"
    forced = Predictor.from_checkpoint(ckpt, precision="fp32", backend="frozen", heads=True)
    assert forced.info["backend"] == "frozen"  # per-head maps narrow auto only, never an engine asked for


def test_thread_governor_drops_to_one_thread_when_passes_slow_down_and_retries(monkeypatch):
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


def test_path_candidates_follow_pinned_settings_and_the_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert set(runtime.path_candidates("auto", "auto")[0]) == set(runtime.PATHS)
    assert set(runtime.path_candidates("fp32", "auto")[0]) == {"fp32", "channels_last"}
    only, why = runtime.path_candidates("bf16", "on")
    assert only == {"channels_last+bf16": (True, True)} and "bf16 pinned" in why and "channels_last on pinned" in why
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)  # emulated bf16 is never timed
    cands, why = runtime.path_candidates("auto", "off")
    assert cands == {"fp32": (False, False)} and "no bf16 units" in why


def _tiny_model(*overrides):
    from sevenpoint.config import load_config
    from sevenpoint.models import FusionModel

    cfg = load_config("tiny", ["model.dropout=0.5", *overrides])
    return FusionModel(cfg.model, cfg.data.image_size, cfg.meta_dim), cfg


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_choose_path_times_the_open_paths_caches_the_winner_and_leaves_the_run_alone(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    model, cfg = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = tmp_path / "autotune.json"
    torch.manual_seed(7)
    cl, bf16, why = runtime.choose_path(mode, model, cfg, 4, "auto", "auto", rounds=1, cache=cache, loss=multitask_loss)
    after_timing = torch.random.get_rng_state()
    torch.manual_seed(7)
    assert torch.random.get_rng_state().equal(after_timing)  # the timed (dropout) steps drew nothing from the run's stream
    assert all(v.equal(model.state_dict()[k]) for k, v in before.items())  # timed on copies
    assert "measured now" in why and all(name in why for name in runtime.PATHS)
    (key, entry), = json.loads(cache.read_text()).items()
    assert f"|{mode}|batch4|" in key and runtime.PATHS[entry["choice"]] == (cl, bf16)
    # the cached winner is used as it is, whatever it is (here: another one than measured)
    other = next(n for n in runtime.PATHS if runtime.PATHS[n] != (cl, bf16))
    cache.write_text(json.dumps({key: {"choice": other, "why": "edited"}}))
    assert runtime.choose_path(mode, model, cfg, 4, "auto", "auto", cache=cache, loss=multitask_loss)[:2] == \
        runtime.PATHS[other]
    # a pinned setting narrows the candidates: one left is taken without timing
    assert runtime.choose_path(mode, model, cfg, 4, "fp32", "off", cache=cache) == \
        (False, False, "fp32: the only candidate (precision fp32 pinned; channels_last off pinned)")


def test_train_and_evaluate_use_and_report_the_measured_path(tiny_run, synth_root, tmp_path, monkeypatch):
    import dataclasses

    from sevenpoint.checkpoint import load_model
    from sevenpoint.engine import evaluate as ev

    # tiny.yaml pins fp32 (as the CPU recipes do): train timed only the two layouts, and says so
    assert "precision fp32 pinned" in tiny_run["path_choice"] and tiny_run["precision"] == "fp32"
    assert tiny_run["path_choice"].split(":")[0] == ("channels_last" if tiny_run["channels_last"] else "fp32")
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    m = ev.evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path / "e", progress=False)
    assert m["precision"] == "fp32" and "precision fp32 pinned" in m["path_choice"]  # the checkpoint's own setting
    assert ev.evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path / "b", precision="bf16",
                       progress=False)["precision"] == "bf16"  # an explicit flag wins
    model, cfg, _ = load_model(tiny_run["best_checkpoint"])
    free = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="auto"))
    bf16, cl, why = ev.inference_path(model, free, 4)
    assert all(name in why for name in runtime.PATHS)  # an unpinned checkpoint: all four paths timed


ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse sse2 avx fma avx2

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
"""
ZEN5 = ZEN3.replace("model\t\t: 1\n", "model\t\t: 2\n", 1).replace(
    "fma avx2\n", "fma avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16\n", 1).replace("cpu family\t: 25", "cpu family\t: 26", 1)


def _as_cpu(monkeypatch, text):
    monkeypatch.setattr(runtime, "_cpuinfo_text", lambda: text)
    runtime.cpu_fields.cache_clear()


def test_autotune_key_tells_cpus_with_one_model_name_apart(tmp_path, monkeypatch):
    """A cache shared between machines (an NFS home) must not hand a Zen 5's choice to a Zen 3: both
    say "AMD EPYC"; their family / model numbers and ISA flags differ, and so must the key."""
    _, cfg = _tiny_model()
    cache = tmp_path / "shared-home" / "autotune.json"
    try:
        for var in runtime.KERNEL_ENV:
            monkeypatch.delenv(var, raising=False)
        _as_cpu(monkeypatch, ZEN5)
        assert runtime.cpu_model() == "AMD EPYC" and "avx512_bf16" in runtime.cpu_flags()
        zen5_key = runtime.path_key(cfg, "train", "batch8")
        assert "family 26 model 2" in zen5_key and "avx512_bf16" in zen5_key
        winner = {"a": lambda: (lambda: None), "b": lambda: (lambda: time.sleep(0.005))}
        assert "measured now" in runtime.autotune(zen5_key, winner, rounds=1, cache=cache)[1]
        _as_cpu(monkeypatch, ZEN3)
        zen3_key = runtime.path_key(cfg, "train", "batch8")
        assert runtime.cpu_model() == "AMD EPYC" and zen3_key != zen5_key
        assert "avx512" not in zen3_key and "family 25 model 1 " in zen3_key
        # the Zen 3 measures afresh (and here a different path wins) instead of reading the Zen 5's entry
        flipped = {"a": lambda: (lambda: time.sleep(0.005)), "b": lambda: (lambda: None)}
        choice, why = runtime.autotune(zen3_key, flipped, rounds=1, cache=cache)
        assert choice == "b" and "measured now" in why
        assert set(json.loads(cache.read_text())) == {zen5_key, zen3_key}  # both kept side by side
        # the same Zen 3 later: its own entry
        assert runtime.autotune(zen3_key, winner, rounds=1, cache=cache) [0] == "b"
        # AVX2 emulation on the AVX-512 machine runs other kernels: another key too
        _as_cpu(monkeypatch, ZEN5)
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        emulated = runtime.path_key(cfg, "train", "batch8")
        assert emulated not in (zen5_key, zen3_key) and "ONEDNN_MAX_CPU_ISA=AVX2" in emulated
        assert not runtime.cpu_supports_bf16()  # oneDNN capped below bf16: bf16 would be emulated
        # and the core count this process may use
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        assert runtime.path_key(cfg, "train", "batch8") != zen5_key and "4 cores" in runtime.cpu_identity()
    finally:
        runtime.cpu_fields.cache_clear()
