"""Batch-1 latency of the serve path when another process holds one of the cores (docs/PERFORMANCE.md).

    python scripts/contention_bench.py --out bench-contention        # DCIHMM, Xception, 299 px

For each thread setting, a fresh process loads the frozen predictor (serve's default) and times
`--runs` single-case predictions (model only: prepared inputs), first alone, then beside a
busy process pinned to... nothing: a plain CPU-bound loop, which the scheduler places on one of
the two cores as a training run would. Settings: torch's default threads (one per core) with
OpenMP's default spin-waiting, the same with OMP_WAIT_POLICY=PASSIVE (threads sleep instead of
spinning while they wait), and one thread.
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
import json, statistics, sys, time, torch
from sevenpoint.predict import Predictor
from sevenpoint.data import Derm7pt
ckpt, images, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = Predictor.from_checkpoint(ckpt, backend="frozen")
c = Derm7pt.load(images).split_cases("test")[0]
prep = [p.prepare({"derm": c.derm, "clinic": c.clinic or c.derm, "meta": c.raw_meta})]
for _ in range(3):
    p.run(prep)
ms = []
for _ in range(runs):
    t = time.perf_counter(); p.run(prep); ms.append(1000 * (time.perf_counter() - t))
ms.sort()
print(json.dumps({"threads": torch.get_num_threads(), "p50": round(ms[len(ms) // 2], 1),
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
}
results = {"cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": "), "rows": {}}
for name, env in SETTINGS.items():
    row = {}
    for beside in ("alone", "beside a busy process"):
        hog = None
        if beside != "alone":
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1)
        try:
            out = subprocess.run([sys.executable, "-c", WORKER, str(ckpt), str(images), str(args.runs)],
                                 capture_output=True, text=True, env={**os.environ, **env}, timeout=1200)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        row[beside] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, beside, row[beside], flush=True)
    results["rows"][name] = row
(args.bench_dir / "contention.json").write_text(json.dumps(results, indent=2))
print(f"-> {args.bench_dir / 'contention.json'}")
