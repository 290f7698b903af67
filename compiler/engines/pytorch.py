"""PyTorch eager on the CPU."""

from __future__ import annotations

import numpy as np

from compiler.engines.base import Engine, Timing


class PyTorch(Engine):
    name = "pytorch"

    def __init__(self, model):
        import torch

        self.model = model.eval()
        self.default_threads = torch.get_num_threads()

    def prepare(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads or self.default_threads)

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    def time(self, x: np.ndarray, timing: Timing) -> dict:
        from compiler import bench

        return bench.time_pytorch(self.model, len(x), timing.repeat, timing.number, timing.warmup, x=x)

    def close(self) -> None:
        import torch

        torch.set_num_threads(self.default_threads)
