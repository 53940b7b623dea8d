"""`sevenpoint calibrate`: temperatures fitted on validation travel in the checkpoint and every
inference path applies them; accuracies never change."""

import subprocess
import sys

import numpy as np
import pytest

from sevenpoint.infer.artifacts import Artifacts
from sevenpoint.checkpoint import assemble_ensemble, load_model, read_checkpoint
from sevenpoint.data import Derm7pt
from sevenpoint.engine.calibrate import CalibrateError, calibrate_checkpoint
from sevenpoint.engine.evaluate import evaluate
from sevenpoint.engine.metrics import nll
from sevenpoint.infer.temperature import apply_temperature
from sevenpoint.infer.predict import Predictor
from sevenpoint.schema import TASK_NAMES


@pytest.fixture(scope="module")
def calibrated(tiny_run, synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "calibrated.ckpt"
    report = calibrate_checkpoint(tiny_run["best_checkpoint"], synth_root, out, progress=False)
    return out, report


def test_temperatures_are_the_validation_fit_and_stored_in_the_checkpoint(calibrated, tiny_run, synth_root, tmp_path):
    out, report = calibrated
    _, cfg, _ = load_model(out)
    temps = [report[name]["temperature"] for name in TASK_NAMES]
    assert cfg.infer.temperature == tuple(temps)
    assert any(abs(t - 1.0) > 0.05 for t in temps)  # the tiny model is mis-calibrated somewhere
    n_valid = len(Derm7pt.load(synth_root).splits["valid"])
    assert read_checkpoint(out)["sevenpoint"]["calibration"]["fitted_on"] == f"{synth_root} (valid, {n_valid} cases)"
    # the same fit as evaluate --calibrate, which reads the validation split only
    fitted = evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path / "e", split="test", calibrate=True,
                      progress=False)["calibration"]
    assert [fitted[name]["temperature"] for name in TASK_NAMES] == temps


def test_evaluate_applies_the_stored_temperatures_and_accuracy_is_unchanged(calibrated, tiny_run, synth_root, tmp_path):
    out, _ = calibrated
    plain = evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path / "plain", progress=False)
    cal = evaluate(out, synth_root, tmp_path / "cal", progress=False)
    assert plain["temperature"] is None
    raw = np.loadtxt(tmp_path / "plain" / "predictions.csv", delimiter=",", skiprows=1, dtype=str)
    header = (tmp_path / "plain" / "predictions.csv").read_text().splitlines()[0].split(",")
    scaled, ys = [], []
    for t, name in enumerate(TASK_NAMES):
        cols = [i for i, h in enumerate(header) if h.startswith(f"{name}_p_")]
        ys.append(raw[:, header.index(f"{name}_true")].astype(int))
        scaled.append(apply_temperature(raw[:, cols].astype(float), cal["temperature"][t]))
    # `calibrate` also fits the stacked diagnosis; where it is the default, DIAG is the stacked model's
    # answer on the scaled probabilities, and temperatures alone still change no accuracy
    stacked = cal["diagnosis_source"] == "stacked"
    if stacked:
        scaled[0] = Artifacts.from_section(read_checkpoint(out)["sevenpoint"]).stacked_diagnosis(scaled)
    for t, name in enumerate(TASK_NAMES):
        assert cal["tasks"][name]["nll"] == pytest.approx(nll(scaled[t], ys[t]), abs=1e-4)
        if not (stacked and name == "DIAG"):
            assert cal["tasks"][name]["accuracy"] == plain["tasks"][name]["accuracy"]


def test_predict_and_onnx_apply_them(calibrated, tiny_run, synth_root, tmp_path):
    out, _ = calibrated
    case = Derm7pt.load(synth_root).split_cases("test")[0]
    inputs = {"derm": case.derm, "clinic": case.clinic, "meta": case.raw_meta}
    plain = Predictor.from_checkpoint(tiny_run["best_checkpoint"], precision="fp32").predict(**inputs)
    cal_predictor = Predictor.from_checkpoint(out, precision="fp32")
    cal = cal_predictor.predict(**inputs)
    assert cal_predictor.info["temperature"] == list(cal_predictor.cfg.infer.temperature)
    scaled = [apply_temperature(np.array([list(plain.tasks[name].probabilities.values())]),
                                cal_predictor.cfg.infer.temperature[t]) for t, name in enumerate(TASK_NAMES)]
    if cal.diagnosis_source == "stacked":  # the stacked diagnosis (also fitted by calibrate) on the scaled ones
        scaled[0] = cal_predictor.artifacts.stacked_diagnosis(scaled)
    for t, name in enumerate(TASK_NAMES):
        after = np.array(list(cal.tasks[name].probabilities.values()))
        np.testing.assert_allclose(after, scaled[t][0], atol=1e-5)
        if name != "DIAG":
            assert cal.tasks[name].predicted == plain.tasks[name].predicted
    onnx_path = tmp_path / "cal.onnx"
    proc = subprocess.run([sys.executable, "-m", "sevenpoint.cli", "export", "--checkpoint", str(out),
                           "--onnx", str(onnx_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    via_onnx = Predictor.from_onnx(onnx_path).predict(**inputs)
    for name in TASK_NAMES:
        np.testing.assert_allclose(list(via_onnx.tasks[name].probabilities.values()),
                                   list(cal.tasks[name].probabilities.values()), atol=1e-4)


def test_calibrate_never_overwrites_and_ensembles_drop_member_temperatures(calibrated, tiny_run, synth_root, tmp_path):
    out, _ = calibrated
    before = out.read_bytes()
    with pytest.raises(CalibrateError, match="already exists"):
        calibrate_checkpoint(tiny_run["best_checkpoint"], synth_root, out, progress=False)
    assert out.read_bytes() == before
    cfg = assemble_ensemble([out, tiny_run["best_checkpoint"]], tmp_path / "ens.ckpt")
    assert cfg.infer.temperature is None  # a member's temperatures do not fit the average
    proc = subprocess.run([sys.executable, "-m", "sevenpoint.cli", "calibrate", "--checkpoint", str(tmp_path / "ens.ckpt"),
                           "--data", str(synth_root), "--out", str(tmp_path / "ens-cal.ckpt"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "valid NLL before → after" in proc.stdout and "DIAG" in proc.stdout
    assert load_model(tmp_path / "ens-cal.ckpt")[1].infer.temperature is not None


@pytest.mark.parametrize("members", [1, 2])
def test_train_calibrate_stores_validation_temperatures_in_best_ckpt(synth_root, tmp_path, members):
    from sevenpoint.config import load_config
    from sevenpoint.data import load_dataset
    from sevenpoint.engine.calibrate import fit_on_validation
    from sevenpoint.engine.run import train

    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'c'}", "train.epochs=1", f"train.ensemble={members}",
                               "train.calibrate=true"])
    summary = train(cfg, synth_root, tmp_path / "run", progress=False)
    model, saved, _ = load_model(summary["best_checkpoint"])
    assert saved.infer.temperature is not None
    temps, _, _ = fit_on_validation(model, saved, load_dataset(synth_root), progress=False)  # ignores stored ones
    assert list(saved.infer.temperature) == pytest.approx(temps)
    if members > 1:  # members stay uncalibrated; only the average is
        for m in ("m0", "m1"):
            member = tmp_path / "run" / "members" / m / "checkpoints" / "best.ckpt"
            assert load_model(member)[1].infer.temperature is None
