"""What a clinician sees: temperatures, prediction sets and the stacked diagnosis fitted on cases the
model did not train on (out of fold for a cross-fit refit ensemble), corrections of criteria, and the
evaluation figures that say how far to trust it (intervals, coverage, breakdowns, interventions)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sevenpoint.infer.artifacts import (Artifacts, CorrectionError, apply_corrections, parse_corrections, postprocess,
                                  triage_point)
from sevenpoint.checkpoint import load_model, read_checkpoint
from sevenpoint.config import ConfigError, load_config
from sevenpoint.data import Derm7pt
from sevenpoint.engine.held_out import conformal_scores, fit_stacker, mixed_criteria
from sevenpoint.engine.trust import _rank_auc, bootstrap_intervals, least_sure_corrections, random_corrections
from sevenpoint.infer.predict import Predictor, PredictError
from sevenpoint.schema import CRITERIA, DIAG_INDEX, TASK_NAMES, TASKS, seven_point_score


def test_cross_fit_members_leave_out_one_fold_each_and_oof_predictions_come_from_that_member(crossfit_run, trust_data):
    from sevenpoint.engine.evaluate import predict_split

    summary, run = crossfit_run
    data = Derm7pt.load(trust_data)
    valid, train_rows = data.splits["valid"], data.splits["train"]
    oof = np.load(run / "out_of_fold.npz")
    ids = [data.cases[i].case_id for i in valid]
    assert list(oof["ids"]) == ids  # every validation case once, in split order
    held_out = []
    for i in range(3):
        member = run / "members" / f"m{i}"
        saw = json.loads((member / "train_summary.json").read_text())["train_cases"]
        held_out.append(len(train_rows) + len(valid) - saw)
        model, cfg, _ = load_model(member / "checkpoints" / "best.ckpt")
        pred = predict_split(model, cfg, data, "valid", progress=False)
        mine = {cid: k for k, cid in enumerate(pred.ids)}
        # the member's own prediction is the out-of-fold one exactly on the cases it never saw
        same = [np.allclose(pred.probs[0][mine[cid]], oof["probs_DIAG"][j], atol=1e-5) for j, cid in enumerate(ids)]
        assert sum(same) >= held_out[-1]
    assert sum(held_out) == len(valid) and min(held_out) > 0  # the folds partition the validation split
    for i in range(3):  # each member's fold, predicted at the end of its training by the model in memory
        saved = np.load(run / "members" / f"m{i}" / "held_out.npz")
        assert len(saved["ids"]) == held_out[i]
        rows = [ids.index(cid) for cid in saved["ids"].tolist()]
        np.testing.assert_array_equal(oof["probs_DIAG"][rows], saved["probs_DIAG"])
        assert (oof["folds"][rows] == i).all()
    section = read_checkpoint(run / "checkpoints" / "best.ckpt")["sevenpoint"]
    assert "out of fold" in section["fitted_on"] and section["conformal"] and section["stacker"]
    assert section["config"]["infer"]["temperature"] == [section["calibration"][t.name]["temperature"] for t in TASKS]
    assert summary["out_of_fold_avg_acc"] is not None and summary["best_val_avg_acc"] is None


def test_cross_fit_ensemble_tempers_each_member_before_averaging(crossfit_run, trust_data):
    """Calibrate-then-pool (RESULTS §13): the temperatures fitted on single members' out-of-fold predictions
    are applied to each member, inside the network, and nowhere else."""
    from sevenpoint.engine.evaluate import predict_split
    from sevenpoint.infer.temperature import apply_temperature

    summary, run = crossfit_run
    data = Derm7pt.load(trust_data)
    model, cfg, _ = load_model(summary["best_checkpoint"])
    temps = cfg.infer.temperature
    assert cfg.infer.temperature_on == "members" and model.member_temperature == temps
    assert cfg.infer.output_temperature is None
    assert any(abs(t - 1.0) > 0.05 for t in temps)  # else the checks below could not tell the orders apart
    members = []
    for i in range(3):
        member, member_cfg, _ = load_model(run / "members" / f"m{i}" / "checkpoints" / "best.ckpt")
        member.fusion_weights = model.fusion_weights
        members.append(predict_split(member, member_cfg, data, "test", progress=False).probs)
    ensemble = predict_split(model, cfg, data, "test", progress=False).probs
    for t, temp in enumerate(temps):
        expected = np.mean([apply_temperature(m[t], temp) for m in members], axis=0)
        np.testing.assert_allclose(ensemble[t], expected, atol=1e-5)
        if abs(temp - 1.0) > 0.05:  # not the same as calibrating the average
            pooled_then = apply_temperature(np.mean([m[t] for m in members], axis=0), temp)
            assert not np.allclose(ensemble[t], pooled_then, atol=1e-4)

    case = data.split_cases("test")[0]
    results = {}
    for backend in ("torch", "frozen"):  # every engine carries them; the output is not tempered a second time
        predictor = Predictor.from_checkpoint(summary["best_checkpoint"], backend=backend, precision="fp32")
        prepared = predictor.prepare({"derm": case.derm, "clinic": case.clinic, "meta": case.raw_meta})
        raw = predictor.backend(prepared.derm[None], prepared.clinic[None], prepared.meta[None],
                                {k: torch.tensor([v]) for k, v in prepared.has.items()})[0]
        result = predictor.run([prepared])[0]
        pn = TASK_NAMES.index("PN")
        np.testing.assert_allclose(list(result.tasks["PN"].probabilities.values()), raw[pn][0], atol=1e-5)
        assert "each member's probabilities before averaging" in result.calibration
        assert "out of fold" in result.calibration
        results[backend] = raw[pn][0]
    np.testing.assert_allclose(results["torch"], results["frozen"], atol=1e-4)


def test_cross_fit_sets_are_cross_conformal_and_every_engine_gives_the_same(crossfit_run, trust_data, tmp_path):
    """Each stored score carries the fold (= the member) that made it; eager, frozen, ONNX Runtime and the
    evaluation path emit the members' probabilities and give the same sets (with a correction too)."""
    from sevenpoint.engine.evaluate import predict_split
    from sevenpoint.engine.held_out import CROSS_METHOD
    from sevenpoint.infer.export import export_onnx

    summary, run = crossfit_run
    section = read_checkpoint(summary["best_checkpoint"])["sevenpoint"]
    oof = np.load(run / "out_of_fold.npz")
    assert section["conformal"]["method"] == CROSS_METHOD
    for t, task in enumerate(TASKS):
        known = oof["targets"][:, t] >= 0
        assert section["conformal"]["tasks"][task.name]["folds"] == oof["folds"][known].tolist()
    assert sorted(set(oof["folds"].tolist())) == [0, 1, 2]
    data = Derm7pt.load(trust_data)
    cases = data.split_cases("test")[:8]
    inputs = [{"derm": c.derm, "clinic": c.clinic, "meta": c.raw_meta} for c in cases]
    inputs[1]["corrections"] = {"BWV": "PRS"}
    export_onnx(summary["best_checkpoint"], tmp_path / "m.onnx")
    got = {}
    for backend in ("torch", "frozen", "onnx"):
        predictor = (Predictor.from_onnx(tmp_path / "m.onnx") if backend == "onnx" else
                     Predictor.from_checkpoint(summary["best_checkpoint"], backend=backend, precision="fp32"))
        got[backend] = [r.sets for r in predictor.predict_batch(inputs)]
    assert got["torch"] == got["frozen"] == got["onnx"]
    model, cfg, extra = load_model(summary["best_checkpoint"])
    pred = predict_split(model, cfg, data, "test", progress=False)
    assert pred.members is not None and len(pred.members) == 3
    order = [pred.ids.index(c.case_id) for c in cases if "corrections" not in inputs[cases.index(c)]]
    shown = postprocess([p[order] for p in pred.probs], Artifacts.from_section(extra), cfg.infer.output_temperature,
                        members=[[p[order] for p in m] for m in pred.members])
    plain = [s for s, i in zip(got["torch"], inputs) if "corrections" not in i]
    for i, sets in enumerate(plain):
        assert sets == {task.name: [c for c, inside in zip(task.classes, shown.sets[t][i]) if inside]
                        for t, task in enumerate(TASKS)}


def test_a_calibrated_run_fits_on_the_model_in_memory_with_the_selected_weights(synth_root, tmp_path, monkeypatch):
    """`train.calibrate` on a plain run: the held-out fits predict with the trained model in memory (no second
    model built from the file), and its weights are the selected epoch's: the stored conformal scores are what
    best.ckpt predicts."""
    import sevenpoint.checkpoint as ckpt_mod
    from sevenpoint.engine.evaluate import predict_split
    from sevenpoint.engine.run import train
    from sevenpoint.infer.temperature import apply_temperatures

    def refuse(*args, **kwargs):
        raise AssertionError("the trained model was rebuilt from its checkpoint")

    monkeypatch.setattr(ckpt_mod, "model_from", refuse)
    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'c'}", "train.calibrate=true", "train.epochs=4",
                               "infer.clinic_weight=0.5"], seed=3)
    summary = train(cfg, synth_root, tmp_path / "run", progress=False)
    monkeypatch.undo()
    import pandas as pd

    val = pd.read_csv(next((tmp_path / "run" / "logs").rglob("metrics.csv")))["val/avg_acc"].dropna().tolist()
    assert max(val) > val[-1]  # the selected epoch is not the last: else the check below could not tell them apart
    model, saved, section = load_model(summary["best_checkpoint"])
    pred = predict_split(model, saved, Derm7pt.load(synth_root), "valid", progress=False)
    probs = apply_temperatures(pred.probs, saved.infer.temperature)
    pn = TASK_NAMES.index("PN")
    known = pred.targets[:, pn] >= 0
    y = pred.targets[known, pn]
    expected = 1.0 - probs[pn][known][np.arange(len(y)), y]
    np.testing.assert_allclose(section["conformal"]["tasks"]["PN"]["scores"], expected, atol=1e-4)


def test_an_uncalibrated_model_says_so(tiny_run, synth_root):
    predictor = Predictor.from_checkpoint(tiny_run["best_checkpoint"], backend="torch")
    case = Derm7pt.load(synth_root).split_cases("test")[0]
    result = predictor.predict(derm=case.derm)
    assert result.calibration.startswith("not calibrated") and result.to_dict()["calibration"] == result.calibration


def test_cross_fit_and_refit_calibration_need_each_other():
    with pytest.raises(ConfigError, match="cross_fit: needs train.refit"):
        load_config("tiny", ["train.cross_fit=true", "train.ensemble=3"])
    with pytest.raises(ConfigError, match="train.cross_fit=true"):
        load_config("tiny", ["train.refit=true", "train.calibrate=true"])


def test_class_conditional_sets_cover_each_class_and_match_the_conformal_rule():
    """Classes with very different score distributions: a marginal (non-Mondrian) set would under-cover the
    hard class; the Mondrian one covers each at >= level, and each set is exactly the p-value rule."""
    rng = np.random.default_rng(0)

    def draw(n):
        y = rng.integers(0, 2, n)
        conf = np.where(y == 0, rng.beta(8, 1, n), rng.beta(1.2, 1, n))  # class 1 is hard
        p1 = np.where(y == 1, conf, 1 - conf)
        return np.stack([1 - p1, p1], axis=1), y

    cal_p, cal_y = draw(400)
    bwv = TASK_NAMES.index("BWV")
    probs = [np.full((400, t.num_classes), 1 / t.num_classes) for t in TASKS]
    probs[bwv] = cal_p
    targets = np.zeros((400, len(TASKS)), dtype=np.int64)
    targets[:, bwv] = cal_y
    art = Artifacts(conformal=conformal_scores(probs, targets))
    test_p, test_y = draw(4000)
    test = [np.full((4000, t.num_classes), 1 / t.num_classes) for t in TASKS]
    test[bwv] = test_p
    sets = art.prediction_sets(test, 0.9)[bwv]
    for c in (0, 1):
        assert sets[test_y == c, c].mean() >= 0.87  # finite-sample guarantee 0.9, minus sampling noise
    scores = {c: 1 - cal_p[cal_y == c, c] for c in (0, 1)}
    for i in range(20):  # the rule, by hand: c is in the set iff (#{cal scores of c >= s} + 1) / (n_c + 1) > 0.1
        for c in (0, 1):
            s = 1 - test_p[i, c]
            p_value = ((scores[c] >= s).sum() + 1) / (len(scores[c]) + 1)
            assert sets[i, c] == (p_value > 0.1)
    with pytest.raises(ValueError, match="level"):
        art.prediction_sets(test, 1.5)


def _one_task(task_name, cal_p, cal_y):
    t = TASK_NAMES.index(task_name)
    probs = [np.full((len(cal_y), k.num_classes), 1 / k.num_classes) for k in TASKS]
    probs[t] = cal_p
    targets = np.zeros((len(cal_y), len(TASKS)), dtype=np.int64)
    targets[:, t] = cal_y
    return t, probs, targets


def test_a_rare_class_is_not_in_every_set_and_no_set_is_empty():
    """DIAG with 7 BCC calibration cases (like Derm7pt's validation split): one Mondrian bin per class puts
    BCC in every 90 % set (its smallest p-value is 1/8); pooled / marginal scoring must not."""
    rng = np.random.default_rng(3)
    counts = {0: 7, 1: 120, 2: 50, 3: 30, 4: 10}  # BCC, NEV, MEL, MISC, SK
    y = np.concatenate([np.full(n, c) for c, n in counts.items()])
    conf = rng.beta(6, 2, len(y))
    p = np.full((len(y), 5), 0.0)
    p[np.arange(len(y)), y] = conf
    p += (1 - conf)[:, None] / 5 * (np.arange(5)[None] != y[:, None])
    p /= p.sum(1, keepdims=True)
    t, probs, targets = _one_task("DIAG", p, y)
    art = Artifacts(conformal=conformal_scores(probs, targets))
    assert art.set_bins(t, 0.9) == {0: "marginal", 1: "own", 2: "own", 3: "own", 4: "own"}
    assert art.set_bins(t, 0.8)[0] == "own"  # 7 cases can leave BCC out at 80 % (n >= 4)
    sure = np.full((50, 5), 0.01)
    sure[:, 1] = 0.96  # confident NEV answers
    test = [np.full((50, k.num_classes), 1 / k.num_classes) for k in TASKS]
    test[t] = sure
    sets = art.prediction_sets(test, 0.9)
    assert not sets[t][:, 0].any() and (sets[t].sum(1) == 1).all()  # a sure case gets one diagnosis
    weird = [q.copy() for q in test]
    weird[t] = np.full((50, 5), 0.2)  # each class as unusual as nothing in calibration: all p-values tiny
    weird[t][:, 3] = 0.2001
    shown = art.prediction_sets(weird, 0.5)[t]
    assert (shown.sum(1) >= 1).all()  # never empty ...
    assert shown[:, 3].all()  # ... the most probable class stands in


def _member_world(rng, n, sharpness, task="BWV"):
    """n cases of a two-class task seen by members of different `sharpness` (one (n, 2) array each)."""
    y = rng.integers(0, 2, n)
    out = []
    for s in sharpness:
        logit = s * np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.5, n)
        p1 = 1 / (1 + np.exp(-logit))
        out.append(np.stack([1 - p1, p1], axis=1))
    return out, y


def test_cross_conformal_scores_each_member_against_its_own_fold():
    """p(c) = (1 + sum_k #{fold k scores of c's bin >= member k's score}) / (n_bin + 1), by hand; one fold and
    one member give exactly the split-conformal sets (crepes), rare-class pooling included."""
    rng = np.random.default_rng(4)
    sharp = (3.0, 0.3)  # member 0 sure of itself, member 1 hardly: their scores live on different scales
    by_member, y = _member_world(rng, 60, sharp)
    folds = np.arange(60) % 2
    oof = np.where(folds[:, None] == 0, by_member[0], by_member[1])  # each case by the member of its fold
    t, probs, targets = _one_task("BWV", oof, y)
    art = Artifacts(conformal=conformal_scores(probs, targets, folds=folds))
    assert art.cross_conformal
    test_members, _ = _member_world(rng, 25, sharp)
    shown = [np.full((25, k.num_classes), 1 / k.num_classes) for k in TASKS]
    shown[t] = np.mean(test_members, axis=0)
    members = []
    for m in test_members:
        mine = [q.copy() for q in shown]
        mine[t] = m
        members.append(mine)
    sets = art.prediction_sets(shown, 0.8, members=members)[t]
    scores = 1 - oof[np.arange(60), y]
    for i in range(25):
        expected = np.zeros(2, dtype=bool)
        for c in (0, 1):
            count = sum(((scores >= 1 - test_members[k][i, c]) & (y == c) & (folds == k)).sum() for k in (0, 1))
            expected[c] = (count + 1) / ((y == c).sum() + 1) > 0.2
        if not expected.any():  # never empty: the most probable class stands in
            expected[shown[t][i].argmax()] = True
        np.testing.assert_array_equal(sets[i], expected)
    with pytest.raises(ValueError, match="each member's probabilities"):
        art.prediction_sets(shown, 0.8)

    counts = {0: 7, 1: 120, 2: 50, 3: 30, 4: 10}  # DIAG with a rare BCC: pooled / marginal bins
    yd = np.concatenate([np.full(k, c) for c, k in counts.items()])
    pd_ = rng.dirichlet(np.ones(5), len(yd))
    t, probs, targets = _one_task("DIAG", pd_, yd)
    split = Artifacts(conformal=conformal_scores(probs, targets))
    one_fold = Artifacts(conformal=conformal_scores(probs, targets, folds=np.zeros(len(yd), dtype=int)))
    test = [q[:40] for q in _one_task("DIAG", rng.dirichlet(np.ones(5), 40), yd[:40])[1]]
    for level in (0.8, 0.9):
        np.testing.assert_array_equal(one_fold.prediction_sets(test, level, members=[test])[t],
                                      split.prediction_sets(test, level)[t])


def test_cross_conformal_sets_cover_each_class_at_the_level():
    """Three members of different sharpness, calibrated each on its own fold: over fresh cases the
    cross-conformal 90 % sets cover each class at >= ~90 % (the guarantee is >= 1 - 2 alpha; in practice ~1 - alpha)."""
    rng = np.random.default_rng(6)
    sharp = (3.0, 1.5, 0.5)
    by_member, y = _member_world(rng, 600, sharp)
    folds = np.arange(600) % 3
    oof = np.choose(folds[:, None], by_member)
    t, probs, targets = _one_task("BWV", oof, y)
    art = Artifacts(conformal=conformal_scores(probs, targets, folds=folds))
    test_members, ty = _member_world(rng, 4000, sharp)
    shown = [np.full((4000, k.num_classes), 1 / k.num_classes) for k in TASKS]
    shown[t] = np.mean(test_members, axis=0)
    members = [[m if j == t else q for j, q in enumerate(shown)] for m in test_members]
    sets = art.prediction_sets(shown, 0.9, members=members)[t]
    for c in (0, 1):
        assert sets[ty == c, c].mean() >= 0.87
    assert sets.sum(axis=1).mean() < 1.9  # and the sets say something


def test_a_correction_equal_to_the_models_answer_changes_nothing():
    rng = np.random.default_rng(1)
    probs, targets = _criteria_world(300, rng)
    stacker, _ = fit_stacker(probs, targets)
    stacker["default"] = False  # the image model shows the diagnosis unless a correction moves it
    art = Artifacts(stacker=stacker, conformal=conformal_scores(probs, targets))
    one = [p[:4] for p in probs]
    own = [{name: int(one[TASK_NAMES.index(name)][i].argmax()) for name in ("BWV", "PN")} for i in range(4)]
    plain, confirmed = postprocess(one, art), postprocess(one, art, corrections=own)
    assert confirmed.corrections == [{}] * 4 and not confirmed.stacked.any()
    for a, b in zip(plain.probs + plain.sets, confirmed.probs + confirmed.sets):
        np.testing.assert_array_equal(a, b)
    flip = [{"BWV": 1 - own[i]["BWV"]} for i in range(4)]
    moved = postprocess(one, art, corrections=flip)
    assert moved.stacked.all() and all(m == f for m, f in zip(moved.corrections, flip))


def test_a_corrected_cases_diagnosis_set_uses_the_stacked_models_scores():
    rng = np.random.default_rng(1)
    probs, targets = _criteria_world(300, rng)
    stacker, stacked_cv = fit_stacker(probs, targets)
    stacker["default"] = False
    art = Artifacts(stacker=stacker, conformal=conformal_scores(
        probs, targets, {"image model": probs[DIAG_INDEX], "stacked": stacked_cv}))
    one = [p[:30] for p in probs]
    flip = [{"BWV": 1 - int(one[TASK_NAMES.index("BWV")][i].argmax())} for i in range(30)]
    moved = postprocess(one, art, corrections=flip, level=0.8)
    alt = list(probs)
    alt[DIAG_INDEX] = stacked_cv
    stacked_only = Artifacts(conformal=conformal_scores(alt, targets))
    expect = stacked_only.prediction_sets(moved.probs, 0.8)[DIAG_INDEX]
    np.testing.assert_array_equal(moved.sets[DIAG_INDEX], expect)
    image_scored = Artifacts(conformal=conformal_scores(probs, targets)).prediction_sets(moved.probs, 0.8)[DIAG_INDEX]
    assert (image_scored != expect).any()  # the two score sets differ here: the check can tell them apart


def test_doubt_without_sets_marks_a_low_top_probability():
    low = [np.full((2, k.num_classes), 1 / k.num_classes) for k in TASKS]
    low[DIAG_INDEX] = np.array([[0.22, 0.2, 0.2, 0.18, 0.2], [0.02, 0.9, 0.04, 0.02, 0.02]])
    done = postprocess(low, Artifacts())
    assert done.sets is None and done.uncertain.tolist() == [True, False]
    assert "22%" in done.why[0] and "no prediction sets" in done.why[0] and done.why[1] is None


def test_the_stacker_sees_true_criteria_mixed_with_predicted_ones():
    rng = np.random.default_rng(2)
    probs, targets = _criteria_world(100, rng)
    targets[:10, TASK_NAMES.index("PN")] = -1  # unlabelled: never replaced
    mixed, rows = mixed_criteria(probs, targets, 4, seed=0)
    assert len(rows) == 500 and (rows[:100] == np.arange(100)).all()
    for t in (TASK_NAMES.index(n) for n in CRITERIA):
        np.testing.assert_array_equal(mixed[t][:100], probs[t])  # the originals as predicted
        one_hot = (mixed[t][100:] == 1.0).any(axis=1)
        assert 0.35 < one_hot.mean() < 0.65  # about half of the copies' values are the truth
        truth = targets[rows[100:], t]
        assert (mixed[t][100:][one_hot].argmax(1) == truth[one_hot]).all()
        if n_unlabelled := (truth < 0).sum():
            assert not one_hot[truth < 0].any(), n_unlabelled
    np.testing.assert_array_equal(mixed[DIAG_INDEX][100:], probs[DIAG_INDEX][rows[100:]])


def test_the_referral_point_refers_a_new_melanoma_at_the_stated_sensitivity():
    """Over many draws of n held-out melanomas, a new melanoma's P(MEL) reaches the chosen threshold with
    probability >= 90 % (the rank bound); an interpolated 10 % quantile of the held-out melanomas falls short."""
    rng = np.random.default_rng(0)
    reps, n = 20000, 30
    held = rng.random((reps, n))
    new = rng.random(reps)
    hit = [new[r] >= triage_point(held[r], np.ones(n, dtype=bool), 0.9)["threshold"] for r in range(reps)]
    assert np.mean(hit) >= 0.895  # exactly 1 - 3/31 = 0.903 in expectation
    point = triage_point(np.array([0.1, 0.5, 0.9, 0.2]), np.array([True, True, False, False]), 0.9)
    assert point["threshold"] == 0.0 and point["held_out_sensitivity"] == 1.0  # 2 melanomas: refer everyone
    assert triage_point(np.array([0.3]), np.array([False])) is None


def _criteria_world(n, rng):
    """Diagnosis decided by two criteria; the image model's diagnosis probabilities are noise."""
    probs = [rng.dirichlet(np.ones(t.num_classes), n) for t in TASKS]
    targets = np.stack([p.argmax(axis=1) for p in probs], axis=1)
    pn, bwv = TASK_NAMES.index("PN"), TASK_NAMES.index("BWV")
    targets[:, DIAG_INDEX] = np.where(targets[:, bwv] == 1, 2, np.where(targets[:, pn] == 1, 1, 4))
    return probs, targets


def test_stacked_diagnosis_learns_from_criteria_is_adopted_when_better_and_follows_corrections():
    rng = np.random.default_rng(1)
    probs, targets = _criteria_world(300, rng)
    stacker, cv = fit_stacker(probs, targets)
    assert stacker["default"] and stacker["held_out"]["stacked_diag_accuracy_cv"] > 0.8 > \
        stacker["held_out"]["image_model_diag_accuracy"]
    assert cv.shape == (300, 5)
    art = Artifacts(stacker=stacker)
    one = [p[:1] for p in probs]
    fixed = apply_corrections(one, [{"BWV": 1}])
    diag, used = art.diagnosis_probs(fixed, np.array([True]))
    assert used[0] and diag[0].argmax() == 2  # blue-whitish veil present -> melanoma in this world
    fixed = apply_corrections(one, [{"BWV": 0, "PN": 1}])
    assert art.diagnosis_probs(fixed, np.array([True]))[0][0].argmax() == 1
    # a stacker that loses to the image model is kept for corrections only
    good = [p.copy() for p in probs]
    good[DIAG_INDEX] = np.eye(5)[targets[:, DIAG_INDEX]] * 0.9 + 0.02
    assert not fit_stacker(good, targets)[0]["default"] or \
        fit_stacker(good, targets)[0]["held_out"]["stacked_diag_accuracy_cv"] >= 0.99


def test_corrections_are_parsed_by_name_and_refused_with_the_name():
    assert parse_corrections({"bwv": "present", "PN": "ATP", "DaG": "irregular"}) == {"BWV": 1, "PN": 2, "DaG": 2}
    with pytest.raises(CorrectionError, match="'DIAG': not a criterion"):
        parse_corrections({"DIAG": "MEL"})
    with pytest.raises(CorrectionError, match="BWV='maybe': unknown value \\(allowed: ABS, PRS\\)"):
        parse_corrections({"BWV": "maybe"})


def test_predictor_corrections_recompute_score_rule_and_diagnosis(crossfit_run, trust_data):
    summary, _ = crossfit_run
    predictor = Predictor.from_checkpoint(summary["best_checkpoint"])
    case = Derm7pt.load(trust_data).split_cases("test")[0]
    plain = predictor.predict(derm=case.derm, clinic=case.clinic, meta=case.raw_meta)
    assert plain.sets is not None and set(plain.sets) == set(TASK_NAMES) and plain.corrections == {}
    assert plain.uncertain == (len(plain.sets["DIAG"]) != 1)
    flip = {name: TASKS[TASK_NAMES.index(name)].classes[-1 if plain.tasks[name].predicted_index == 0 else 0]
            for name in CRITERIA}
    fixed = predictor.predict(derm=case.derm, clinic=case.clinic, meta=case.raw_meta, corrections=flip)
    assert {n: fixed.tasks[n].predicted for n in CRITERIA} == flip and fixed.corrections == flip
    assert all(fixed.sets[n] == [v] for n, v in flip.items())
    assert fixed.seven_point_score == seven_point_score({n: fixed.tasks[n].predicted_index for n in CRITERIA})
    assert fixed.seven_point_score != plain.seven_point_score
    assert fixed.diagnosis_source == "stacked"
    for r in (plain, fixed):  # the referral point travels in the checkpoint and is applied to P(MEL)
        assert r.refer == (r.melanoma_probability >= r.triage["threshold"])
        assert ("refer at the 90%-sensitivity point" in r.triage_text()) == r.refer
    assert fixed.tasks["DIAG"].probabilities != plain.tasks["DIAG"].probabilities
    with pytest.raises(PredictError, match="'XYZ': not a criterion"):
        predictor.predict(derm=case.derm, corrections={"XYZ": "ABS"})


def test_a_checkpoint_without_artefacts_still_predicts_and_says_what_it_lacks(tiny_run, synth_root, tmp_path):
    from sevenpoint.engine.evaluate import evaluate

    predictor = Predictor.from_checkpoint(tiny_run["best_checkpoint"])
    case = Derm7pt.load(synth_root).split_cases("test")[0]
    result = predictor.predict(derm=case.derm, corrections={"BWV": "PRS"})
    assert result.sets is None and result.diagnosis_source == "image model"
    top = max(result.tasks["DIAG"].probabilities.values())  # without sets, doubt is a low top probability
    assert result.uncertain == (top < 0.5) and (result.uncertain_why is not None) == result.uncertain
    assert result.tasks["BWV"].predicted == "PRS"  # the score and rule still follow the correction
    assert any("prediction sets" in x for x in predictor.info["lacks"])
    m = evaluate(tiny_run["best_checkpoint"], synth_root, tmp_path / "e", progress=False, bootstrap=50)
    assert m["sets"] is None and m["diagnosis_models"] is None and m["lacks"]
    assert "No prediction sets" in (tmp_path / "e" / "report.md").read_text()


def test_evaluate_reports_intervals_coverage_breakdown_and_interventions(crossfit_run, trust_data, tmp_path):
    from sevenpoint.engine.evaluate import evaluate

    summary, _ = crossfit_run
    m = evaluate(summary["best_checkpoint"], trust_data, tmp_path / "e", progress=False, bootstrap=200, level=0.6)
    lo, hi = m["intervals"]["average_accuracy"]
    assert lo <= m["average_accuracy"] <= hi and hi - lo > 0.01
    for name, (lo, hi) in m["intervals"]["tasks"].items():
        assert lo - 1e-9 <= m["tasks"][name]["accuracy"] <= hi + 1e-9
    # the set figures, recomputed through the checkpoint's artefacts from the members' probabilities (the sets
    # are cross-conformal) of a separate pass, whose shown probabilities are those of predictions.csv
    import pandas as pd

    from sevenpoint.engine.evaluate import predict_split

    model, cfg, section = load_model(summary["best_checkpoint"])
    pred = predict_split(model, cfg, Derm7pt.load(trust_data), "test", progress=False)
    shown = postprocess(pred.probs, Artifacts.from_section(section), cfg.infer.output_temperature, level=0.6,
                        members=pred.members)
    frame = pd.read_csv(tmp_path / "e" / "predictions.csv")
    assert frame["case_id"].tolist() == pred.ids
    probs = [frame[[f"{t.name}_p_{c}" for c in t.classes]].to_numpy() for t in TASKS]
    for mine, theirs in zip(shown.probs, probs):
        np.testing.assert_allclose(mine, theirs, atol=2e-6)
    targets = frame[[f"{t.name}_true" for t in TASKS]].to_numpy()
    sets = shown.sets
    assert m["sets"]["level"] == 0.6
    assert any(s.sum(1).mean() < s.shape[1] - 0.5 for s in sets)  # some sets leave classes out at 60 %
    for t, task in enumerate(TASKS):
        covered = sets[t][np.arange(len(targets)), targets[:, t]].mean()
        assert m["sets"]["tasks"][task.name]["coverage"] == pytest.approx(covered, abs=1e-6)
        assert m["sets"]["tasks"][task.name]["mean_size"] == pytest.approx(sets[t].sum(1).mean(), abs=1e-6)
    for field, groups in m["breakdown"].items():
        assert sum(g["cases"] for g in groups.values()) == m["cases"], field
    assert set(m["breakdown"]) >= {"level_of_diagnostic_difficulty", "sex", "location", "elevation", "diagnosis"}
    # k = 7: every criterion replaced by the truth, so the rule is the true 7-point rule
    true_flag = seven_point_score(targets) >= 3
    assert m["diagnosis_models"]["intervention"]["7"]["rule_accuracy"] == \
        pytest.approx(float((true_flag == (targets[:, 0] == 2)).mean()))
    report = (tmp_path / "e" / "report.md").read_text()
    assert set(m["diagnosis_models"]["correction_effects"]["BWV"]) == {"PRS"}
    for heading in ("95 % bootstrap intervals", "Prediction sets at 60%", "image model vs stacked", "Where it fails",
                    "What a correction does to the stacked model's P(MEL)"):
        assert heading in report
    assert (tmp_path / "e" / "reliability.png").stat().st_size > 5000
    # the temperatures act inside the network (each member): "raw" is a pass without them
    from sevenpoint.engine.evaluate import predict_split
    from sevenpoint.engine.metrics import ece, nll

    assert m["temperature_on"] == "members" and "to each member before averaging" in report
    model, cfg, _ = load_model(summary["best_checkpoint"])
    model.member_temperature = None
    raw = predict_split(model, cfg, Derm7pt.load(trust_data), "test", progress=False).probs
    known = targets[:, 1] >= 0
    assert m["ece_uncalibrated"]["tasks"]["PN"] == pytest.approx(ece(targets[known, 1], raw[1][known]), abs=1e-6)
    assert m["nll_uncalibrated"]["tasks"]["PN"] == pytest.approx(nll(raw[1][known], targets[known, 1]), abs=1e-6)
    assert m["nll_mean"] == pytest.approx(np.mean([m["tasks"][t.name]["nll"] for t in TASKS]))
    assert "NLL of the raw probabilities" in report


def test_correction_effects_measure_how_a_criterion_moves_p_mel():
    from sevenpoint.engine.trust import correction_effects
    from sevenpoint.infer.artifacts import CRITERIA_INDEX

    widths = [TASKS[t].num_classes for t in CRITERIA_INDEX]
    column = {(TASKS[t].name, c): sum(widths[:i]) + c for i, t in enumerate(CRITERIA_INDEX) for c in range(widths[i])}
    coef = np.zeros((5, 24))
    coef[2, column[("BWV", 1)]] = 2.0    # BWV present raises the MEL logit
    coef[2, column[("RS", 1)]] = -1.0    # RS present lowers it
    art = Artifacts(stacker={"coef": coef.tolist(), "intercept": [0.0] * 5, "classes": [0, 1, 2, 3, 4],
                             "default": False})
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(t.num_classes), size=6) for t in TASKS]
    effects = correction_effects(probs, art)
    def p_mel(z):  # only the MEL logit is not 0
        return np.exp(z) / (np.exp(z) + 4)

    bwv, rs = probs[TASK_NAMES.index("BWV")][:, 1], probs[TASK_NAMES.index("RS")][:, 1]
    assert effects["BWV"]["PRS"] == pytest.approx(np.mean(p_mel(2 - rs) - p_mel(-rs)))
    assert effects["RS"]["PRS"] == pytest.approx(np.mean(p_mel(2 * bwv - 1) - p_mel(2 * bwv)))
    assert effects["BWV"]["PRS"] > 0 > effects["RS"]["PRS"]
    assert set(effects["PN"]) == {"TYP", "ATP"} and effects["PN"]["ATP"] == pytest.approx(0.0)
    assert correction_effects(probs, Artifacts()) is None


def test_least_sure_corrections_pick_the_lowest_confidence_labelled_criteria():
    probs = [np.array([[0.5, 0.5, 0, 0, 0]])] + [np.array([[0.9, 0.05, 0.05]]) if t.num_classes == 3
                                                  else np.array([[0.9, 0.1]]) for t in TASKS[1:]]
    probs[TASK_NAMES.index("STR")] = np.array([[0.4, 0.3, 0.3]])
    probs[TASK_NAMES.index("RS")] = np.array([[0.55, 0.45]])
    targets = np.array([[1, 0, 1, 0, 0, 2, 0, 1]])
    assert least_sure_corrections(probs, targets, 2) == [{"STR": 2, "RS": 1}]
    targets[0, TASK_NAMES.index("STR")] = -1  # not labelled: skipped
    assert least_sure_corrections(probs, targets, 1) == [{"RS": 1}]


def test_random_corrections_are_the_control_of_the_least_sure_ones():
    rng = np.random.default_rng(4)
    targets = rng.integers(0, 2, (400, len(TASKS)))
    targets[:, TASK_NAMES.index("PN")] = -1  # never labelled: never drawn
    drawn = random_corrections(targets, 2, seed=1)
    assert drawn == random_corrections(targets, 2, seed=1)  # reproducible
    assert all(len(d) == 2 and "PN" not in d for d in drawn)
    assert all(v == targets[i, TASK_NAMES.index(n)] for i, d in enumerate(drawn) for n, v in d.items())
    counts = {n: sum(n in d for d in drawn) for n in CRITERIA if n != "PN"}
    assert min(counts.values()) > 80  # every labelled criterion comes up (800 draws over 6: ~133 each)
    everything = random_corrections(targets, 7)
    assert all(set(d) == set(CRITERIA) - {"PN"} for d in everything)  # k = 7: both curves end at the truth


def test_bootstrap_intervals_bracket_and_collapse_when_nothing_varies():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    n = 120
    targets = rng.integers(0, 2, (n, len(TASKS)))
    probs = [np.eye(t.num_classes)[np.clip(targets[:, i], 0, t.num_classes - 1)] * 0.8 + 0.05 for i, t in enumerate(TASKS)]
    out = bootstrap_intervals(probs, targets, 300)
    assert out["tasks"]["PN"] == [1.0, 1.0]  # always right: no spread
    score, truth = rng.random((4, 60)), rng.random((4, 60)) < 0.4
    assert np.allclose(_rank_auc(score, truth), [roc_auc_score(truth[i], score[i]) for i in range(4)])


def test_cli_set_and_report(crossfit_run, trust_data, tmp_path):
    summary, _ = crossfit_run
    case = Derm7pt.load(trust_data).split_cases("test")[0]
    base = [sys.executable, "-m", "sevenpoint.cli", "predict", "--checkpoint", summary["best_checkpoint"],
            "--derm", str(case.derm)]
    proc = subprocess.run(base + ["--set", "BWV=PRS", "--set", "rs=present", "--out", str(tmp_path / "r.json"),
                                  "--report", str(tmp_path / "case.html")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["corrections"] == {"BWV": "PRS", "RS": "PRS"} and result["tasks"]["BWV"]["predicted"] == "PRS"
    page = (tmp_path / "case.html").read_text()
    assert "data:image/jpeg;base64," in page and "not a medical device" in page and "BWV = PRS" in page
    assert "src='http" not in page and "<script" not in page  # self-contained, nothing to load
    bad = subprocess.run(base + ["--set", "BWV=maybe"], capture_output=True, text=True)
    assert bad.returncode == 2 and "BWV='maybe': unknown value" in bad.stderr
    bad = subprocess.run(base + ["--set", "BWV"], capture_output=True, text=True)
    assert bad.returncode == 2 and "CRITERION=VALUE" in bad.stderr + bad.stdout


def test_api_takes_corrections_and_writes_the_report(crossfit_run, trust_data):
    from fastapi.testclient import TestClient

    from sevenpoint.web.app import create_app

    summary, _ = crossfit_run
    case = Derm7pt.load(trust_data).split_cases("test")[0]
    files = {"derm": ("d.jpg", case.derm.read_bytes(), "image/jpeg")}
    with TestClient(create_app(Predictor.from_checkpoint(summary["best_checkpoint"]))) as client:
        r = client.post("/api/predict", files=files, data={"BWV": "PRS", "PN": "ATP"})
        assert r.status_code == 200 and r.json()["corrections"] == {"BWV": "PRS", "PN": "ATP"}
        assert r.json()["sets"]["BWV"] == ["PRS"]
        bad = client.post("/api/predict", files=files, data={"BWV": "sometimes"})
        assert bad.status_code == 422 and "BWV='sometimes'" in bad.json()["error"]
        report = client.post("/api/report", files=files, data={"STR": "IR"})
        assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
        assert "STR = IR" in report.text and "data:image/jpeg;base64," in report.text


def test_batch_csv_carries_each_tasks_set_and_the_uncertain_flag(crossfit_run, trust_data, tmp_path):
    import pandas as pd

    from sevenpoint.infer.batch import run_batch

    summary, _ = crossfit_run
    cases = Derm7pt.load(trust_data).split_cases("test")[:3]
    (tmp_path / "cases.csv").write_text("derm\n" + "".join(f"{c.derm}\n" for c in cases))
    run_batch(summary["best_checkpoint"], tmp_path / "cases.csv", [tmp_path / "out.csv"], progress=False)
    rows = pd.read_csv(tmp_path / "out.csv")
    predictor = Predictor.from_checkpoint(summary["best_checkpoint"])
    for (_, row), case in zip(rows.iterrows(), cases):
        alone = predictor.predict(derm=case.derm)
        assert {t: row[f"{t}_set"] for t in TASK_NAMES} == {t: "|".join(s) for t, s in alone.sets.items()}
        assert bool(row["uncertain"]) == alone.uncertain
