"""Faults: kill -9 mid-training then --resume; the web server under concurrent load and over its limits."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from sevenpoint.checkpoint import read_checkpoint
from conftest import start_server

from sevenpoint.data import Derm7pt, make_synthetic

CLI = [sys.executable, "-m", "sevenpoint.cli"]


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory):
    """Enough cases that an epoch lasts long enough to be killed in the middle of one."""
    return make_synthetic(tmp_path_factory.mktemp("slow"), cases=120, size=64, seed=4)


def _train_cmd(data, out, cache, *extra):
    return [*CLI, "train", "--data", str(data), "--out", str(out), "--config", "tiny", "--seed", "3", "--no-progress",
            "train.epochs=4", "train.batch_size=2", "train.deterministic=true", "model.dropout=0.2",
            f"data.cache_dir={cache}", *extra]


def test_kill9_mid_epoch_then_resume_matches_uninterrupted(slow_data, tmp_path):
    cache = tmp_path / "cache"
    subprocess.run(_train_cmd(slow_data, tmp_path / "full", cache), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_train_cmd(slow_data, tmp_path / "killed", cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    assert proc.poll() is None, "training finished before it could be killed; make epochs longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    epoch_at_kill = read_checkpoint(last)["epoch"]  # the surviving checkpoint is complete and loadable
    assert epoch_at_kill < 3
    resumed = subprocess.run([*CLI, "train", "--data", str(slow_data), "--out", str(tmp_path / "killed"), "--resume",
                              "--no-progress"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:  # bit-identical, as docs/RELIABILITY.md promises
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    ba = [v for k, v in a["callbacks"].items() if k.startswith("ModelCheckpoint")][0]["best_model_score"]
    bb = [v for k, v in b["callbacks"].items() if k.startswith("ModelCheckpoint")][0]["best_model_score"]
    assert float(ba) == float(bb)


def test_server_holds_50_concurrent_requests(tiny_run, synth_root):
    from sevenpoint.web.loadtest import run_load

    case = Derm7pt.load(synth_root).split_cases("test")[0]
    proc, url = start_server(tiny_run["best_checkpoint"])
    try:
        stats = run_load(url, case.derm, case.clinic, requests=50, concurrency=50)
        print(f"\nload: {stats}")
        assert stats["status_counts"] == {"200": 50} and stats["errors"] == 0
        assert stats["latency_ms_p95"] >= stats["latency_ms_p50"] > 0
        assert httpx.get(f"{url}/health").json()["queue"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_queue_limit_gives_503_not_a_crash(tiny_run, synth_root):
    from sevenpoint.web.loadtest import run_load

    case = Derm7pt.load(synth_root).split_cases("test")[0]
    proc, url = start_server(tiny_run["best_checkpoint"], "--max-queue", "2")
    try:
        stats = run_load(url, case.derm, case.clinic, requests=30, concurrency=30)
        assert stats["errors"] == 0 and stats["rejected_503"] > 0 and stats["status_counts"].get("200", 0) >= 2
        assert httpx.get(f"{url}/health").status_code == 200  # still alive
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_oversize_body_rejected_before_it_is_read(tiny_run):
    proc, url = start_server(tiny_run["best_checkpoint"], "--max-upload-mb", "1")
    try:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            # announce 500 MB, send 1 KB: the answer must come without the server waiting for the rest
            s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 524288000\r\n\r\n" + b"x" * 1024)
            reply = b""
            while b"exceeds" not in reply:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
            reply = reply.decode(errors="replace")
        assert reply.startswith("HTTP/1.1 413") and "exceeds the limit" in reply
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_write_killed_midway_leaves_the_old_file_and_stray_tmp_files_are_ignored(tiny_run, synth_root, tmp_path):
    """docs/RELIABILITY.md: atomic writes; a `*.tmp` left by a killed process changes nothing."""
    import shutil

    from sevenpoint.atomic import atomic_path
    from sevenpoint.data.cache import ImageCache
    from sevenpoint.engine.evaluate import evaluate

    target = tmp_path / "best.ckpt"
    target.write_bytes(b"the old checkpoint")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of a new one")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"the old checkpoint" and not list(tmp_path.glob("*.tmp"))

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run)
    (run / "checkpoints" / ".best.ckpt.x1y2z3.tmp").write_bytes(b"\x00" * 100)  # what a kill -9 leaves
    m = evaluate(run / "checkpoints" / "best.ckpt", synth_root, tmp_path / "eval", split="valid", progress=False)
    assert m["average_accuracy"] == pytest.approx(tiny_run["best_val_avg_acc"], abs=1e-6)

    cache = ImageCache(tmp_path / "cache", 32, 0)
    image = next(synth_root.rglob("*.jpg"))
    first = cache.load(image)
    for entry in (tmp_path / "cache").rglob("*"):
        if entry.is_file():
            (entry.parent / (entry.name + ".k9.tmp")).write_bytes(b"garbage")
    assert (cache.load(image) == first).all() and cache.stats.hits == 1
