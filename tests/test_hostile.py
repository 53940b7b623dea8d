"""Hostile-input catalogue (issue: reliability): each case gets a clear error naming the file,
row, field or value, a non-zero exit without a traceback, and harms nothing already saved."""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import sevenpoint.cli as cli_module
from conftest import run_cli
from sevenpoint.data import Derm7pt, CaseDataset, ImageCache


def cli(capsys, *args) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stdout + stderr)."""
    code, out, err = run_cli(capsys, *args)
    return code, out + err


def _meta(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "meta" / "meta.csv", dtype=str, keep_default_na=False)


def _save_meta(root: Path, frame: pd.DataFrame) -> None:
    frame.to_csv(root / "meta" / "meta.csv", index=False)


def _image_of_row(root: Path, row: int) -> Path:
    return root / "images" / _meta(root).loc[row, "derm"]


def drop_column(root):
    _save_meta(root, _meta(root).drop(columns=["streaks"]))


def unknown_value(root):
    m = _meta(root)
    m.loc[3, "pigmentation"] = "checkered"
    _save_meta(root, m)


def empty_meta(root):
    _save_meta(root, _meta(root).iloc[0:0])


def zero_byte_meta(root):
    (root / "meta" / "meta.csv").write_bytes(b"")


def duplicated_case(root):
    m = _meta(root)
    m.loc[5, "case_num"] = m.loc[4, "case_num"]
    _save_meta(root, m)


def non_integer_case(root):
    m = _meta(root)
    m.loc[2, "case_num"] = "twelve"
    _save_meta(root, m)


def wrong_score(root):
    m = _meta(root)
    m.loc[6, "seven_point_score"] = str(int(m.loc[6, "seven_point_score"]) + 2)
    _save_meta(root, m)


def index(values, split="valid"):
    def make(root):
        pd.DataFrame({"indexes": values}).to_csv(root / "meta" / f"{split}_indexes.csv", index=False)
    return make


def overlapping(root):
    train = pd.read_csv(root / "meta" / "train_indexes.csv")["indexes"]
    pd.DataFrame({"indexes": train[:2]}).to_csv(root / "meta" / "test_indexes.csv", index=False)


def missing_index_file(root):
    (root / "meta" / "test_indexes.csv").unlink()


def missing_image(root):
    _image_of_row(root, 8).unlink()


def two_missing_images(root):
    _image_of_row(root, 8).unlink()
    _image_of_row(root, 11).unlink()


def zero_byte_image(root):
    _image_of_row(root, 8).write_bytes(b"")


def truncated_jpeg(root):
    p = _image_of_row(root, 8)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])


def header_truncated_jpeg(root):
    p = _image_of_row(root, 8)
    p.write_bytes(p.read_bytes()[:300])  # cut inside the JPEG header: Image.open itself fails


def text_as_jpeg(root):
    _image_of_row(root, 8).write_text("this is not a picture\n")


def escaping_path(path):
    def make(root):
        m = _meta(root)
        m.loc[9, "derm"] = path
        _save_meta(root, m)
    return make


def huge_image(root):
    # 9000 x 5000 = 45 M pixels (> 40 M limit): bilevel PNG, so the file stays small
    Image.new("1", (9000, 5000)).save(_image_of_row(root, 8).with_suffix(".png"))
    m = _meta(root)
    m.loc[8, "derm"] = m.loc[8, "derm"].rsplit(".", 1)[0] + ".png"
    _save_meta(root, m)


DATASET_CASES = [
    ("meta.csv missing a column", drop_column, r"missing column\(s\) streaks"),
    ("unknown label value", unknown_value, r"row 3, column 'pigmentation': unknown value 'checkered'"),
    ("meta.csv with no rows", empty_meta, r"no rows"),
    ("0-byte meta.csv", zero_byte_meta, r"meta.csv: cannot parse as CSV"),
    ("duplicated case", duplicated_case, r"row 5: case_num \d+ duplicates row 4"),
    ("non-integer case_num", non_integer_case, r"row 2: case_num 'twelve' is not an integer"),
    ("score disagrees with criteria", wrong_score, r"row 6: seven_point_score is \d+ but the criteria give"),
    ("index out of range", index(["0", "5000"]), r"valid_indexes.csv, line 3: index 5000 is outside"),
    ("duplicated index", index(["1", "1"]), r"valid_indexes.csv: duplicated index"),
    ("non-integer index", index(["1", "2.5x"]), r"valid_indexes.csv, line 3: index '2.5x' is not an integer"),
    ("empty index file", index([]), r"valid_indexes.csv: (no indexes|cannot parse)"),
    ("overlapping splits", overlapping, r"splits train and test overlap in 2 row"),
    ("index file missing", missing_index_file, r"test_indexes.csv: file not found"),
    ("image missing", missing_image, r"1 image file\(s\) not found \(--skip-missing leaves those cases out\):\n.*row 8, column 'derm'"),
    ("two images missing: both listed", two_missing_images,
     r"2 image file\(s\) not found \(--skip-missing leaves those cases out\):\n.*row 8, column 'derm'.*\n.*row 11, column 'derm'"),
    ("0-byte image", zero_byte_image, r"unusable image.*\n.*S\d+d\.jpg"),
    ("truncated JPEG", truncated_jpeg, r"unusable image.*\n.*S\d+d\.jpg: cannot decode"),
    ("JPEG truncated inside its header", header_truncated_jpeg, r"unusable image.*\n.*S\d+d\.jpg: cannot decode"),
    ("text file named .jpg", text_as_jpeg, r"S\d+d\.jpg: not a readable image"),
    ("path escaping the dataset (../..)", escaping_path("../../etc/passwd"), r"row 9, column 'derm'.*escapes"),
    ("absolute image path", escaping_path("/etc/hostname"), r"row 9, column 'derm'.*escapes"),
    ("decompression bomb (45 M pixels)", huge_image, r"S\d+d\.png: 9000x5000 = 45000000 pixels exceeds"),
]


@pytest.mark.parametrize("name, make, message", DATASET_CASES, ids=[c[0] for c in DATASET_CASES])
def test_dataset_hostile_inputs(synth_copy, capsys, name, make, message):
    make(synth_copy)
    code, out = cli(capsys, "check-data", synth_copy)
    assert code == 2, out
    assert "Traceback" not in out
    import re

    assert re.search(message, out), out


def test_not_a_dataset_folder(tmp_path, capsys):
    code, out = cli(capsys, "check-data", tmp_path)
    assert code == 2 and "not a dataset folder this version reads (formats: derm7pt, ph2, isic)" in out


def _replace_image(root: Path, img: Image.Image, suffix: str) -> None:
    """Replace row 8's dermoscopy image by `img`, saved in a format that holds its mode."""
    old = _image_of_row(root, 8)
    old.unlink()
    img.save(old.with_suffix(suffix))
    m = _meta(root)
    m.loc[8, "derm"] = m.loc[8, "derm"].rsplit(".", 1)[0] + suffix
    _save_meta(root, m)


def grayscale(img):
    return img.convert("L")


def rgba(img):
    out = img.convert("RGBA")
    out.putalpha(128)
    return out


def palette(img):
    return img.convert("P", palette=Image.Palette.ADAPTIVE)


def cmyk(img):
    return img.convert("CMYK")


def gray16(img):
    arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    img16 = Image.fromarray(arr)
    assert img16.mode.startswith("I;16")
    return img16


@pytest.mark.parametrize("convert, suffix", [(grayscale, ".jpg"), (rgba, ".png"), (palette, ".png"), (cmyk, ".jpg"),
                                             (gray16, ".tif")], ids=["grayscale", "rgba", "palette", "cmyk", "16-bit"])
def test_odd_image_modes_work(synth_copy, capsys, tmp_path, convert, suffix):
    source = Image.open(_image_of_row(synth_copy, 8)).convert("RGB")
    _replace_image(synth_copy, convert(source), suffix)
    code, out = cli(capsys, "check-data", synth_copy)
    assert code == 0, out
    data = Derm7pt.load(synth_copy)
    case = data.cases[8]
    split = next(s for s, idx in data.splits.items() if 8 in idx)
    ds = CaseDataset(data, split, ImageCache(tmp_path / "c", 32, 0))
    item = ds[list(data.splits[split]).index(8)]
    assert item["derm"].shape == (3, 32, 32) and torch.isfinite(item["derm"]).all()
    assert case.derm.exists()


def test_training_on_a_broken_image_names_it_and_keeps_the_cache(synth_copy, capsys, tmp_path):
    row = int(pd.read_csv(synth_copy / "meta" / "train_indexes.csv")["indexes"][0])  # a case the trainer reads
    p = _image_of_row(synth_copy, row)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    cache = tmp_path / "cache"
    code, out = cli(capsys, "train", "--data", synth_copy, "--out", tmp_path / "run", "--config", "tiny",
                    f"data.cache_dir={cache}", "--no-progress")
    assert code == 2 and "cannot decode" in out and "S0" in out and "Traceback" not in out
    assert not list(cache.rglob("*.tmp"))  # no half-written cache entries


# ---------------------------------------------------------------- checkpoints


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/sevenpoint-pwned",))


def test_checkpoint_that_runs_code_is_refused(tmp_path, capsys, synth_root):
    marker = Path("/tmp/sevenpoint-pwned")
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"sevenpoint": _Evil(), "state_dict": {}}))
    before = _sha(evil)
    code, out = cli(capsys, "evaluate", "--checkpoint", evil, "--data", synth_root, "--out", tmp_path / "e")
    assert code == 2 and "refused" in out
    assert not marker.exists()  # the payload never ran
    assert _sha(evil) == before and not (tmp_path / "e" / "metrics.json").exists()


def test_not_a_checkpoint(tmp_path, capsys, synth_root):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("just some text")
    code, out = cli(capsys, "predict", "--checkpoint", bad, "--derm", bad)
    assert code == 2 and "not a readable checkpoint" in out and "Traceback" not in out


def test_checkpoint_with_another_schema(tiny_run, tmp_path, capsys):
    ckpt = torch.load(tiny_run["best_checkpoint"], weights_only=True)
    ckpt["sevenpoint"]["schema"][0][1] = ["BCC", "NEV", "MEL"]
    path = tmp_path / "other-schema.ckpt"
    torch.save(ckpt, path)
    code, out = cli(capsys, "predict", "--checkpoint", path, "--derm", path)
    assert code == 2 and "label schema differs" in out


def test_checkpoint_whose_weights_do_not_fit_its_variant(tiny_run, tmp_path, capsys):
    ckpt = torch.load(tiny_run["best_checkpoint"], weights_only=True)
    ckpt["sevenpoint"]["config"]["model"]["variant"] = "DIM"
    path = tmp_path / "mismatch.ckpt"
    torch.save(ckpt, path)
    code, out = cli(capsys, "predict", "--checkpoint", path, "--derm", path)
    assert code == 2 and "weights do not fit a DIM/xception_tiny model" in out and "unexpected" in out


def test_resume_without_a_run(tmp_path, capsys, synth_root):
    code, out = cli(capsys, "train", "--data", synth_root, "--out", tmp_path / "none", "--resume")
    assert code == 2 and "nothing to resume" in out


def test_unwritable_run_dir_fails_before_training(tmp_path, capsys, synth_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, out = cli(capsys, "train", "--data", synth_root, "--out", blocker / "run", "--config", "tiny")
    assert code == 2 and "cannot write the run folder" in out


def test_full_disk_fails_before_training(tmp_path, synth_root, monkeypatch):
    import shutil as sh

    from sevenpoint.config import load_config
    from sevenpoint.engine import train as tr

    monkeypatch.setattr(tr.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(tr.RunDirError, match="only 1 MB free"):
        tr.train_model(load_config("tiny"), synth_root, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- predict


@pytest.fixture()
def derm_image(synth_root) -> Path:
    return Derm7pt.load(synth_root).cases[0].derm


@pytest.mark.parametrize("args, message", [
    ([], "give --derm and/or --clinic"),
    (["--sex", "robot", "--location", "back", "--elevation", "flat"], "allowed: female, male"),
    (["--sex", "male", "--location", "moon", "--elevation", "flat"], "allowed: abdomen, acral"),
    (["--sex", "male", "--location", "back", "--elevation", "very"], "allowed: flat, palpable, nodular"),
    (["--sex", "male"], "metadata is partial"),
], ids=["no image", "bad sex", "bad location", "bad elevation", "partial metadata"])
def test_predict_bad_arguments(tiny_run, derm_image, tmp_path, capsys, args, message):
    out_json = tmp_path / "r.json"
    derm = ["--derm", derm_image] if args else []
    code, out = cli(capsys, "predict", "--checkpoint", tiny_run["best_checkpoint"], *derm, *args, "--out", out_json)
    assert code == 2 and message in out and "Traceback" not in out
    assert not out_json.exists()


def test_predict_unsupported_and_oversize_images(tiny_run, tmp_path, capsys):
    text = tmp_path / "x.jpg"
    text.write_text("nope")
    code, out = cli(capsys, "predict", "--checkpoint", tiny_run["best_checkpoint"], "--derm", text)
    assert code == 2 and "x.jpg: not a readable image" in out
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 5000)).save(huge)
    code, out = cli(capsys, "predict", "--checkpoint", tiny_run["best_checkpoint"], "--derm", huge)
    assert code == 2 and "exceeds the limit" in out
    code, out = cli(capsys, "predict", "--checkpoint", tiny_run["best_checkpoint"], "--derm", tmp_path / "absent.jpg")
    assert code == 2 and "absent.jpg" in out
    cut = tmp_path / "cut.jpg"  # a JPEG cut inside its header: Image.open itself fails
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 60, 40)).save(buf, "JPEG")
    cut.write_bytes(buf.getvalue()[:300])
    code, out = cli(capsys, "predict", "--checkpoint", tiny_run["best_checkpoint"], "--derm", cut)
    assert code == 2 and "cut.jpg: cannot decode" in out and "Traceback" not in out


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_predict_nan_inf_arrays(tiny_run, bad):
    from sevenpoint.infer.predict import Predictor, PredictError

    arr = np.zeros((32, 32, 3), np.float32)
    arr[3, 4, 1] = bad
    with pytest.raises(PredictError, match="derm: array contains NaN or infinite"):
        Predictor.from_checkpoint(tiny_run["best_checkpoint"]).predict(derm=arr)


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(Exception, match="no such folder"):
        cli_module._STATE["debug"] = True
        old = sys.argv
        sys.argv = ["sevenpoint", "--debug", "check-data", str(tmp_path / "nope")]
        try:
            cli_module.main()
        finally:
            sys.argv = old
            cli_module._STATE["debug"] = False
    shutil.rmtree(tmp_path, ignore_errors=True)
