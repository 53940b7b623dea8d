"""`train.refit`: the validation split joins the training data, nothing is selected on it, and
every command that would read it as held-out data refuses or says so."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sevenpoint.checkpoint import load_model, read_checkpoint
from sevenpoint.config import ConfigError, load_config
from sevenpoint.data import Derm7pt, make_synthetic
from sevenpoint.engine.calibrate import CalibrateError, calibrate_checkpoint
from sevenpoint.engine.evaluate import evaluate, train_majority
from sevenpoint.engine.run import train

REFIT = ["train.refit=true", "train.epochs=2"]


@pytest.fixture(scope="module")
def refit_data(tmp_path_factory):
    """A synthetic set whose train + valid majority class differs from train's on a task (seed 4 at 64 px)."""
    return make_synthetic(tmp_path_factory.mktemp("refit-data"), cases=60, size=64, seed=4)


@pytest.fixture(scope="module")
def refit_run(refit_data, tmp_path_factory):
    """One tiny model refit through the CLI, as a user would."""
    run = tmp_path_factory.mktemp("refit") / "run"
    proc = subprocess.run([sys.executable, "-m", "sevenpoint.cli", "train", "--data", str(refit_data), "--out", str(run),
                           "--config", "tiny", "--no-progress", f"data.cache_dir={run.parent / 'cache'}", *REFIT],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return run, proc.stdout


def test_refit_trains_on_train_plus_valid_and_keeps_the_final_weights(refit_run, refit_data):
    run, stdout = refit_run
    data = Derm7pt.load(refit_data)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["refit"] and summary["best_val_avg_acc"] is None
    assert summary["train_cases"] == len(data.splits["train"]) + len(data.splits["valid"])
    assert "no validation score" in stdout and "refit: training on train + valid" in stdout
    best, last = (torch.load(run / "checkpoints" / f"{n}.ckpt", map_location="cpu", weights_only=True)
                  for n in ("best", "last"))
    assert best["epoch"] == last["epoch"] == 1  # best.ckpt = the weights after the final epoch, not a selection
    for key, value in last["state_dict"].items():
        torch.testing.assert_close(best["state_dict"][key], value, rtol=0, atol=0)
    header = next(iter((run / "logs").glob("*/metrics.csv"))).read_text().splitlines()[0]
    assert "train/loss" in header and "val/" not in header  # no validation loop ran
    combined = train_majority(np.concatenate([data.targets("train"), data.targets("valid")]))
    assert combined != train_majority(data.targets("train"))  # so the next line can tell them apart
    assert read_checkpoint(run / "checkpoints" / "best.ckpt")["sevenpoint"]["train_majority"] == combined


def test_refit_checkpoint_is_never_calibrated_or_scored_as_held_out_on_valid(refit_run, refit_data, tmp_path):
    run, _ = refit_run
    synth_root = refit_data
    ckpt = run / "checkpoints" / "best.ckpt"
    assert load_model(ckpt)[1].train.refit
    with pytest.raises(CalibrateError, match="refit on train \\+ valid"):
        calibrate_checkpoint(ckpt, synth_root, tmp_path / "cal.ckpt", progress=False)
    assert not (tmp_path / "cal.ckpt").exists()
    with pytest.raises(ValueError, match="which this refit model was trained on"):
        evaluate(ckpt, synth_root, tmp_path / "e", split="test", calibrate=True, progress=False)
    assert evaluate(ckpt, synth_root, tmp_path / "v", split="valid", progress=False)["split_in_training_data"]
    assert not evaluate(ckpt, synth_root, tmp_path / "t", split="test", progress=False)["split_in_training_data"]


def test_refit_ensemble_resumes_and_every_member_refits(synth_root, tmp_path):
    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'c'}", *REFIT, "train.ensemble=2"])
    train(cfg, synth_root, tmp_path / "run", progress=False, stop_after_epochs=1)  # killed inside member 0
    summary = train(load_config("tiny"), synth_root, tmp_path / "run", resume=True, progress=False)
    data = Derm7pt.load(synth_root)
    assert summary["refit"] and summary["best_val_avg_acc"] is None and summary["valid_cases"] == 0
    assert summary["train_cases"] == len(data.splits["train"]) + len(data.splits["valid"])
    for name, member in summary["members"].items():
        assert member["best_val_avg_acc"] is None and member["epochs_run"] == 2
        best = torch.load(member["best_checkpoint"], map_location="cpu", weights_only=True)
        assert best["epoch"] == 1  # the final epoch's weights, also for the resumed member
    assert (tmp_path / "run" / "members" / "m0" / "logs" / "resume1").is_dir()
    assert load_model(summary["best_checkpoint"])[1].train.refit


@pytest.mark.parametrize("extra, message", [("train.calibrate=true", "no held-out case is left"),
                                            ("train.early_stopping=5", "no validation split to stop on")])
def test_refit_refuses_what_needs_a_held_out_split(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [*REFIT, extra])


def test_cv_and_ablate_refuse_a_refit(synth_root, tmp_path):
    from sevenpoint.engine.ablate import run_ablation
    from sevenpoint.engine.cv import run_cv

    with pytest.raises(ConfigError, match="train.refit=false"):
        run_cv(load_config("tiny", REFIT), synth_root, tmp_path / "cv", folds=2, progress=False)
    with pytest.raises(ConfigError, match="train.refit=false"):
        run_ablation(synth_root, tmp_path / "ab", "tiny", REFIT, seeds=[0], runs=["DIM"], progress=False)
    assert not (tmp_path / "cv").exists() and not (tmp_path / "ab").exists()
