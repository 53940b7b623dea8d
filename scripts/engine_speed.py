"""Batch-1 latency and batch-8 throughput of one checkpoint on each inference engine, timed round robin
through `Predictor.run` (forward pass and post-processing; image decoding excluded), and what
`--backend auto` picks on this machine. ONNX Runtime int8 is timed too where `export --int8` accepted
an int8 model for this checkpoint.

    .venv/bin/python scripts/engine_speed.py RUN/checkpoints/best.ckpt --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from sevenpoint.infer.predict import Prepared, Predictor, cached_export, onnx_cache
from sevenpoint.checkpoint import load_model
from sevenpoint.runtime import cpu_summary, time_round_robin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out")
    args = ap.parse_args()
    model, cfg, section = load_model(args.checkpoint)
    onnx = onnx_cache(args.checkpoint, model, cfg, section)
    engines = {"torch eager": Predictor.from_checkpoint(args.checkpoint, backend="torch", precision="fp32"),
               "frozen": Predictor.from_checkpoint(args.checkpoint, backend="frozen", precision="fp32"),
               "onnxruntime": Predictor.from_onnx(onnx)}
    int8 = cached_export(args.checkpoint, "int8")
    if int8.is_file():  # the int8 model `export --int8` accepted for this checkpoint (after its accuracy check)
        engines["onnxruntime int8"] = Predictor.from_onnx(int8)
    g = torch.Generator().manual_seed(0)
    s = cfg.data.image_size

    def case() -> Prepared:
        return Prepared(torch.rand(3, s, s, generator=g), torch.rand(3, s, s, generator=g), torch.zeros(cfg.meta_dim),
                        {"derm": True, "clinic": True, "meta": False}, None)

    batches = {n: [case() for _ in range(n)] for n in (1, 8)}
    fns = {(name, n): (lambda p=p, b=b: p.run(b)) for name, p in engines.items() for n, b in batches.items()}
    times = time_round_robin(fns, warmup=2, repeats=args.rounds)
    report = {"checkpoint": args.checkpoint, "cpu": cpu_summary(), "threads": torch.get_num_threads(), "engines": {}}
    for name in engines:
        p50 = statistics.median(times[(name, 1)])
        rate = 8 / statistics.median(times[(name, 8)])
        report["engines"][name] = {"batch1_p50_ms": 1000 * p50, "batch8_cases_per_s": rate, "path": engines[name].choice}
        print(f"{name:16s} batch 1 p50 {1000 * p50:7.1f} ms   batch 8 {rate:6.1f} cases/s   ({engines[name].choice})")
    auto = Predictor.from_checkpoint(args.checkpoint)
    report["auto"] = {"backend": auto.info["backend"], "why": auto.choice}
    print(f"auto picks {auto.info['backend']}: {auto.choice}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
