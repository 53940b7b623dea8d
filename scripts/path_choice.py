"""What `train` and `evaluate` would choose on this machine for packaged configs, measured afresh
(`runtime.choose_path` with a throw-away cache), and how long the measurement took:
docs/PERFORMANCE.md, "Measured path choice".

    .venv/bin/python scripts/path_choice.py paper cpu-recipe --precision auto
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sevenpoint.config import load_config
from sevenpoint.engine.loss import multitask_loss
from sevenpoint.models import FusionModel
from sevenpoint.runtime import TIMING_BATCH, choose_path, cpu_model

parser = argparse.ArgumentParser()
parser.add_argument("configs", nargs="+", help="packaged config names or YAML files")
parser.add_argument("--precision", default=None, help="override train.precision (default: the config's)")
parser.add_argument("--eval-batch", type=int, default=32, help="evaluate's batch size (its default: 32)")
args = parser.parse_args()

print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
with tempfile.TemporaryDirectory() as tmp:
    for name in args.configs:
        cfg = load_config(name, ["model.pretrained=false"])
        precision = args.precision or cfg.train.precision
        model = FusionModel(cfg.model, cfg.data.image_size, cfg.meta_dim)
        for mode, batch in (("train", cfg.train.batch_size), ("infer", args.eval_batch)):
            start = time.perf_counter()
            _, _, why = choose_path(mode, model, cfg, batch, precision, cfg.train.channels_last,
                                    cache=Path(tmp) / "autotune.json", loss=multitask_loss)
            print(f"{name} ({cfg.model.backbone}, {cfg.data.image_size} px) {mode} batch {batch} (timed on "
                  f"{min(batch, TIMING_BATCH)}), precision "
                  f"{precision}: {why} [{time.perf_counter() - start:.1f} s]", flush=True)
