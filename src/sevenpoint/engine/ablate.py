"""`run_ablation()`: DIM / CIM / DCIHMM x soft attention on/off, trained and tested from one config.

Resumable: a (variant, seed) folder that already holds a finished run is reused, one with only
`checkpoints/last.ckpt` is resumed, so a long ablation can span several sessions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import yaml

from ..config import ConfigError, RunConfig, config_from_dict, load_config
from .evaluate import evaluate
from ..schema import PAPER_ORDER
from .report import PAPER_ABLATIONS, mean_sd
from .run import train

VARIANTS = ("DIM", "CIM", "DCIHMM")
SELECTABLE_TTA = ("none", "flip")  # tta="select" picks one of these per run, on validation
RUNS = tuple(f"{v}{suffix}" for v in VARIANTS for suffix in ("", "-noSA"))


def check_runs(runs: list[str]) -> None:
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise ValueError(f"unknown ablation run(s) {', '.join(unknown)} (have: {', '.join(RUNS)})")


def _run_files(run_dir: Path) -> tuple[Path, Path]:
    """A finished run's training summary and its one test evaluation."""
    return run_dir / "train_summary.json", run_dir / "eval-test" / "metrics.json"


def _finished(run_dir: Path) -> bool:
    return all(f.is_file() for f in _run_files(run_dir))


def _recipe(cfg: RunConfig) -> RunConfig:
    """What decides a run's result: the config without where the cache lives or how many loader workers."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=None, num_workers=0))


def _check_same_recipe(cfg: RunConfig, run_dir: Path) -> None:
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    saved = config_from_dict(yaml.safe_load(saved_file.read_text()))
    summary = run_dir / "train_summary.json"
    if saved.train.precision == "auto" and summary.is_file():
        # `auto` was a fixed rule before it became a measurement (2026-11-28): the run says what it ran in
        ran = json.loads(summary.read_text()).get("precision", "auto")
        saved = dataclasses.replace(saved, train=dataclasses.replace(saved.train, precision=ran))
    if _recipe(saved) != _recipe(cfg):
        a, b = _recipe(saved).to_dict(), _recipe(cfg).to_dict()
        diff = [f"{sec}.{k}: {a[sec][k]!r} there, {b[sec][k]!r} asked" for sec in ("data", "model", "train", "infer")
                for k in a[sec] if a[sec][k] != b[sec][k]]
        diff += [f"seed: {a['seed']} there, {b['seed']} asked"] if a["seed"] != b["seed"] else []
        raise ValueError(f"{run_dir}: holds a run with another config ({'; '.join(diff)}); "
                         "use another --out to compare configs")


def _train_and_test(cfg, data_dir, run_dir: Path, tta: str | None, progress: bool) -> tuple[dict, dict]:
    """(training summary, test metrics), reusing whatever `run_dir` already holds."""
    _check_same_recipe(cfg, run_dir)
    summary_file, metrics_file = _run_files(run_dir)
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
    else:
        resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
        summary = train(cfg, data_dir, run_dir, resume=resume, progress=progress)
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
    else:
        if tta == "select":
            tta = _select_tta(summary["best_checkpoint"], data_dir, run_dir, progress)
        metrics = evaluate(summary["best_checkpoint"], data_dir, metrics_file.parent, split="test", tta=tta,
                           progress=progress)
    return summary, metrics


def _record(results: dict, key: str, seed: int, summary: dict, metrics: dict) -> None:
    """Append one finished (run, seed) to `results[key]`: the figures the tables are made of, in %."""
    r = results.setdefault(key, {"seeds": [], "test_avg_acc": [], "val_avg_acc": [], "train_seconds": [],
                                 "test_tasks": {name: [] for name in PAPER_ORDER}, "tta": [],
                                 "rule_sensitivity": [], "rule_specificity": [], "diag_melanoma_auc": []})
    r["seeds"].append(seed)
    r["val_avg_acc"].append(100 * summary["best_val_avg_acc"])
    r["test_avg_acc"].append(100 * metrics["average_accuracy"])
    r["train_seconds"].append(summary.get("train_seconds"))
    r["tta"].append(metrics.get("tta"))
    for name in PAPER_ORDER:
        acc = metrics["tasks"].get(name, {}).get("accuracy")
        r["test_tasks"][name].append(None if acc is None else 100 * acc)
    mel = metrics.get("melanoma") or {}
    r["rule_sensitivity"].append(None if mel.get("sensitivity") is None else 100 * mel["sensitivity"])
    r["rule_specificity"].append(None if mel.get("specificity") is None else 100 * mel["specificity"])
    r["diag_melanoma_auc"].append(mel.get("diag_head_auc"))


def _mean(values: list) -> str:
    known = [v for v in values if v is not None]
    return f"{sum(known) / len(known):.2f}" if known else "–"


def _per_run_table(results: dict) -> list[str]:
    """Every run: seeds, train time, validation and test AVG (mean ± sd), per-task test means, rule, AUC."""
    lines = ["| run | seeds | TTA | train s | val AVG | " + " | ".join(PAPER_ORDER) + " | test AVG | rule sens / spec "
             "| DIAG mel AUC |", "|---|---|---|---:|---:|" + "---:|" * len(PAPER_ORDER) + "---:|---:|---:|"]
    for key, r in results.items():
        secs = ", ".join("?" if t is None else f"{t:.0f}" for t in r["train_seconds"])
        tasks = " | ".join(_mean(r["test_tasks"][name]) for name in PAPER_ORDER)
        auc = ", ".join("–" if a is None else f"{a:.2f}" for a in r["diag_melanoma_auc"])
        lines.append(f"| {key} | {' '.join(map(str, r['seeds']))} | {', '.join(map(str, r['tta']))} | {secs} | "
                     f"{mean_sd(r['val_avg_acc'])} | {tasks} | **{mean_sd(r['test_avg_acc'])}** | "
                     f"{_mean(r['rule_sensitivity'])} / {_mean(r['rule_specificity'])} | {auc} |")
    return lines


def _select_tta(checkpoint: str, data_dir, run_dir: Path, progress: bool) -> str:
    """The TTA mode with the best validation average accuracy (ties: the cheaper one)."""
    scores = {}
    for mode in SELECTABLE_TTA:
        folder = run_dir / f"eval-valid-{mode}"
        done = folder / "metrics.json"
        m = json.loads(done.read_text()) if done.is_file() else evaluate(
            checkpoint, data_dir, folder, split="valid", tta=mode, progress=progress)
        scores[mode] = m["average_accuracy"]
    return max(SELECTABLE_TTA, key=lambda mode: (scores[mode], -SELECTABLE_TTA.index(mode)))


def _cell(results: dict, key: str) -> str:
    return mean_sd(results[key]["test_avg_acc"]) if key in results else "–"


def run_ablation(data_dir: str | os.PathLike, out: str | os.PathLike, config: str | None, overrides: list[str],
                 seeds: list[int], tta: str | None = None, progress: bool = True,
                 runs: list[str] | None = None, report_only: bool = False) -> str:
    """Train and test-evaluate every (run, seed); write ablation.md and ablation.json.

    `runs` picks among DIM, DIM-noSA, CIM, CIM-noSA, DCIHMM, DCIHMM-noSA (default: all). `tta` is a
    mode for every run, None for each checkpoint's own `infer.tta`, or "select": per run, the better
    of none/flip on validation, then test once.
    """
    out = Path(out)
    runs = list(runs or RUNS)
    check_runs(runs)
    results: dict[str, dict[str, list[float]]] = {}
    for key in [k for k in RUNS if k in runs]:
        variant, attention = key.removesuffix("-noSA"), not key.endswith("-noSA")
        for seed in seeds:
            run_dir = out / key / f"seed{seed}"
            if report_only and not _finished(run_dir):
                continue
            cfg = load_config(config, [*overrides, f"model.variant={variant}", f"model.attention={attention}"],
                              seed=seed)
            if cfg.train.refit:
                raise ConfigError("ablate reports each run's validation score, and a refit trains on the validation "
                                  "split: add train.refit=false")
            summary, metrics = _train_and_test(cfg, data_dir, run_dir, tta, progress)
            _record(results, key, seed, summary, metrics)
    lines = [f"# Ablations (seeds {seeds}; test average accuracy %, mean ± sd over seeds)", "",
             "## Modality (with soft attention)", "", "| model | ours | paper |", "|---|---:|---:|"]
    for v in VARIANTS:
        lines.append(f"| {v} | {_cell(results, v)} | {PAPER_ABLATIONS['modality'][v]:.2f} |")
    lines += ["", "## Soft attention (DCIHMM)", "", "| model | ours | paper |", "|---|---:|---:|",
              f"| with soft attention | {_cell(results, 'DCIHMM')} | "
              f"{PAPER_ABLATIONS['attention']['with soft attention']:.2f} |",
              f"| without soft attention | {_cell(results, 'DCIHMM-noSA')} | "
              f"{PAPER_ABLATIONS['attention']['without soft attention']:.2f} |",
              "", "Every run (best validation / test average accuracy, %):", "",
              "| run | seeds | val avg acc | test avg acc |", "|---|---|---:|---:|"]
    for key, r in results.items():
        seeds_done = " ".join(map(str, r["seeds"]))
        lines.append(f"| {key} | {seeds_done} | {mean_sd(r['val_avg_acc'])} | {mean_sd(r['test_avg_acc'])} |")
    lines += ["", "Per run: test accuracy per task (mean over its seeds), the 7-point rule (score ≥ 3) melanoma "
              "sensitivity / specificity (mean), the DIAG head's melanoma AUC per seed; train s per seed:", "",
              *_per_run_table(results)]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"seeds": seeds, "results": results}, indent=2))
    return text
