"""Distillation in one run (`train.distill`): the recipe is trained twice.

1. The teacher (`RUN/teacher/`): the recipe as it is, on the labelled data alone.
2. The teacher writes its probabilities for the 8 tasks on every image of `data.extra` (`engine.teach`;
   `RUN/teacher/soft_targets.npz`): images without the checklist's labels, e.g. ISIC 2017's.
3. The student (`RUN/student/`): the same recipe again, learning the labels plus the teacher's
   probabilities on those images (`data.extra_soft`; their own labels count only with `data.extra_labels`).

`RUN/checkpoints/best.ckpt` is the student's, so evaluate, predict, serve and export use it like any
checkpoint. The unlabelled images are optional: where `data.extra` does not exist the run says so, trains
the teacher alone and keeps it as the model. Each phase is an ordinary resumable run; a finished phase is
not trained again on `--resume`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_json
from ..config import RunConfig
from .ensemble import train_ensemble
from .train import open_run_dir, saved_train_option, train_model

TEACHER, STUDENT = "teacher", "student"
SOFT_FILE = "soft_targets.npz"
PHASE_KEYS = ("best_checkpoint", "best_val_avg_acc", "epochs_run", "train_seconds", "members")


def is_distill_run(run_dir: Path) -> bool:
    return bool(saved_train_option(run_dir, "distill", False))


def phase_configs(cfg: RunConfig, soft_file: str | os.PathLike) -> tuple[RunConfig, RunConfig]:
    """The teacher's config (the recipe without the unlabelled images) and the student's (with the teacher's
    probabilities on them)."""
    train = dataclasses.replace(cfg.train, distill=False)
    teacher = dataclasses.replace(cfg, train=train, data=dataclasses.replace(cfg.data, extra=None, extra_soft=None))
    student = dataclasses.replace(cfg, train=train, data=dataclasses.replace(cfg.data, extra_soft=str(soft_file)))
    return teacher, student


def _holds_run(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last.ckpt").is_file() or (run_dir / "members").is_dir()


def _train_phase(cfg: RunConfig, data_dir, phase_dir: Path, progress: bool, argv, stop_after_epochs,
                 splits) -> dict:
    """One phase trained, or resumed where its folder holds an unfinished run."""
    trainer = train_ensemble if cfg.train.ensemble > 1 else train_model
    return trainer(cfg, data_dir, phase_dir, resume=_holds_run(phase_dir), progress=progress, argv=argv,
                   stop_after_epochs=stop_after_epochs, splits=splits)


def _link_or_copy(src: Path, dst: Path) -> None:
    """`dst` becomes `src`'s file: a hard link where the file system allows it, else a copy (atomic either way)."""
    import shutil

    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def train_distilled(cfg: RunConfig, data_dir: str | os.PathLike, run_dir: str | os.PathLike, resume: bool = False,
                    progress: bool = True, argv: list[str] | None = None, stop_after_epochs: int | None = None,
                    splits: dict[str, np.ndarray] | None = None) -> dict:
    """Teacher, its probabilities on `data.extra`, then the student (module docstring); returns the summary
    also written to `run_dir/train_summary.json`. `stop_after_epochs` interrupts the first phase (tests)."""
    from .teach import teach

    run_dir = Path(run_dir)
    cfg = open_run_dir(cfg, run_dir, resume, argv, taken=(TEACHER, "checkpoints"))
    unlabelled = Path(cfg.data.extra)
    soft_file = run_dir / TEACHER / SOFT_FILE
    teacher_cfg, student_cfg = phase_configs(cfg, soft_file)
    if not unlabelled.exists():
        print(f"distillation skipped: no unlabelled images at {unlabelled} (data.extra); the teacher alone is "
              f"trained and kept as the model. Put dermoscopy images there (e.g. ISIC 2017's, README) or set "
              f"data.extra=DIR for a student.", flush=True)
    done_file = run_dir / "phases.json"
    phases: dict[str, dict] = json.loads(done_file.read_text()) if done_file.is_file() else {}
    if TEACHER not in phases:
        print(f"distillation: the teacher -> {run_dir / TEACHER}", flush=True)
        summary = _train_phase(teacher_cfg, data_dir, run_dir / TEACHER, progress, argv, stop_after_epochs, splits)
        if stop_after_epochs:  # an interrupted run (tests): the teacher is not finished
            return summary
        phases[TEACHER] = {k: summary[k] for k in PHASE_KEYS if k in summary}
        write_json(done_file, phases)
    if unlabelled.exists() and STUDENT not in phases:
        if not soft_file.is_file():
            start = time.perf_counter()
            taught = teach(phases[TEACHER]["best_checkpoint"], unlabelled, soft_file, data_format=cfg.data.extra_format,
                           batch_size=cfg.train.batch_size, progress=progress, extra_cases=cfg.data.extra_cases)
            phases["teach_seconds"] = round(time.perf_counter() - start, 1)
            write_json(done_file, phases)
            print(f"distillation: the teacher's probabilities for {taught['cases']} unlabelled case(s) of "
                  f"{taught['dataset']} -> {soft_file} ({phases['teach_seconds']} s)", flush=True)
        print(f"distillation: the student -> {run_dir / STUDENT}", flush=True)
        summary = _train_phase(student_cfg, data_dir, run_dir / STUDENT, progress, argv, None, splits)
        phases[STUDENT] = {k: summary[k] for k in PHASE_KEYS if k in summary}
        write_json(done_file, phases)
    trained = [name for name in (TEACHER, STUDENT) if name in phases]
    model = phases[trained[-1]]
    best = run_dir / "checkpoints" / "best.ckpt"
    _link_or_copy(Path(model["best_checkpoint"]), best)
    summary = {
        "best_checkpoint": str(best),
        "best_val_avg_acc": model["best_val_avg_acc"],
        "distilled": STUDENT in phases,
        "unlabelled": str(unlabelled),
        "soft_targets": str(soft_file) if STUDENT in phases else None,
        "phases": {name: phases[name] for name in trained},
        "epochs_run": sum(phases[name]["epochs_run"] for name in trained),
        "train_seconds": round(sum(phases[name]["train_seconds"] for name in trained) + phases.get("teach_seconds", 0.0), 1),
        "refit": cfg.train.refit,
        "config": dataclasses.asdict(cfg),
    }
    write_json(run_dir / "train_summary.json", summary)
    return summary
