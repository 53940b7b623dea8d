"""Batch-1 latency of the serve path when another process holds one of the cores (docs/PERFORMANCE.md).

    python scripts/contention_bench.py --out bench-contention        # DCIHMM, Xception, 299 px

For each thread setting, a fresh process loads the frozen predictor (serve's default), warms up
alone, then times `--runs` single-case predictions (model only: prepared inputs) — alone, and
again with a busy process started after the warm-up (a plain CPU-bound loop, which the scheduler
puts on one of the cores, as a training run started beside a server would). Settings: torch's
default threads (one per core) with OpenMP's spin-waiting, the same with OMP_WAIT_POLICY=PASSIVE
(waiting threads sleep), one thread, and the default with `runtime.ThreadGovernor` (what `serve`
runs: one thread while passes are much slower than the best seen, full width retried every 20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, os, statistics, sys, time, torch
from sevenpoint.infer.predict import Predictor
from sevenpoint.data import Derm7pt
ckpt, images, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = Predictor.from_checkpoint(ckpt, backend="frozen")
if os.environ.get("GOVERNOR"):
    from sevenpoint.runtime import ThreadGovernor
    p.governor = ThreadGovernor()
c = Derm7pt.load(images).split_cases("test")[0]
prep = [p.prepare({"derm": c.derm, "clinic": c.clinic or c.derm, "meta": c.raw_meta})]
for _ in range(8):  # warm-up alone (the governor learns the idle speed), then the neighbour may start
    p.run(prep)
print("ready", flush=True)
sys.stdin.readline()
ms = []
for _ in range(runs):
    t = time.perf_counter(); p.run(prep); ms.append(1000 * (time.perf_counter() - t))
ms.sort()
print(json.dumps({"threads_at_end": torch.get_num_threads(), "p50": round(ms[len(ms) // 2], 1),
                  "p95": round(ms[int(len(ms) * 0.95) - 1], 1), "max": round(ms[-1], 1)}))
"""

parser = argparse.ArgumentParser()
parser.add_argument("--bench-dir", type=Path, default=Path("bench-serve"),
                    help="folder where scripts/serve_bench.py wrote untrained.ckpt and images/")
parser.add_argument("--runs", type=int, default=40)
args = parser.parse_args()
ckpt, images = args.bench_dir / "untrained.ckpt", args.bench_dir / "images"
if not ckpt.is_file():
    raise SystemExit(f"{ckpt}: run scripts/serve_bench.py --out {args.bench_dir} first")

SETTINGS = {
    "default (2 threads, spin-wait)": {},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads + ThreadGovernor (serve's default)": {"GOVERNOR": "1"},
}
results = {"cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": "), "rows": {}}
for name, env in SETTINGS.items():
    row = {}
    for beside in ("alone", "beside a busy process"):
        hog = None
        worker = subprocess.Popen([sys.executable, "-c", WORKER, str(ckpt), str(images), str(args.runs)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, env={**os.environ, **env})
        try:
            while worker.stdout.readline().strip() != "ready":
                if worker.poll() is not None:
                    raise SystemExit(f"{name}: worker failed")
            if beside != "alone":  # the neighbour starts after the server warmed up, as a training run would
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(1)
            worker.stdin.write("go\n")
            worker.stdin.flush()
            last = worker.stdout.read().strip().splitlines()[-1]
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            worker.wait()
        row[beside] = json.loads(last)
        print(name, beside, row[beside], flush=True)
    results["rows"][name] = row
(args.bench_dir / "contention.json").write_text(json.dumps(results, indent=2))
print(f"-> {args.bench_dir / 'contention.json'}")
