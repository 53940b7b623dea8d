"""The int8 export's accuracy check: an int8 ONNX model is written only when it scores within a limit of
the fp32 export on real cases. It needs data and metrics, so it lives with evaluation; the quantisation
itself (`sevenpoint.infer.export.quantize_int8`) is inference-side."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Subset

from ..atomic import atomic_path
from ..checkpoint import load_model
from ..data import load_dataset
from ..infer.export import ExportError, export_loaded, ort_session, quantize_int8
from ..infer.predict import cached_export
from ..schema import TASK_NAMES
from .evaluate import eval_dataset
from .metrics import compute_metrics


def _feeds(batch: dict) -> dict[str, np.ndarray]:
    """A dataset batch (CaseDataset) as ONNX Runtime inputs."""
    return {"derm": batch["derm"].numpy(), "clinic": batch["clinic"].numpy(),
            "meta": batch["meta"].numpy().astype(np.float32),
            **{f"has_{k}": batch[f"has_{k}"].float().numpy() for k in ("derm", "clinic", "meta")}}


def split_batches(cfg, data, split: str, batch_size: int = 8, cases: int | None = None):
    """Batches of one split prepared exactly as for validation in training (the first `cases` cases)."""
    ds = eval_dataset(cfg, data, split)
    if cases is not None:
        ds = Subset(ds, range(min(cases, len(ds))))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


def onnx_split_accuracy(paths: list[str | os.PathLike], batches) -> list[tuple[float | None, list[np.ndarray]]]:
    """Per ONNX export: its average accuracy (fused probabilities, as `evaluate`) over dataset batches
    and its per-task probabilities; every export runs on each batch, so the images are prepared once."""
    sessions = [ort_session(path) for path in paths]
    names = [f"prob_{t}" for t in TASK_NAMES]
    probs: list[list[list[np.ndarray]]] = [[[] for _ in TASK_NAMES] for _ in sessions]
    targets = []
    for batch in batches:
        feeds = _feeds(batch)
        for sess, mine in zip(sessions, probs):
            for t, p in enumerate(sess.run(names, feeds)):
                mine[t].append(p)
        targets.append(batch["targets"].numpy())
    results = []
    for mine in probs:
        stacked = [np.concatenate(p) for p in mine]
        results.append((compute_metrics(stacked, np.concatenate(targets))["average_accuracy"], stacked))
    return results


def export_int8(checkpoint: str | os.PathLike, onnx_path: str | os.PathLike, data_dir: str | os.PathLike,
                calibration_cases: int = 64, check_split: str = "valid", max_drop: float = 0.5,
                data_format: str = "auto") -> dict:
    """Export an int8 ONNX model calibrated on the first `calibration_cases` training cases of
    `data_dir`, then compare its average accuracy on `check_split` with the fp32 export's. The file
    is written only when the drop is below `max_drop` points (else ExportError, nothing written).
    Both are scored on one view per case, like the graph itself (a checkpoint's `infer.tta` views are
    added by `Predictor` at prediction time)."""
    if check_split == "test":
        raise ExportError("--check-split test: the test split is read once per final model, not to check an export; "
                          "use valid (or train)")
    model, cfg, section = load_model(checkpoint)
    data = load_dataset(data_dir, data_format, include_leaky_meta=cfg.data.include_leaky_meta)
    for split in ("train", check_split):
        if not data.split_cases(split):
            raise ExportError(f"{data_dir}: the {split} split has no cases (int8 needs train cases to calibrate on "
                              f"and {check_split} cases to check)")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_loaded(model, cfg, section, fp32)
        staged = Path(tmp) / "int8.onnx"
        quantize_int8(fp32, staged, (_feeds(b) for b in split_batches(cfg, data, "train", cases=calibration_cases)))
        (ref_acc, ref), (acc, got) = onnx_split_accuracy([fp32, staged],
                                                         split_batches(cfg, data, check_split, batch_size=16))
        agreement = float(np.mean([np.mean(a.argmax(1) == b.argmax(1)) for a, b in zip(ref, got)]))
        report = {"onnx": str(onnx_path), "check_split": check_split, "cases": int(len(ref[0])),
                  "calibration_cases": min(calibration_cases, len(data.split_cases("train"))),
                  "fp32_avg_acc": ref_acc, "int8_avg_acc": acc, "argmax_agreement": agreement,
                  "trained_on_check_split": check_split == "train" or (check_split == "valid" and cfg.train.refit)}
        if ref_acc is None or acc is None:
            raise ExportError(f"{data_dir}: no task of the {check_split} split is annotated, so the int8 model "
                              "cannot be checked")
        report["drop_points"] = 100 * (ref_acc - acc)
        if report["drop_points"] >= max_drop:
            raise ExportError(f"int8 loses {report['drop_points']:.2f} points of average accuracy on the {check_split} "
                              f"split ({100 * ref_acc:.2f} -> {100 * acc:.2f} %, limit {max_drop}); {onnx_path} "
                              "was not written")
        with atomic_path(onnx_path, suffix=".onnx.tmp") as out:
            import onnx

            proto = onnx.load(str(staged))
            entry = proto.metadata_props.add()
            entry.key, entry.value = "sevenpoint_quantization", json.dumps(
                {k: report[k] for k in ("calibration_cases", "check_split", "fp32_avg_acc", "int8_avg_acc")})
            onnx.save(proto, str(out))
    # kept beside the autotune cache too, so `--backend auto` times it for this checkpoint (`Predictor`)
    kept = cached_export(checkpoint, "int8")
    kept.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(kept, suffix=".onnx.tmp") as out:
        shutil.copyfile(onnx_path, out)
    report["kept_for_auto"] = str(kept)
    return report
