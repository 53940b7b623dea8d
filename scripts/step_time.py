"""Training-step time of a config's model under several override sets, and where one step's time goes.

Each candidate is `NAME=key=value,key=value` (config overrides; `NAME=` alone is the config as it is).
Round robin over the candidates (so a neighbour on the machine lands on all of them alike), batch 16,
fp32 + channels_last, random inputs, the real multi-task loss and AdamW (the recipe's optimiser, with
its two parameter groups' rates); prints the median per step. `--profile` then runs torch.profiler on
one step of each candidate and sums self CPU time by op class (depthwise / pointwise / dense
convolution forward and backward, BatchNorm, activations, optimiser, the rest).

    .venv/bin/python scripts/step_time.py v14= full=model.freeze_blocks=0 --profile
    .venv/bin/python scripts/step_time.py v14= f11=model.freeze_blocks=11 c11=model.freeze_blocks=11,train.trunk_views=1
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python scripts/step_time.py v14=   # emulated AVX2

(`cpu-recipe` is v14 since 2026-12-06: its members already freeze the stem and blocks 0-4.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict

import torch

from sevenpoint.config import load_config
from sevenpoint.engine.loss import multitask_loss
from sevenpoint.models import FusionModel
from sevenpoint.runtime import time_round_robin


def parse_candidate(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    return name, [o for o in overrides.split(",") if o]


def _conv_kind(weight_shape) -> str:
    # weight (C_out, C_in / groups, kh, kw): depthwise has one input channel per group
    if not weight_shape or len(weight_shape) != 4:
        return "conv (other)"
    if weight_shape[1] == 1 and weight_shape[2] > 1:
        return "depthwise conv"
    if weight_shape[2] == weight_shape[3] == 1:
        return "pointwise conv"
    return "dense conv (stem, attention)"


def _own_class(ev) -> str | None:
    """The op class an event names by itself, or None (then its nearest classified ancestor decides)."""
    name = ev.name
    shapes = getattr(ev, "input_shapes", None) or []
    if name.startswith("Optimizer.") or name.startswith("Optimizer.zero_grad"):
        return "optimiser"
    if name == "aten::convolution_backward":
        return _conv_kind(shapes[2] if len(shapes) > 2 else None) + " bwd"
    if name == "aten::convolution":
        return _conv_kind(shapes[1] if len(shapes) > 1 else None) + " fwd"
    if "batch_norm_backward" in name:
        return "BatchNorm bwd"
    if "batch_norm" in name:
        return "BatchNorm fwd"
    if name in ("aten::hardtanh_backward", "aten::threshold_backward"):
        return "activations bwd"
    if name in ("aten::hardtanh", "aten::hardtanh_", "aten::relu", "aten::relu_", "aten::clamp", "aten::clamp_"):
        return "activations fwd"
    if "softmax" in name.lower():
        return "softmax / loss"
    if "nll_loss" in name or "cross_entropy" in name:
        return "softmax / loss"
    return None


def profile_classes(step) -> dict[str, float]:
    """ms of self CPU time per op class in one call of `step` (all threads, autograd's included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    events = prof.events()
    out: dict[str, float] = defaultdict(float)
    cache: dict[int, str] = {}

    def klass(ev) -> str:
        if id(ev) in cache:
            return cache[id(ev)]
        own = _own_class(ev)
        if own is None:
            own = klass(ev.cpu_parent) if ev.cpu_parent is not None else "other (copies, pooling, attention, heads)"
        cache[id(ev)] = own
        return own

    for ev in events:
        out[klass(ev)] += ev.self_cpu_time_total / 1000.0
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def build(config: str, overrides: list[str]):
    cfg = load_config(config, overrides)
    model = FusionModel(cfg.model, cfg.data.image_size).to(memory_format=torch.channels_last).train()
    if cfg.train.trunk_views:  # the frozen part read from a trunk-feature cache: the step starts after it
        model.read_trunk(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return cfg, model, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("candidates", nargs="+", help="NAME=key=value,key=value (NAME= for the config as is)")
    ap.add_argument("--config", default="cpu-recipe")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    ap.add_argument("--profile", action="store_true", help="profile one step per candidate by op class")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.manual_seed(0)
    runs = {}
    for text in args.candidates:
        name, overrides = parse_candidate(text)
        runs[name] = build(args.config, overrides)
    n = args.batch
    labels = torch.zeros(n, 8, dtype=torch.long)

    def make_step(cfg, model, opt):
        size = cfg.data.image_size
        derm, clinic = (x.to(memory_format=torch.channels_last) for x in model.example_inputs(n, size))

        def step():
            loss, _ = multitask_loss(model(derm, clinic, torch.zeros(n, 14)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    steps = {name: make_step(*r) for name, r in runs.items()}
    times = time_round_robin(steps, warmup=1, repeats=args.rounds)
    env = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    report = {"threads": torch.get_num_threads(), "batch": n, "config": args.config, "env": env, "candidates": {}}
    base = statistics.median(times[next(iter(runs))])
    print(f"{args.config}, batch {n}, {torch.get_num_threads()} threads, fp32 + channels_last"
          f"{', ' + ' '.join(f'{k}={v}' for k, v in env.items()) if env else ''}")
    for name, t in times.items():
        med = statistics.median(t)
        report["candidates"][name] = {"median_s": med, "min_s": min(t), "max_s": max(t),
                                      "vs_first": med / base}
        print(f"  {name}: median {med:.3f} s per step ({base / med:.2f}x faster than the first), "
              f"range {min(t):.3f}-{max(t):.3f} s")
    if args.profile:
        for name, step in steps.items():
            classes = profile_classes(step)
            total = sum(classes.values())
            report["candidates"][name]["profile_ms"] = classes
            print(f"  profile of one {name} step (self CPU ms, all threads; total {total:.0f} ms):")
            for k, v in classes.items():
                print(f"    {k:45s} {v:8.1f} ms  {100 * v / total:5.1f} %")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
