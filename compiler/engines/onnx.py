"""The ONNX files the ONNX-based engines read: one fp32 export per model (opset 18, torch.onnx's dynamo exporter,
onnx.checker'd) and its static int8 (onnxruntime.quantization: QDQ, per-channel int8 weights, activations
calibrated on the images TVM's int8 build calibrates on, the same layers kept fp32)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from compiler import console

OPSET = 18


def export_onnx(model, path: Path, example: np.ndarray) -> dict:
    """Export ``model`` to ONNX (opset 18, dynamic batch) with torch.onnx's dynamo exporter; onnx.checker'd."""
    import onnx
    import torch

    from compiler import fileio

    x = torch.from_numpy(example[:1])
    with fileio.atomic_path(path) as tmp:
        with console.third_party_quiet():  # the exporter prints its progress and warns about torch internals
            torch.onnx.export(model.eval(), (x,), str(tmp), opset_version=OPSET, dynamo=True, verbose=False,
                              input_names=["x"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        onnx.checker.check_model(str(tmp), full_check=True)
    return {"file": str(path), "bytes": path.stat().st_size, "opset": OPSET,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}"}


def _quantizable(model_path: Path) -> tuple[list[str], list[str]]:
    """Names of the ONNX graph's Conv nodes and Gemm/MatMul nodes, in graph order (as TVM numbers its layers)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    mats = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    return convs, mats


def _excluded(model_path: Path, keep: tuple[str, ...]) -> list[str]:
    """TVM's ``--keep-fp32`` layers as ONNX node names: first (convs reading the input), last, conv2dK, matmulK."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    convs, mats = _quantizable(model_path)
    inputs = {i.name for i in graph.input}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    out = []
    for k in keep:
        if k == "first":
            out += [n.name for n in layers if any(i in inputs for i in n.input)]
        elif k == "last" and layers:
            out.append(layers[-1].name)
        elif k.startswith("conv2d") and k[6:].isdigit() and int(k[6:]) < len(convs):
            out.append(convs[int(k[6:])])
        elif k.startswith("matmul") and k[6:].isdigit() and int(k[6:]) < len(mats):
            out.append(mats[int(k[6:])])
    return sorted(set(out))


def quantize_onnx(fp32: Path, out: Path, calib: np.ndarray, method: str, keep: tuple[str, ...]) -> dict:
    """Static int8 with onnxruntime.quantization: QDQ, per-channel int8 weights, activations calibrated on
    ``calib`` (uint8 activations on x86, as TVM's int8 uses there), ``keep`` left in fp32."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import targets
    from passes.calibration import DEFAULT_PERCENTILE
    from passes.quantize import config_for

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.chunks = iter(calib[i:i + 64] for i in range(0, len(calib), 64))

        def get_next(self):
            chunk = next(self.chunks, None)
            return None if chunk is None else {"x": chunk}

    from compiler import fileio

    unsigned = config_for(targets.get("host")).unsigned_activations
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    extra = {"CalibPercentile": DEFAULT_PERCENTILE} if method == "percentile" else {}
    with tempfile.TemporaryDirectory(prefix="ort-quant-") as scratch, fileio.atomic_path(out) as tmp:
        pre = Path(scratch) / "pre.onnx"  # shape inference + graph optimization, as onnxruntime recommends
        quant_pre_process(str(fp32), str(pre))
        excluded = _excluded(pre, keep)
        with console.third_party_quiet():  # onnxruntime.quantization prints its calibration progress
            quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=methods[method],
                            nodes_to_exclude=excluded, extra_options=extra)
    return {"file": str(out), "bytes": out.stat().st_size, "format": "QDQ", "weights": "int8 per channel",
            "activations": "uint8" if unsigned else "int8", "calibration": method, "kept_fp32": excluded}
