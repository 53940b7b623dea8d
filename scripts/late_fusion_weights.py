"""Validation average accuracy of trained models and of their average, for several weights of the
clinical branch in late fusion (docs/RESULTS.md §2, candidate v5). Validation split only.

    .venv/bin/python scripts/late_fusion_weights.py --data ~/data/derm7pt RUN0/checkpoints/best.ckpt RUN1/... RUN2/...

With --by-size: per ensemble size k, the mean [min-max] over every k-model average instead of each one
(how much more members could still give).
"""

import argparse
import itertools

import numpy as np

from sevenpoint.checkpoint import load_model
from sevenpoint.data import Derm7pt
from sevenpoint.engine.evaluate import predict_split
from sevenpoint.engine.metrics import compute_metrics
from sevenpoint.runtime import use_channels_last

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.add_argument("--weights", default="1,0.5,0")
parser.add_argument("--by-size", action="store_true", help="summarise the averages per ensemble size")
parser.add_argument("checkpoints", nargs="+")
args = parser.parse_args()

data = Derm7pt.load(args.data)
preds = []
for path in args.checkpoints:
    model, cfg, _ = load_model(path)
    preds.append(predict_split(model, cfg, data, "valid", channels_last=use_channels_last("auto"), progress=False))


def fused(pred, w):
    """Late fusion of one model's branch probabilities with the clinical branch weighted `w`."""
    out = []
    for t in range(len(pred.probs)):
        num = den = 0
        for b, probs in pred.branch_probs.items():
            wb = pred.branch_masks[b][:, None] * (w if b == "clinic" else 1.0)
            num, den = num + wb * probs[t], den + wb
        out.append(num / np.maximum(den, 1e-12))
    return out


targets = preds[0].targets
for w in map(float, args.weights.split(",")):
    per_model = [fused(p, w) for p in preds]
    acc = [100 * compute_metrics(f, targets)["average_accuracy"] for f in per_model]
    groups = [g for k in range(2, len(preds) + 1) for g in itertools.combinations(range(len(preds)), k)]
    ens = {g: 100 * compute_metrics([np.mean([per_model[i][t] for i in g], 0) for t in range(len(targets[0]))],
                                    targets)["average_accuracy"] for g in groups}
    if args.by_size:
        sizes = {1: acc} | {k: [v for g, v in ens.items() if len(g) == k] for k in range(2, len(preds) + 1)}
        print(f"clinic weight {w:g}: " + "; ".join(f"{k} model(s) {np.mean(v):.2f} [{min(v):.2f}-{max(v):.2f}] "
                                                   f"({len(v)})" for k, v in sizes.items()))
        continue
    print(f"clinic weight {w:g}: models " + " / ".join(f"{a:.2f}" for a in acc) + "; averages "
          + ", ".join(f"{'+'.join(map(str, g))} {v:.2f}" for g, v in ens.items()))
