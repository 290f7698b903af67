"""A TVM artifact built for this machine (the Relax VM on the CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.engines.base import Engine, Timing


class TVM(Engine):
    name = "tvm"

    def __init__(self, folder: str | Path):
        from compiler import artifact

        self.folder = Path(folder)
        self.executable, self.manifest = artifact.load_local(self.folder)
        self.batch = self.manifest["input"]["shape"][0]

    def prepare(self, threads: int) -> None:
        from compiler import threads as threads_mod

        if threads:
            threads_mod.set_tvm(threads)

    def run(self, x: np.ndarray) -> np.ndarray:
        from compiler.build import run_module

        return run_module(self.executable, x, self.batch)

    def time(self, x: np.ndarray, timing: Timing) -> dict:
        from compiler import bench

        return bench.time_tvm(self.executable, self.batch, timing.repeat, timing.number, timing.warmup, x=x)


def tuning_note(manifest: dict) -> str:
    t = manifest.get("tuning") or {}
    where = [w for w in (t.get("database"), (t.get("library") or {}).get("database")) if w]
    amx = f"; {t['amx_conv2d']} conv2d kernels on AMX tiles" if t.get("amx_conv2d") else ""
    if where:
        return f"tuned ({t.get('tasks_applied')}/{t.get('tasks')} kernels, {' + '.join(where)}{amx})"
    return "untuned" + amx
