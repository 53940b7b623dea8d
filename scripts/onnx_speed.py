"""Batch-8 throughput and batch-1 latency of ONNX exports (e.g. fp32 vs `export --int8`), timed round robin.

    .venv/bin/python scripts/onnx_speed.py runs/m-fp32.onnx runs/m-int8.onnx
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from sevenpoint.config import config_from_dict
from sevenpoint.infer.export import INPUT_NAMES, example_inputs, ort_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx", nargs="+")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    sessions = {path: ort_session(path) for path in args.onnx}
    first = next(iter(sessions.values()))
    cfg = config_from_dict(json.loads(first.get_modelmeta().custom_metadata_map["sevenpoint_config"]))
    feeds = {n: {k: v.numpy() for k, v in zip(INPUT_NAMES, example_inputs(n, cfg.data.image_size, cfg.meta_dim))}
             for n in (8, 1)}
    times: dict[tuple[str, int], list[float]] = {(p, n): [] for p in sessions for n in feeds}
    for _ in range(args.rounds + 2):  # the first two rounds warm up
        for path, sess in sessions.items():
            for n, feed in feeds.items():
                start = time.perf_counter()
                sess.run(None, feed)
                times[(path, n)].append(time.perf_counter() - start)
    for path in sessions:
        b8, b1 = (statistics.median(times[(path, n)][2:]) for n in (8, 1))
        print(f"{path}: batch 8 {8 / b8:.1f} cases/s, batch 1 p50 {1000 * b1:.1f} ms "
              f"(p95 {1000 * np.percentile(times[(path, 1)][2:], 95):.1f} ms)")


if __name__ == "__main__":
    main()
