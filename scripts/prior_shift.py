"""Does a per-class logit offset per task (a prior shift fitted on validation) generalise?
docs/RESULTS.md §3, "Post-hoc changes". Validation split only: for each of `--splits` random
halvings, the offsets are fitted (validation NLL, L-BFGS) on one half and scored on the other;
printed is the other half's average accuracy with the offsets minus without, per checkpoint.

    .venv/bin/python scripts/prior_shift.py --data ~/data/derm7pt RUN0/checkpoints/best.ckpt RUN1/...
"""

import argparse

import numpy as np
import torch

from sevenpoint.checkpoint import load_model
from sevenpoint.data import Derm7pt
from sevenpoint.engine.evaluate import predict_split
from sevenpoint.engine.metrics import compute_metrics
from sevenpoint.runtime import use_channels_last

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.add_argument("--splits", type=int, default=20)
parser.add_argument("checkpoints", nargs="+")
args = parser.parse_args()


def fit_offsets(log_probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-class offsets b minimising the NLL of softmax(log_probs + b) on (log_probs, y)."""
    lp, target = torch.tensor(log_probs, dtype=torch.float64), torch.tensor(y)
    b = torch.zeros(lp.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([b], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lp + b, target)
        loss.backward()
        return loss

    opt.step(closure)
    return b.detach().numpy()


data = Derm7pt.load(args.data)
rng = np.random.default_rng(0)
for path in args.checkpoints:
    model, cfg, _ = load_model(path)
    pred = predict_split(model, cfg, data, "valid", channels_last=use_channels_last("auto"), progress=False)
    logs = [np.log(np.clip(p, 1e-12, 1)) for p in pred.probs]
    n, gains = len(pred.targets), []
    for _ in range(args.splits):
        order = rng.permutation(n)
        fit, score = order[: n // 2], order[n // 2:]
        shifted = [np.exp(lp[score] + fit_offsets(lp[fit], pred.targets[fit, t])) for t, lp in enumerate(logs)]
        shifted = [p / p.sum(axis=1, keepdims=True) for p in shifted]
        plain = [p[score] for p in pred.probs]
        targets = pred.targets[score]
        gains.append(100 * (compute_metrics(shifted, targets)["average_accuracy"]
                            - compute_metrics(plain, targets)["average_accuracy"]))
    print(f"{path}: held-out half, with offsets minus without: mean {np.mean(gains):+.2f} "
          f"(min {np.min(gains):+.2f}, max {np.max(gains):+.2f}) over {args.splits} halvings")
