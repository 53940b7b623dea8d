"""ONNX export of a checkpoint (dynamic batch, all three inputs with availability flags) and its check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .artifacts import Artifacts
from ..atomic import atomic_path
from ..checkpoint import load_model
from ..models import DenseFusion, split_outputs
from ..schema import TASK_NAMES

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
    outputs = ([f"prob_{t}" for t in TASK_NAMES] + ["branches_used"] + [f"attention_{n}" for n in dense.attention_names]
               + [f"member{k}_prob_{t}" for k in range(dense.members) for t in TASK_NAMES])
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
    # a clinical-only model has nothing to run without the clinical photo
    keep = inputs[4].bool() if "derm" not in cfg.model.images else torch.ones(n, dtype=torch.bool)
    sess = ort_session(onnx_path)
    attention = json.loads(sess.get_modelmeta().custom_metadata_map.get("sevenpoint_attention", "[]"))
    out = sess.run(None, {k: v.numpy() for k, v in zip(INPUT_NAMES, inputs)})
    probs, _, _, members = split_outputs(out, attention, len(ref.members or []))
    pairs = list(zip(probs, ref.probs)) + [pair for m, r in zip(members, ref.members or []) for pair in zip(m, r)]
    return float(max(np.abs(got[keep.numpy()] - want[keep].numpy()).max() for got, want in pairs))


# --- int8: static QDQ quantisation with ONNX Runtime, calibrated and checked on real cases -------------

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


class ExportError(ValueError):
    """An export that cannot be made (or would not be good enough), said in a sentence."""
