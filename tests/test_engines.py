"""The engine interface (compiler.engines) run for real on a small model: PyTorch, ONNX Runtime and OpenVINO on
the same ONNX files compare uses (fp32 export, static int8 QDQ), each timed at every thread count and checked
against PyTorch."""

import numpy as np
import pytest
import torch

from compiler.models import build_model
from helpers import randomize_bn

FP32_TOL = 1e-4  # float32 summation order differs, nothing else may


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """A ResNet8 with random BN, its ONNX export and static int8 QDQ model, a batch and PyTorch's logits."""
    from compiler.engines.onnx import export_onnx, quantize_onnx

    root = tmp_path_factory.mktemp("engines")
    torch.manual_seed(0)
    model = build_model("resnet8")
    randomize_bn(model)
    model.eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    export_onnx(model, root / "fp32.onnx", x)
    calib = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2)).numpy()
    info = quantize_onnx(root / "fp32.onnx", root / "int8.onnx", calib, "minmax", ("first",))
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    return {"model": model, "fp32": root / "fp32.onnx", "int8": root / "int8.onnx", "x": x, "ref": ref,
            "int8_info": info}


def check_engine(engine, f, tol):
    from compiler import threads
    from compiler.engines import Timing, measure

    got = measure(engine, f["x"][:2], Timing(repeat=3, number=1, warmup=1), threads.candidates(),
                  check=(f["x"], f["ref"]))
    assert got.threads in threads.candidates() and sorted(int(n) for n in got.threads_ms) == threads.candidates()
    assert 0 < got.stats["median_ms"] <= got.stats["p90_ms"]
    assert got.agreement["max_abs_diff"] < tol * max(1.0, float(np.abs(f["ref"]).max())), got.agreement
    return got


def test_pytorch_and_onnxruntime_engines(onnx_files):
    from compiler.engines.onnxruntime import OnnxRuntime
    from compiler.engines.pytorch import PyTorch

    assert check_engine(PyTorch(onnx_files["model"]), onnx_files, 1e-6).agreement["argmax_agree"] == 100.0
    assert check_engine(OnnxRuntime(onnx_files["fp32"]), onnx_files, FP32_TOL).agreement["argmax_agree"] == 100.0


def test_openvino_engine_fp32_and_int8(onnx_files):
    """OpenVINO on the fp32 ONNX equals PyTorch; on the int8 QDQ model it stays as close as ONNX Runtime's int8
    (the same quantized model: the two differ only in int8 kernels and rounding)."""
    pytest.importorskip("openvino", reason="OpenVINO is an optional peer (pip install openvino)")
    from compiler.engines import agreement
    from compiler.engines.onnxruntime import OnnxRuntime
    from compiler.engines.openvino import OpenVINO

    got = check_engine(OpenVINO(onnx_files["fp32"], batch=2), onnx_files, FP32_TOL)
    assert got.agreement["argmax_agree"] == 100.0
    ov8 = OpenVINO(onnx_files["int8"], batch=2)
    ov8.prepare(1)
    ort8 = OnnxRuntime(onnx_files["int8"])
    ort8.prepare(1)
    ov_logits, ort_logits = ov8.run(onnx_files["x"]), ort8.run(onnx_files["x"])  # 8 images through batch 2
    scale = float(np.abs(onnx_files["ref"]).max())
    assert ov_logits.shape == (8, 10)
    assert agreement(ov_logits, ort_logits)["max_abs_diff"] < 0.1 * scale
    assert agreement(ov_logits, onnx_files["ref"])["max_abs_diff"] < 0.25 * scale
