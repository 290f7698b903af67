"""ONNX Runtime's CPU execution provider on an ONNX file (fp32, or static int8 QDQ)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.engines.base import Engine, Timing


class OnnxRuntime(Engine):
    name = "onnxruntime"

    def __init__(self, path: str | Path):
        self.path, self.session = Path(path), None

    def prepare(self, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(x)})[0]

    def time(self, x: np.ndarray, timing: Timing) -> dict:
        from compiler import bench

        feed = {self.input: np.ascontiguousarray(x)}
        return bench.time_calls(lambda: self.session.run(None, feed), timing.repeat, timing.number, timing.warmup)

    def close(self) -> None:
        self.session = None
