from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

# `pytest -n 2` (pytest-xdist, the suite's default: pyproject addopts) runs two workers, one per core: each
# runs torch, and every process a test starts, on one thread, so the workers never oversubscribe the cores
# (small ops slow down many times when two 2-thread processes share 2 cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
# Measured precision choices (runtime.autotune) go to one file per test session, never to ~/.cache:
# every predictor of a session (and every server it starts) then uses the same choice.
os.environ.setdefault("SEVENPOINT_AUTOTUNE", os.path.join(tempfile.mkdtemp(prefix="sevenpoint-autotune-"),
                                                          "autotune.json"))
# ... and are kept though the workers share the cores (runtime.autotune would otherwise re-measure them).
os.environ.setdefault("SEVENPOINT_AUTOTUNE_SHARED", "keep")

REPO = Path(__file__).resolve().parents[1]
# The real Derm7pt meta + splits (no images) shared beside the checkout; tests that need it
# skip with a reason where it is absent. SEVENPOINT_REAL_META points elsewhere.
REAL_META = Path(os.environ.get("SEVENPOINT_REAL_META", REPO.parent / "shared" / "data" / "derm7pt-meta"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic Derm7pt (read-only for tests: copy it before modifying)."""
    from sevenpoint.data import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth"), cases=60, size=64, seed=3)


@pytest.fixture()
def synth_copy(synth_root, tmp_path) -> Path:
    import shutil

    dest = tmp_path / "release_v0"
    shutil.copytree(synth_root, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_run(synth_root, tmp_path_factory) -> dict:
    """A tiny DCIHMM trained for 2 epochs on the synthetic data (shared by several tests)."""
    from sevenpoint.config import load_config
    from sevenpoint.engine.run import train

    out = tmp_path_factory.mktemp("run")
    cfg = load_config("tiny", [f"data.cache_dir={out / 'cache'}"], seed=0)
    summary = train(cfg, synth_root.parent, out / "run", progress=False)
    summary["run_dir"] = out / "run"
    summary["cache_dir"] = out / "cache"
    return summary


@pytest.fixture(scope="session")
def trust_data(tmp_path_factory) -> Path:
    """Enough validation cases (~40) for a stacked diagnosis and class-conditional sets to be fitted."""
    from sevenpoint.data import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("trust-data"), cases=200, size=64, seed=5)


@pytest.fixture(scope="session")
def crossfit_run(trust_data, tmp_path_factory) -> tuple[dict, Path]:
    """A tiny cross-fitted refit ensemble of 3 (the default recipe's shape), calibrated out of fold."""
    from sevenpoint.config import load_config
    from sevenpoint.engine.run import train

    out = tmp_path_factory.mktemp("crossfit")
    cfg = load_config("tiny", [f"data.cache_dir={out / 'cache'}", "train.ensemble=3", "train.refit=true",
                               "train.cross_fit=true", "train.calibrate=true"], seed=1)
    return train(cfg, trust_data.parent, out / "run", progress=False), out / "run"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`sevenpoint ARGS` in this process (no interpreter start, errors as the console entry point maps them):
    (exit status, stdout, stderr)."""
    import sevenpoint.cli as cli_module

    cli_module._STATE["debug"] = False
    old = sys.argv
    sys.argv = ["sevenpoint", *map(str, args)]
    try:
        cli_module.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def start_server(checkpoint, *extra) -> tuple[subprocess.Popen, str]:
    """`sevenpoint serve` on a free loopback port; returns (process, base URL) once /health answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sevenpoint.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}"
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("server did not start: " + proc.stdout.read().decode(errors="replace")[-2000:])
