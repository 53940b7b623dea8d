"""The package's own training learns: a tiny `train` run beats the majority class on held-out
synthetic cases by margins a model that never updates its weights cannot reach, and `evaluate`
scores it against each case's own labels."""

import numpy as np
import pandas as pd
import pytest

from sevenpoint.config import load_config
from sevenpoint.data import Derm7pt, make_synthetic
from sevenpoint.engine.evaluate import evaluate
from sevenpoint.engine.run import train
from sevenpoint.schema import TASKS


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp("learn"), cases=200, size=64, seed=1)
    out = root.parent
    cfg = load_config("tiny", [f"data.cache_dir={out / 'cache'}", "train.epochs=20", "data.augment=0",
                               "train.scheduler=cosine", "train.channels_last='off'"], seed=0)
    summary = train(cfg, root, out / "run", progress=False)
    metrics = evaluate(summary["best_checkpoint"], root, out / "eval", split="test", progress=False)
    return root, out / "eval", metrics


def test_training_beats_the_majority_class(learned):
    # Measured margins for seeds 0 / 1 / 2 (78 test cases): PN +0.26 / +0.23 / +0.27, BWV +0.21 / +0.17 /
    # +0.18, average +0.058 / +0.066 / +0.072. With the optimiser step made a no-op (loss and gradients
    # still computed) PN fell to 0.21 against a majority of 0.33 and this test failed. The layout is pinned
    # (contiguous): left to the autotune, a Sapphire Rapids picked channels_last and seed 0's average
    # margin came out +0.037 (2026-12-02) - the margins then depended on the machine, not on learning.
    _, _, m = learned
    base = m["majority_baseline"]
    assert m["tasks"]["PN"]["accuracy"] >= base["PN"] + 0.15
    assert m["tasks"]["BWV"]["accuracy"] >= base["BWV"] + 0.10
    assert m["average_accuracy"] >= base["AVG"] + 0.04


def test_evaluate_scores_each_case_against_its_own_labels(learned):
    root, eval_dir, m = learned
    data = Derm7pt.load(root)
    truth = {c.case_id: c.targets for c in data.split_cases("test")}
    pred = pd.read_csv(eval_dir / "predictions.csv")
    assert sorted(pred["case_id"]) == sorted(truth)
    for t, task in enumerate(TASKS):
        expected = np.array([truth[cid][t] for cid in pred["case_id"]])
        assert np.array_equal(pred[f"{task.name}_true"].to_numpy(), expected), task.name
        acc = (pred[f"{task.name}_pred"].to_numpy() == expected).mean()
        assert m["tasks"][task.name]["accuracy"] == pytest.approx(acc)
