"""Which calibration helps an ensemble: none, calibrate-then-pool or pool-then-calibrate (issue 40, item 4).

Needs ensembles whose members did not train on the validation split (v5-style members: `cpu-recipe-v5
train.ensemble=1`, or their cached-trunk screen). The validation cases are split into `--folds`
stratified folds; on each, temperatures are fitted on the other folds and the fold is scored, so every
case is scored once by temperatures that never saw it:

- none: the members' probabilities averaged as they are;
- calibrate-then-pool: per member and task a temperature (NLL, `metrics.fit_temperature`) on its own
  probabilities, applied before averaging;
- calibrate-then-pool, one T: per task one temperature fitted on all members' probabilities together (the
  members of one recipe are exchangeable, and the fit sees K times the cases), applied to each member
  before averaging: what a cross-fitted refit can fit, where each member has only its own fold held out;
- pool-then-calibrate: per task one temperature on the averaged probabilities, applied after.

Reported per ensemble: mean NLL and ECE over the 8 tasks, and for the differences
against "none" a paired bootstrap 95 % interval (cases resampled, the same resamples for every method).

    .venv/bin/python scripts/calibration_choice.py --data D --out calibration.json \\
        --ensemble RUN0/checkpoints/best.ckpt,RUN1/...,RUN2/... --ensemble RUN3/...,RUN4/...,RUN5/...
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.model_selection import StratifiedKFold

from sevenpoint.checkpoint import load_model
from sevenpoint.data import Derm7pt
from sevenpoint.engine.evaluate import predict_split
from sevenpoint.engine.metrics import ece, fit_temperature
from sevenpoint.runtime import use_channels_last
from sevenpoint.schema import DIAG_INDEX, TASKS
from sevenpoint.infer.temperature import apply_temperature

METHODS = ("none", "calibrate-then-pool", "calibrate-then-pool, one T", "pool-then-calibrate")


def member_probs(paths: list[str], data) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Per member, the validation probabilities per task (the checkpoint's own late fusion), and targets."""
    out, targets = [], None
    for path in paths:
        model, cfg, _ = load_model(path)
        pred = predict_split(model, cfg, data, "valid", channels_last=use_channels_last("auto"), progress=False)
        out.append(pred.probs)
        targets = pred.targets
    return out, targets


def cross_fitted(members: list[list[np.ndarray]], targets: np.ndarray, folds: int, seed: int) -> dict:
    """{method: per task (N, C) probabilities}, each case scored with temperatures fitted on the other folds."""
    n = len(targets)
    pooled = [np.mean([m[t] for m in members], axis=0) for t in range(len(TASKS))]
    out = {"none": pooled, **{k: [np.zeros_like(p) for p in pooled] for k in METHODS[1:]}}
    split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(n), targets[:, DIAG_INDEX])
    for fit_idx, score_idx in split:
        for t in range(len(TASKS)):
            known = fit_idx[targets[fit_idx, t] >= 0]
            y = targets[known, t]
            temps = [fit_temperature(m[t][known], y) for m in members]
            out["calibrate-then-pool"][t][score_idx] = np.mean(
                [apply_temperature(m[t][score_idx], temp) for m, temp in zip(members, temps)], axis=0)
            shared = fit_temperature(np.concatenate([m[t][known] for m in members]), np.tile(y, len(members)))
            out["calibrate-then-pool, one T"][t][score_idx] = np.mean(
                [apply_temperature(m[t][score_idx], shared) for m in members], axis=0)
            out["pool-then-calibrate"][t][score_idx] = apply_temperature(pooled[t][score_idx],
                                                                       fit_temperature(pooled[t][known], y))
    return out


def case_nll(probs: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """(N, 8) negative log-likelihood of each case's true class per task (NaN where unannotated)."""
    out = np.full(targets.shape, np.nan)
    for t, p in enumerate(probs):
        known = targets[:, t] >= 0
        out[known, t] = -np.log(np.clip(p[known, targets[known, t]], 1e-12, None))
    return out


def mean_ece(probs: list[np.ndarray], targets: np.ndarray, rows: np.ndarray | None = None) -> float:
    rows = np.arange(len(targets)) if rows is None else rows
    values = []
    for t, p in enumerate(probs):
        keep = rows[targets[rows, t] >= 0]
        values.append(ece(targets[keep, t], p[keep]))
    return float(np.mean(values))


def summarise(by_method: dict, targets: np.ndarray, boot: int, seed: int) -> dict:
    nlls = {k: case_nll(v, targets) for k, v in by_method.items()}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(targets), size=(boot, len(targets)))
    out = {}
    for k in METHODS:
        row = {"nll": float(np.nanmean(np.nanmean(nlls[k], axis=0))), "ece": mean_ece(by_method[k], targets)}
        if k != "none":
            d_nll = [np.nanmean(np.nanmean(nlls[k][i] - nlls["none"][i], axis=0)) for i in idx]
            d_ece = [mean_ece(by_method[k], targets, i) - mean_ece(by_method["none"], targets, i) for i in idx[:200]]
            row["nll_minus_none"] = [row["nll"] - out["none"]["nll"], *np.percentile(d_nll, [2.5, 97.5]).tolist()]
            row["ece_minus_none"] = [row["ece"] - out["none"]["ece"], *np.percentile(d_ece, [2.5, 97.5]).tolist()]
        out[k] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--ensemble", action="append", required=True, help="comma-separated member checkpoints")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--boot", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    data = Derm7pt.load(args.data)
    report = {}
    for e, spec in enumerate(args.ensemble):
        members, targets = member_probs(spec.split(","), data)
        report[f"ensemble {e}"] = summarise(cross_fitted(members, targets, args.folds, args.seed), targets,
                                            args.boot, args.seed)
    for name, rows in report.items():
        print(name)
        for k, row in rows.items():
            extra = "".join(f"  {m}: {v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]" for m, v in row.items()
                            if isinstance(v, list))
            print(f"  {k:27s} NLL {row['nll']:.4f}  ECE {row['ece']:.4f}{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"folds": args.folds, "boot": args.boot, "ensembles": args.ensemble, **report}, f, indent=2)


if __name__ == "__main__":
    main()
