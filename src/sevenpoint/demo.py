"""`run_demo()`: the README's main job on the built-in synthetic default, end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from .config import load_config
from .data import Derm7pt, make_synthetic
from .engine.evaluate import evaluate
from .engine.run import train
from .infer.predict import Predictor, save_heatmaps


def run_demo(out: str | Path, cases: int = 400, epochs: int | None = None, progress: bool = True,
             console: Console | None = None) -> dict:
    """Synthesise -> train a small DCIHMM -> evaluate on test -> predict one test case."""
    console = console or Console()
    out = Path(out)
    t0 = time.perf_counter()
    data_dir = out / "data"
    if not (data_dir / "release_v0" / "meta" / "meta.csv").exists():
        make_synthetic(data_dir, cases=cases, size=128, seed=0)
    console.print(f"[1/4] synthetic dataset: {cases} cases in {data_dir}")
    overrides = [f"data.cache_dir={out / 'cache'}"] + ([f"train.epochs={epochs}"] if epochs else [])
    cfg = load_config("demo", overrides, seed=0)
    run_dir = out / "run"
    summary = train(cfg, data_dir, run_dir, resume=(run_dir / "checkpoints" / "last.ckpt").exists(),
                    progress=progress)
    console.print(f"[2/4] trained {cfg.model.variant} ({cfg.model.backbone_text}, {cfg.data.image_size} px) for "
                  f"{summary['epochs_run']} epochs in {summary['train_seconds']} s; best val avg acc "
                  f"{100 * summary['best_val_avg_acc']:.1f} %")
    metrics = evaluate(summary["best_checkpoint"], data_dir, out / "eval", split="test", progress=progress)
    console.print("[3/4] test-split report:")
    console.print((out / "eval" / "report.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    case = Derm7pt.load(data_dir).split_cases("test")[0]
    predictor = Predictor.from_checkpoint(summary["best_checkpoint"])
    result = predictor.predict(derm=case.derm, clinic=case.clinic, meta=case.raw_meta)
    (out / "predict").mkdir(parents=True, exist_ok=True)
    (out / "predict" / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    written = save_heatmaps(result, {"derm": case.derm, "clinic": case.clinic}, out / "predict")
    doubt = "" if result.sets is None else f" (90 % set: {' or '.join(result.sets['DIAG'])})"
    doubt += f", uncertain: {result.uncertain_why}" if result.uncertain else ""
    console.print(f"[4/4] predicted case {case.case_id}: diagnosis {result.diagnosis}{doubt}, 7-point score "
                  f"{result.seven_point_score}, branches {', '.join(result.branches_used)}; "
                  f"{len(written)} attention images in {out / 'predict'}")
    base = metrics["majority_baseline"]["AVG"]
    console.print(f"test average accuracy {100 * metrics['average_accuracy']:.1f} % vs majority class "
                  f"{100 * base:.1f} %; plots: {out / 'eval' / 'confusion_matrices.png'}, "
                  f"{out / 'eval' / 'roc_curves.png'}, {out / 'eval' / 'reliability.png'}; "
                  f"total {time.perf_counter() - t0:.0f} s")
    return {"metrics": metrics, "summary": summary, "prediction": result.to_dict()}
