"""Measure the out-of-distribution score on real data (docs/RESULTS.md):

    .venv/bin/python scripts/ood_auroc.py --checkpoint RUN/checkpoints/best.ckpt --data ~/data/derm7pt

AUROC of the score separating the test split's dermoscopy images from (a) the non-lesion images
of `sevenpoint.infer.ood.non_lesion_examples` and (b) the test split's clinical photos (a lesion seen
without a dermoscope), and the share of each flagged by the checkpoint's threshold. A checkpoint
trained before the score existed gets it fitted here on train / valid, exactly as `train` does.
"""

import argparse
import json

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from sevenpoint.checkpoint import read_checkpoint
from sevenpoint.config import config_from_dict
from sevenpoint.data import Derm7pt
from sevenpoint.data.cache import make_cache
from sevenpoint.data.images import crop_and_resize
from sevenpoint.engine.train import TRAIN_SPLITS
from sevenpoint.infer.ood import OODModel, descriptor, non_lesion_examples

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", required=True)
parser.add_argument("--data", required=True)
args = parser.parse_args()

section = read_checkpoint(args.checkpoint)["sevenpoint"]
cfg = config_from_dict(section["config"])
data, cache = Derm7pt.load(args.data), make_cache(cfg)
ood = OODModel.from_dict(section.get("ood"))
if ood is None:
    desc = {s: np.stack([descriptor(cache.load(c.derm)) for c in data.split_cases(s)]) for s in TRAIN_SPLITS}
    ood = OODModel.fit(desc["train"], desc["valid"])
test = data.split_cases("test")
derm = ood.scores(np.stack([descriptor(cache.load(c.derm)) for c in test]))
clinic = ood.scores(np.stack([descriptor(cache.load(c.clinic)) for c in test if c.clinic is not None]))
d = cfg.data
others = ood.scores(np.stack([descriptor(crop_and_resize(Image.fromarray(img), d.image_size, d.crop, d.short_side))
                              for img in non_lesion_examples().values()]))


def auroc(neg, pos):
    return float(roc_auc_score([0] * len(neg) + [1] * len(pos), np.concatenate([neg, pos])))


print(json.dumps({
    "threshold": ood.threshold, "fitted_on": ood.fitted_on,
    "test_derm_flagged": float((derm > ood.threshold).mean()), "test_derm_cases": len(derm),
    "non_lesion_flagged": float((others > ood.threshold).mean()), "non_lesion_images": len(others),
    "clinic_flagged": float((clinic > ood.threshold).mean()), "clinic_photos": len(clinic),
    "auroc_derm_vs_non_lesion": auroc(derm, others), "auroc_derm_vs_clinic": auroc(derm, clinic),
}, indent=2))
