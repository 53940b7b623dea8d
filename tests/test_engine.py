import json

import numpy as np
import pandas as pd
import pytest
import torch

from sevenpoint.checkpoint import read_checkpoint
from sevenpoint.config import ConfigError, load_config
from sevenpoint.engine.evaluate import evaluate
from sevenpoint.engine.metrics import apply_temperature, fit_temperature
from sevenpoint.engine.run import train
from sevenpoint.engine.train import RunDirError
from sevenpoint.schema import TASKS


def test_config_overrides_and_errors():
    cfg = load_config("tiny", ["train.lr=0.5", "model.attention=false", "data.cache_dir=none"], seed=7)
    assert cfg.train.lr == 0.5 and cfg.model.attention is False and cfg.seed == 7 and cfg.data.cache_dir is None
    assert cfg.meta_dim == 14 and not hasattr(cfg.model, "image_size")  # derived, not an option
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config("tiny", ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="model.variant"):
        load_config("tiny", ["model.variant=XYZ"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config("tiny", ["train.epochs=two"])
    paper = load_config("paper")
    assert (paper.train.lr, paper.train.batch_size, paper.train.epochs, paper.data.image_size) == (1e-4, 32, 150, 299)


def test_tiny_training_writes_checkpoints_logs_and_config(tiny_run):
    run = tiny_run["run_dir"]
    for name in ("config.yaml", "run_info.json", "train_summary.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run_info.json").read_text())
    assert info["versions"]["torch"] and "cpu" in info
    metrics_csv = next(run.glob("logs/**/metrics.csv"))
    log = pd.read_csv(metrics_csv)
    assert "val/avg_acc" in log.columns and log["val/avg_acc"].notna().sum() == 2
    ckpt = read_checkpoint(run / "checkpoints" / "best.ckpt")  # weights_only load works
    assert ckpt["sevenpoint"]["config"]["model"]["variant"] == "DCIHMM"
    assert not list(run.rglob("*.tmp"))  # atomic writes leave no temp files
    # the best checkpoint is the epoch with the highest validation average accuracy
    best = log["val/avg_acc"].max()
    assert abs(tiny_run["best_val_avg_acc"] - best) < 1e-6


def test_validation_score_is_what_evaluate_finds_for_the_best_checkpoint(tiny_run, synth_root, tmp_path):
    m = evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path, split="valid", progress=False)
    assert m["average_accuracy"] == pytest.approx(tiny_run["best_val_avg_acc"], abs=1e-6)


def test_refuses_to_overwrite_a_run(tiny_run, synth_root):
    run = tiny_run["run_dir"]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    cfg = load_config("tiny", ["train.epochs=5"], seed=7)
    with pytest.raises(RunDirError, match="already holds a run"):
        train(cfg, synth_root, run, progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing overwritten


def test_evaluate_metrics_match_predictions_csv(tiny_run, synth_root, tmp_path):
    m = evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path / "eval", split="test", progress=False)
    for name in ("metrics.json", "report.md", "predictions.csv", "confusion_matrices.png", "roc_curves.png"):
        assert (tmp_path / "eval" / name).is_file()
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    accs = []
    for task in TASKS:
        acc = float((pred[f"{task.name}_pred"] == pred[f"{task.name}_true"]).mean())
        assert saved["tasks"][task.name]["accuracy"] == pytest.approx(acc)
        probs = pred[[f"{task.name}_p_{c}" for c in task.classes]].to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
        accs.append(acc)
    assert saved["average_accuracy"] == pytest.approx(np.mean(accs))
    assert m["cases"] == len(pred)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| model | BWV | DaG | PIG | PN | RS | STR | VS | DIAG | AVG |" in report and "83.04" in report
    for key in ("sensitivity", "specificity", "precision", "auc"):
        assert key in saved["tasks"]["DIAG"]["classes"]["MEL"]
    assert "diag_head_auc" in saved["melanoma"]


def test_tta_probabilities_sum_to_one_and_calibration_is_fitted_on_validation_only(tiny_run, synth_root, tmp_path,
                                                                                     monkeypatch):
    import sevenpoint.engine.metrics as metrics_module

    fitted = []
    real_fit = metrics_module.fit_temperature
    monkeypatch.setattr(metrics_module, "fit_temperature",
                        lambda p, y: fitted.append((p.copy(), y.copy())) or real_fit(p, y))
    m = evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path / "e", split="test", tta="flip_rot",
                 calibrate=True, progress=False)
    pred = pd.read_csv(tmp_path / "e" / "predictions.csv")
    for task in TASKS:
        probs = pred[[f"{task.name}_p_{c}" for c in task.classes]].to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    # every temperature was fitted on exactly the validation predictions and labels, never on test's
    evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path / "v", split="valid", tta="flip_rot",
                     progress=False)
    vpred = pd.read_csv(tmp_path / "v" / "predictions.csv")
    assert len(fitted) == len(TASKS)
    for (p, y), task in zip(fitted, TASKS):
        np.testing.assert_allclose(p, vpred[[f"{task.name}_p_{c}" for c in task.classes]].to_numpy(), atol=1e-5)
        assert np.array_equal(y, vpred[f"{task.name}_true"].to_numpy())
        assert m["calibration"][task.name]["temperature"] == real_fit(p, y)


def test_temperature_fitted_on_one_half_lowers_the_nll_of_the_other():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 1000)
    logits = rng.normal(0, 1, (1000, 3))
    logits[np.arange(1000), y] += 1.0
    overconfident = apply_temperature(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 0.25)
    fit, held = slice(0, 500), slice(500, 1000)
    t = fit_temperature(overconfident[fit], y[fit])

    def nll(p, yy):
        return -np.log(p[np.arange(len(yy)), yy]).mean()

    before, after = nll(overconfident[held], y[held]), nll(apply_temperature(overconfident[held], t), y[held])
    assert after < 0.8 * before  # held-out cases it never saw: clearly better calibrated


def test_trainer_never_sees_the_test_split(synth_root, tmp_path, monkeypatch):
    import sevenpoint.engine.train as tr

    seen = []
    original = tr.CaseDataset.__init__

    def spy(self, data, split, *args, **kwargs):
        seen.append(split)
        assert "test" not in data.splits  # the split is not even in the trainer's data object
        original(self, data, split, *args, **kwargs)

    monkeypatch.setattr(tr.CaseDataset, "__init__", spy)
    cfg = load_config("tiny", ["train.epochs=1", f"data.cache_dir={tmp_path / 'c'}"], seed=0)
    train(cfg, synth_root, tmp_path / "run", progress=False)
    assert sorted(set(seen)) == ["train", "valid"]


def test_resume_matches_an_uninterrupted_run(synth_root, tmp_path):
    over = [f"data.cache_dir={tmp_path / 'c'}", "train.deterministic=true", "model.dropout=0.2"]
    full = train(load_config("tiny", [*over, "train.epochs=3"], seed=1), synth_root, tmp_path / "full", progress=False)
    part = train(load_config("tiny", [*over, "train.epochs=3"], seed=1), synth_root, tmp_path / "part",
                 progress=False, stop_after_epochs=1)
    assert part["epochs_run"] == 1
    resumed = train(load_config("tiny", seed=1), synth_root, tmp_path / "part", resume=True, progress=False)
    a = torch.load(full["last_checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(resumed["last_checkpoint"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:  # bit-identical, as docs/RELIABILITY.md promises (weights, BN statistics, counters)
        assert torch.equal(a[k], b[k]), k
    assert resumed["best_val_avg_acc"] == full["best_val_avg_acc"]


def test_ddp_two_cpu_processes(synth_root, tmp_path):
    """Lightning DDP with the gloo backend: 2 CPU processes train one model and write one pair of checkpoints."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sevenpoint.cli", "train", "--data", str(synth_root), "--out", str(tmp_path / "ddp"),
           "--config", "tiny", "--no-progress", "train.devices=2", "train.strategy=ddp", "train.accelerator=cpu",
           "train.epochs=1", f"data.cache_dir={tmp_path / 'c'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best val avg acc") == 1  # only rank 0 reports
    ckpt = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "best.ckpt")
    assert ckpt["sevenpoint"]["config"]["train"]["devices"] == 2


def test_ablate_writes_both_paper_tables(synth_root, tmp_path):
    from sevenpoint.engine.ablate import run_ablation

    text = run_ablation(synth_root, tmp_path / "abl", "tiny", ["train.epochs=1", f"data.cache_dir={tmp_path / 'c'}"],
                        seeds=[0], progress=False)
    assert "## Modality" in text and "## Soft attention" in text
    for row, paper in (("| DIM |", "79.72"), ("| CIM |", "70.57"), ("| DCIHMM |", "83.04"),
                       ("| without soft attention |", "79.68")):
        line = next(x for x in text.splitlines() if x.startswith(row))
        assert line.endswith(f"| {paper} |")
        ours = float(line.split("|")[2])
        assert 0.0 < ours <= 100.0
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(saved["results"]) == {"DIM", "DIM-noSA", "CIM", "CIM-noSA", "DCIHMM", "DCIHMM-noSA"}
    # every run was evaluated on test from its own best-on-validation checkpoint
    assert (tmp_path / "abl" / "CIM-noSA" / "seed0" / "eval-test" / "metrics.json").is_file()
    # the per-run table carries each run's own test figures per task, in the paper's column order
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("| run | seeds | TTA |"))
    cols = [c.strip() for c in lines[start].strip("|").split("|")]
    for key in saved["results"]:
        metrics = json.loads((tmp_path / "abl" / key / "seed0" / "eval-test" / "metrics.json").read_text())
        row = next(x for x in lines[start:] if x.startswith(f"| {key} | 0 | "))
        cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
        for task in ("BWV", "DaG", "PIG", "PN", "RS", "STR", "VS", "DIAG"):
            assert cells[task] == f"{100 * metrics['tasks'][task]['accuracy']:.2f}", (key, task)
        assert cells["test AVG"] == f"**{100 * metrics['average_accuracy']:.2f}**"


def test_ablate_reuses_finished_runs_and_runs_a_subset(synth_root, tmp_path):
    from sevenpoint.engine.ablate import run_ablation

    args = (synth_root, tmp_path / "abl", "tiny", ["train.epochs=1", f"data.cache_dir={tmp_path / 'c'}"])
    first = run_ablation(*args, seeds=[0], progress=False, runs=["DIM"], tta="select")
    run = tmp_path / "abl" / "DIM" / "seed0"
    valid = {m: json.loads((run / f"eval-valid-{m}" / "metrics.json").read_text())["average_accuracy"]
             for m in ("none", "flip")}
    chosen = json.loads((run / "eval-test" / "metrics.json").read_text())["tta"]
    assert chosen == ("flip" if valid["flip"] > valid["none"] else "none")  # TTA picked on validation
    stamp = (run / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    assert "| DIM |" in first and "| CIM | – |" in first  # only the requested run
    again = run_ablation(*args, seeds=[0], progress=False, runs=["DIM"], tta="select")
    assert again == first  # same numbers, read back from the finished run
    assert (run / "checkpoints" / "best.ckpt").stat().st_mtime_ns == stamp  # not retrained
    report = run_ablation(*args, seeds=[0, 1], progress=False, runs=["DIM", "CIM"], report_only=True)
    assert "| DIM | 0 |" in report and "| CIM | – |" in report  # finished runs only
    assert not (tmp_path / "abl" / "DIM" / "seed1").exists() and not (tmp_path / "abl" / "CIM").exists()
    with pytest.raises(ValueError, match="DIMM"):
        run_ablation(*args, seeds=[0], progress=False, runs=["DIMM"])
    changed = (*args[:3], [*args[3], "train.lr=0.5"])
    with pytest.raises(ValueError, match=r"train\.lr: 0\.003 there, 0\.5 asked"):
        run_ablation(*changed, seeds=[0], progress=False, runs=["DIM"])  # never mixes two configs in one table
    # a run saved with the old `precision: auto` (then a rule; its summary says what it ran in) still matches
    # that precision, and only that one
    saved = run / "config.yaml"
    saved.write_text(saved.read_text().replace("precision: fp32", "precision: auto"))
    assert "| DIM | 0 |" in run_ablation(*args, seeds=[0], progress=False, runs=["DIM"], report_only=True)
    with pytest.raises(ValueError, match=r"train\.precision: 'fp32' there, 'bf16' asked"):
        run_ablation(*args[:3], [*args[3], "train.precision=bf16"], seeds=[0], progress=False, runs=["DIM"],
                     report_only=True)


def test_each_branch_alone_is_reported_and_averages_to_the_fused_result(tiny_run, synth_root, tmp_path):
    from torch.utils.data import DataLoader

    from sevenpoint.checkpoint import load_model
    from sevenpoint.data import Derm7pt, CaseDataset
    from sevenpoint.engine.evaluate import branch_accuracy, predict_loader
    from sevenpoint.data.cache import make_cache

    model, cfg, _ = load_model(tiny_run["best_checkpoint"])
    data = Derm7pt.load(synth_root)
    loader = DataLoader(CaseDataset(data, "valid", make_cache(cfg)), batch_size=7)
    pred = predict_loader(model, loader, tta="flip", progress=False)
    assert set(pred.branch_probs) == {"derm", "clinic", "hybrid"}
    cases = data.split_cases("valid")
    assert pred.branch_masks["clinic"].sum() == sum(c.clinic is not None for c in cases)
    assert any(c.clinic is None for c in cases)  # so one-case batches below include one with no clinic branch
    single = predict_loader(model, DataLoader(loader.dataset, batch_size=1), tta="flip", progress=False)
    for b in pred.branch_probs:
        np.testing.assert_array_equal(single.branch_masks[b], pred.branch_masks[b])
        for t in range(len(TASKS)):
            np.testing.assert_allclose(single.branch_probs[b][t][pred.branch_masks[b]],
                                       pred.branch_probs[b][t][pred.branch_masks[b]], atol=1e-4)
    all_ran = np.logical_and.reduce(list(pred.branch_masks.values()))
    assert all_ran.any()
    for t in range(len(TASKS)):  # late fusion is the plain mean where every branch ran, view by view
        mean = np.mean([pred.branch_probs[b][t][all_ran] for b in pred.branch_probs], axis=0)
        np.testing.assert_allclose(pred.probs[t][all_ran], mean, atol=1e-5)
    acc = branch_accuracy(pred)
    for b, probs in pred.branch_probs.items():
        m = pred.branch_masks[b]
        expect = [(probs[t][m].argmax(1) == pred.targets[m, t]).mean() for t in range(len(TASKS))]
        assert acc[b]["cases"] == m.sum()
        assert [acc[b]["tasks"][task.name]["accuracy"] for task in TASKS] == pytest.approx(expect)
        assert acc[b]["average_accuracy"] == pytest.approx(np.mean(expect))
    metrics = evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path / "e", split="valid", progress=False)
    assert metrics["branches"]["derm"]["average_accuracy"] == pytest.approx(acc["derm"]["average_accuracy"], abs=1e-6)
    assert "## Each branch alone" in (tmp_path / "e" / "report.md").read_text()


def test_training_output_has_no_adverts(synth_root, tmp_path, caplog):
    import logging

    from sevenpoint.config import load_config
    from sevenpoint.engine.run import train

    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1"], seed=0)
    with caplog.at_level(logging.INFO):
        train(cfg, synth_root.parent, tmp_path / "run", progress=False)
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "max_epochs=1" in said  # Lightning's own lines still come through
    assert "litlogger" not in said and "Tip" not in said
