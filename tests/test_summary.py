"""`sevenpoint summarize`: several evaluations of the same cases as mean ± sd with every run's value."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from conftest import run_cli
from sevenpoint.engine.metrics import compute_metrics
from sevenpoint.engine.summary import SummaryError, summarize, write_summary
from sevenpoint.schema import TASKS


def _evaluation(folder, seed: int, cases: int = 60, split: str = "test") -> dict:
    """A metrics.json as `evaluate` writes it (task metrics from compute_metrics on random predictions) with
    prediction sets and a referral point, in `folder`."""
    rng = np.random.default_rng(seed)
    targets = np.stack([rng.integers(0, t.num_classes, cases) for t in TASKS], axis=1)
    probs = [rng.dirichlet(np.ones(t.num_classes), cases) for t in TASKS]
    m = compute_metrics(probs, targets)
    m.update({"cases": cases, "split": split, "format": "derm7pt", "checkpoint": f"seed{seed}.ckpt",
              "ece_mean": float(rng.uniform(0.02, 0.1)), "nll_mean": float(rng.uniform(0.5, 1.0)),
              "ece_uncalibrated": {"tasks": {}, "mean": float(rng.uniform(0.05, 0.2))},
              "sets": {"level": 0.9, "mean_coverage": float(rng.uniform(0.85, 0.95)), "mean_size": 2.0,
                       "tasks": {"DIAG": {"cases": cases, "coverage": float(rng.uniform(0.85, 0.95)),
                                          "mean_size": float(rng.uniform(1.5, 3)), "single": 0.3,
                                          "coverage_by_class": {"BCC": 0.8 + 0.05 * seed, "NEV": 0.95}}}},
              "uncertain_share": 0.5, "temperature": [1.2] * 8, "tta": "none",
              "triage": {"threshold": 0.1, "sensitivity": 0.9, "sensitivity_here": 0.9 + 0.01 * seed,
                         "specificity_here": 0.5, "referred_here": 0.6}})
    if seed == 0:
        m["only_here"] = 1.0  # a figure an older evaluate did not write
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(m))
    return m


def test_summary_is_mean_and_sd_of_every_run_in_order(tmp_path):
    runs = [_evaluation(tmp_path / f"s{i}", i) for i in range(3)]
    s = write_summary([tmp_path / f"s{i}" for i in range(3)], tmp_path / "sum")
    acc = [r["average_accuracy"] for r in runs]
    assert s["stats"]["average_accuracy"]["values"] == acc
    assert s["stats"]["average_accuracy"]["mean"] == pytest.approx(statistics.fmean(acc))
    assert s["stats"]["average_accuracy"]["sd"] == pytest.approx(statistics.stdev(acc))
    mel = [r["tasks"]["DIAG"]["classes"]["MEL"]["auc"] for r in runs]
    assert s["stats"]["tasks.DIAG.classes.MEL.auc"]["mean"] == pytest.approx(np.mean(mel))
    assert "only_here" in s["partial"] and "only_here" not in s["stats"]
    assert "temperature" not in s["stats"] and s["level"] == 0.9  # lists are not averaged
    md = (tmp_path / "sum" / "summary.md").read_text()
    assert json.loads((tmp_path / "sum" / "summary.json").read_text())["stats"] == s["stats"]
    avg = f"{100 * statistics.fmean(acc):.2f} ± {100 * statistics.stdev(acc):.2f} (" \
          + " / ".join(f"{100 * a:.2f}" for a in acc) + ")"
    assert f"| **AVG** | {avg} |" in md
    assert "| DIAG | " in md and "BCC 85.0 ± 5.0 (80.0 / 85.0 / 90.0)" in md  # the least-covered class
    assert "sensitivity here (%) | 91.0 ± 1.0" in md


def test_summary_refuses_evaluations_of_different_cases_naming_the_folder(tmp_path):
    _evaluation(tmp_path / "a", 0)
    _evaluation(tmp_path / "b", 1, split="valid")
    with pytest.raises(SummaryError, match=r"b: split = 'valid', but .*a has 'test'"):
        summarize([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(FileNotFoundError, match=r"missing.metrics\.json"):
        summarize([tmp_path / "a", tmp_path / "missing"])


def test_cli_summarize_writes_both_files_and_exits_2_on_a_bad_folder(tmp_path, capsys):
    for i in range(2):
        _evaluation(tmp_path / f"s{i}", i)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")

    code, out, _ = run_cli(capsys, "summarize", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "sum")
    assert code == 0 and "2 evaluation(s) of 60 test cases" in out
    assert (tmp_path / "sum" / "summary.md").is_file()
    code, _, err = run_cli(capsys, "summarize", tmp_path / "s0", tmp_path / "bad", "--out", tmp_path / "sum2")
    assert code == 2 and "bad" in err and not (tmp_path / "sum2").exists()
