"""Forward-pass GFLOP per case (torch.utils.flop_counter; a multiply-add = 2) of packaged configs,
without timing anything: docs/PERFORMANCE.md, "Where the time goes".

    .venv/bin/python scripts/flops.py paper cpu-recipe
"""

import argparse

from sevenpoint.config import load_config
from sevenpoint.engine.bench import forward_gflop
from sevenpoint.models import FusionModel

parser = argparse.ArgumentParser()
parser.add_argument("configs", nargs="+", help="packaged config names or YAML files")
args = parser.parse_args()

for name in args.configs:
    cfg = load_config(name, ["model.pretrained=false"])
    model = FusionModel(cfg.model, cfg.data.image_size, cfg.meta_dim)
    gflop = forward_gflop(model, cfg.data.image_size, cfg.meta_dim)
    print(f"{name}: {cfg.model.variant} {cfg.model.backbone} at {cfg.data.image_size} px: "
          f"{gflop:.2f} GFLOP per case (forward)")
