"""The dataset seam: format detection, the PH2 and ISIC readers (with their real layouts' quirks),
partial labels through loss, metrics, weights and baselines, and PH2 / ISIC end to end."""

import dataclasses
import shutil

import numpy as np
import openpyxl
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sevenpoint.data import DatasetError, detect_format, load_dataset
from sevenpoint.data.synthetic import make_synthetic_isic, make_synthetic_ph2
from sevenpoint.engine.loss import multitask_loss, task_loss
from sevenpoint.engine.metrics import compute_metrics
from sevenpoint.schema import NOT_ANNOTATED, PRESENT, TASK_NAMES, TASKS

from test_hostile import cli

T = {name: i for i, name in enumerate(TASK_NAMES)}


@pytest.fixture(scope="module")
def ph2_root(tmp_path_factory):
    return make_synthetic_ph2(tmp_path_factory.mktemp("ph2"), cases=30, size=64, seed=2)


@pytest.fixture()
def ph2_copy(ph2_root, tmp_path):
    return shutil.copytree(ph2_root, tmp_path / "PH2Dataset")


def _sheet_rows(xlsx):
    """The image rows of a PH2 spreadsheet read cell by cell, independently of the reader."""
    ws = openpyxl.load_workbook(xlsx).active
    return {r[0]: r for r in ws.iter_rows(values_only=True) if isinstance(r[0], str) and r[0].startswith("IMD")}


# --- detection and the registry

def test_each_layout_is_detected_and_can_be_forced(synth_root, ph2_root, tmp_path):
    isic = make_synthetic_isic(tmp_path, cases=20, size=48)
    assert detect_format(synth_root) == "derm7pt" and detect_format(synth_root.parent) == "derm7pt"
    assert detect_format(ph2_root) == "ph2" and detect_format(ph2_root.parent) == "ph2"
    assert detect_format(isic) == "isic"
    assert load_dataset(isic, "isic").format == "isic"
    with pytest.raises(DatasetError, match="not a Derm7pt folder"):
        load_dataset(isic, "derm7pt")
    with pytest.raises(DatasetError, match="not a dataset folder this version reads"):
        detect_format(tmp_path)
    both = shutil.copytree(synth_root, tmp_path / "both")
    shutil.copy(next(isic.glob("*Training*.csv")), both / "gt.csv")
    with pytest.raises(DatasetError, match=r"several formats \(derm7pt, isic\); pick one with --format"):
        detect_format(both)
    assert load_dataset(both, "derm7pt").format == "derm7pt"


# --- PH2

def test_ph2_reader_reads_the_real_spreadsheet_layout(ph2_root):
    data = load_dataset(ph2_root)
    sheet = _sheet_rows(ph2_root / "PH2_dataset.xlsx")
    assert len(data.cases) == len(sheet) == 30 and list(data.splits) == ["all"]
    assert data.annotated_tasks() == ["DIAG", "PN", "BWV", "STR", "DaG", "RS"]  # VS, PIG: not in PH2
    letters = {"PN": {"T": 1, "AT": 2}, "DaG": {"A": 0, "T": 1, "AT": 2}, "STR": {"A": 0, "P": PRESENT},
               "RS": {"A": 0, "P": 1}, "BWV": {"A": 0, "P": 1}}
    columns = {"PN": 6, "DaG": 7, "STR": 8, "RS": 9, "BWV": 10}  # 0-based, as the synthetic sheet writes them
    for case in data.cases:
        row = sheet[case.case_id]
        assert case.targets[T["DIAG"]] == (2 if row[4] == "X" else 1)
        for task, col in columns.items():
            assert case.targets[T[task]] == letters[task][row[col]], (case.case_id, task)
        assert case.targets[T["VS"]] == case.targets[T["PIG"]] == NOT_ANNOTATED
        assert case.clinic is None and case.meta is None and case.derm.name == f"{case.case_id}.bmp"
    assert data.verify_images() == 30


def test_ph2_header_may_carry_the_diagnosis_names_itself(ph2_copy):
    """Another layout of the same header: the three names in the header row, a title row above it."""
    xlsx = ph2_copy / "PH2_dataset.xlsx"
    book = openpyxl.load_workbook(xlsx)
    ws = book.active
    ws.unmerge_cells("C12:D12")
    ws["C11"], ws["C12"], ws["D12"], ws["C13"], ws["D13"] = "Clinical Diagnosis", "Common Nevus", "Atypical\nNevus", None, None
    book.save(xlsx)
    assert [c.targets for c in load_dataset(ph2_copy).cases] == [c.targets for c in load_dataset(ph2_copy.parent).cases]
    assert load_dataset(ph2_copy).annotated_tasks() == ["DIAG", "PN", "BWV", "STR", "DaG", "RS"]


def test_ph2_reduced_copies(ph2_copy):
    xlsx = ph2_copy / "PH2_dataset.xlsx"
    # a spreadsheet without the criteria columns: diagnosis only, and it says so
    book = openpyxl.load_workbook(xlsx)
    book.active.delete_cols(6, 6)
    book.save(ph2_copy / "reduced.xlsx")
    shutil.move(ph2_copy / "reduced.xlsx", xlsx)
    data = load_dataset(ph2_copy)
    assert data.annotated_tasks() == ["DIAG"]
    assert any("no column for PN, DaG, STR, RS, BWV" in q for q in data.quirks)
    # the txt some copies ship, without the xlsx: refused, pointing at the xlsx
    xlsx.unlink()
    (ph2_copy / "PH2_dataset.txt").write_text("Name\tClinical Diagnosis\tAsymmetry\nIMD003\t0\t0\n")
    with pytest.raises(DatasetError, match=r"PH2_dataset.txt: a reduced copy.*put the distributed PH2_dataset.xlsx"):
        load_dataset(ph2_copy)


def test_ph2_bad_cells_and_missing_images_are_named(ph2_copy):
    xlsx = ph2_copy / "PH2_dataset.xlsx"
    book = openpyxl.load_workbook(xlsx)
    ws = book.active
    ws["I15"] = "maybe"  # streaks, third image row
    ws["C16"] = "X"      # a second diagnosis on the fourth
    book.save(xlsx)
    with pytest.raises(DatasetError, match=r"2 problem\(s\)(.|\n)*row 15 \(IMD\d+\), column 'streaks \(a/p\)': unknown "
                                           r"value 'MAYBE'(.|\n)*row 16 \(IMD\d+\): 2 of Common Nevus"):
        load_dataset(ph2_copy)
    book = openpyxl.load_workbook(xlsx)
    book.active["I15"], book.active["C16"] = "A", None
    book.save(xlsx)
    gone = sorted((ph2_copy / "PH2 Dataset images").iterdir())[:2]
    for folder in gone:
        shutil.rmtree(folder)
    with pytest.raises(DatasetError, match=r"2 image file\(s\) not found") as err:
        load_dataset(ph2_copy)
    assert all(f.name in str(err.value) for f in gone)
    data = load_dataset(ph2_copy, skip_missing=True)
    assert len(data.cases) == 28 and sum("left out" in q for q in data.quirks) == 2


def test_derm7pt_skip_missing_leaves_the_case_out_of_its_split(synth_copy):
    data = load_dataset(synth_copy)
    gone = data.split_cases("valid")[0]
    gone.derm.unlink()
    kept = load_dataset(synth_copy, skip_missing=True)
    assert len(kept.cases) == len(data.cases) - 1 and gone.case_id not in {c.case_id for c in kept.cases}
    assert len(kept.splits["valid"]) == len(data.splits["valid"]) - 1
    assert [c.case_id for c in kept.split_cases("test")] == [c.case_id for c in data.split_cases("test")]
    assert any("case left out, image not found" in q and gone.derm.name in q for q in kept.quirks)


# --- ISIC

@pytest.mark.parametrize("variant", ["2017", "2018", "2019"])
def test_isic_variants_map_onto_diag(variant, tmp_path):
    root = make_synthetic_isic(tmp_path, cases=40, size=48, variant=variant)
    data = load_dataset(root)
    assert set(data.splits) == {"train", "valid", "all"} and data.annotated_tasks() == ["DIAG"]
    mapping = {"melanoma": 2, "seborrheic_keratosis": 4, "MEL": 2, "NV": 1, "BCC": 0, "BKL": 4, "DF": 3, "VASC": 3}
    expected, skipped = {}, 0
    for csv in sorted(root.glob("*GroundTruth.csv")):
        frame = pd.read_csv(csv)
        for rec in frame.to_dict("records"):
            marked = [c for c in frame.columns[1:] if rec[c] == 1.0]
            if marked and marked[0] not in mapping:
                skipped += 1
                continue
            expected[rec[frame.columns[0]]] = mapping[marked[0]] if marked else 1
    assert {c.case_id: c.targets[0] for c in data.cases} == expected
    assert all(set(c.targets[1:]) == {NOT_ANNOTATED} and c.crop == 0 for c in data.cases)
    assert (skipped > 0) == (variant != "2017")
    assert any(f"{skipped} image(s) left out" in q for q in data.quirks) == (skipped > 0)


def test_isic_bad_rows_are_named(tmp_path):
    root = make_synthetic_isic(tmp_path, cases=20, size=48, variant="2018")
    csv = next(root.glob("*Training*.csv"))
    frame = pd.read_csv(csv, dtype=str)
    frame.loc[2, "NV"] = frame.loc[2, "MEL"] = "1.0"
    frame.loc[4, "BCC"] = "yes"
    frame.to_csv(csv, index=False)
    with pytest.raises(DatasetError, match=r"line 4: 2 classes marked(.|\n)*line 6, column 'bcc': 'yes' is not 0 or 1"):
        load_dataset(root)
    # the 2017 files some copies ship without the keratosis column: said, non-melanomas read as nevi
    root17 = make_synthetic_isic(tmp_path / "b", cases=20, size=48)
    for csv in root17.glob("*.csv"):
        pd.read_csv(csv).drop(columns="seborrheic_keratosis").to_csv(csv, index=False)
    data = load_dataset(root17)
    assert any("no seborrheic_keratosis column" in q for q in data.quirks)
    assert set(c.targets[0] for c in data.cases) == {1, 2}


# --- partial labels

def test_task_loss_equals_cross_entropy_and_ignores_unannotated():
    torch.manual_seed(0)
    logits, y, w = torch.randn(12, 3), torch.randint(0, 3, (12,)), torch.tensor([0.5, 1.0, 2.0])
    for weight in (None, w):
        for smoothing in (0.0, 0.1):
            full = F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)
            assert torch.allclose(task_loss(logits, y, weight, smoothing), full, atol=1e-6)
            part = y.clone()
            part[:5] = NOT_ANNOTATED
            part[5] = PRESENT
            assert torch.allclose(task_loss(logits, part, weight, smoothing),
                                  F.cross_entropy(logits[6:], y[6:], weight=weight, label_smoothing=smoothing), atol=1e-6)


def test_a_task_without_labels_in_the_batch_gives_its_heads_no_gradient():
    from sevenpoint.config import load_config
    from sevenpoint.engine.module import forward_batch
    from sevenpoint.models import FusionModel

    cfg = load_config("tiny")
    model = FusionModel(cfg.model, 64, cfg.meta_dim).train()
    n = 4
    batch = {"derm": torch.rand(n, 3, 64, 64), "clinic": torch.rand(n, 3, 64, 64), "meta": torch.zeros(n, 14),
             "has_derm": torch.ones(n, dtype=torch.bool), "has_clinic": torch.ones(n, dtype=torch.bool),
             "has_meta": torch.ones(n, dtype=torch.bool)}
    targets = torch.zeros(n, 8, dtype=torch.long)
    targets[:, T["PN"]] = NOT_ANNOTATED
    targets[:, T["STR"]] = PRESENT
    loss, _ = multitask_loss(forward_batch(model, batch), targets)
    loss.backward()
    for branch in ("derm", "clinic", "hybrid"):
        heads = getattr(model, branch).heads.heads
        for task in ("PN", "STR"):
            assert heads[T[task]].weight.grad is not None and torch.count_nonzero(heads[T[task]].weight.grad) == 0
        assert torch.count_nonzero(heads[T["DIAG"]].weight.grad) > 0
    assert torch.isfinite(loss)


@pytest.mark.filterwarnings("ignore:You are trying to")
def test_mixup_trains_on_blended_cases_against_blended_labels(monkeypatch):
    """train.mixup: the step sees convex blends of two cases (a modality kept only where both have it) and its loss
    is the cross-entropy against the same blend of their one-hot labels."""
    from sevenpoint.config import load_config
    from sevenpoint.engine import module as mod

    cfg = load_config("tiny", ["train.mixup=1.0", "model.dropout=0", "train.meta_dropout=0"])
    step = mod.SevenPointModule(cfg).train()
    torch.manual_seed(0)
    n = 6
    batch = {"derm": torch.rand(n, 3, 64, 64), "clinic": torch.rand(n, 3, 64, 64), "meta": torch.rand(n, 14),
             "has_derm": torch.ones(n, dtype=torch.bool), "has_clinic": torch.ones(n, dtype=torch.bool),
             "has_meta": torch.tensor([True, True, False, True, True, True]),
             "targets": torch.stack([torch.randint(0, t.num_classes, (n,)) for t in TASKS], dim=1)}
    seen, real = {}, mod.mix_batch

    def spy(b, lam, perm):
        seen.update(lam=lam, perm=perm, mixed=real(b, lam, perm))
        return seen["mixed"]

    monkeypatch.setattr(mod, "mix_batch", spy)
    loss = step.training_step(batch, 0)
    lam, perm, mixed = seen["lam"], seen["perm"], seen["mixed"]
    assert 0 < lam < 1 and not torch.equal(perm, torch.arange(n))
    assert torch.allclose(mixed["derm"], lam * batch["derm"] + (1 - lam) * batch["derm"][perm])
    assert torch.equal(mixed["has_meta"], batch["has_meta"] & batch["has_meta"][perm])
    assert torch.equal(mixed["targets"], batch["targets"])  # the labels are blended in the loss, not here
    out = step.model(mixed["derm"], mixed["clinic"], mixed["meta"], mixed["has_derm"], mixed["has_clinic"],
                     mixed["has_meta"])
    expected = 0.0
    for logits in out.logits.values():
        for t, lg in enumerate(logits):
            y = batch["targets"][:, t]
            soft = lam * F.one_hot(y, lg.shape[1]) + (1 - lam) * F.one_hot(y[perm], lg.shape[1])
            expected = expected + F.cross_entropy(lg, soft.float())
    assert torch.allclose(loss, expected, atol=1e-5)


def test_score_loss_is_the_squared_error_of_the_expected_checklist_score():
    """train.score_weight's target: the points the criteria heads expect against the labelled 7-point score, on
    cases whose seven criteria are all labelled; a 2-point criterion's miss costs 2 squared, a 1-point one's 1."""
    from sevenpoint.engine.loss import score_loss
    from sevenpoint.models import FusionOutput
    from sevenpoint.schema import seven_point_score

    targets = torch.tensor([[2, 2, 1, 0, 2, 0, 2, 1],    # score 2 + 2 + 1 + 1 + 1 = 7
                            [1, 1, 0, 0, 1, 0, 0, 0],    # score 0
                            [1, NOT_ANNOTATED, 0, 0, 1, 0, 0, 0]])  # PN not labelled: left out
    sure = [torch.where(F.one_hot(targets[:, t].clamp_min(0), c).bool(), 30.0, -30.0)
            for t, c in enumerate(task.num_classes for task in TASKS)]
    out = FusionOutput(logits={"derm": sure}, masks={"derm": torch.ones(3, dtype=torch.bool)})
    assert seven_point_score(targets[0].numpy()) == 7
    assert float(score_loss(out, targets)) == pytest.approx(0.0, abs=1e-6)
    wrong = [lg.clone() for lg in sure]
    wrong[T["BWV"]][0] = torch.tensor([30.0, -30.0])    # case 0: BWV (2 points) missed
    wrong[T["RS"]][1] = torch.tensor([-30.0, 30.0])     # case 1: RS (1 point) seen where absent
    wrong[T["PN"]][2] = torch.tensor([-30.0, -30.0, 30.0])  # case 2 is not scored
    out = FusionOutput(logits={"derm": wrong}, masks={"derm": torch.ones(3, dtype=torch.bool)})
    assert float(score_loss(out, targets)) == pytest.approx((2 ** 2 + 1 ** 2) / 2, abs=1e-5)


@pytest.mark.filterwarnings("ignore:You are trying to")
def test_score_weight_adds_the_score_loss_to_the_step():
    from sevenpoint.config import load_config
    from sevenpoint.engine import module as mod
    from sevenpoint.engine.loss import multitask_loss, score_loss

    torch.manual_seed(0)
    n = 4
    batch = {"derm": torch.rand(n, 3, 64, 64), "clinic": torch.rand(n, 3, 64, 64), "meta": torch.rand(n, 14),
             "has_derm": torch.ones(n, dtype=torch.bool), "has_clinic": torch.ones(n, dtype=torch.bool),
             "has_meta": torch.ones(n, dtype=torch.bool),
             "targets": torch.stack([torch.randint(0, t.num_classes, (n,)) for t in TASKS], dim=1)}
    cfg = load_config("tiny", ["train.score_weight=0.5", "model.dropout=0", "train.meta_dropout=0"])
    step = mod.SevenPointModule(cfg).train()
    loss = step.training_step(batch, 0)
    out = mod.forward_batch(step.model, batch)
    expected = multitask_loss(out, batch["targets"])[0] + 0.5 * score_loss(out, batch["targets"])
    assert float(score_loss(out, batch["targets"])) > 0
    assert torch.allclose(loss, expected, atol=1e-5)


def test_metrics_weights_and_baselines_skip_unannotated_targets():
    from sevenpoint.data.dataset import balanced_weights
    from sevenpoint.engine.evaluate import majority_baseline, train_majority
    from sevenpoint.engine.train import class_weights_for

    rng = np.random.default_rng(0)
    n = 40
    probs = [rng.dirichlet(np.ones(t.num_classes), n) for t in TASKS]
    targets = np.stack([rng.integers(0, t.num_classes, n) for t in TASKS], axis=1)
    targets[:, T["VS"]] = NOT_ANNOTATED
    targets[:10, T["PN"]] = NOT_ANNOTATED
    targets[:, T["STR"]] = np.where(targets[:, T["STR"]] > 0, PRESENT, 0)
    m = compute_metrics(probs, targets)
    pred = {t.name: probs[i].argmax(1) for i, t in enumerate(TASKS)}
    assert m["tasks"]["VS"]["accuracy"] is None and m["not_annotated"] == ["VS"]
    assert m["tasks"]["PN"]["annotated"] == 30
    assert m["tasks"]["PN"]["accuracy"] == pytest.approx((pred["PN"][10:] == targets[10:, T["PN"]]).mean())
    y = targets[:, T["STR"]]
    assert m["tasks"]["STR"]["accuracy"] == pytest.approx(np.where(y == 0, pred["STR"] == 0, pred["STR"] != 0).mean())
    assert np.array(m["tasks"]["STR"]["presence_confusion"]["matrix"]).sum() == n
    assert m["average_accuracy"] == pytest.approx(np.mean([m["tasks"][k]["accuracy"] for k in m["scored_tasks"]]))
    # class weights, majority and balanced sampling count annotated labels only
    w = class_weights_for(targets)
    counts = np.bincount(targets[10:, T["PN"]], minlength=3)
    assert torch.allclose(w[T["PN"]], torch.tensor(counts.sum() / counts / 3 / (counts.sum() / counts / 3).mean(),
                                                   dtype=torch.float32))
    assert torch.equal(w[T["VS"]], torch.ones(3))
    majority = train_majority(targets)
    assert majority[T["VS"]] == -1 and majority[T["PN"]] == np.bincount(targets[10:, T["PN"]]).argmax()
    base = majority_baseline(majority, targets)
    assert base["VS"] is None and base["PN"] == pytest.approx((targets[10:, T["PN"]] == majority[T["PN"]]).mean())
    bw = balanced_weights(targets, T["PN"])
    assert np.all(np.isfinite(bw)) and bw.shape == (n,)


# --- end to end

def test_check_data_summarises_ph2_and_refuses_to_train_on_it(ph2_root, tmp_path, capsys):
    code, out = cli(capsys, "check-data", ph2_root)
    assert code == 0, out
    assert "ph2 dataset at" in out and "not annotated (not trained or scored on): VS, PIG" in out
    assert "present (kind not given)" in out and "clinical photo 0" in out
    code, out = cli(capsys, "train", "--data", ph2_root, "--out", tmp_path / "run", "--config", "tiny")
    assert code == 2 and "external test set" in out


def test_evaluate_on_ph2_scores_the_shared_tasks(tiny_run, ph2_root, tmp_path, capsys):
    out = tmp_path / "ph2eval"
    code, text = cli(capsys, "evaluate", "--checkpoint", tiny_run["best_checkpoint"], "--data", ph2_root,
                     "--split", "all", "--out", out, "--no-progress")
    assert code == 0, text
    import json

    m = json.loads((out / "metrics.json").read_text())
    assert m["format"] == "ph2" and m["cases"] == 30 and m["not_annotated"] == ["VS", "PIG"]
    assert m["majority_baseline_from"] == "the checkpoint's training data"
    assert m["majority_baseline"]["VS"] is None and m["majority_baseline"]["PN"] is not None
    pred = pd.read_csv(out / "predictions.csv")
    for name in ("DIAG", "PN", "STR", "BWV"):
        y, p = pred[f"{name}_true"].to_numpy(), pred[f"{name}_pred"].to_numpy()
        assert m["tasks"][name]["accuracy"] == pytest.approx(np.where(y == PRESENT, p != 0, p == y).mean())
    assert m["melanoma"]["sensitivity"] is not None and m["melanoma"]["diag_head_auc"] is not None
    report = (out / "report.md").read_text()
    assert "not annotated in this data (–): VS, PIG" in report and "absent vs present" in report
    assert "Published on the official Derm7pt" not in report


def test_isic_as_extra_training_data_joins_the_train_split_only(synth_root, tmp_path):
    from sevenpoint.config import load_config
    from sevenpoint.engine.run import train
    from sevenpoint.engine.train import load_training_data

    isic = make_synthetic_isic(tmp_path, cases=24, size=48)
    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", f"data.extra={isic}", "train.epochs=1"])
    data = load_training_data(synth_root, cfg)
    plain = load_training_data(synth_root, load_config("tiny"))
    n_isic_train = len(load_dataset(isic).splits["train"])
    assert len(data.splits["train"]) == len(plain.splits["train"]) + n_isic_train
    assert np.array_equal(data.splits["valid"], plain.splits["valid"])  # selection stays on Derm7pt
    summary = train(cfg, synth_root, tmp_path / "run", progress=False)
    assert summary["train_cases"] == len(data.splits["train"]) and summary["valid_cases"] == len(plain.splits["valid"])
    cfg_ph2 = load_config("tiny", [f"data.extra={make_synthetic_ph2(tmp_path, cases=10, size=48)}"])
    with pytest.raises(DatasetError, match="never trained on"):
        load_training_data(synth_root, cfg_ph2)


def test_soft_target_loss_is_the_cross_entropy_against_the_teacher_on_the_cases_that_carry_it():
    from sevenpoint.config import load_config
    from sevenpoint.engine.loss import soft_target_loss
    from sevenpoint.engine.module import forward_batch
    from sevenpoint.models import FusionModel

    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = FusionModel(cfg.model, 64, cfg.meta_dim).eval()
    n = 5
    batch = {"derm": torch.rand(n, 3, 64, 64), "clinic": torch.rand(n, 3, 64, 64), "meta": torch.zeros(n, 14),
             "has_derm": torch.ones(n, dtype=torch.bool), "has_clinic": torch.tensor([True, True, False, True, True]),
             "has_meta": torch.ones(n, dtype=torch.bool)}
    out = forward_batch(model, batch)
    soft = torch.cat([torch.softmax(torch.randn(n, t.num_classes), dim=1) for t in TASKS], dim=1)
    has = torch.tensor([True, True, True, False, False])
    expected = 0.0
    for branch, logits in out.logits.items():
        rows = out.masks[branch] & has
        start = 0
        for lg in logits:
            q = soft[rows, start:start + lg.shape[1]]
            start += lg.shape[1]
            expected = expected + F.cross_entropy(lg[rows], q)  # soft-label cross-entropy, mean over rows
    got = soft_target_loss(out, soft, has)
    assert torch.allclose(got, expected, atol=1e-5)
    other = soft.clone()
    other[3:] = torch.rand(2, soft.shape[1])  # cases without a teacher's answer: their values are never read
    assert torch.equal(soft_target_loss(out, other, has), got)
    assert float(soft_target_loss(out, soft, torch.zeros(n, dtype=torch.bool))) == 0.0


def test_teach_writes_the_teachers_probabilities_and_a_student_learns_them(tiny_run, synth_root, tmp_path, capsys):
    """`sevenpoint teach` on ISIC images, then `data.extra` + `data.extra_soft`: the extra cases carry the
    teacher's probabilities into the batches, and training adds the distillation loss."""
    import pandas as pd

    from sevenpoint.config import ConfigError, load_config
    from sevenpoint.engine.evaluate import eval_dataset
    from sevenpoint.engine.run import train
    from sevenpoint.engine.evaluate import load_predictions
    from sevenpoint.engine.train import load_training_data

    isic = make_synthetic_isic(tmp_path, cases=24, size=48)
    soft_file = tmp_path / "teacher.npz"
    code, text = cli(capsys, "teach", "--checkpoint", tiny_run["best_checkpoint"], "--data", isic, "--out", soft_file,
                     "--no-progress")
    assert code == 0, text
    saved = load_predictions(soft_file)
    cases = load_dataset(isic).cases
    assert sorted(saved.ids) == sorted(c.case_id for c in cases)
    for p, task in zip(saved.probs, TASKS):
        assert p.shape == (len(cases), task.num_classes)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", f"data.extra={isic}",
                               f"data.extra_soft={soft_file}", "train.epochs=1"])
    data = load_training_data(synth_root, cfg)
    row = {cid: i for i, cid in enumerate(saved.ids)}
    extra = [c for c in data.cases if c.case_id in row]
    assert extra and all(c.soft is not None for c in extra)
    assert all(c.soft is None for c in data.cases if c.case_id not in row)  # Derm7pt's own cases: labels only
    first = extra[0]
    np.testing.assert_allclose(first.soft, np.concatenate([p[row[first.case_id]] for p in saved.probs]))
    ds = eval_dataset(cfg, data, "train")
    item = ds[[c.case_id for c in ds.cases].index(first.case_id)]
    assert bool(item["has_soft"]) and torch.allclose(item["soft"], torch.from_numpy(first.soft))
    plain = ds[[c.soft is None for c in ds.cases].index(True)]
    assert not bool(plain["has_soft"]) and not plain["soft"].any()
    summary = train(cfg, synth_root, tmp_path / "run", progress=False)
    log = pd.read_csv(next((tmp_path / "run" / "logs").rglob("metrics.csv")))
    distill = log["train/loss_distill"].dropna()
    assert len(distill) == 1 and distill.iloc[0] > 0 and summary["epochs_run"] == 1
    alone = load_training_data(synth_root, load_config("tiny", [f"data.extra={isic}", f"data.extra_soft={soft_file}",
                                                                "data.extra_labels=false"]))
    taught = [c for c in alone.cases if c.case_id in row]
    assert all(c.soft is not None and set(c.targets) == {NOT_ANNOTATED} for c in taught)  # the teacher alone
    assert [c.targets for c in alone.cases if c.case_id not in row] == [c.targets for c in data.cases
                                                                         if c.case_id not in row]
    with pytest.raises(ConfigError, match="data.extra_soft"):
        load_config("tiny", [f"data.extra_soft={soft_file}"])
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    bad = load_config("tiny", [f"data.extra={isic}", f"data.extra_soft={tmp_path / 'junk.npz'}"])
    with pytest.raises(DatasetError, match="junk.npz"):
        load_training_data(synth_root, bad)


def test_path_options_take_the_users_home(monkeypatch, tmp_path):
    """`data.extra=~/data/isic2017` as the README writes it: the shell leaves that ~ alone, the config does not."""
    from sevenpoint.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("tiny", ["data.extra=~/isic", "data.extra_soft=~/t.npz", "data.cache_dir=~/cache"])
    assert (cfg.data.extra, cfg.data.extra_soft, cfg.data.cache_dir) == (str(tmp_path / "isic"), str(tmp_path / "t.npz"),
                                                                         str(tmp_path / "cache"))
    assert load_config("tiny", ["data.extra=isic"]).data.extra == "isic"  # a relative path stays relative


def test_train_distill_trains_a_teacher_then_a_student_on_its_probabilities_and_resumes(synth_root, tmp_path):
    """`train.distill`: the teacher (the recipe without the unlabelled images), its probabilities on the ones
    drawn (`data.extra_cases`), then the student on those; best.ckpt is the student's. Interrupted in the teacher, `--resume` finishes
    both phases, and a finished phase is not trained again."""
    import filecmp
    import json

    import yaml

    from sevenpoint.checkpoint import load_model
    from sevenpoint.engine.evaluate import load_predictions
    from sevenpoint.engine.run import train
    from sevenpoint.engine.train import load_training_data
    from sevenpoint.config import load_config

    isic = make_synthetic_isic(tmp_path, cases=24, size=48)
    run = tmp_path / "run"
    cfg = load_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", f"data.extra={isic}", "train.distill=true",
                               "data.extra_labels=false", "data.extra_cases=10", "train.epochs=2", "train.ensemble=2"])
    interrupted = train(cfg, synth_root, run, progress=False, stop_after_epochs=1)  # in the teacher's first member
    assert interrupted["epochs_run"] == 1 and not (run / "student").exists()
    summary = train(cfg, synth_root, run, resume=True, progress=False)
    assert summary["distilled"] and summary["phases"]["teacher"]["epochs_run"] == 4  # 2 members x 2 epochs
    assert summary["epochs_run"] == 8 and len(summary["phases"]["student"]["members"]) == 2
    teacher = yaml.safe_load((run / "teacher" / "config.yaml").read_text())
    student = yaml.safe_load((run / "student" / "config.yaml").read_text())
    assert teacher["data"]["extra"] is None and teacher["train"]["distill"] is False
    assert student["data"]["extra_soft"] == str(run / "teacher" / "soft_targets.npz") and not student["train"]["distill"]
    soft = load_predictions(run / "teacher" / "soft_targets.npz")
    drawn = {seed: load_training_data(synth_root, dataclasses.replace(cfg, seed=seed)) for seed in (0, 5)}
    isic_ids = {c.case_id for c in load_dataset(isic).cases}
    taught = [[data.cases[i].case_id for i in data.splits["train"] if data.cases[i].case_id in isic_ids]
              for data in drawn.values()]
    assert len(taught[0]) == 10 and taught[0] == taught[1]  # a fixed draw: the same for every seed
    assert sorted(soft.ids) == sorted(taught[0])  # the teacher labels exactly the drawn images
    logs = {name: pd.read_csv(next((run / name / "members" / "m1" / "logs").rglob("metrics.csv")))
            for name in ("teacher", "student")}
    assert "train/loss_distill" not in logs["teacher"] and (logs["student"]["train/loss_distill"].dropna() > 0).all()
    best = run / "checkpoints" / "best.ckpt"
    assert filecmp.cmp(best, summary["phases"]["student"]["best_checkpoint"], shallow=False)
    load_model(best)
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*.ckpt") if p != best}
    again = train(cfg, synth_root, run, resume=True, progress=False)
    assert again["phases"] == summary["phases"]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.ckpt") if p != best} == stamps  # nothing trained again
    assert json.loads((run / "train_summary.json").read_text())["distilled"] is True


def test_train_distill_without_the_unlabelled_images_says_so_and_keeps_the_teacher(synth_root, tmp_path, capsys):
    """The unlabelled images are optional: where data.extra does not exist the run names the path, trains the
    recipe alone and keeps it; a config that cannot distil is refused before any work."""
    import filecmp
    import json

    from sevenpoint.config import ConfigError, load_config

    missing = tmp_path / "isic-not-here"
    code, said = cli(capsys, "train", "--data", synth_root, "--out", tmp_path / "run", "--config", "tiny", "--no-progress",
                     f"data.cache_dir={tmp_path / 'cache'}", f"data.extra={missing}", "train.distill=true",
                     "train.epochs=1")
    assert code == 0, said
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert f"distillation skipped: no unlabelled images at {missing}" in " ".join(said.split())
    assert f"teacher: {100 * summary['best_val_avg_acc']:.2f} %" in said and "student:" not in said
    assert not summary["distilled"] and summary["soft_targets"] is None and list(summary["phases"]) == ["teacher"]
    assert not (tmp_path / "run" / "student").exists()
    assert filecmp.cmp(tmp_path / "run" / "checkpoints" / "best.ckpt", summary["phases"]["teacher"]["best_checkpoint"],
                       shallow=False)
    with pytest.raises(ConfigError, match="train.distill"):
        load_config("tiny", ["train.distill=true"])
    with pytest.raises(ConfigError, match="data.extra_soft"):
        load_config("tiny", [f"data.extra={missing}", "train.distill=true", f"data.extra_soft={tmp_path / 't.npz'}"])


def test_ddp_on_two_cpu_processes_trains_on_isic_and_shares_the_cache_safely(tmp_path):
    """The scale-out command (README) with 2 CPU processes instead of GPUs: it trains, writes one
    best.ckpt, and the decoded-image cache both processes filled holds only valid entries."""
    import os
    import subprocess
    import sys

    from sevenpoint.data.cache import _read_entry

    isic = make_synthetic_isic(tmp_path, cases=48, size=48)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "sevenpoint.cli", "train", "--data", str(isic), "--out", str(tmp_path / "run"),
           "--config", "tiny", "--no-progress", "model.variant=DIM", "train.epochs=2", "train.accelerator=cpu",
           "train.devices=2", "train.strategy=ddp", f"data.cache_dir={cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    run = tmp_path / "run"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "train_summary.json").is_file()
    import json
    import math

    best = json.loads((run / "train_summary.json").read_text())["best_val_avg_acc"]
    assert best is not None and math.isfinite(best) and best > 0  # selection on DIAG, the one task ISIC annotates
    # each process took its half of every epoch: 2 epochs x ceil(ceil(n / 2) / batch 16) optimiser steps
    n_train = len(load_dataset(isic).splits["train"])
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 * -(-(-(-n_train // 2)) // 16)
    entries = list(cache.rglob("*.img"))
    assert len(entries) == len(load_dataset(isic).splits["train"]) + len(load_dataset(isic).splits["valid"])
    assert all(_read_entry(e, 64) is not None for e in entries)
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".img"]  # no temp files left


def test_epoch_sampler_splits_each_epoch_between_processes(monkeypatch):
    """Under DDP every process takes every world-th pair of the same seeded sequence: disjoint shares
    that cover the epoch, padded to equal length for training, unpadded (exact) for validation."""
    from sevenpoint.data import dataset

    full = list(dataset.EpochSampler(37, seed=4))
    for pad in (True, False):
        shares = []
        for rank in range(3):
            monkeypatch.setattr(dataset, "rank_and_world", lambda rank=rank: (rank, 3))
            sampler = dataset.EpochSampler(37, seed=4, pad=pad)
            shares.append(list(sampler))
            assert len(sampler) == len(shares[-1])
        if pad:
            assert [len(s) for s in shares] == [13, 13, 13]
            assert sorted(p for s in shares for p in s) == sorted(full + full[:2])
        else:
            assert sorted(p for s in shares for p in s) == sorted(full) and sum(map(len, shares)) == 37
