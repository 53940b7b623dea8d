"""The `sevenpoint` command line (typer): parses options and prints results; the work is done in
engine/, predict, export, demo and web.

Known errors print one clear line and exit 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Seven-point checklist criteria + diagnosis from dermoscopy, clinical photo and metadata.")
console = Console()
err = Console(stderr=True, soft_wrap=True)
_STATE = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks on errors.")] = False) -> None:
    _STATE["debug"] = debug


def _is_known(exc: BaseException) -> bool:
    """Our own error types (they name the file / row / field) and missing or unreadable files."""
    return type(exc).__module__.startswith("sevenpoint.") or isinstance(exc, (FileNotFoundError, PermissionError))


def main() -> None:
    """Console entry point: accepts `--seeds 0 1 2` (space-separated) and maps known errors to exit 2."""
    argv = sys.argv[1:]
    if "--seeds" in argv:
        i = argv.index("--seeds")
        j = i + 1
        while j < len(argv) and re.fullmatch(r"\d+([ ,]+\d+)*", argv[j].strip()):  # 0 1 2, "0 1 2", 0,1,2
            j += 1
        if j > i + 1:
            argv = argv[:i + 1] + [",".join(argv[i + 1:j])] + argv[j:]
    try:
        app(args=argv, standalone_mode=False)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        # typer vendors click (0.29+): recognise its exceptions by shape, not by import
        kind = type(exc).__name__
        if kind == "Exit":
            raise SystemExit(getattr(exc, "exit_code", 0)) from None
        if kind == "Abort":
            err.print("aborted")
            raise SystemExit(130) from None
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # usage / bad-parameter errors
            exc.show()
            raise SystemExit(exc.exit_code) from None
        if _STATE["debug"] or not _is_known(exc):
            raise
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        raise SystemExit(2) from None


def _seeds(seed: int, seeds: str | None) -> list[int]:
    if not seeds:
        return [seed]
    try:
        return [int(s) for s in seeds.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(f"--seeds {seeds!r}: expected integers, e.g. --seeds 0 1 2") from None


FormatOption = Annotated[str, typer.Option(
    "--format", help="Dataset format: auto (detected from the folder) | derm7pt | ph2 | isic.")]
SkipMissingOption = Annotated[bool, typer.Option(
    help="Leave out cases whose image file is missing (each one listed) instead of refusing the dataset.")]


@app.command()
def synth(out_dir: Path, cases: int = 200, size: int = 128, seed: int = 0,
          data_format: Annotated[str, typer.Option("--format", help="derm7pt | ph2 | isic")] = "derm7pt") -> None:
    """Write a small learnable synthetic dataset to OUT_DIR in a format's own layout."""
    from .data import synthetic

    makers = {"derm7pt": synthetic.make_synthetic, "ph2": synthetic.make_synthetic_ph2,
              "isic": synthetic.make_synthetic_isic}
    if data_format not in makers:
        raise typer.BadParameter(f"{data_format!r} is not one of {', '.join(makers)}", param_hint="--format")
    start = time.perf_counter()
    root = makers[data_format](out_dir, cases=cases, size=size, seed=seed)
    console.print(f"wrote {cases} synthetic {data_format} cases ({size} px) to {root} "
                  f"in {time.perf_counter() - start:.1f} s")


@app.command("check-data")
def check_data(data_dir: Path,
               include_leaky_meta: Annotated[bool, typer.Option(
                   help="Also encode management and diagnostic difficulty — these LEAK the diagnosis.")] = False,
               as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
               decode: Annotated[bool, typer.Option(help="Decode every image to find broken files.")] = True,
               data_format: FormatOption = "auto", skip_missing: SkipMissingOption = False) -> None:
    """Validate a dataset (Derm7pt, PH2 or ISIC layout) and summarise it (exit 0 when usable)."""
    from .data import load_dataset

    data = load_dataset(data_dir, data_format, include_leaky_meta=include_leaky_meta, skip_missing=skip_missing)
    decoded = data.verify_images(progress=not as_json) if decode else None
    s = data.summary()
    s["images_decoded"] = decoded
    if as_json:
        console.print_json(json.dumps(s))
        return
    console.print(f"[bold]{data.format} dataset at {s['root']}[/]: {s['cases']} cases; "
                  + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
    console.print(f"has: dermoscopy {s['has']['derm']}, clinical photo {s['has']['clinic']}, "
                  f"metadata {s['has']['meta']}")
    if s["not_annotated"]:
        console.print(f"not annotated (not trained or scored on): {', '.join(s['not_annotated'])}")
    table = Table("task", "class", *s["splits"].keys(), title="classes per task per split")
    for task, per_split in s["classes"].items():
        if task in s["not_annotated"]:
            continue  # listed above
        classes = next(iter(per_split.values())).keys()
        for c in classes:
            table.add_row(task, c, *(str(per_split[sp][c]) for sp in s["splits"]))
    console.print(table)
    if data.format == "derm7pt":
        console.print(f"clinic photo missing (clinic == derm): {len(s['clinic_missing'])} case(s) "
                      f"{s['clinic_missing']}")
        path_quirks = [q for q in s["quirks"] if "resolved" in q]
        console.print(f"path quirks resolved: {len(path_quirks)}")
        for q in path_quirks:
            console.print(f"  {q}", highlight=False)
        console.print(f"metadata: {data.meta_dim} dims" + (" (INCLUDES leaky fields)" if include_leaky_meta else ""))
    else:
        for q in s["quirks"]:
            console.print(f"note: {q}", highlight=False)
    if decoded is not None:
        console.print(f"images decoded: {decoded}, all readable")
    console.print("[green]usable[/]")


@app.command(context_settings={"allow_extra_args": True})
def train(
    data: Annotated[Path, typer.Option(help="Dataset folder with train and valid splits (Derm7pt release_v0 or its "
                                            "parent, or ISIC); format from data.format (auto-detected).")],
    out: Annotated[Path, typer.Option(help="Run folder.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="section.key=value overrides")] = None,
    config: Annotated[Optional[str], typer.Option(help="YAML file or packaged name (paper, tiny, demo, cpu-recipe).")] = None,
    seed: int = 0,
    seeds: Annotated[Optional[str], typer.Option(help="Several seeds: --seeds 0 1 2 (runs in OUT/seedN).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    against: Annotated[Optional[Path], typer.Option(
        help="With --seeds: a baseline run folder trained with the same seeds (its seeds_summary.json); prints "
             "the paired change per seed and a verdict (promising / no measurable effect / rejected, ±0.5 points).",
        show_default=False)] = None,
    progress: bool = True,
) -> None:
    """Train (checkpoints selected on validation average accuracy, or train.refit=true: train + valid, final
    weights; the test split is never read)."""
    from .config import load_config
    from .engine.run import train as run_train

    seed_list = _seeds(seed, seeds)
    baseline = _baseline(against, seed_list) if against is not None else None
    results = []
    for s in seed_list:
        cfg = load_config(config, overrides or [], seed=s)
        run_dir = out if len(seed_list) == 1 else out / f"seed{s}"
        summary = run_train(cfg, data, run_dir, resume=resume, progress=progress, argv=sys.argv)
        results.append(summary)
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:  # DDP worker processes stay quiet
            continue
        score = ("refit on train + valid: no validation score" if summary["best_val_avg_acc"] is None
                 else f"best val avg acc {100 * summary['best_val_avg_acc']:.2f} %")
        console.print(f"seed {s}: {score} ({summary['epochs_run']} epochs, {summary['train_seconds']} s) "
                      f"-> {summary['best_checkpoint']}")
        for name, phase in summary.get("phases", {}).items():  # train.distill: the teacher and the student
            acc = phase["best_val_avg_acc"]
            console.print(f"  {name}: {'no validation score' if acc is None else f'{100 * acc:.2f} %'} "
                          f"({phase['epochs_run']} epochs) -> {phase['best_checkpoint']}")
    if len(results) > 1 and all(r["best_val_avg_acc"] is not None for r in results):
        vals = [100 * r["best_val_avg_acc"] for r in results]
        from .engine.report import mean_sd, paired_verdict

        console.print(f"validation average accuracy over seeds {seed_list}: {mean_sd(vals)} %")
        summary = {"seeds": seed_list, "best_val_avg_acc": vals}
        if baseline is not None:
            judged = paired_verdict(dict(zip(seed_list, vals)), baseline)
            for s, v in zip(seed_list, vals):
                console.print(f"seed {s}: {v:.2f} vs {baseline[s]:.2f} in {against} ({judged['delta'][s]:+.2f})")
            console.print(f"mean change {judged['mean_delta']:+.2f} points: {judged['verdict']} (promising: mean "
                          f">= +{judged['margin']} and every seed gains; rejected: mean <= -{judged['margin']})")
            summary["against"] = {**judged, "run": str(against), "baseline": [baseline[s] for s in seed_list],
                                  "delta": [judged["delta"][s] for s in seed_list]}
        (out / "seeds_summary.json").write_text(json.dumps(summary, indent=2))


def _baseline(run: Path, seed_list: list[int]) -> dict[int, float]:
    """Validation accuracy by seed of a `train --seeds` run, checked before any training starts."""
    if len(seed_list) < 2:
        raise typer.BadParameter("a paired verdict needs --seeds with at least two seeds", param_hint="--against")
    path = run / "seeds_summary.json"
    try:
        saved = json.loads(path.read_text())
        baseline = dict(zip(saved["seeds"], saved["best_val_avg_acc"], strict=True))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise typer.BadParameter(f"{path}: not a `train --seeds` summary ({exc})", param_hint="--against") from None
    missing = [s for s in seed_list if s not in baseline]
    if missing:
        raise typer.BadParameter(f"{path} has no seed {', '.join(map(str, missing))} (it holds seeds "
                                 f"{sorted(baseline)}): pair the lever with the seeds its baseline was trained with",
                                 param_hint="--against")
    return {s: baseline[s] for s in seed_list}


@app.command("cache-trunk", context_settings={"allow_extra_args": True})
def cache_trunk(
    data: Annotated[Path, typer.Option(help="Dataset folder (as for train).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="section.key=value overrides")] = None,
    config: Annotated[Optional[str], typer.Option(help="YAML file or packaged name; needs train.trunk_views > 0.")] = None,
    splits: Annotated[str, typer.Option(help="Splits to cache, comma-separated.")] = "train,valid",
    engine: Annotated[str, typer.Option(help="auto (fastest measured, parity-checked) | eager | channels_last | "
                                             "onnxruntime.")] = "auto",
    processes: Annotated[int, typer.Option(help="Processes, each filling every n-th image with cores / n threads.")] = 1,
    devices: Annotated[Optional[str], typer.Option(help="GPUs to fill on, comma-separated (cuda:0,cuda:1).")] = None,
    progress: bool = True,
) -> None:
    """Fill the trunk-feature cache that `train` with train.trunk_views reads (train fills what is missing itself)."""
    from .config import load_config
    from .engine.trunk import ENGINES, cache_trunk as run_cache, describe

    if engine not in ("auto", *ENGINES):
        raise typer.BadParameter(f"{engine!r} is not one of auto, {', '.join(ENGINES)}", param_hint="--engine")
    if processes < 1:
        raise typer.BadParameter(f"need at least 1 process, got {processes}", param_hint="--processes")
    cfg = load_config(config, overrides or [])
    report = run_cache(cfg, data, tuple(s.strip() for s in splits.split(",") if s.strip()), engine, processes,
                       devices.split(",") if devices else None, progress)
    console.print(describe(report))


@app.command(context_settings={"allow_extra_args": True})
def cv(
    data: Annotated[Path, typer.Option(help="Derm7pt folder (release_v0 or its parent).")],
    out: Annotated[Path, typer.Option(help="Folder for the fold runs and cv.md / cv.json.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="section.key=value overrides")] = None,
    config: Annotated[Optional[str], typer.Option(help="YAML file or packaged name.")] = None,
    seed: int = 0,
    folds: Annotated[int, typer.Option(help="Number of folds over the train + valid cases.")] = 5,
    fold_seed: Annotated[int, typer.Option(help="Which folds; keep it fixed to compare configs on the same folds.")] = 0,
    progress: bool = True,
) -> None:
    """K-fold cross-validation over train + valid (test never read): compare configurations on 616 cases."""
    from .config import load_config
    from .engine.cv import run_cv

    cfg = load_config(config, overrides or [], seed=seed)
    if folds < 2:
        raise typer.BadParameter(f"need at least 2 folds, got {folds}", param_hint="--folds")
    result = run_cv(cfg, data, out, folds=folds, fold_seed=fold_seed, progress=progress)
    console.print((out / "cv.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"{folds}-fold validation average accuracy {result['mean']:.2f} ± {result['sd']:.2f} % -> {out}")


@app.command()
def ensemble(
    checkpoints: Annotated[list[Path], typer.Argument(help="Two or more checkpoints with the same model and data config.")],
    out: Annotated[Path, typer.Option(help="Ensemble checkpoint to write (must not exist).")],
    tta: Annotated[Optional[str], typer.Option(help="Inference TTA to store: none, flip or flip_rot (default: the first member's).")] = None,
    clinic_weight: Annotated[Optional[float], typer.Option(help="Clinical branch's late-fusion weight to store, in (0, 1].")] = None,
) -> None:
    """Average trained models into one checkpoint that evaluate, predict, serve and export use like any other."""
    from .checkpoint import CheckpointError, assemble_ensemble

    if out.exists():
        raise CheckpointError(f"{out}: already exists; pick a new --out (nothing was overwritten)")
    infer = {k: v for k, v in (("tta", tta), ("clinic_weight", clinic_weight)) if v is not None}
    cfg = assemble_ensemble(checkpoints, out, infer)
    console.print(f"{len(checkpoints)} members -> {out} (tta {cfg.infer.tta}, clinic weight {cfg.infer.clinic_weight})")


@app.command()
def teach(
    checkpoint: Annotated[Path, typer.Option(help="The teacher: a trained (or ensemble) checkpoint.")],
    data: Annotated[Path, typer.Option(help="Dataset whose cases get the teacher's probabilities (e.g. ISIC images).")],
    out: Annotated[Path, typer.Option(help="The .npz to write (ids and one probs_<TASK> array per task).")],
    split: Annotated[str, typer.Option(help="Which split of --data (all: every case).")] = "all",
    data_format: FormatOption = "auto",
    progress: bool = True,
) -> None:
    """Write a teacher's probabilities for the 8 tasks on every case of a dataset: distillation targets for a
    student trained with `data.extra=DATA data.extra_soft=OUT` (train.distill_weight weighs them)."""
    from .engine.teach import teach as run_teach

    r = run_teach(checkpoint, data, out, split, data_format, progress=progress)
    console.print(f"wrote {r['out']}: the teacher's probabilities for {r['cases']} case(s) of {r['dataset']} "
                  f"(split {r['split']}); train a student with data.extra={data} data.extra_soft={out}")


@app.command()
def calibrate(
    checkpoint: Annotated[Path, typer.Option(help="A trained (or ensemble) checkpoint.")],
    data: Annotated[Path, typer.Option(help="Dataset with a validation split (the one the model was chosen on).")],
    out: Annotated[Path, typer.Option(help="Calibrated checkpoint to write (must not exist).")],
    progress: bool = True,
) -> None:
    """Fit one temperature per task on validation and store them in a copy of the checkpoint.

    evaluate, predict, serve and export apply them by default; accuracies do not change.
    """
    from .engine.calibrate import calibrate_checkpoint

    report = calibrate_checkpoint(checkpoint, data, out, progress=progress)
    table = Table("task", "T", "valid NLL before → after", "valid ECE before → after", title=f"{out}")
    for name, r in report.items():
        if r["valid_nll_before"] is None:
            table.add_row(name, f"{r['temperature']:.2f}", "not annotated", "")
            continue
        table.add_row(name, f"{r['temperature']:.2f}", f"{r['valid_nll_before']:.3f} → {r['valid_nll_after']:.3f}",
                      f"{r['valid_ece_before']:.3f} → {r['valid_ece_after']:.3f}")
    console.print(table)


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="A best.ckpt / last.ckpt file.")],
    data: Annotated[Path, typer.Option(help="Dataset folder: Derm7pt, PH2 or ISIC layout (tasks it does not "
                                            "annotate are not scored).")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    split: Annotated[str, typer.Option(help="test | valid | train (Derm7pt); all (PH2, or every ISIC case).")] = "test",
    tta: Annotated[Optional[str], typer.Option(
        help="none | flip | flip_rot (default: the checkpoint's own infer.tta)")] = None,
    calibrate: Annotated[bool, typer.Option(help="Temperature scaling fitted on the validation split.")] = False,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16")] = "auto",
    data_format: FormatOption = "auto",
    skip_missing: SkipMissingOption = False,
    baseline_data: Annotated[Optional[Path], typer.Option(
        help="For data without a train split and a checkpoint that does not store its training majority "
             "classes: the training dataset whose train split gives the majority-class baseline.")] = None,
    level: Annotated[float, typer.Option(help="Conformal level of the prediction sets whose coverage is measured.")] = 0.9,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95 % intervals (0: none).")] = 1000,
    progress: bool = True,
) -> None:
    """Evaluate a checkpoint: metrics.json, report.md, predictions.csv, confusion/ROC/reliability PNGs."""
    from .engine.evaluate import evaluate as run_eval

    _check_level(level)
    if bootstrap < 0:
        raise typer.BadParameter(f"--bootstrap {bootstrap}: expected 0 (none) or more resamples")
    m = run_eval(checkpoint, data, out, split=split, tta=tta, calibrate=calibrate, precision=precision,
                 progress=progress, data_format=data_format, skip_missing=skip_missing, baseline_data=baseline_data,
                 level=level, bootstrap=bootstrap)
    console.print((out / "report.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    scored = "" if not m["not_annotated"] else f" over {len(m['scored_tasks'])} annotated tasks"
    console.print(f"average accuracy {100 * m['average_accuracy']:.2f} %{scored} on {m['cases']} {split} cases -> {out}")


@app.command()
def summarize(
    evaluations: Annotated[list[Path], typer.Argument(help="`evaluate --out` folders of the same cases, e.g. one "
                                                           "per seed.")],
    out: Annotated[Path, typer.Option(help="Folder for summary.json and summary.md.")],
) -> None:
    """Mean ± sd over several evaluations (seeds): accuracy per task, the 7-point rule, calibration, prediction
    sets per task and class, the referral point, the intervention curve."""
    from .engine.summary import write_summary

    s = write_summary(evaluations, out)
    console.print((out / "summary.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"{len(s['runs'])} evaluation(s) of {s['cases']} {s['split']} cases -> {out}")


@app.command()
def ablate(
    data: Annotated[Path, typer.Option(help="Derm7pt folder.")],
    out: Annotated[Path, typer.Option(help="Output folder for all runs and the tables.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="section.key=value overrides")] = None,
    config: Optional[str] = None,
    seed: int = 0,
    seeds: Optional[str] = None,
    tta: Annotated[Optional[str], typer.Option(
        help="none | flip | flip_rot | select (per run, on validation); default: the config's infer.tta")] = None,
    runs: Annotated[Optional[str], typer.Option(
        help="Comma-separated subset of DIM,DIM-noSA,CIM,CIM-noSA,DCIHMM,DCIHMM-noSA (default: all).")] = None,
    report_only: Annotated[bool, typer.Option(help="Train nothing: tables from the runs already finished.")] = False,
    progress: bool = True,
) -> None:
    """Train + evaluate DIM, CIM, DCIHMM with and without soft attention; write the paper's two tables.

    Finished runs under --out are reused and interrupted ones resumed, so it can be re-run to continue.
    """
    from .engine.ablate import check_runs, run_ablation

    picked = [r.strip() for r in runs.split(",") if r.strip()] if runs else None
    try:
        check_runs(picked or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--runs") from None
    text = run_ablation(data, out, config, overrides or [], _seeds(seed, seeds), tta=tta, progress=progress,
                        runs=picked, report_only=report_only)
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@app.command()
def demo(out: Path = Path("demo-run"), cases: int = 400, epochs: Optional[int] = None, progress: bool = True) -> None:
    """The main job end to end on synthetic data: synthesise, train, evaluate, predict one case."""
    from .demo import run_demo

    run_demo(out, cases=cases, epochs=epochs, progress=progress, console=console)


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint file.")],
    derm: Annotated[Optional[Path], typer.Option(help="Dermoscopy image.")] = None,
    clinic: Annotated[Optional[Path], typer.Option(help="Clinical photo.")] = None,
    sex: Optional[str] = None,
    location: Optional[str] = None,
    elevation: Optional[str] = None,
    out: Annotated[Optional[list[Path]], typer.Option(
        help="Write the result JSON here. With --batch: .csv, .json or .jsonl, repeatable (--out r.csv --out r.json); "
             "the run resumes from OUT.parts/ if it was interrupted.")] = None,
    heatmaps: Annotated[Optional[Path], typer.Option(help="Folder for attention overlays (PNG).")] = None,
    batch: Annotated[Optional[Path], typer.Option(
        help="A CSV (columns derm and/or clinic, optional sex, location, elevation, case_id; paths relative to "
             "the CSV's folder) or a folder of dermoscopy images. Exit 3 if any row failed.")] = None,
    precision: Annotated[str, typer.Option(help="auto (fp32 and bf16 timed once on a bf16 CPU, with the layout, "
                                                "the fastest kept) | fp32 | bf16")] = "auto",
    backend: Annotated[str, typer.Option(help="auto (eager, frozen and ONNX Runtime timed once on this CPU, the fastest "
                                              "kept; eager when --heatmaps wants per-head maps) | torch | frozen | "
                                              "onnx (from .onnx)")] = "auto",
    tta: Annotated[Optional[str], typer.Option(
        help="Test-time views: none | flip | flip_rot (default: the checkpoint's own infer.tta)")] = None,
    devices: Annotated[int, typer.Option(help="--batch: processes (CPU, sharing the cores) or GPUs, one process each.")] = 1,
    accelerator: Annotated[str, typer.Option(help="--batch: cpu | gpu | auto (Lightning's accelerator).")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="--batch: cases per forward pass.")] = 16,
    restart: Annotated[bool, typer.Option(help="--batch: discard an interrupted run's journal and start over.")] = False,
    progress: Annotated[bool, typer.Option(help="--batch: progress bar (rows/s, ETA).")] = True,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Correct a criterion with the clinician's value, e.g. --set BWV=ABS (repeatable): the 7-point "
                      "score, the rule and the stacked diagnosis follow it.")] = None,
    level: Annotated[Optional[float], typer.Option(
        help="Conformal level of the per-task prediction sets [default: 0.9].")] = None,
    report: Annotated[Optional[Path], typer.Option(
        help="Write a one-page case report (self-contained HTML; print it to PDF from the browser).")] = None,
    figures: Annotated[Optional[Path], typer.Option(
        help="--report: this model's `evaluate` metrics.json, to quote its measured test figures.")] = None,
) -> None:
    """Predict one case (or a batch: CSV or image folder): criteria, diagnosis, 7-point score, attention maps."""
    from .infer.predict import Predictor, PredictError, save_heatmaps

    outs = out or []
    if batch is not None:
        ignored = [name for name, value in (("--set", set_), ("--level", level), ("--report", report),
                                            ("--heatmaps", heatmaps), ("--figures", figures), ("--derm", derm),
                                            ("--clinic", clinic), ("--sex", sex), ("--location", location),
                                            ("--elevation", elevation)) if value is not None]
        if ignored:  # refused rather than silently dropped (batch rows carry their own images and metadata)
            raise typer.BadParameter(f"{', '.join(ignored)}: not supported with --batch (it predicts each row as it "
                                     "is, at the default 90 % level, without reports or overlays)", param_hint="--batch")
        _predict_batch(checkpoint, batch, outs, precision=precision, backend=backend, tta=tta, devices=devices,
                       accelerator=accelerator, batch_size=batch_size, restart=restart, progress=progress)
        return
    if len(outs) > 1:
        raise typer.BadParameter("one --out for a single case (several only with --batch)")
    out = outs[0] if outs else None
    corrections = {}
    for item in set_ or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise typer.BadParameter(f"--set {item!r}: expected CRITERION=VALUE, e.g. BWV=ABS")
        corrections[name.strip()] = value.strip()
    level = 0.9 if level is None else level
    _check_level(level)
    predictor = Predictor.from_checkpoint(checkpoint, precision=precision, backend=backend, tta=tta,
                                          heads=heatmaps is not None)
    predictor.set_level = level
    err.print(f"path {predictor.choice}", highlight=False)
    for lack in predictor.artifacts.missing():
        err.print(f"note: this checkpoint has no {lack}", highlight=False, markup=False)
    if derm is None and clinic is None:
        raise PredictError("give --derm and/or --clinic (or --batch CSV)")
    meta = {"sex": sex, "location": location, "elevation": elevation}
    result = predictor.predict(derm=derm, clinic=clinic, meta=meta, corrections=corrections)
    if report:
        from .infer.case_report import read_figures, write_report

        write_report(report, result, {"derm": derm, "clinic": clinic}, meta, predictor.info,
                     predictor.artifacts.provenance, read_figures(figures),
                     case_id=(derm or clinic).stem)
        err.print(f"case report -> {report}", highlight=False, markup=False)
    payload = json.dumps(result.to_dict(), indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(payload)
    if heatmaps:
        written = save_heatmaps(result, {"derm": derm, "clinic": clinic}, heatmaps)
        console.print(f"{len(written)} attention images -> {heatmaps}")
    _print_prediction(result)


def _predict_batch(checkpoint: Path, source: Path, outs: list[Path], **options) -> None:
    """`predict --batch`: streamed, resumable, per-row errors; exit 3 when some rows failed."""
    import tempfile

    from .infer.batch import EXIT_ROWS_FAILED, run_batch

    with tempfile.TemporaryDirectory(prefix="sevenpoint-batch-") as scratch:
        to_stdout = not outs
        summary = run_batch(checkpoint, source, outs or [Path(scratch) / "results.json"], **options)
        if to_stdout:
            console.print_json(Path(summary.outputs[0]).read_text())
    resumed = f", {summary.resumed} of them from an interrupted run" if summary.resumed else ""
    skipped = f"; {summary.skipped} non-image file(s) in the folder skipped" if summary.skipped else ""
    where = f" -> {', '.join(summary.outputs)}" if not to_stdout else ""
    err.print(f"{summary.total} rows: {summary.ok} predicted, {summary.failed} failed{resumed}{skipped}{where}",
              highlight=False, markup=False)
    for line in summary.failures:
        err.print(f"  {line}", highlight=False, markup=False)
    if summary.failed > len(summary.failures):
        err.print(f"  ... and {summary.failed - len(summary.failures)} more (the error column of the output)",
                  highlight=False, markup=False)
    if summary.failed:
        raise SystemExit(EXIT_ROWS_FAILED)


@app.command()
def serve(
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint (.ckpt) or ONNX export (.onnx).")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = 10.0,
    max_queue: Annotated[int, typer.Option(help="Predictions waiting at once; more get 503.")] = 64,
    backend: Annotated[str, typer.Option(help="auto (eager, frozen and ONNX Runtime timed once on this CPU, the fastest "
                                              "kept) | frozen | torch | onnx (inferred from .onnx)")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (fp32 and bf16 timed once on a bf16 CPU, with the layout, "
                                                "the fastest kept) | fp32 | bf16")] = "auto",
    tta: Annotated[Optional[str], typer.Option(
        help="Test-time views: none | flip | flip_rot (default: the checkpoint's own infer.tta)")] = None,
    token: Annotated[Optional[str], typer.Option(
        envvar="SEVENPOINT_TOKEN", help="Access token every /api call must send (Authorization: Bearer TOKEN); "
                                        "required to bind beyond loopback.")] = None,
    request_timeout: Annotated[float, typer.Option(help="Seconds to receive an upload (408 after).")] = 30.0,
    predict_timeout: Annotated[float, typer.Option(help="Seconds for one prediction, queue included (504 after).")] = 60.0,
    max_batch: Annotated[int, typer.Option(help="Concurrent requests gathered into one forward pass, at most "
                                                "(1: one at a time).")] = 8,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to share its "
                                                      "forward pass, at most.")] = 5.0,
    adaptive_threads: Annotated[bool, typer.Option(help="Drop to one thread while forward passes run much slower "
                                                        "than the best seen (a busy neighbour process).")] = True,
    level: Annotated[float, typer.Option(help="Conformal level of the per-task prediction sets.")] = 0.9,
    figures: Annotated[Optional[Path], typer.Option(
        help="This model's `evaluate` metrics.json, quoted in case reports.")] = None,
) -> None:
    """Serve the web page and JSON API (research tool, not a medical device)."""
    _check_level(level)
    from .web.app import is_loopback

    if not is_loopback(host) and not token:
        raise typer.BadParameter(f"{host} is reachable from other machines: give an access token with --token "
                                 "(or SEVENPOINT_TOKEN), or serve on 127.0.0.1", param_hint="--host")
    if token is not None and len(token) < 16:
        raise typer.BadParameter("use an access token of at least 16 characters (e.g. `python -c 'import secrets; "
                                 "print(secrets.token_urlsafe())'`)", param_hint="--token")
    if checkpoint is None:
        raise typer.BadParameter("give --checkpoint. No model yet? `sevenpoint demo` trains one on synthetic data "
                                 "and writes demo-run/run/checkpoints/best.ckpt", param_hint="--checkpoint")
    import uvicorn

    from .infer.predict import Predictor
    from .web.app import create_app

    predictor = Predictor.from_checkpoint(checkpoint, backend=backend, tta=tta, precision=precision)
    predictor.set_level = level
    if adaptive_threads:
        from .runtime import ThreadGovernor

        predictor.governor = ThreadGovernor()
    link = f"http://{host}:{port}/" + (f"#token={token}" if token else "")
    console.print(f"serving {predictor.info} on {link}")
    if max_batch < 1 or batch_wait_ms < 0:
        raise typer.BadParameter(f"--max-batch {max_batch} must be >= 1 and --batch-wait-ms {batch_wait_ms} >= 0")
    from .infer.case_report import read_figures

    app_ = create_app(predictor, max_upload_mb=max_upload_mb, max_queue=max_queue, token=token,
                      request_timeout=request_timeout, predict_timeout=predict_timeout, max_batch=max_batch,
                      batch_wait_ms=batch_wait_ms, figures=read_figures(figures))
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint file.")],
    onnx: Annotated[Path, typer.Option(help="Output .onnx file.")],
    check: Annotated[bool, typer.Option(help="Compare with PyTorch on synthetic inputs.")] = True,
    int8: Annotated[Optional[Path], typer.Option(
        help="Dataset folder: quantise to int8 (static, calibrated on its train split) and check the accuracy on "
             "--check-split; the file is written only if it drops < --max-drop points.")] = None,
    calibration_cases: Annotated[int, typer.Option(help="int8: training cases to calibrate on.")] = 64,
    check_split: Annotated[str, typer.Option(help="int8: the split its accuracy is compared on (not test).")] = "valid",
    max_drop: Annotated[float, typer.Option(help="int8: largest accepted average-accuracy drop, points.")] = 0.5,
    data_format: FormatOption = "auto",
) -> None:
    """Export to ONNX (dynamic batch; derm, clinic, meta + availability flags) and check it with onnxruntime.
    With --int8 DATA: an int8 model calibrated and checked on DATA (the fast CPU path where its accuracy holds)."""
    from .engine.int8 import export_int8
    from .infer.export import check_parity, export_onnx

    if int8 is not None:
        r = export_int8(checkpoint, onnx, int8, calibration_cases, check_split, max_drop, data_format)
        note = " (the model was trained on this split: not held out)" if r["trained_on_check_split"] else ""
        console.print(f"wrote {r['onnx']} ({onnx.stat().st_size / 2**20:.1f} MB, int8, calibrated on "
                      f"{r['calibration_cases']} training cases)")
        console.print(f"{r['check_split']} split, {r['cases']} cases{note}: average accuracy fp32 "
                      f"{100 * r['fp32_avg_acc']:.2f} %, int8 {100 * r['int8_avg_acc']:.2f} % "
                      f"(drop {r['drop_points']:.2f} points, limit {max_drop}); same class on "
                      f"{100 * r['argmax_agreement']:.1f} % of the task answers")
        return
    info = export_onnx(checkpoint, onnx)
    console.print(f"wrote {info['onnx']} ({onnx.stat().st_size / 2**20:.1f} MB)")
    if check:
        diff = check_parity(checkpoint, onnx)
        console.print(f"max |prob difference| vs PyTorch fp32: {diff:.2e}")
        if diff >= 1e-4:
            raise SystemExit(f"error: ONNX output differs from PyTorch by {diff:.2e} (>= 1e-4)")


@app.command()
def bench(
    variant: str = "DCIHMM",
    size: int = 299,
    backbone: str = "xception",
    batch: int = 8,
    repeats: int = 5,
    out: Path = Path("bench"),
    compile: Annotated[bool, typer.Option(help="Also time torch.compile (minutes of compilation).")] = False,
    onnx: bool = True,
    freeze: Annotated[bool, typer.Option(help="Also time the traced + frozen inference graph.")] = True,
    int8: Annotated[bool, typer.Option(help="Also time ONNX Runtime int8 (speed only; see export --int8).")] = False,
    threads: Optional[int] = None,
    emulated: Annotated[bool, typer.Option(help="Also time bf16 paths on a CPU without bf16 units (emulated: "
                                                "slow, and never the fastest).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Speed of every CPU path vs naive fp32 in one run: bench.json + bench.md in --out."""
    from .engine.bench import bench_table, run_bench

    r = run_bench(variant, size, backbone, batch=batch, repeats=repeats, compile=compile, onnx=onnx, out=out,
                  threads=threads, freeze=freeze, int8=int8, emulated=emulated, progress=progress)
    console.print(bench_table(r), markup=False, highlight=False, soft_wrap=True)
    console.print(f"-> {out / 'bench.json'}")


@app.command()
def loadtest(
    url: Annotated[str, typer.Option(help="Base URL of a running `sevenpoint serve`.")] = "http://127.0.0.1:8000",
    derm: Annotated[Path, typer.Option(help="Dermoscopy image to send.")] = Path("derm.jpg"),
    clinic: Optional[Path] = None,
    requests: int = 50,
    concurrency: int = 50,
) -> None:
    """Concurrent predictions against a running server: status counts and latency p50/p95."""
    from .web.loadtest import run_load

    console.print_json(json.dumps(run_load(url, derm, clinic, requests, concurrency)))


def _check_level(level: float) -> None:
    """--level of predict, serve and evaluate: a conformal level strictly between 0 and 1."""
    if not 0.0 < level < 1.0:
        raise typer.BadParameter(f"--level {level}: expected a value in (0, 1), e.g. 0.9", param_hint="--level")


def _print_prediction(result) -> None:
    from .schema import MELANOMA_THRESHOLD

    title = "sevenpoint prediction (research tool, not a medical device)"
    level = f"{result.set_level:.0%} set" if result.sets is not None else "set"
    table = Table("task", "prediction", "probability", level, title=title)
    for name, tr in result.tasks.items():
        given = " (clinician)" if name in result.corrections else ""
        plausible = " or ".join(result.sets[name]) if result.sets is not None else "-"
        table.add_row(name, f"{tr.predicted} ({tr.predicted_name}){given}", f"{tr.probabilities[tr.predicted]:.2f}",
                      plausible)
    console.print(table)
    if result.uncertain:
        console.print(f"UNCERTAIN: {result.uncertain_why}")
    console.print(f"diagnosis: {result.diagnosis} ({result.diagnosis_name}, {result.diagnosis_source}); "
                  f"7-point score {result.seven_point_score}"
                  f" -> {'SUSPECT MELANOMA' if result.melanoma_flag else 'below'} (threshold {MELANOMA_THRESHOLD}); "
                  f"DIAG melanoma probability {result.melanoma_probability:.2f}; branches {', '.join(result.branches_used)}")
    if result.triage is not None:
        console.print(("REFER" if result.refer else "triage") + f": {result.triage_text()}")
    console.print(f"probabilities: {result.calibration}")
    if result.ood_warning:
        err.print(f"[yellow]warning:[/] the dermoscopy image looks unlike the training images (out-of-distribution "
                  f"score {result.ood_score:.1f} > {result.ood_threshold:.1f}); treat this result with extra caution")


if __name__ == "__main__":
    main()
