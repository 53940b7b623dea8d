"""Ensembles (`train.ensemble`, `sevenpoint ensemble`) and the late-fusion clinic weight
(`infer.clinic_weight`): one checkpoint that evaluate, predict, serve and export use like any other."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sevenpoint.checkpoint import CheckpointError, assemble_ensemble, load_model, read_checkpoint
from sevenpoint.config import ConfigError, load_config
from sevenpoint.engine.evaluate import evaluate
from sevenpoint.engine.run import train
from sevenpoint.engine.train import RunDirError
from sevenpoint.infer.export import check_parity, export_onnx
from sevenpoint.models import FusionEnsemble
from sevenpoint.infer.predict import Predictor


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "sevenpoint.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


@pytest.fixture(scope="module")
def ens_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens")
    cfg = load_config("tiny", [f"data.cache_dir={out / 'cache'}", "train.epochs=2", "train.ensemble=2",
                               "infer.clinic_weight=0.5"], seed=1)
    summary = train(cfg, synth_root, out / "run", progress=False)
    return {"summary": summary, "run": out / "run", "cache": out / "cache"}


def _inputs(n=6, size=64, meta_dim=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    derm, clinic = torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.rand(n, 3, size, size, generator=g) * 2 - 1
    meta = torch.zeros(n, meta_dim)
    has_clinic = torch.tensor([True, False] * (n // 2))  # some cases without a clinical photo
    return derm, clinic, meta, torch.ones(n, dtype=torch.bool), has_clinic, torch.ones(n, dtype=torch.bool)


@pytest.mark.parametrize("override, match", [("train.ensemble=0", "train.ensemble"),
                                             ("infer.clinic_weight=0", "infer.clinic_weight"),
                                             ("infer.clinic_weight=1.5", "infer.clinic_weight")])
def test_ensemble_options_are_validated_when_loaded(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


def test_ensemble_trains_its_members_with_their_own_seeds(ens_run):
    run, summary = ens_run["run"], ens_run["summary"]
    finished = json.loads((run / "members" / "finished.json").read_text())
    assert sorted(finished) == ["m0", "m1"] and summary["members"] == finished
    seeds = [json.loads((run / "members" / m / "train_summary.json").read_text())["config"]["seed"] for m in ("m0", "m1")]
    assert seeds == [2, 3]  # seed 1 of a 2-member ensemble: members 2 and 3
    ckpt = read_checkpoint(run / "checkpoints" / "best.ckpt")
    assert [m["seed"] for m in ckpt["sevenpoint"]["members"]] == [2, 3]
    model, cfg, _ = load_model(run / "checkpoints" / "best.ckpt")
    assert isinstance(model, FusionEnsemble) and len(model.members) == 2
    assert cfg.train.ensemble == 2 and cfg.infer.clinic_weight == 0.5
    for i, m in enumerate(model.members):  # each member holds exactly its own best weights
        member, _, _ = load_model(run / "members" / f"m{i}" / "checkpoints" / "best.ckpt")
        for (k, a), (_, b) in zip(m.state_dict().items(), member.state_dict().items()):
            assert torch.equal(a, b), k
    assert summary["train_seconds"] == pytest.approx(sum(f["train_seconds"] for f in finished.values()), abs=0.2)


def test_ensemble_averages_branch_probabilities_then_weights_late_fusion(ens_run):
    model, _, _ = load_model(ens_run["run"] / "checkpoints" / "best.ckpt")
    x = _inputs()
    with torch.no_grad():
        out = model(*x)
        members = [m(*x) for m in model.members]
    for t in range(8):
        mean = {b: torch.stack([o.branch_probs(b)[t] for o in members]).mean(0) for b in ("derm", "clinic", "hybrid")}
        for b in mean:
            assert torch.allclose(out.branch_probs(b)[t][out.masks[b]], mean[b][out.masks[b]], atol=1e-5)
        has_clinic = x[4].float()[:, None]
        expected = (mean["derm"] + 0.5 * has_clinic * mean["clinic"] + has_clinic * mean["hybrid"]) / (1 + 1.5 * has_clinic)
        assert torch.allclose(out.probs[t], expected, atol=1e-5)
    model.fusion_weights = {}  # equal weights give a different answer where the clinical photo is present
    with torch.no_grad():
        equal = model(*x)
    assert not torch.allclose(equal.probs[0][x[4]], out.probs[0][x[4]])
    assert torch.allclose(equal.probs[0][~x[4]], out.probs[0][~x[4]])


def test_ensemble_summary_is_what_evaluate_finds_on_validation(ens_run, synth_root, tmp_path):
    metrics = evaluate(ens_run["run"] / "checkpoints" / "best.ckpt", synth_root, tmp_path, split="valid", progress=False)
    assert metrics["average_accuracy"] == pytest.approx(ens_run["summary"]["best_val_avg_acc"])


def test_ensemble_runs_on_every_inference_path(ens_run, tmp_path):
    ckpt = ens_run["run"] / "checkpoints" / "best.ckpt"
    export_onnx(ckpt, tmp_path / "m.onnx")
    assert check_parity(ckpt, tmp_path / "m.onnx") < 1e-4
    rng = np.random.default_rng(0)
    derm = rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)
    clinic = rng.integers(0, 255, (70, 60, 3), dtype=np.uint8)
    torch_predictor = Predictor.from_checkpoint(ckpt)
    assert torch_predictor.info["members"] == 2 and torch_predictor.info["clinic_weight"] == 0.5
    ref = torch_predictor.predict(derm=derm, clinic=clinic)
    for p in (Predictor.from_checkpoint(ckpt, backend="frozen", precision="fp32"), Predictor.from_onnx(tmp_path / "m.onnx")):
        got = p.predict(derm=derm, clinic=clinic)
        for task, r in ref.tasks.items():
            assert got.tasks[task].probabilities == pytest.approx(r.probabilities, abs=1e-4)


def test_interrupted_ensemble_resumes_where_it_stopped(synth_root, tmp_path):
    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2", "train.ensemble=2"])
    train(cfg, synth_root, tmp_path / "run", progress=False, stop_after_epochs=1)
    assert not (tmp_path / "run" / "members" / "finished.json").exists()
    assert not (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()
    with pytest.raises(RunDirError, match="already holds a run"):
        train(cfg, synth_root, tmp_path / "run", progress=False)
    summary = train(load_config("tiny"), synth_root, tmp_path / "run", resume=True, progress=False)
    assert summary["members"]["m0"]["epochs_run"] == 2 and len(summary["members"]) == 2  # m0 continued, not restarted
    assert (tmp_path / "run" / "members" / "m0" / "logs" / "resume1").is_dir()
    model, cfg_back, _ = load_model(summary["best_checkpoint"])
    assert len(model.members) == 2 and cfg_back.train.ensemble == 2


def test_assembling_refuses_what_cannot_be_averaged(ens_run, tiny_run, tmp_path):
    members = [ens_run["run"] / "members" / m / "checkpoints" / "best.ckpt" for m in ("m0", "m1")]
    with pytest.raises(CheckpointError, match="at least 2"):
        assemble_ensemble(members[:1], tmp_path / "e.ckpt")
    # another run with the same model and data (its cache folder differs): fine
    assert assemble_ensemble([members[0], tiny_run["best_checkpoint"]], tmp_path / "ok.ckpt").train.ensemble == 2
    other = read_checkpoint(members[1])
    other["sevenpoint"]["config"]["model"]["freeze_blocks"] = 3  # frozen deeper in training: same network
    torch.save(other, tmp_path / "cut.ckpt")
    mixed = assemble_ensemble([members[0], tmp_path / "cut.ckpt"], tmp_path / "cuts.ckpt")
    assert mixed.train.ensemble == 2 and mixed.model.freeze_blocks == 0
    other["sevenpoint"]["config"]["model"]["dropout"] = 0.5
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="config differs"):
        assemble_ensemble([members[0], tmp_path / "other.ckpt"], tmp_path / "e.ckpt")
    with pytest.raises(CheckpointError, match="already an ensemble"):
        assemble_ensemble([members[0], ens_run["run"] / "checkpoints" / "best.ckpt"], tmp_path / "e.ckpt")
    with pytest.raises(ConfigError, match="clinic_weight"):
        assemble_ensemble(members, tmp_path / "e.ckpt", {"clinic_weight": 2.0})
    assert not (tmp_path / "e.ckpt").exists()


def test_ensemble_command_writes_one_checkpoint_and_never_overwrites(ens_run, tmp_path):
    members = [ens_run["run"] / "members" / m / "checkpoints" / "best.ckpt" for m in ("m0", "m1")]
    out = tmp_path / "ens.ckpt"
    proc = run("ensemble", *members, "--out", out, "--tta", "flip", "--clinic-weight", "0.25")
    assert "2 members" in proc.stdout
    _, cfg, _ = load_model(out)
    assert cfg.train.ensemble == 2 and cfg.infer.tta == "flip" and cfg.infer.clinic_weight == 0.25
    before = out.read_bytes()
    proc = run("ensemble", *members, "--out", out, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr and out.read_bytes() == before
    proc = run("ensemble", members[0], tmp_path / "missing.ckpt", "--out", tmp_path / "x.ckpt", check=False)
    assert proc.returncode == 2 and "missing.ckpt" in proc.stderr and not (tmp_path / "x.ckpt").exists()
