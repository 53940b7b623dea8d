"""`predict --batch`: per-row errors, CSV/JSON outputs, resume after kill -9, 2 processes from a process
pool, folder input, CSV encodings, fuzzed CSV bytes."""

import codecs
import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from sevenpoint.infer import batch as batch_mod
from sevenpoint.infer.batch import BatchInputError, CaseSource, predict_cases, run_batch
from sevenpoint.cli import _is_known
from sevenpoint.infer.predict import Predictor
from sevenpoint.schema import TASKS

CLI = [sys.executable, "-m", "sevenpoint.cli"]
EXAMPLES = int(os.environ.get("SEVENPOINT_FUZZ_EXAMPLES", "60"))


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`sevenpoint ARGS` in this process (no interpreter start): (exit status, stderr)."""
    code, _, err = run_cli(capsys, *args)
    return code, err


def ckpt(tiny_run):
    return tiny_run["run_dir"] / "checkpoints" / "best.ckpt"


def archive(synth_root, folder, rows: int, bad_every: int = 0) -> "os.PathLike":
    """A CSV beside its own copy of the synthetic images: `rows` cases cycling through the synthetic
    ones, every `bad_every`-th (1-based) pointing at a file that is not an image."""
    images = folder / "imgs"
    shutil.copytree(synth_root / "images", images)
    (images / "broken.jpg").write_bytes(b"not an image at all")
    meta = list(csv.DictReader(open(synth_root / "meta" / "meta.csv")))
    meta = [m for m in meta if (images / m["derm"]).exists()]
    path = folder / "cases.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "derm", "clinic", "sex", "location", "elevation"])
        for i in range(rows):
            m = meta[i % len(meta)]
            derm = "imgs/broken.jpg" if bad_every and (i + 1) % bad_every == 0 else f"imgs/{m['derm']}"
            w.writerow([f"c{i:04d}", derm, f"imgs/{m['clinic']}", m["sex"], m["location"], m["elevation"]])
    return path


def test_bad_row_costs_only_itself_and_outputs_open_in_pandas(tiny_run, synth_root, tmp_path, monkeypatch, capsys):
    cases = archive(synth_root, tmp_path, rows=3, bad_every=2)
    code, stderr = cli(monkeypatch, capsys, "predict", "--checkpoint", ckpt(tiny_run), "--batch", cases,
                       "--out", tmp_path / "r.csv", "--out", tmp_path / "r.json", "--no-progress")
    assert code == batch_mod.EXIT_ROWS_FAILED == 3, stderr
    assert "3 rows: 2 predicted, 1 failed" in stderr and "Traceback" not in stderr
    assert "row 2:" in stderr and "broken.jpg: not a readable image" in stderr
    table = pd.read_csv(tmp_path / "r.csv", keep_default_na=False)
    assert list(table["case_id"]) == ["c0000", "c0001", "c0002"]
    assert list(table["status"]) == ["ok", "error", "ok"]
    assert table.loc[1, "error"].startswith("row 2: ") and table.loc[1, "DIAG"] == ""
    for task in TASKS:  # every task's class and its probabilities, summing to 1
        probs = table.loc[[0, 2], [f"{task.name}_p_{c}" for c in task.classes]].astype(float)
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert set(table.loc[[0, 2], task.name]) <= set(task.classes)
    listed = json.loads((tmp_path / "r.json").read_text())
    assert [r["row"] for r in listed] == [1, 2, 3] and listed[1]["error"] == table.loc[1, "error"]
    # the JSON entries are the single-case JSON, same numbers as the CSV
    single = Predictor.from_checkpoint(ckpt(tiny_run)).predict(
        derm=listed[0]["inputs"]["derm"], clinic=listed[0]["inputs"]["clinic"],
        meta={k: listed[0]["inputs"][k] for k in ("sex", "location", "elevation")})
    assert listed[0]["diagnosis"] == single.diagnosis == table.loc[0, "diagnosis"]
    assert listed[0]["tasks"]["PN"]["probabilities"]["TYP"] == pytest.approx(
        single.tasks["PN"].probabilities["TYP"], abs=1e-5)
    assert not (tmp_path / "r.csv.parts").exists()  # the journal goes once the outputs are written


def test_all_rows_predicted_exits_zero(tiny_run, synth_root, tmp_path, monkeypatch, capsys):
    cases = archive(synth_root, tmp_path, rows=4)
    lightning_level = logging.getLogger("lightning.pytorch").level
    code, stderr = cli(monkeypatch, capsys, "predict", "--checkpoint", ckpt(tiny_run), "--batch", cases,
                       "--out", tmp_path / "r.jsonl")
    assert code == 0, stderr
    # Lightning's INFO lines are muted while scoring, not for the rest of the process (a later train's are ours)
    assert logging.getLogger("lightning.pytorch").level == lightning_level
    assert "4 rows: 4 predicted, 0 failed" in stderr
    assert "row/s" in stderr and "4/4" in stderr  # the progress bar, on by default
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert [json.loads(x)["case_id"] for x in lines] == ["c0000", "c0001", "c0002", "c0003"]


@pytest.mark.parametrize("option", [["--set", "BWV=ABS"], ["--level", "0.8"], ["--report", "r.html"],
                                    ["--heatmaps", "maps"], ["--sex", "female"]])
def test_batch_refuses_single_case_options_by_name(tiny_run, synth_root, tmp_path, monkeypatch, capsys, option):
    cases = archive(synth_root, tmp_path, rows=2)
    code, stderr = cli(monkeypatch, capsys, "predict", "--checkpoint", ckpt(tiny_run), "--batch", cases,
                       "--out", tmp_path / "r.csv", *option)
    assert code == 2 and f"{option[0]}: not supported with --batch" in stderr
    assert not (tmp_path / "r.csv").exists()  # refused before anything was predicted


def test_kill_minus_9_then_rerun_continues_without_repeating_a_row(tiny_run, synth_root, tmp_path, monkeypatch):
    cases = archive(synth_root, tmp_path, rows=400, bad_every=50)
    out = tmp_path / "r.csv"
    shard = tmp_path / "r.csv.parts" / "rank0.jsonl"
    proc = subprocess.Popen([*CLI, "predict", "--checkpoint", ckpt(tiny_run), "--batch", cases, "--out", out,
                             "--batch-size", "2", "--no-progress", "--precision", "fp32", "--backend", "torch"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not shard.exists() or shard.read_bytes().count(b"\n") < 20):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert shard.exists() and not out.exists()
    with open(shard, "ab") as f:  # as if the kill had landed inside a write
        f.write(b'{"row": 399, "case_id": "c03')
    kept = shard.read_bytes().count(b"\n")
    assert 20 <= kept < 400

    predicted = []
    real = batch_mod.predict_cases
    monkeypatch.setattr(batch_mod, "predict_cases", lambda p, c: predicted.extend(x.row for x in c) or real(p, c))
    summary = run_batch(ckpt(tiny_run), cases, [out], precision="fp32", backend="torch", progress=False)
    assert summary.resumed == kept and summary.total == 400
    assert len(predicted) == 400 - kept and len(set(predicted)) == len(predicted)  # nothing predicted twice
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table["row"]) == list(range(1, 401))  # every row once, in input order
    assert (table["status"] == "error").sum() == 8 == summary.failed

    fresh = run_batch(ckpt(tiny_run), cases, [tmp_path / "fresh.csv"], precision="fp32", backend="torch",
                      progress=False)
    assert fresh.resumed == 0
    again = pd.read_csv(tmp_path / "fresh.csv", keep_default_na=False)
    assert (again["diagnosis"] == table["diagnosis"]).all()
    assert np.allclose(again["DIAG_p_MEL"].replace("", np.nan).astype(float),
                       table["DIAG_p_MEL"].replace("", np.nan).astype(float), atol=1e-5, equal_nan=True)


def test_a_changed_input_is_not_mixed_into_an_interrupted_run(tiny_run, synth_root, tmp_path):
    cases = archive(synth_root, tmp_path, rows=3)
    out = tmp_path / "r.csv"
    parts = tmp_path / "r.csv.parts"
    parts.mkdir()
    (parts / "header.json").write_text(json.dumps({"version": 1, "input_sha256": "someone else's"}))
    with pytest.raises(BatchInputError, match="--restart"):
        run_batch(ckpt(tiny_run), cases, [out], progress=False)
    summary = run_batch(ckpt(tiny_run), cases, [out], progress=False, restart=True)
    assert summary.ok == 3 and summary.resumed == 0


def test_two_processes_match_one_row_for_row(tiny_run, synth_root, tmp_path):
    cases = archive(synth_root, tmp_path, rows=37, bad_every=9)
    run_batch(ckpt(tiny_run), cases, [tmp_path / "one.csv"], precision="fp32", progress=False, batch_size=4)
    proc = subprocess.run([*CLI, "predict", "--checkpoint", ckpt(tiny_run), "--batch", cases, "--devices", "2",
                           "--batch-size", "4", "--precision", "fp32", "--out", tmp_path / "two.csv"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == batch_mod.EXIT_ROWS_FAILED, proc.stderr
    # the first process scored its own share only (19 rows): the other 18 of the 37 below came from the second
    assert "predict (process 1 of 2)" in proc.stderr and "19/19" in proc.stderr and "37/37" not in proc.stderr
    one = pd.read_csv(tmp_path / "one.csv", keep_default_na=False)
    two = pd.read_csv(tmp_path / "two.csv", keep_default_na=False)
    assert list(two.columns) == list(one.columns) and len(two) == 37
    numeric = [c for c in one.columns if "_p_" in c or c in ("melanoma_probability", "ood_score")]
    text = [c for c in one.columns if c not in numeric]
    assert (one[text] == two[text]).all().all()
    a, b = (t[numeric].replace("", np.nan).astype(float).to_numpy() for t in (one, two))
    assert np.allclose(a, b, atol=1e-5, equal_nan=True)


def test_a_folder_of_images_is_an_archive(tiny_run, synth_root, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for src in sorted((synth_root / "images").rglob("*d.jpg"))[:3]:
        shutil.copy(src, folder / src.name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "zz.png").write_bytes(b"broken")
    summary = run_batch(ckpt(tiny_run), folder, [tmp_path / "r.csv"], progress=False)
    assert (summary.total, summary.ok, summary.failed, summary.skipped) == (4, 3, 1, 1)
    table = pd.read_csv(tmp_path / "r.csv", keep_default_na=False)
    assert list(table["case_id"]) == sorted(p.name for p in folder.iterdir() if p.suffix != ".txt")
    assert (table["clinic"] == "").all() and (table.loc[:2, "branches_used"] != "").all()


ROWS = [["case_id", "derm", "clinic", "sex"], ["a", "x/1.jpg", "", "female"], ["b", "/abs/2.jpg", "c.jpg", ""]]


@pytest.mark.parametrize("codec,delimiter,newline", [
    ("utf-8", ",", "\n"), ("utf-8-sig", ",", "\r\n"), ("utf-16", "\t", "\r\n"),  # utf-16: Excel's "Unicode text"
    ("utf-16-be", ";", "\n"), ("utf-16-le", ",", "\n")])
def test_csv_encodings_and_line_ends_read_alike(tmp_path, codec, delimiter, newline):
    text = newline.join(delimiter.join(r) for r in ROWS) + newline
    data = text.encode(codec)
    if codec == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data
    path = tmp_path / "cases.csv"
    path.write_bytes(data)
    cases = list(CaseSource(path))
    assert [(c.row, c.case_id) for c in cases] == [(1, "a"), (2, "b")]
    assert cases[0].derm == str(tmp_path / "x" / "1.jpg") and cases[0].clinic is None
    assert cases[1].derm == "/abs/2.jpg" and cases[1].clinic == str(tmp_path / "c.jpg")
    assert cases[0].meta["sex"] == "female" and cases[1].meta["sex"] is None


def test_whole_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "latin.csv"
    bad.write_bytes(b"derm,clinic\n\xe9t\xe9.jpg,\n")
    with pytest.raises(BatchInputError, match=r"latin\.csv line 2: not utf-8 text \(byte offset 12"):
        CaseSource(bad)
    nohead = tmp_path / "nohead.csv"
    nohead.write_text("image,label\na.jpg,1\n")
    with pytest.raises(BatchInputError, match=r"nohead\.csv: the header needs a 'derm'"):
        CaseSource(nohead)
    with pytest.raises(BatchInputError, match="no such file"):
        CaseSource(tmp_path / "missing.csv")


@pytest.fixture(scope="module")
def tiny_predictor(tiny_run):
    return Predictor.from_checkpoint(ckpt(tiny_run), precision="fp32")


BASE = "case_id,derm,clinic,sex,location,elevation\nc1,a.jpg,,female,back,flat\nc2,,b.png,,,\n".encode()


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 60,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda cut, junk, codec: (BASE[:cut] + junk + BASE[cut:]).decode("latin-1").encode(codec, "replace"),
              st.integers(0, len(BASE)), st.binary(max_size=12), st.sampled_from(["utf-8", "utf-16", "utf-8-sig"]))))
@example(data=b"derm\n\x00\x00\n")
@example(data=b"\xff\xfe" + "derm\r\nx.jpg\r\n".encode("utf-16-le"))
@example(data=b'derm,clinic\n"unclosed,x\n')
@example(data=b'derm\n"two\nlines.jpg"\n')
def test_fuzzed_batch_csv_gives_results_or_one_line_errors(tmp_path_factory, tiny_predictor, data):
    path = tmp_path_factory.mktemp("fuzz") / "cases.csv"
    path.write_bytes(data)
    try:
        source = CaseSource(path)
        cases = list(source)
    except Exception as exc:  # noqa: BLE001 - the property under test
        assert isinstance(exc, BatchInputError), f"{type(exc).__name__}: {exc}"
        assert _is_known(exc) and "\n" not in str(exc) and str(path) in str(exc)
        return
    assert source.count == len(cases) and [c.row for c in cases] == list(range(1, len(cases) + 1))
    for rec, case in zip(predict_cases(tiny_predictor, cases), cases):
        assert rec["row"] == case.row and (rec["prediction"] is None) == bool(rec["error"])
        if rec["error"]:
            assert rec["error"].startswith(f"row {case.row}: ") and "\n" not in rec["error"]


def test_a_second_run_on_the_same_output_is_refused_while_one_writes(tiny_run, synth_root, tmp_path):
    import fcntl

    cases = archive(synth_root, tmp_path, rows=2)
    parts = tmp_path / "r.csv.parts"
    parts.mkdir()
    with open(parts / "lock", "w") as held:  # as a running `predict --batch` holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BatchInputError, match="another run is writing"):
            run_batch(ckpt(tiny_run), cases, [tmp_path / "r.csv"], progress=False)
    assert run_batch(ckpt(tiny_run), cases, [tmp_path / "r.csv"], progress=False).ok == 2
