"""ONNX export of a checkpoint (dynamic batch, all three inputs with availability flags) and its check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .artifacts import Artifacts
from .atomic import atomic_path
from .checkpoint import load_model
from .models import DenseFusion
from .schema import TASK_NAMES

INPUT_NAMES = ["derm", "clinic", "meta", "has_derm", "has_clinic", "has_meta"]


def example_inputs(n: int, size: int, meta_dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    meta = torch.zeros(n, meta_dim)
    meta[:, 0] = 1
    flags = torch.ones(n)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            meta, flags, flags.clone(), flags.clone())


def ort_session(path: str | os.PathLike):
    """An ONNX Runtime CPU session with every graph optimisation on (the one place sessions are made)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_model(model: torch.nn.Module, path: str | os.PathLike, size: int, meta_dim: int, opset: int = 17,
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Export `DenseFusion(model)` (dynamic batch) to `path` atomically; returns the output names."""
    dense = DenseFusion(model).eval()
    inputs = example_inputs(2, size, meta_dim)
    with torch.no_grad():
        dense(*inputs)  # fills attention_names
    outputs = [f"prob_{t}" for t in TASK_NAMES] + ["branches_used"] + [f"attention_{n}" for n in dense.attention_names]
    dynamic = {name: {0: "batch"} for name in INPUT_NAMES + outputs}
    with atomic_path(path, suffix=".onnx.tmp") as tmp:
        torch.onnx.export(dense, inputs, str(tmp), input_names=INPUT_NAMES, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
        if metadata:
            import onnx

            proto = onnx.load(str(tmp))
            for key, value in {**metadata, "sevenpoint_attention": json.dumps(dense.attention_names)}.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.save(proto, str(tmp))
    return outputs


def export_onnx(checkpoint: str | os.PathLike, onnx_path: str | os.PathLike, opset: int = 17) -> dict:
    """Write the ONNX graph; the run config is stored in its metadata so `Predictor` can use it alone."""
    return export_loaded(*load_model(checkpoint), onnx_path, opset)


def export_loaded(model: torch.nn.Module, cfg, section: dict, onnx_path: str | os.PathLike, opset: int = 17) -> dict:
    """`export_onnx` of a model already loaded with `load_model` (its config and checkpoint section)."""
    outputs = export_model(model, onnx_path, cfg.data.image_size, cfg.meta_dim, opset,
                           metadata={"sevenpoint_config": json.dumps(cfg.to_dict()),
                                     "sevenpoint_ood": json.dumps(section.get("ood")),
                                     "sevenpoint_artifacts": json.dumps(Artifacts.from_section(section).to_section())})
    return {"onnx": str(onnx_path), "outputs": outputs}


def check_parity(checkpoint: str | os.PathLike, onnx_path: str | os.PathLike, n: int = 4) -> float:
    """Max |prob difference| between PyTorch (fp32) and ONNX Runtime on random cases with mixed availability."""
    model, cfg, _ = load_model(checkpoint)
    inputs = list(example_inputs(n, cfg.data.image_size, cfg.meta_dim, seed=1))
    inputs[4] = torch.tensor([1.0, 0.0] * (n // 2) + [1.0] * (n % 2))  # some cases without a clinical photo
    inputs[5] = torch.tensor([1.0, 1.0, 0.0] * n)[:n]  # some without metadata
    with torch.no_grad():
        ref = model(inputs[0], inputs[1], inputs[2], inputs[3].bool(), inputs[4].bool(), inputs[5].bool())
    if "derm" not in cfg.model.images:  # a clinical-only model has nothing to run without the clinical photo
        keep = inputs[4].bool()
        ref_probs = [p[keep] for p in ref.probs]
    else:
        keep, ref_probs = torch.ones(n, dtype=torch.bool), ref.probs
    sess = ort_session(onnx_path)
    got = sess.run(None, {k: v.numpy() for k, v in zip(INPUT_NAMES, inputs)})
    return float(max(np.abs(got[t][keep.numpy()] - ref_probs[t].numpy()).max() for t in range(len(TASK_NAMES))))


# --- int8: static QDQ quantisation with ONNX Runtime, calibrated and checked on real cases -------------

def _feeds(batch: dict) -> dict[str, np.ndarray]:
    """A dataset batch (CaseDataset) as ONNX Runtime inputs."""
    return {"derm": batch["derm"].numpy(), "clinic": batch["clinic"].numpy(),
            "meta": batch["meta"].numpy().astype(np.float32),
            **{f"has_{k}": batch[f"has_{k}"].float().numpy() for k in ("derm", "clinic", "meta")}}


def split_batches(cfg, data, split: str, batch_size: int = 8, cases: int | None = None):
    """Batches of one split prepared exactly as for validation in training (the first `cases` cases)."""
    from torch.utils.data import DataLoader, Subset

    from .engine.evaluate import eval_dataset

    ds = eval_dataset(cfg, data, split)
    if cases is not None:
        ds = Subset(ds, range(min(cases, len(ds))))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


def int8_op_types() -> list[str]:
    """Every op type ONNX Runtime can quantise in QDQ form except Softmax: quantised, the softmax outputs
    lose resolution and the probabilities stop summing to 1 (0.992 seen). Measured on a real v4 member
    (validation): these ops 74.32 % (fp32 74.57); Conv/Gemm/MatMul alone 69.15 % and slower (their
    activations then are not fused into the int8 convolutions)."""
    from onnxruntime.quantization.registry import QDQRegistry

    return [op for op in QDQRegistry if op != "Softmax"]


def quantize_int8(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, feeds) -> None:
    """Static int8 quantisation of `int8_op_types()` (QDQ, per-channel int8 weights, uint8 activations,
    min-max ranges from `feeds`, an iterable of input dicts), written atomically; the sevenpoint
    metadata is kept."""
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp, atomic_path(int8_path, suffix=".onnx.tmp") as out:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=int8_op_types())


def onnx_split_accuracy(paths: list[str | os.PathLike], batches) -> list[tuple[float | None, list[np.ndarray]]]:
    """Per ONNX export: its average accuracy (fused probabilities, as `evaluate`) over dataset batches
    and its per-task probabilities; every export runs on each batch, so the images are prepared once."""
    from .engine.metrics import compute_metrics

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
    import tempfile

    from .data import load_dataset

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
    return report


class ExportError(ValueError):
    """An export that cannot be made (or would not be good enough), said in a sentence."""
