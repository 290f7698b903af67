"""TensorRT engines (fp32, fp16, int8 from the QDQ ONNX: explicit quantization, so the int8 ranges are ONNX
Runtime's calibration) on a CUDA GPU; only where the tensorrt package imports and torch sees a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.engines.base import Engine, Timing, Unavailable, in_chunks

PRECISIONS = ("fp32", "fp16", "int8")


def unavailable() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    why = []
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a broken install failing on its CUDA libraries
        why.append("the tensorrt Python package is not installed")
    try:
        import torch

        gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        gpu = False
    if not gpu:
        why.append("no CUDA GPU is present")
    return None if not why else "TensorRT is not available on this machine: " + " and ".join(why)


class TensorRT(Engine):
    name = "tensorrt"
    cpu = False

    def __init__(self, onnx_path: str | Path, precision: str, batch: int):
        why = unavailable()
        if why:
            raise Unavailable(why)
        self.onnx_path, self.precision, self.batch = Path(onnx_path), precision, batch
        self.context = None

    def prepare(self, threads: int) -> None:
        if self.context is None:
            self._build()

    def _build(self) -> None:
        import tensorrt as trt
        import torch

        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8; implicit in 10
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(self.onnx_path.read_bytes()):
            raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
        config = builder.create_builder_config()
        if self.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if self.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        name, shape = network.get_input(0).name, (self.batch, 3, 32, 32)
        profile = builder.create_optimization_profile()
        profile.set_shape(name, shape, shape, shape)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError("the engine build failed")
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        self.context = engine.create_execution_context()
        self.context.set_input_shape(name, shape)
        self.xin = torch.empty(shape, dtype=torch.float32, device="cuda")
        out_name = engine.get_tensor_name(engine.num_io_tensors - 1)
        self.out = torch.empty(tuple(self.context.get_tensor_shape(out_name)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(name, self.xin.data_ptr())
        self.context.set_tensor_address(out_name, self.out.data_ptr())
        self.stream = torch.cuda.Stream()

    def _infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        self.xin.copy_(torch.from_numpy(x))
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return self.out.cpu().numpy()

    def run(self, x: np.ndarray) -> np.ndarray:
        return in_chunks(self._infer, x, self.batch)

    def time(self, x: np.ndarray, timing: Timing) -> dict:
        import torch

        from compiler import bench

        self.xin.copy_(torch.from_numpy(np.ascontiguousarray(x)))
        return bench.time_calls(lambda: self.context.execute_async_v3(self.stream.cuda_stream), timing.repeat,
                                timing.number, timing.warmup, sync=self.stream.synchronize)
