"""The input gate (too small / too elongated images refused) and the out-of-distribution score
(fitted on the training dermoscopy images, stored in the checkpoint, carried by every backend)."""

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sklearn.metrics import roc_auc_score

from sevenpoint.checkpoint import assemble_ensemble, read_checkpoint
from sevenpoint.data import Derm7pt
from sevenpoint.data.images import crop_and_resize
from sevenpoint.infer.export import export_onnx
from sevenpoint.infer.ood import OODModel, descriptor, non_lesion_examples
from sevenpoint.infer.predict import Predictor, PredictError
from sevenpoint.web.app import create_app

def test_tiny_images_and_strips_are_refused_by_the_gate(tiny_run):
    p = Predictor.from_checkpoint(tiny_run["best_checkpoint"])
    with pytest.raises(PredictError, match=r"derm: 1x1 px is too small"):
        p.predict(derm=np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(PredictError, match=r"derm: 20000x3 px is too small"):
        p.predict(derm=np.zeros((3, 20000, 3), np.uint8))
    with pytest.raises(PredictError, match=r"clinic: 2000x100 px is too elongated .*20.0:1"):
        p.predict(clinic=np.zeros((100, 2000, 3), np.uint8))
    p.predict(derm=np.zeros((100, 350, 3), np.uint8))  # 3.5:1 passes


def test_web_refuses_what_cannot_be_a_lesion_photo(tiny_run):
    client = TestClient(create_app(Predictor.from_checkpoint(tiny_run["best_checkpoint"])))
    for size in ((1, 1), (20000, 3)):
        buf = io.BytesIO()
        Image.new("RGB", size).save(buf, "PNG")
        r = client.post("/api/predict", files={"derm": ("x.png", buf.getvalue(), "image/png")})
        assert r.status_code == 422 and "too small to be a lesion photo" in r.json()["error"]


def test_ood_score_separates_dermoscopy_from_other_images(tiny_run, synth_root):
    ckpt = read_checkpoint(tiny_run["best_checkpoint"])
    ood = OODModel.from_dict(ckpt["sevenpoint"]["ood"])
    data = Derm7pt.load(synth_root)
    assert ood.fitted_on == len(data.split_cases("train")) and ood.threshold > 0
    p = Predictor.from_checkpoint(tiny_run["best_checkpoint"])
    lesions = [p.predict(derm=c.derm) for c in data.split_cases("test")]
    others = {name: p.predict(derm=img) for name, img in non_lesion_examples().items()}
    scores = [r.ood_score for r in lesions] + [r.ood_score for r in others.values()]
    auroc = roc_auc_score([0] * len(lesions) + [1] * len(others), scores)
    assert auroc >= 0.95, auroc
    assert all(r.ood_warning for r in others.values()), {k: r.ood_score for k, r in others.items()}
    # threshold: 99th percentile of validation scores; with the tiny synthetic set (25 training, 12
    # validation images for a 75-value descriptor) 3 of 23 test lesions are flagged; on real data see RESULTS.md
    assert np.mean([r.ood_warning for r in lesions]) <= 0.2
    body = others["noise0"].to_dict()
    assert body["ood_warning"] is True and body["ood_score"] > body["ood_threshold"]
    # the score is the Mahalanobis distance of the descriptor of the image the model sees
    d = p.cfg.data
    seen = crop_and_resize(Image.fromarray(non_lesion_examples()["gradient"]), d.image_size, d.crop, d.short_side)
    assert others["gradient"].ood_score == pytest.approx(float(ood.scores(descriptor(seen))[0]))


def test_ood_statistics_travel_with_ensembles_and_onnx(tiny_run, tmp_path):
    best = tiny_run["best_checkpoint"]
    assemble_ensemble([best, best], tmp_path / "ens.ckpt")
    assert read_checkpoint(tmp_path / "ens.ckpt")["sevenpoint"]["ood"] == read_checkpoint(best)["sevenpoint"]["ood"]
    export_onnx(best, tmp_path / "m.onnx")
    noise = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    ref = Predictor.from_checkpoint(best).predict(derm=noise)
    for p in (Predictor.from_onnx(tmp_path / "m.onnx"), Predictor.from_checkpoint(tmp_path / "ens.ckpt"),
              Predictor.from_checkpoint(best, backend="frozen")):
        got = p.predict(derm=noise)
        assert got.ood_score == pytest.approx(ref.ood_score) and got.ood_warning == ref.ood_warning is True
    assert Predictor.from_checkpoint(best).predict(clinic=noise).ood_score is None  # no dermoscopy image
