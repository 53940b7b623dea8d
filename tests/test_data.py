import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sevenpoint.data import DatasetError, Derm7pt, CaseDataset, ImageCache, make_synthetic
from sevenpoint.schema import NUM_CLASSES, TASKS


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_layout_columns_and_determinism(tmp_path):
    a = make_synthetic(tmp_path / "a", cases=40, size=48, seed=5)
    b = make_synthetic(tmp_path / "b", cases=40, size=48, seed=5)
    c = make_synthetic(tmp_path / "c", cases=40, size=48, seed=6)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    meta = pd.read_csv(a / "meta" / "meta.csv")
    assert len(meta.columns) == 19 and len(meta) == 40
    for split in ("train", "valid", "test"):
        assert (a / "meta" / f"{split}_indexes.csv").is_file()


def test_every_class_present_in_every_split(synth_root):
    data = Derm7pt.load(synth_root)
    for split in ("train", "valid", "test"):
        targets = data.targets(split)
        for t, task in enumerate(TASKS):
            assert set(targets[:, t]) == set(range(task.num_classes)), (split, task.name)


def test_reader_accepts_parent_or_release_folder(synth_root):
    assert Derm7pt.load(synth_root).root == Derm7pt.load(synth_root.parent).root


def test_reader_items_shapes_flags_and_quirks(synth_root, tmp_path):
    data = Derm7pt.load(synth_root)
    assert sum(len(v) for v in data.splits.values()) == 60
    # the case-mismatched path is resolved and reported
    resolved = [q for q in data.quirks if "case-insensitively" in q]
    assert len(resolved) == 1
    missing = [c for c in data.cases if c.clinic is None]
    assert len(missing) == 3
    ds = CaseDataset(data, "train", ImageCache(tmp_path / "cache", size=32, crop=0))
    item = ds[0]
    assert item["derm"].shape == (3, 32, 32) and item["derm"].dtype == torch.float32
    assert -1.0 <= float(item["derm"].min()) and float(item["derm"].max()) <= 1.0
    assert item["meta"].shape == (14,) and float(item["meta"].sum()) == 3.0
    assert item["targets"].shape == (8,) and item["targets"].dtype == torch.long
    assert all(0 <= int(item["targets"][t]) < n for t, n in enumerate(NUM_CLASSES))
    all_items = [ds[i] for i in range(len(ds))] + [CaseDataset(data, s, ds.cache)[i]
                                                   for s in ("valid", "test") for i in range(len(data.splits[s]))]
    no_clinic = [it for it in all_items if not bool(it["has_clinic"])]
    assert len(no_clinic) == 3
    assert all(float(it["clinic"].abs().sum()) == 0.0 for it in no_clinic)


def test_leaky_meta_only_on_request(synth_root):
    assert Derm7pt.load(synth_root).cases[0].meta.shape == (14,)
    assert Derm7pt.load(synth_root, include_leaky_meta=True).cases[0].meta.shape == (20,)


def _edit_meta(root: Path, row: int, column: str, value: str) -> None:
    frame = pd.read_csv(root / "meta" / "meta.csv", dtype=str, keep_default_na=False)
    frame.loc[row, column] = value
    frame.to_csv(root / "meta" / "meta.csv", index=False)


def test_unknown_label_value_names_row_column_value(synth_copy):
    _edit_meta(synth_copy, 4, "streaks", "zigzag")
    with pytest.raises(DatasetError, match=r"row 4, column 'streaks': unknown value 'zigzag'"):
        Derm7pt.load(synth_copy)


def test_missing_image_is_named(synth_copy):
    rel = pd.read_csv(synth_copy / "meta" / "meta.csv")["derm"][7]
    (synth_copy / "images" / rel).unlink(missing_ok=True)
    with pytest.raises(DatasetError, match=r"not found \(--skip-missing leaves those cases out\):\n.*row 7, column 'derm'"):
        Derm7pt.load(synth_copy)


def test_score_disagreeing_with_criteria_is_an_error(synth_copy):
    frame = pd.read_csv(synth_copy / "meta" / "meta.csv", dtype=str, keep_default_na=False)
    wrong = str(int(frame.loc[2, "seven_point_score"]) + 1)
    _edit_meta(synth_copy, 2, "seven_point_score", wrong)
    with pytest.raises(DatasetError, match=r"row 2: seven_point_score is"):
        Derm7pt.load(synth_copy)


@pytest.mark.parametrize("values, message", [
    (["0", "999"], r"index 999 is outside"),
    (["0", "0"], r"duplicated index"),
    (["0", "x1"], r"'x1' is not an integer"),
])
def test_bad_index_files(synth_copy, values, message):
    pd.DataFrame({"indexes": values}).to_csv(synth_copy / "meta" / "valid_indexes.csv", index=False)
    with pytest.raises(DatasetError, match=message):
        Derm7pt.load(synth_copy)


def test_overlapping_splits(synth_copy):
    train = pd.read_csv(synth_copy / "meta" / "train_indexes.csv")
    pd.DataFrame({"indexes": train["indexes"][:3]}).to_csv(synth_copy / "meta" / "test_indexes.csv", index=False)
    with pytest.raises(DatasetError, match="overlap"):
        Derm7pt.load(synth_copy)


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd"])
def test_paths_escaping_the_dataset_are_refused(synth_copy, path):
    _edit_meta(synth_copy, 1, "derm", path)
    with pytest.raises(DatasetError, match="escapes the dataset"):
        Derm7pt.load(synth_copy)


def test_cache_hits_and_rebuilds_corrupted_entries(synth_root, tmp_path):
    data = Derm7pt.load(synth_root)
    path = data.cases[0].derm
    cache = ImageCache(tmp_path / "c", size=40, crop=0)
    first = cache.load(path)
    assert cache.stats.misses == 1 and cache.stats.hits == 0
    second = cache.load(path)
    assert cache.stats.hits == 1 and np.array_equal(first, second)
    entry = cache.entry_path(path)
    raw = bytearray(entry.read_bytes())
    raw[-10] ^= 0xFF  # flip a pixel byte: the checksum catches it
    entry.write_bytes(bytes(raw))
    third = cache.load(path)
    assert cache.stats.rebuilt == 1 and np.array_equal(first, third)
    entry.write_bytes(entry.read_bytes()[:20])  # truncated entry
    assert np.array_equal(cache.load(path), first) and cache.stats.rebuilt == 2


def test_cache_misses_when_the_source_changes(synth_root, tmp_path):
    src = tmp_path / "img.jpg"
    shutil.copy(Derm7pt.load(synth_root).cases[0].derm, src)
    cache = ImageCache(tmp_path / "c", size=16, crop=0)
    before = cache.load(src)
    Image.new("RGB", (30, 20), (0, 255, 0)).save(src)
    after = cache.load(src)
    assert cache.stats.misses == 2
    assert not np.array_equal(before, after)
    r, g, b = after[8, 8].tolist()  # JPEG: close to pure green, not exact
    assert g > 200 and r < 40 and b < 40


def test_synthetic_data_is_learnable(tmp_path):
    """A small CNN trained for a few seconds beats the majority class clearly on BWV, STR and DaG."""
    from torch import nn

    torch.manual_seed(0)
    data = Derm7pt.load(make_synthetic(tmp_path, cases=300, size=64, seed=1))

    def load(cases):
        x = np.stack([np.asarray(Image.open(c.derm).convert("RGB").resize((64, 64)), np.float32) / 127.5 - 1 for c in cases])
        return torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([c.targets for c in cases])

    xtr, ytr = load(data.split_cases("train") + data.split_cases("valid"))
    xte, yte = load(data.split_cases("test"))

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    net = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(32, sum(NUM_CLASSES)))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    cuts = np.cumsum(NUM_CLASSES)[:-1].tolist()
    for _ in range(40):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 32):
            b = perm[i:i + 32]
            parts = torch.tensor_split(net(xtr[b]), cuts, dim=1)
            loss = sum(nn.functional.cross_entropy(p, ytr[b, k]) for k, p in enumerate(parts))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        parts = torch.tensor_split(net(xte), cuts, dim=1)
    names = [t.name for t in TASKS]
    for task, margin in (("BWV", 0.05), ("STR", 0.10), ("DaG", 0.15)):
        k = names.index(task)
        acc = (parts[k].argmax(1) == yte[:, k]).float().mean().item()
        majority = (yte[:, k] == torch.bincount(ytr[:, k]).argmax()).float().mean().item()
        assert acc >= majority + margin, (task, acc, majority)
