"""The trunk-feature cache (`train.trunk_views`): storage, parity with the full model, fill and training."""

import dataclasses
import os
import time

import numpy as np
import pytest
import torch

from sevenpoint.config import ConfigError, load_config
from sevenpoint.data import load_dataset
from sevenpoint.data.trunk_store import TrunkCacheError
from sevenpoint.engine.trunk import choose_engine, fill, missing, stores_for, trunk_datasets
from sevenpoint.models import FusionModel

LITE = ["model.backbone=efficientnet_lite0", "model.pretrained=false", "model.freeze_blocks=5", "train.trunk_views=2"]


def lite_cfg(tmp_path, *extra, seed=0):
    return load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", *LITE, *extra], seed=seed)


def test_trunk_views_need_frozen_lite_blocks():
    with pytest.raises(ConfigError, match="model.freeze_blocks > 0"):
        load_config("tiny", ["model.backbone=efficientnet_lite0", "train.trunk_views=4"])
    with pytest.raises(ConfigError, match="EfficientNet-Lite"):
        load_config("tiny", ["model.freeze_blocks=2", "train.trunk_views=4"])  # tiny Xception


def test_model_reading_the_trunk_matches_the_model_reading_images(tmp_path):
    cfg = lite_cfg(tmp_path)
    model = FusionModel(cfg.model, 64, cfg.meta_dim).eval()
    g = torch.Generator().manual_seed(0)
    derm, clinic = torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    meta = torch.zeros(3, cfg.meta_dim)
    with torch.no_grad():
        full = model(derm, clinic, meta)
        feats = model.derm.backbone.trunk(derm), model.clinic.backbone.trunk(clinic)
        model.read_trunk(True)
        cut = model(*feats, meta)
    assert feats[0].shape[1] != 3  # features, not images
    for a, b in zip(full.probs, cut.probs):
        torch.testing.assert_close(a, b)
    model.read_trunk(False)
    with torch.no_grad():
        torch.testing.assert_close(model(derm, clinic, meta).probs[0], full.probs[0])


def _stores_and_needed(cfg, data_root):
    model = FusionModel(cfg.model, cfg.data.image_size, cfg.meta_dim)
    data = load_dataset(data_root)
    stores = stores_for(model, cfg)
    sets = trunk_datasets(stores, cfg, data, {"train": False, "valid": False})
    return stores, sets, [item for ds in sets.values() for item in ds.needed()]


def test_fill_store_read_and_damage(synth_root, tmp_path):
    cfg = lite_cfg(tmp_path, "model.pretrained=true")
    stores, sets, needed = _stores_and_needed(cfg, synth_root.parent)
    assert stores["derm"][0].root == stores["clinic"][0].root  # one ImageNet-like trunk: entries shared
    todo = missing(stores, needed, views=2)
    report = fill(todo, cfg, 2, engine="eager", progress=False)
    assert report["images"] == len(todo) > 0 and report["engine"] == "eager"
    assert missing(stores, needed, views=2) == []
    assert len(missing(stores, needed, views=3)) == len(todo)  # more views asked: every entry refilled
    store, trunk = stores["derm"]
    _, image, crop = needed[0]
    from sevenpoint.engine.trunk import image_views

    x = image_views(store.images, cfg, image, crop, 2)
    with torch.no_grad():
        want = trunk(x).numpy()
    for v in range(3):
        np.testing.assert_allclose(store.read(image, crop, v).astype(np.float32), want[v], atol=2e-3, rtol=2e-3)
    assert not np.allclose(want[1], want[2])  # two different augmented views
    # a training item reads an augmented view, a validation item view 0
    ds = sets["train"]
    item_views = {tuple(ds[(0, s)]["derm"].flatten()[:8].tolist()) for s in range(12)}
    first = ds.cases[0].derm
    stored = {tuple(torch.from_numpy(store.read(first, ds.cases[0].crop, v)).float().flatten()[:8].tolist())
              for v in (1, 2)}
    assert item_views == stored
    torch.testing.assert_close(ds[0]["derm"], torch.from_numpy(store.read(first, ds.cases[0].crop, 0)).float())
    # one flipped byte: the read names the entry, the check finds it, the next fill rebuilds it
    entry = store.entry(image, crop)
    raw = bytearray(entry.read_bytes())
    raw[-5] ^= 0xFF
    entry.write_bytes(bytes(raw))
    with pytest.raises(TrunkCacheError, match=str(entry.name)):
        store.read(image, crop, 2)
    assert [p for _, _, p, _ in missing(stores, needed, views=2)] == [image]
    entry.write_bytes(bytes(raw[:100]))  # truncated
    assert store.views_stored(image, crop) == 0


def test_changed_image_misses_the_cache(synth_copy, tmp_path):
    cfg = lite_cfg(tmp_path)
    stores, _, needed = _stores_and_needed(cfg, synth_copy.parent)
    needed = needed[:4]
    fill(missing(stores, needed, views=2), cfg, 2, engine="eager", progress=False)
    _, image, _ = needed[0]
    later = time.time() + 10
    os.utime(image, (later, later))
    assert [p for _, _, p, _ in missing(stores, needed, views=2)] == [image]


def test_trunk_key_follows_the_frozen_weights(tmp_path):
    cfg = lite_cfg(tmp_path, "model.pretrained=true")
    model = FusionModel(cfg.model, 64, cfg.meta_dim)
    before = stores_for(model, cfg)["derm"][0].root
    with torch.no_grad():
        model.derm.backbone.net._conv_stem.weight.add_(0.01)  # e.g. model.derm_init
    stores = stores_for(model, cfg)
    assert stores["derm"][0].root != before and stores["clinic"][0].root == before
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=0.3))
    assert stores_for(model, other)["clinic"][0].root != before  # another augmentation recipe


def test_engine_choice_checks_parity(tmp_path):
    cfg = lite_cfg(tmp_path)
    model = FusionModel(cfg.model, 64, cfg.meta_dim)
    _, trunk = stores_for(model, cfg)["derm"]
    sample = torch.rand(4, 3, 64, 64)
    name, run, report = choose_engine(trunk, sample)
    assert report["parity_rel_err"][name] <= report["tolerance"]  # an engine off by more is never chosen
    with torch.no_grad():
        torch.testing.assert_close(run(sample), trunk(sample), atol=1e-3, rtol=1e-3)


def test_fill_over_two_processes_writes_the_same_entries(synth_root, tmp_path):
    one, two = lite_cfg(tmp_path / "a"), lite_cfg(tmp_path / "b")
    model = FusionModel(one.model, 64, one.meta_dim)
    data = load_dataset(synth_root.parent)
    s1, s2 = stores_for(model, one), stores_for(model, two)
    needed = trunk_datasets(s1, one, data, {"valid": False})["valid"].needed()[:6]
    fill(missing(s1, needed, views=1), one, 1, engine="eager", progress=False)
    report = fill(missing(s2, needed, views=1), two, 1, engine="eager", processes=2, progress=False)
    assert report["processes"] == 2 and report["images"] == 6 and missing(s2, needed, views=1) == []
    for modality, image, crop in needed:
        np.testing.assert_allclose(s1[modality][0].read(image, crop, 1), s2[modality][0].read(image, crop, 1),
                                   atol=1e-3)


def test_training_on_the_trunk_cache_writes_an_ordinary_checkpoint(synth_root, tmp_path, capsys):
    from sevenpoint.checkpoint import load_model
    from sevenpoint.engine.evaluate import eval_dataset, predict_split
    from sevenpoint.engine.run import train

    cfg = lite_cfg(tmp_path, "model.pretrained=true")
    train(cfg, synth_root.parent, tmp_path / "run", progress=False, stop_after_epochs=1)  # interrupted
    out = capsys.readouterr().out
    assert "trunk features:" in out and "already cached" not in out
    summary = train(cfg, synth_root.parent, tmp_path / "run", progress=False, resume=True)
    assert "every entry already cached" in capsys.readouterr().out  # resume reads what the first start filled
    assert summary["epochs_run"] == cfg.train.epochs
    model, saved, _ = load_model(summary["best_checkpoint"])
    assert saved.train.trunk_views == 2 and not model.derm.backbone.reads_trunk  # reads images, no cache needed
    data = load_dataset(synth_root.parent)
    pred = predict_split(model, saved, data, "valid", progress=False)
    assert pred.probs[0].shape[0] == len(eval_dataset(saved, data, "valid"))
    # validation in training read view 0 from the cache (fp16): the checkpoint on images gives the same probabilities
    sets = trunk_datasets(stores_for(model, saved), saved, data, {"valid": False})
    batch = [sets["valid"][i] for i in range(len(sets["valid"]))]
    stack = {k: torch.stack([b[k] for b in batch]) for k in ("derm", "clinic", "meta", "has_derm", "has_clinic",
                                                             "has_meta")}
    model.read_trunk(True)
    with torch.no_grad():
        cut = model(stack["derm"], stack["clinic"], stack["meta"], stack["has_derm"], stack["has_clinic"],
                    stack["has_meta"])
    for t in range(8):
        np.testing.assert_allclose(cut.probs[t].numpy(), pred.probs[t], atol=5e-3)


def test_screen_config_is_a_v5_member_on_the_cut_11_cache():
    member = load_config("cpu-recipe-v5", ["train.ensemble=1", "train.calibrate=false"])
    screen = load_config("screen")
    assert (screen.model.freeze_blocks, screen.train.trunk_views) == (11, 16)
    plain = dataclasses.replace(screen, model=dataclasses.replace(screen.model, freeze_blocks=0),
                                train=dataclasses.replace(screen.train, trunk_views=0))
    assert plain == member  # everything else is the v5 member that §2's figures were measured with
