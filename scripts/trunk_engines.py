"""Fill engines for the trunk-feature cache: ms per view and parity with eager fp32, per cut.

For each cut, the trunk of the config's backbone runs on the views of a few images (1 + V views each,
as the fill makes them; synthetic images when no --data is given) on every engine `engine.trunk` knows;
prints the median ms per view (round robin, 3 rounds) and the relative error against eager fp32.

    .venv/bin/python scripts/trunk_engines.py --data ~/data/derm7pt --cuts 5 8 11 13
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python scripts/trunk_engines.py ...   # emulated AVX2
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from sevenpoint.config import load_config
from sevenpoint.data import load_dataset
from sevenpoint.data.cache import make_cache
from sevenpoint.engine.trunk import choose_engine, image_views, stores_for
from sevenpoint.models import FusionModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a dataset folder (default: random images)")
    ap.add_argument("--config", default="cpu-recipe")
    ap.add_argument("--cuts", type=int, nargs="+", default=[5, 8, 11, 13])
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    out = {"threads": torch.get_num_threads(),
           "env": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}}
    for cut in args.cuts:
        cfg = load_config(args.config, [f"model.freeze_blocks={cut}", f"train.trunk_views={args.views}"])
        size = cfg.data.image_size
        _, trunk = stores_for(FusionModel(cfg.model, size, cfg.meta_dim), cfg)["derm"]
        if args.data:
            data = load_dataset(args.data)
            cases = data.split_cases("train")[:2]
            sample = torch.cat([image_views(make_cache(cfg), cfg, c.derm, c.crop, args.views) for c in cases])
        else:
            sample = torch.rand(2 * (1 + args.views), 3, size, size)
        name, _, report = choose_engine(trunk, sample)
        out[f"cut{cut}"] = report
        ms = ", ".join(f"{k} {v:.2f}" for k, v in report["ms_per_view"].items())
        err = ", ".join(f"{k} {v:.1e}" for k, v in report["parity_rel_err"].items())
        print(f"cut {cut}: ms per view {ms}; relative error vs eager {err}; chosen {name}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
