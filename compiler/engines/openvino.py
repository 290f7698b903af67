"""OpenVINO's CPU plugin on the same ONNX files ONNX Runtime reads (fp32, and the static int8 QDQ model, which
OpenVINO runs in int8 through its low-precision transformations). Optional: ``pip install openvino``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.engines.base import Engine, Timing, Unavailable, in_chunks


def unavailable() -> str | None:
    """Why OpenVINO cannot run here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ("OpenVINO is not installed (an optional peer: pip install openvino, or the project's [peers] "
                "extra)")
    return None


def version() -> str:
    import openvino

    return openvino.__version__.split("-")[0]


class OpenVINO(Engine):
    """The ONNX model reshaped to the timed batch (a static shape, as TVM's), latency hint, one stream."""

    name = "openvino"

    def __init__(self, path: str | Path, batch: int):
        why = unavailable()
        if why:
            raise Unavailable(why)
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(path))
        self.model.reshape({self.model.inputs[0].get_any_name(): [batch, 3, 32, 32]})
        self.batch, self.request = batch, None

    def prepare(self, threads: int) -> None:
        import openvino.properties as props
        import openvino.properties.hint as hints

        config = {hints.performance_mode: hints.PerformanceMode.LATENCY, props.num_streams: 1,
                  hints.inference_precision: "f32"}  # else bf16 where the CPU has it (AVX-512 BF16, AMX)
        if threads:
            config[props.inference_num_threads] = threads
        self.request = self.core.compile_model(self.model, "CPU", config).create_infer_request()

    def _infer(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: x}, share_inputs=True)
        return self.request.get_output_tensor(0).data

    def run(self, x: np.ndarray) -> np.ndarray:
        return in_chunks(lambda chunk: self._infer(chunk).copy(), x, self.batch)

    def time(self, x: np.ndarray, timing: Timing) -> dict:
        from compiler import bench

        x = np.ascontiguousarray(x)
        return bench.time_calls(lambda: self._infer(x), timing.repeat, timing.number, timing.warmup)

    def close(self) -> None:
        self.request = None
