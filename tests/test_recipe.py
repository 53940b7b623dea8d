"""The CPU recipe's knobs: aspect-kept geometry, crop augmentation, BN momentum, AdamW + warm-up
cosine, EMA weights and the inference settings a checkpoint carries (infer.tta)."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from sevenpoint.checkpoint import load_model, read_checkpoint
from sevenpoint.config import ConfigError, load_config
from sevenpoint.data.cache import ImageCache
from sevenpoint.data.images import center_square, crop_and_resize
from sevenpoint.data.transforms import transforms_for
from sevenpoint.engine.evaluate import evaluate
from sevenpoint.engine.module import warmup_cosine
from sevenpoint.engine.run import train
from sevenpoint.models import build_backbone
from sevenpoint.infer.predict import Predictor


@pytest.mark.parametrize("override, match", [
    ("data.augmentation=mixup", "data.augmentation"),
    ("data.short_side=50", "data.short_side"),
    ("model.bn_momentum=0", "model.bn_momentum"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("train.scheduler=linear", "train.scheduler"),
    ("train.ema_decay=1.0", "train.ema_decay"),
    ("train.swa_start=1.0", "train.swa_start"),
    ("infer.tta=rot", "infer.tta"),
])
def test_recipe_options_are_validated_when_loaded(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


def test_packaged_recipes_load():
    recipe, v1, candidate = load_config("cpu-recipe"), load_config("cpu-recipe-v1"), load_config("cpu-recipe-v2")
    assert candidate.data.short_side == 256 and candidate.model.bn_momentum == 0.1 and candidate.infer.tta == "flip_rot"
    assert v1.data.short_side == 0 and v1.model.bn_momentum is None and v1.train.ensemble == 1
    # the recipe: three v4 members (squash, affine, BN 0.1, AdamW, heads 1e-3 / backbones 3e-4, EMA)
    assert recipe.train.ensemble == 3 and recipe.infer.clinic_weight == 0.5 and recipe.infer.tta == "none"
    assert recipe.data.short_side == 0 and recipe.data.augmentation == "affine" and recipe.model.bn_momentum == 0.1
    assert (recipe.train.lr, recipe.train.backbone_lr_scale, recipe.train.ema_decay) == (1e-3, 0.3, 0.99)
    # v6 = v5 refit on train + valid with v5's number of optimiser steps (616 cases x 20 epochs ~ 413 x 30)
    v5, v6 = load_config("cpu-recipe-v5"), load_config("cpu-recipe-v6")
    assert v6.train.refit and not v6.train.calibrate and v6.train.epochs == 20
    assert not v5.train.refit and v5.train.calibrate and v5.train.epochs == 30 and not v1.train.calibrate
    assert dataclasses.replace(v6.train, refit=False, calibrate=True, epochs=30) == v5.train
    assert (v6.data, v6.model, v6.infer) == (v5.data, v5.model, v5.infer)
    # v11 = v6 cross-fitted and calibrated out of fold, 22 epochs on 548 cases ~ v6's steps
    v11 = load_config("cpu-recipe-v11")
    assert v11.train.cross_fit and v11.train.calibrate and v11.train.epochs == 22
    assert dataclasses.replace(v11.train, cross_fit=False, calibrate=False, epochs=20) == v6.train
    assert (v11.data, v11.model, v11.infer) == (v6.data, v6.model, v6.infer)
    # v14 (the recipe) = v11 with the stem and blocks 0-4 frozen in every member, 15 epochs (525 steps)
    assert recipe.model.freeze_blocks == 5 and recipe.train.epochs == 15 and recipe.train.trunk_views == 0
    assert dataclasses.replace(recipe.train, epochs=22) == v11.train
    assert dataclasses.replace(recipe.model, freeze_blocks=0) == v11.model
    assert (recipe.data, recipe.infer) == (v11.data, v11.infer)


def test_short_side_keeps_the_aspect_ratio_and_the_centre():
    arr = np.zeros((512, 768, 3), np.uint8)
    arr[200:312, 330:438] = 255  # a bright square in the middle
    out = crop_and_resize(Image.fromarray(arr), 224, crop=25, short_side=256)
    assert out.shape == (256, 398, 3)  # 718 x 462 after the border crop, short side -> 256
    squashed = crop_and_resize(Image.fromarray(arr), 224, crop=25)
    assert squashed.shape == (224, 224, 3)
    window = center_square(out, 224)
    assert window.shape == (224, 224, 3) and window[112, 112].min() > 200
    with pytest.raises(ValueError, match="smaller"):
        center_square(out, 300)


def test_crop_preset_crops_randomly_in_training_and_centrally_in_evaluation():
    cfg = load_config("tiny", ["data.image_size=32", "data.short_side=40", "data.augmentation=crop"])
    train_tf, eval_tf = transforms_for(cfg.data)
    img = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    assert np.array_equal(eval_tf(image=img)["image"], img[4:36, 14:46])
    outs = set()
    for seed in range(6):
        train_tf.set_random_seed(seed)
        out = train_tf(image=img)["image"]
        assert out.shape == (32, 32, 3)
        outs.add(out.tobytes())
    assert len(outs) > 1
    squash = load_config("tiny")  # short_side 0: images arrive square, nothing is cropped
    assert np.array_equal(transforms_for(squash.data)[1](image=img[:32, :32])["image"], img[:32, :32])


def test_cache_keeps_aspect_entries_apart_from_square_ones(tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(np.full((60, 90, 3), 128, np.uint8)).save(src)
    square = ImageCache(tmp_path / "c", 32)
    kept = ImageCache(tmp_path / "c", 32, short_side=40)
    assert square.load(src).shape == (32, 32, 3)
    assert kept.load(src).shape == (40, 60, 3)
    assert kept.load(src).shape == (40, 60, 3) and kept.stats.hits == 1 and square.stats.hits == 0
    assert square.entry_path(src) != kept.entry_path(src)


@pytest.mark.parametrize("backbone, default", [("xception_tiny", 0.1), ("efficientnet_lite0", 0.01)])
def test_bn_momentum_reaches_every_backbone_batchnorm(backbone, default):
    def momenta(overrides):
        cfg = load_config("tiny", [f"model.backbone={backbone}", "model.pretrained=false", *overrides])
        net = build_backbone(cfg.model, cfg.data.image_size)
        return {round(m.momentum, 6) for m in net.modules() if isinstance(m, nn.BatchNorm2d)}

    assert momenta([]) == {default}
    assert momenta(["model.bn_momentum=0.3"]) == {0.3}


def test_warmup_cosine_schedule():
    values = [warmup_cosine(s, warmup=10, total=110) for s in range(111)]
    assert values[0] < 0.1 and values[9] == pytest.approx(10 / 11)
    assert values[10] == pytest.approx(1.0) and values[60] == pytest.approx(0.5) and values[110] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


@pytest.fixture(scope="module")
def ema_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema")
    cfg = load_config("tiny", [f"data.cache_dir={out / 'cache'}", "train.epochs=3", "train.optimizer=adamw",
                               "train.weight_decay=0.01", "train.scheduler=warmup_cosine", "train.ema_decay=0.5", "train.lr=0.01",
                               "data.image_size=48", "data.short_side=56", "data.augmentation=crop",
                               "model.bn_momentum=0.2", "infer.tta=flip"], seed=0)
    summary = train(cfg, synth_root, out / "run", progress=False)
    return summary, out


def test_ema_weights_are_what_is_validated_and_saved(ema_run, synth_root, tmp_path):
    summary, _ = ema_run
    last = read_checkpoint(summary["last_checkpoint"])
    raw, averaged = last["current_model_state"], last["state_dict"]
    differs = [k for k in averaged if averaged[k].is_floating_point() and not torch.equal(averaged[k], raw[k])]
    assert differs  # the saved weights are the average, not the last step's
    # AdamW, and the schedule stepped once per optimiser step down to ~0 at the end
    assert last["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.01
    sched = last["lr_schedulers"][0]
    assert last["epoch"] == 2  # last.ckpt is the final epoch's, even where that epoch did not improve
    assert sched["last_epoch"] == last["global_step"] > 3
    assert max(sched["_last_lr"]) < 1e-3 * max(g["initial_lr"] for g in last["optimizer_states"][0]["param_groups"])
    # evaluating best.ckpt (no TTA) on validation reproduces the accuracy the trainer selected it by
    m = evaluate(summary["best_checkpoint"], synth_root, tmp_path / "v", split="valid", tta="none", progress=False)
    assert m["average_accuracy"] == pytest.approx(summary["best_val_avg_acc"], abs=1e-6)


def test_swa_averages_the_epochs_from_its_start_and_the_trained_weights_before(synth_root, tmp_path):
    with pytest.raises(ConfigError, match="train.swa_start.*ema_decay=0"):
        load_config("tiny", ["train.ema_decay=0.5", "train.swa_start=0.5"])
    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=4", "train.swa_start=0.5",
                               "train.lr=0.01", "data.image_size=48"], seed=0)
    run = tmp_path / "run"
    train(cfg, synth_root, run, progress=False, stop_after_epochs=1)  # epoch 0: before the average starts
    early = read_checkpoint(run / "checkpoints" / "last.ckpt")
    # what is saved (and was validated) is the trained model, not the untrained copy the average starts from
    assert "current_model_state" not in early
    summary = train(cfg, synth_root, run, resume=True, progress=False)
    last = read_checkpoint(summary["last_checkpoint"])
    assert int(last["averaging_state"]["n_averaged"]) == 2  # epochs 2 and 3 of 0..3, across the resume
    raw, averaged = last["current_model_state"], last["state_dict"]
    assert any(v.is_floating_point() and not torch.equal(v, raw[k]) for k, v in averaged.items())
    m = evaluate(summary["best_checkpoint"], synth_root, tmp_path / "v", split="valid", tta="none", progress=False)
    assert m["average_accuracy"] == pytest.approx(summary["best_val_avg_acc"], abs=1e-6)


def test_checkpoint_carries_its_tta_to_evaluate_and_predict(ema_run, synth_root, tmp_path):
    summary, _ = ema_run
    ckpt = summary["best_checkpoint"]
    default = evaluate(ckpt, synth_root, tmp_path / "d", split="test", progress=False)
    assert default["tta"] == "flip"
    explicit = evaluate(ckpt, synth_root, tmp_path / "f", split="test", tta="flip", progress=False)
    none = evaluate(ckpt, synth_root, tmp_path / "n", split="test", tta="none", progress=False)
    p_default = pd.read_csv(tmp_path / "d" / "predictions.csv")
    assert np.allclose(p_default.filter(like="_p_").to_numpy(),
                       pd.read_csv(tmp_path / "f" / "predictions.csv").filter(like="_p_").to_numpy())
    assert not np.allclose(p_default.filter(like="_p_").to_numpy(),
                           pd.read_csv(tmp_path / "n" / "predictions.csv").filter(like="_p_").to_numpy())
    assert explicit["tta"] == "flip" and none["tta"] == "none"

    # Predictor: the checkpoint's TTA by default = the mean over the 4 flipped views' probabilities
    case = json.loads(json.dumps({"derm": str(next((synth_root / "images").rglob("*.jpg")))}))
    with_tta = Predictor.from_checkpoint(ckpt, precision="fp32")
    assert with_tta.tta == "flip" and with_tta.info["tta"] == "flip"
    plain = Predictor.from_checkpoint(ckpt, precision="fp32", tta="none")
    x = plain.preprocess(case["derm"], "derm")[0][None]
    model, _, _ = load_model(ckpt)
    views = [x, x.flip(-1), x.flip(-2), x.flip(-1, -2)]
    with torch.no_grad():
        per_view = [model(v, None, torch.zeros(1, 14), has_meta=torch.zeros(1, dtype=torch.bool)).probs[0][0].numpy()
                    for v in views]
    expected = np.mean(per_view, axis=0)
    assert np.abs(expected - per_view[0]).max() > 1e-5  # the views disagree, so the check below can tell
    got = with_tta.predict(derm=case["derm"]).tasks["DIAG"].probabilities
    np.testing.assert_allclose(list(got.values()), expected, atol=1e-6)
    got_plain = plain.predict(derm=case["derm"]).tasks["DIAG"].probabilities
    np.testing.assert_allclose(list(got_plain.values()), per_view[0], atol=1e-6)


def test_cv_folds_cover_train_and_valid_once_and_never_test(synth_root, tmp_path, monkeypatch):
    import sevenpoint.engine.cv as cv
    from sevenpoint.data import Derm7pt
    from sevenpoint.engine.train import load_training_data

    data = Derm7pt.load(synth_root)
    folds = cv.make_folds(data, 3)
    held_out = np.concatenate([f["valid"] for f in folds])
    pool = np.concatenate([data.splits["train"], data.splits["valid"]])
    assert sorted(held_out.tolist()) == sorted(pool.tolist())  # every train+valid case held out exactly once
    assert not set(held_out) & set(data.splits["test"].tolist())
    for f in folds:
        assert not set(f["train"].tolist()) & set(f["valid"].tolist())
    assert all(np.array_equal(a["valid"], b["valid"]) for a, b in zip(folds, cv.make_folds(data, 3)))  # paired
    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match="not in the official train/valid"):
        load_training_data(synth_root, cfg, {"train": data.splits["test"], "valid": folds[0]["valid"]})

    seen = []
    real_train = cv.train

    def spy(cfg, data_dir, run_dir, **kw):
        seen.append(kw["splits"]["valid"])
        return real_train(cfg, data_dir, run_dir, **kw)

    monkeypatch.setattr(cv, "train", spy)
    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1"])
    result = cv.run_cv(cfg, synth_root, tmp_path / "cv", folds=2, progress=False)
    assert len(seen) == 2 and sum(len(v) for v in seen) == len(pool)
    summaries = [json.loads((tmp_path / "cv" / f"fold{i}" / "train_summary.json").read_text()) for i in range(2)]
    assert summaries[0]["valid_cases"] == len(seen[0])  # the fold's held-out cases were the validation set
    assert result["fold_val_avg_acc"] == pytest.approx([100 * s["best_val_avg_acc"] for s in summaries])
    assert "mean ± sd over folds" in (tmp_path / "cv" / "cv.md").read_text()
    seen.clear()
    assert cv.run_cv(cfg, synth_root, tmp_path / "cv", folds=2, progress=False)["mean"] == pytest.approx(result["mean"])
    assert seen == []  # finished folds are reused, nothing retrained


@pytest.mark.parametrize("override, match", [
    ("model.backbone=resnet50", "model.backbone"),
    ("model.attention_heads=0", "model.attention_heads"),
])
def test_model_options_are_validated_when_loaded(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])
    with pytest.raises(ConfigError, match="backbone_checkpoint"):
        load_config("cpu-recipe", ["model.backbone_checkpoint=x.safetensors"])


@pytest.mark.parametrize("backbone", ["xception_tiny", "efficientnet_lite0"])
def test_attention_heads_reach_every_backbone(backbone):
    cfg = load_config("tiny", [f"model.backbone={backbone}", "model.attention_heads=3", "model.pretrained=false"])
    net = build_backbone(cfg.model, cfg.data.image_size)
    _, maps = net.forward_features(torch.zeros(1, 3, 64, 64))
    assert maps["exit"].shape[1] == 3


def test_user_xception_load_report_is_shown_and_kept_with_the_run(synth_root, tmp_path, capsys):
    from sevenpoint.models import XCEPTION_TINY, ModifiedXception

    weights = tmp_path / "xception_tiny.pt"
    torch.save(ModifiedXception(XCEPTION_TINY, attention=False).state_dict(), weights)
    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1",
                               f"model.backbone_checkpoint={weights}"])
    train(cfg, synth_root, tmp_path / "run", progress=False)
    report = (tmp_path / "run" / "backbone_load_report.txt").read_text()
    assert report.count("backbone from") == 2 and "loaded" in report and "not in the file" in report
    assert report.splitlines()[0] in capsys.readouterr().out


def test_pretrained_defaults_to_what_the_backbone_ships_and_refuses_what_it_cannot():
    assert load_config("cpu-recipe").model.pretrained is True  # EfficientNet-Lite ships ImageNet weights
    assert load_config("paper", ["model.backbone=efficientnet_lite1"]).model.pretrained is True
    assert load_config("tiny").model.pretrained is False  # the Xceptions ship none
    with pytest.raises(ConfigError, match="model.pretrained=true: xception has no packaged"):
        load_config("paper", ["model.pretrained=true"])
    assert load_config("paper", ["model.pretrained=true", "model.backbone_checkpoint=w.pt"]).model.pretrained


def test_derived_values_are_build_arguments_not_options(tmp_path):
    import yaml

    from sevenpoint.config import config_from_dict
    from sevenpoint.models import FusionModel

    for key in ("model.image_size=288", "model.meta_dim=20"):
        with pytest.raises(ConfigError, match="unknown config key"):
            load_config("tiny", [key])
    cfg = load_config("tiny", ["data.include_leaky_meta=true", "data.image_size=48"])
    assert cfg.meta_dim == 20
    model = FusionModel(cfg.model, cfg.data.image_size, cfg.meta_dim).eval()
    x = torch.zeros(2, 3, 48, 48)
    assert model(x, x, torch.zeros(2, 20)).probs[0].shape == (2, 5)
    saved = cfg.to_dict()  # a checkpoint or run folder from before 2026-11-28 also saved the derived values
    saved["model"].update(image_size=299, meta_dim=14)
    assert config_from_dict(saved) == cfg
    old_run = tmp_path / "config.yaml"
    old_run.write_text(yaml.safe_dump(saved))
    assert load_config(old_run) == cfg  # `--config OLD_RUN/config.yaml` still works


@pytest.mark.parametrize("override", ["data.image_size=8", "data.crop=-1", "data.augment=-0.5", "model.dropout=1.0",
                                      "model.hybrid_channels=0", "train.epochs=0", "train.batch_size=0", "train.lr=0",
                                      "train.weight_decay=-1", "train.label_smoothing=1", "train.meta_dropout=1.5",
                                      "train.early_stopping=-2", "train.limit_train_batches=0", "train.devices=0"])
def test_numeric_options_are_range_checked_when_loaded(override, tmp_path):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": expected a value"):
        load_config("tiny", [override])


def test_a_run_with_its_own_dermoscopy_backbone_reloads_and_predicts(synth_root, tmp_path):
    """train -> best.ckpt -> load_model / Predictor rebuild the Lite1 dermoscopy + Lite0 clinical model."""
    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "model.pretrained=false",
                               "model.backbone=efficientnet_lite0", "model.derm_backbone=efficientnet_lite1"])
    summary = train(cfg, synth_root, tmp_path / "run", progress=False)
    model, saved, _ = load_model(summary["best_checkpoint"])
    assert saved.model.derm_backbone == "efficientnet_lite1"
    derm_size, clinic_size = (sum(p.numel() for p in b.parameters())
                              for b in (model.derm.backbone, model.clinic.backbone))
    assert derm_size > clinic_size
    images = sorted((synth_root / "images").rglob("*.jpg"))
    result = Predictor.from_checkpoint(summary["best_checkpoint"], precision="fp32").predict(
        derm=str(images[0]), clinic=str(images[1]))
    assert abs(sum(result.tasks["DIAG"].probabilities.values()) - 1) < 1e-5


def test_derm_init_starts_the_dermoscopy_backbone_from_another_run(tiny_run, synth_root, tmp_path, capsys):
    """model.derm_init=CKPT: the dermoscopy backbone starts from CKPT's (e.g. a DIM model trained on ISIC);
    the clinical backbone does not; a backbone of another network or a model without one is refused."""
    from sevenpoint.checkpoint import CheckpointError, load_derm_backbone
    from sevenpoint.models import FusionModel

    ckpt = tiny_run["best_checkpoint"]
    source, _, _ = load_model(ckpt)
    cfg = load_config("tiny")
    model = FusionModel(cfg.model, 64)
    assert load_derm_backbone(model, ckpt) == len(source.derm.backbone.state_dict())
    for name, value in source.derm.backbone.state_dict().items():
        assert torch.equal(model.derm.backbone.state_dict()[name], value), name
    assert not all(torch.equal(model.clinic.backbone.state_dict()[k], v)
                   for k, v in source.clinic.backbone.state_dict().items())
    lite = FusionModel(load_config("tiny", ["model.backbone=efficientnet_lite0", "model.pretrained=false"]).model, 64)
    with pytest.raises(CheckpointError, match="does not fit this model's"):
        load_derm_backbone(lite, ckpt)
    with pytest.raises(CheckpointError, match="has no dermoscopy branch"):
        load_derm_backbone(FusionModel(load_config("tiny", ["model.variant=CIM"]).model, 64), ckpt)

    # a run with a learning rate too small to move the weights: its dermoscopy backbone is still the source's
    run_cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.lr=1e-7",
                                   f"model.derm_init={ckpt}"], seed=5)  # another init than the source
    summary = train(run_cfg, synth_root, tmp_path / "run", progress=False)
    assert f"dermoscopy backbone initialised from {ckpt}" in capsys.readouterr().out
    trained, saved, _ = load_model(summary["best_checkpoint"])  # rebuilt from its own config, the source not read
    assert saved.model.derm_init == str(ckpt)
    for branch, close in (("derm", True), ("clinic", False)):
        theirs = dict(getattr(source, branch).backbone.named_parameters())
        gap = max(float((p - theirs[n]).abs().max()) for n, p in getattr(trained, branch).backbone.named_parameters())
        assert (gap < 1e-3) == close, (branch, gap)
