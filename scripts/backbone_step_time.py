"""Training-step time of the CPU recipe's model with each dermoscopy backbone (model.derm_backbone).

Round robin over the candidates (so a neighbour on the machine lands on all of them alike), batch 16,
fp32 + channels_last, random inputs, the real multi-task loss and AdamW; prints the median per step.

    .venv/bin/python scripts/backbone_step_time.py efficientnet_lite0 efficientnet_lite1 efficientnet_lite2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sevenpoint.config import load_config
from sevenpoint.engine.loss import multitask_loss
from sevenpoint.models import FusionModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("derm_backbones", nargs="+")
    ap.add_argument("--config", default="cpu-recipe")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=12, help="timed rounds after one warm-up round")
    args = ap.parse_args()
    torch.manual_seed(0)
    runs = {}
    for name in args.derm_backbones:
        cfg = load_config(args.config, [f"model.derm_backbone={name}"])
        model = FusionModel(cfg.model, cfg.data.image_size).to(memory_format=torch.channels_last).train()
        runs[name] = (model, torch.optim.AdamW(model.parameters(), 1e-4), cfg.data.image_size)
    n = args.batch
    labels = torch.zeros(n, 8, dtype=torch.long)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds + 1):
        for name, (model, opt, size) in runs.items():
            derm, clinic = (torch.randn(n, 3, size, size).to(memory_format=torch.channels_last) for _ in range(2))
            start = time.perf_counter()
            loss, _ = multitask_loss(model(derm, clinic, torch.zeros(n, 14)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times[args.derm_backbones[0]][1:])
    for name, t in times.items():
        med = statistics.median(t[1:])
        print(f"{name}: median {med:.3f} s per step ({med / base:.2f}x the first), "
              f"range {min(t[1:]):.3f}-{max(t[1:]):.3f} s, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
