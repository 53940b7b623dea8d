import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sevenpoint.data import Derm7pt
from sevenpoint.infer.predict import Predictor, PredictError
from sevenpoint.schema import TASK_NAMES, seven_point_score

CLI = [sys.executable, "-m", "sevenpoint.cli"]


def run(*args, check=True):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_synth_then_check_data(tmp_path):
    out = run("synth", tmp_path / "d", "--cases", 40, "--size", 48, "--seed", 2).stdout
    assert "wrote 40 synthetic derm7pt cases" in out
    report = run("check-data", tmp_path / "d").stdout
    assert "usable" in report and "clinic photo missing" in report and "resolved case-insensitively" in report
    summary = json.loads(run("check-data", tmp_path / "d", "--json").stdout)
    assert sum(summary["splits"].values()) == 40


def test_check_data_fails_clearly(tmp_path):
    proc = run("check-data", tmp_path / "nothing", check=False)
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("seeds", [["0", "1", "2"], ["0 1 2"], ["0,1,2"]], ids=["spaced", "quoted", "commas"])
def test_seeds_are_read_in_every_written_form(tmp_path, seeds):
    proc = run("ablate", "--data", tmp_path, "--out", tmp_path / "a", "--seeds", *seeds, "--report-only")
    assert "# Ablations (seeds [0, 1, 2];" in proc.stdout


def test_predict_cli_json_score_and_heatmaps(tiny_run, synth_root, tmp_path):
    case = Derm7pt.load(synth_root).split_cases("test")[0]
    out = tmp_path / "result.json"
    run("predict", "--checkpoint", tiny_run["best_checkpoint"], "--derm", case.derm, "--clinic", case.clinic or case.derm,
        "--sex", "female", "--location", "back", "--elevation", "flat", "--out", out, "--heatmaps", tmp_path / "maps")
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == list(TASK_NAMES)
    for task in result["tasks"].values():
        assert sum(task["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    predicted = {name: t["predicted_index"] for name, t in result["tasks"].items()}
    assert result["seven_point_score"] == seven_point_score(predicted)
    assert result["melanoma_flag"] == (result["seven_point_score"] >= 3)
    assert result["branches_used"] == ["derm", "clinic", "hybrid"]
    overlay = tmp_path / "maps" / "derm_exit_overlay.png"
    assert overlay.is_file()
    assert Image.open(overlay).size == Image.open(case.derm).size
    assert (tmp_path / "maps" / "derm_exit_heads.png").is_file()


def test_predict_cli_bad_metadata_lists_allowed_values(tiny_run, synth_root):
    case = Derm7pt.load(synth_root).cases[0]
    proc = run("predict", "--checkpoint", tiny_run["best_checkpoint"], "--derm", case.derm, "--sex", "x",
               "--location", "back", "--elevation", "flat", check=False)
    assert proc.returncode == 2 and "allowed: female, male" in proc.stderr


def test_api_missing_inputs_and_branches(tiny_run, synth_root):
    p = Predictor.from_checkpoint(tiny_run["best_checkpoint"])
    case = Derm7pt.load(synth_root).cases[1]
    only_derm = p.predict(derm=case.derm)
    assert only_derm.branches_used == ["derm"] and only_derm.inputs_used == {"derm": True, "clinic": False, "meta": False}
    no_meta = p.predict(derm=case.derm, clinic=str(case.derm))
    assert no_meta.branches_used == ["derm", "clinic", "hybrid"]
    arr = np.asarray(Image.open(case.derm))
    from_array = p.predict(derm=arr)
    assert from_array.tasks["DIAG"].probabilities == pytest.approx(only_derm.tasks["DIAG"].probabilities, abs=1e-5)
    with pytest.raises(PredictError, match="NaN"):
        p.predict(derm=np.full((20, 20, 3), np.nan))
    with pytest.raises(PredictError, match="give a dermoscopy image"):
        p.predict(meta={"sex": "male", "location": "back", "elevation": "flat"})
    with pytest.raises(PredictError, match="partial"):
        p.predict(derm=arr, meta={"sex": "male"})


def test_batch_prediction_equals_single(tiny_run, synth_root):
    p = Predictor.from_checkpoint(tiny_run["best_checkpoint"])
    cases = Derm7pt.load(synth_root).split_cases("valid")[:5]
    inputs = [{"derm": c.derm, "clinic": c.clinic, "meta": c.raw_meta} for c in cases]
    batch = p.predict_batch(inputs, batch_size=4)
    for inp, res in zip(inputs, batch):
        single = p.predict(**inp)
        assert res.tasks["PN"].probabilities == pytest.approx(single.tasks["PN"].probabilities, abs=1e-4)


def test_onnx_export_parity_and_onnx_predictor(tiny_run, synth_root, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    out = run("export", "--checkpoint", tiny_run["best_checkpoint"], "--onnx", onnx_path).stdout
    diff = float(out.split("PyTorch fp32:")[1].split()[0])
    assert diff < 1e-4
    from sevenpoint.infer.export import check_parity

    assert check_parity(tiny_run["best_checkpoint"], onnx_path) < 1e-4
    case = Derm7pt.load(synth_root).split_cases("test")[2]
    torch_p = Predictor.from_checkpoint(tiny_run["best_checkpoint"], precision="fp32")
    onnx_p = Predictor.from_onnx(onnx_path)
    for kwargs in ({"derm": case.derm, "clinic": case.clinic, "meta": case.raw_meta}, {"derm": case.derm}):
        a, b = torch_p.predict(**kwargs), onnx_p.predict(**kwargs)
        assert a.branches_used == b.branches_used
        for name in TASK_NAMES:
            assert a.tasks[name].probabilities == pytest.approx(b.tasks[name].probabilities, abs=1e-4)
        assert set(b.attention) == set(a.attention)
    assert onnx_p.info["int8"] is None and torch_p.info["int8"] is None  # an fp32 export says so too


def test_demo_runs_end_to_end_and_resumes_into_the_same_folder(tmp_path):
    out = tmp_path / "demo"
    first = run("demo", "--out", out, "--cases", 60, "--epochs", 1, "--no-progress").stdout
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "test average accuracy"):
        assert step in first
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "test" and 0.0 <= metrics["average_accuracy"] <= 1.0
    result = json.loads((out / "predict" / "result.json").read_text())
    assert list(result["tasks"]) == list(TASK_NAMES)
    predicted = {name: t["predicted_index"] for name, t in result["tasks"].items()}
    assert result["seven_point_score"] == seven_point_score(predicted)
    assert list((out / "predict").glob("*.png"))  # attention overlays
    again = run("demo", "--out", out, "--cases", 60, "--epochs", 1, "--no-progress").stdout
    assert "[4/4]" in again  # a second run reuses the finished training instead of failing on the folder


def test_int8_export_is_checked_on_real_cases_and_written_only_when_it_holds(tiny_run, synth_root, tmp_path):
    """export --int8 DATA: calibrated on DATA's train split, its accuracy compared with fp32 on valid
    (the fp32 figure is the trained model's own validation score), the file written only within --max-drop."""
    import onnx

    from sevenpoint.engine.int8 import export_int8
    from sevenpoint.infer.export import ExportError

    # a copy: an accepted int8 export is kept for `--backend auto` of that checkpoint file
    ckpt, out = shutil.copy(tiny_run["best_checkpoint"], tmp_path / "m.ckpt"), tmp_path / "m8.onnx"
    assert "onnx int8" not in Predictor.from_checkpoint(ckpt).choice
    report = export_int8(ckpt, out, synth_root, calibration_cases=16, max_drop=100)
    assert "onnx int8" in Predictor.from_checkpoint(ckpt).choice  # auto now times it beside the others
    assert Path(report["kept_for_auto"]).read_bytes() == out.read_bytes()
    assert report["fp32_avg_acc"] == pytest.approx(tiny_run["best_val_avg_acc"], abs=1e-6)
    assert report["cases"] == len(Derm7pt.load(synth_root).split_cases("valid"))
    assert report["drop_points"] == pytest.approx(100 * (report["fp32_avg_acc"] - report["int8_avg_acc"]))
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantised
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["sevenpoint_quantization"])["calibration_cases"] == 16
    case = Derm7pt.load(synth_root).split_cases("test")[0]
    int8_predictor = Predictor.from_onnx(out)
    assert int8_predictor.info["int8"]["calibration_cases"] == 16  # serve's /api/health shows it
    assert int8_predictor.info["int8"]["int8_avg_acc"] == pytest.approx(report["int8_avg_acc"])
    result = int8_predictor.predict(derm=case.derm, clinic=case.clinic, meta=case.raw_meta)
    assert sum(result.tasks["DIAG"].probabilities.values()) == pytest.approx(1, abs=1e-5)

    before = out.read_bytes()  # a failing check leaves what was there
    with pytest.raises(ExportError, match=r"int8 loses .* points .* was not written"):
        export_int8(ckpt, out, synth_root, calibration_cases=16, max_drop=-100)
    assert out.read_bytes() == before and not list(tmp_path.glob(".m8.onnx.*"))
    proc = run("export", "--checkpoint", ckpt, "--onnx", tmp_path / "t.onnx", "--int8", synth_root,
               "--check-split", "test", check=False)
    assert proc.returncode == 2 and "test split is read once" in proc.stderr and not (tmp_path / "t.onnx").exists()
    proc = run("export", "--checkpoint", ckpt, "--onnx", tmp_path / "c.onnx", "--int8", synth_root,
               "--calibration-cases", 16, "--max-drop", 100)
    assert "int8, calibrated on 16 training cases" in proc.stdout and "average accuracy fp32" in proc.stdout


def test_paired_verdict_follows_the_screening_rule():
    from sevenpoint.engine.report import paired_verdict

    base = {0: 72.0, 1: 73.0}
    assert paired_verdict({0: 72.8, 1: 73.4}, base)["verdict"] == "promising"  # +0.6 mean, both up
    assert paired_verdict({0: 73.5, 1: 72.9}, base)["verdict"] == "no measurable effect"  # +0.7 mean, one seed down
    assert paired_verdict({0: 71.2, 1: 72.9}, base)["verdict"] == "no measurable effect"  # mean -0.45
    judged = paired_verdict({0: 71.0, 1: 72.9}, base)
    assert judged["verdict"] == "rejected" and judged["delta"] == {0: pytest.approx(-1.0), 1: pytest.approx(-0.1)}
    with pytest.raises(ValueError, match="no seed 2"):
        paired_verdict({0: 72.0, 2: 73.0}, base)


def test_train_against_a_baseline_pairs_the_seeds_and_refuses_unpaired_ones(synth_root, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "seeds_summary.json").write_text(json.dumps({"seeds": [0, 1], "best_val_avg_acc": [0.0, 0.0]}))
    common = ["train", "--data", synth_root.parent, "--config", "tiny", "--no-progress",
              f"data.cache_dir={tmp_path / 'cache'}", "--against", base]
    proc = run(*common, "--out", tmp_path / "x", "--seeds", "0", "2", check=False)
    assert proc.returncode == 2 and "no seed 2" in proc.stderr and not (tmp_path / "x").exists()  # before training
    out = tmp_path / "lever"
    proc = run(*common, "--out", out, "--seeds", "0", "1")
    summary = json.loads((out / "seeds_summary.json").read_text())
    assert summary["against"]["delta"] == pytest.approx(summary["best_val_avg_acc"])  # baseline 0 on both seeds
    assert summary["against"]["verdict"] == "promising" and "promising" in proc.stdout
