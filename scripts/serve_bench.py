"""Batched serving against offline batch throughput, on this machine, in one run (docs/PERFORMANCE.md).

    python scripts/serve_bench.py --out bench-serve          # DCIHMM, Xception, 299 px (the paper model)

Writes an untrained model of the given config as a checkpoint (speed does not depend on the
weights), then measures, with the serve default backend (frozen graph):
  1. offline: `Predictor.run` on batches of 8 prepared cases (forward only), and prepare + run
     (decoding 768x512 JPEGs too), cases/s, median of repeats;
  2. `sevenpoint serve` in a subprocess with `--max-batch 1` (one at a time) and with the default
     micro-batching, loaded by `web/loadtest.py` at concurrency 1, 8 and 50: throughput, p50 / p95.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sevenpoint.checkpoint import SCHEMA_FINGERPRINT
from sevenpoint.config import load_config
from sevenpoint.data import Derm7pt, make_synthetic
from sevenpoint.models import FusionModel
from sevenpoint.infer.predict import Predictor
from sevenpoint.web.loadtest import run_load

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, default=Path("bench-serve"))
parser.add_argument("--config", default="paper")
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("overrides", nargs="*", help="section.key=value")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)

cfg = load_config(args.config, ["model.pretrained=false", *args.overrides])
model = FusionModel(cfg.model, cfg.data.image_size, cfg.meta_dim)
ckpt = args.out / "untrained.ckpt"
torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "sevenpoint": {"config": cfg.to_dict(), "schema": SCHEMA_FINGERPRINT}}, ckpt)
data_root = args.out / "images"
if not (data_root / "release_v0").exists():
    make_synthetic(data_root, cases=40, size=512, seed=0)  # 768 x 512 JPEGs, like the real ones
cases = Derm7pt.load(data_root).split_cases("test")[:8]
inputs = [{"derm": c.derm, "clinic": c.clinic or c.derm, "meta": c.raw_meta} for c in cases]


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(len(inputs) / (time.perf_counter() - t))
    return out


def offline(repeats):
    """Cases/s of forward only and of prepare + forward, batches of 8, median of `repeats`."""
    predictor = Predictor.from_checkpoint(ckpt, backend="frozen")
    prepared = [predictor.prepare(c) for c in inputs]
    predictor.run(prepared)  # warm-up
    forward = timed(lambda: predictor.run(prepared), repeats)
    full = timed(lambda: predictor.run([predictor.prepare(c) for c in inputs]), repeats)
    return statistics.median(forward), statistics.median(full)


forward, full = offline(args.repeats)
result = {"device": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
          "torch": torch.__version__, "threads": torch.get_num_threads(), "config": args.config,
          "model": {"variant": cfg.model.variant, "backbone": cfg.model.backbone, "size": cfg.data.image_size},
          "offline_batch8_forward_cases_per_s": round(forward, 2),
          "offline_batch8_prepare_and_forward_cases_per_s": round(full, 2), "serve": {}}
print(json.dumps(result, indent=2), flush=True)


def serve(*extra):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sevenpoint.cli", "serve", "--checkpoint", str(ckpt),
                             "--port", str(port), "--max-queue", "256", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


for mode, extra in (("one at a time (--max-batch 1)", ("--max-batch", "1")), ("micro-batched (default)", ())):
    proc, url = serve(*extra)
    try:
        run_load(url, cases[0].derm, cases[0].clinic, requests=8, concurrency=8)  # warm-up
        rows = {}
        for conc, n in ((1, 20), (8, 64), (50, 150)):
            stats = run_load(url, cases[0].derm, cases[0].clinic, requests=n, concurrency=conc, timeout=300)
            rows[str(conc)] = stats
            print(mode, conc, stats, flush=True)
        import httpx

        rows["batching"] = httpx.get(f"{url}/health").json()["batching"]
        result["serve"][mode] = rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)
(args.out / "serve_bench.json").write_text(json.dumps(result, indent=2))
print(f"-> {args.out / 'serve_bench.json'}")
