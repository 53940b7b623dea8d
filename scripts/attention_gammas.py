"""The learned soft-attention scales gamma (output = x + gamma * alpha * x; gamma starts at 0) of
trained checkpoints: docs/RESULTS.md §5 (ablations), "how far from identity do the modules move".

    .venv/bin/python scripts/attention_gammas.py RUN0/checkpoints/best.ckpt RUN1/...
"""

import argparse

from sevenpoint.checkpoint import load_model

parser = argparse.ArgumentParser()
parser.add_argument("checkpoints", nargs="+")
args = parser.parse_args()

for path in args.checkpoints:
    model, _, _ = load_model(path)
    gammas = {name.removesuffix(".gamma"): float(p.detach()) for name, p in model.named_parameters() if name.endswith(".gamma")}
    text = ", ".join(f"{name} {value:+.3f}" for name, value in gammas.items()) or "no soft-attention module"
    print(f"{path}: {text}")
