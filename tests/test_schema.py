import numpy as np
import pandas as pd
import pytest
from conftest import REAL_META

from sevenpoint.data.derm7pt import encode_row, encode_value
from sevenpoint.schema import (CRITERIA, NUM_CLASSES, TASK_NAMES, TASKS, LabelError, encode_meta, meta_dim,
                               seven_point_score)


def test_task_order_and_class_count():
    assert TASK_NAMES == ("DIAG", "PN", "BWV", "VS", "PIG", "STR", "DaG", "RS")
    assert sum(NUM_CLASSES) == 24
    assert CRITERIA == ("PN", "BWV", "VS", "PIG", "STR", "DaG", "RS")


def test_checklist_points_major_and_minor():
    assert seven_point_score({"PN": 2, "BWV": 1, "VS": 2, "PIG": 0, "STR": 0, "DaG": 0, "RS": 0}) == 6
    assert seven_point_score({"PN": 1, "BWV": 0, "VS": 1, "PIG": 2, "STR": 2, "DaG": 2, "RS": 1}) == 4
    # regular classes never score
    assert seven_point_score({"PN": 1, "BWV": 0, "VS": 1, "PIG": 1, "STR": 1, "DaG": 1, "RS": 0}) == 0
    batch = np.array([[2, 2, 1, 2, 2, 2, 2, 1], [0] * 8])
    assert seven_point_score(batch).tolist() == [10, 0]


def test_unknown_raw_value_names_row_column_value():
    with pytest.raises(LabelError, match=r"row 7, column 'streaks': unknown value 'wavy'"):
        encode_value("STR", "wavy", row=7)


def test_meta_one_hot_14_dims_and_leaky_option():
    v = encode_meta({"sex": "male", "location": "back", "elevation": "nodular"})
    assert v.shape == (14,) and v.sum() == 3 and v[1] == 1 and v[2 + 2] == 1 and v[-1] == 1
    assert meta_dim() == 14 and meta_dim(include_leaky=True) == 20
    with pytest.raises(LabelError, match="field 'location'.*allowed: abdomen"):
        encode_meta({"sex": "male", "location": "moon", "elevation": "flat"})


@pytest.mark.skipif(not (REAL_META / "meta.csv").exists(), reason=f"real Derm7pt meta not found at {REAL_META}")
def test_real_meta_maps_every_value_and_reproduces_score():
    frame = pd.read_csv(REAL_META / "meta.csv", dtype=str, keep_default_na=False)
    assert len(frame) == 1011
    labels = np.array([encode_row(rec, i) for i, rec in enumerate(frame.to_dict("records"))])
    assert (seven_point_score(labels) == frame["seven_point_score"].astype(int).to_numpy()).all()
    # every class of every task occurs in the real data
    for t, task in enumerate(TASKS):
        assert set(labels[:, t]) == set(range(task.num_classes)), task.name
    sizes = [len(pd.read_csv(REAL_META / f"{s}_indexes.csv")) for s in ("train", "valid", "test")]
    assert sizes == [413, 203, 395]


def test_score_rule_text_is_written_from_the_table(monkeypatch):
    import dataclasses

    from sevenpoint import schema

    text = schema.score_rule()
    assert text.startswith("7-point score = 2 x (atypical pigment network,") and ">= 3 suggests" in text
    assert "1 x (irregular pigmentation" in text and text.count("regression") == 1
    # one edit to the table (PN becomes a minor criterion, threshold 4) changes the text with it
    tasks = tuple(dataclasses.replace(t, points={2: 1}) if t.name == "PN" else t for t in schema.TASKS)
    monkeypatch.setattr(schema, "TASKS", tasks)
    monkeypatch.setattr(schema, "MELANOMA_THRESHOLD", 4)
    text = schema.score_rule()
    assert text.startswith("7-point score = 2 x (present blue whitish veil, irregular vascular structures) + "
                           "1 x (atypical pigment network, irregular pigmentation") and ">= 4 suggests" in text
