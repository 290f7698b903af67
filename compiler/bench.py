"""``bench``: latency of a compiled artifact with TVM's time_evaluator (warm-up, repeats, median and p90).

Runs an artifact built for this machine locally. The same numbers for PyTorch eager on the checkpoint the
artifact was built from come with ``--pytorch CKPT`` (same batch, same process), so the two are comparable.
"""

from __future__ import annotations

import time

import numpy as np

from compiler import artifact
from compiler.errors import SettingError


def stats(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": round(float(np.median(ms)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "runs": len(ms)}


def time_tvm(executable, batch: int, repeat: int, number: int, warmup: int, x: np.ndarray | None = None) -> dict:
    """``x``: the input batch (float32 NCHW, ``batch`` images); default random normal."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    if x is None:
        x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype("float32")
    x = tvm.runtime.tensor(np.ascontiguousarray(x, dtype="float32"), dev)
    vm.set_input("main", x)
    for _ in range(warmup):
        vm.invoke_stateful("main")
    f = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat, min_repeat_ms=0)
    return stats(list(f("main").results))


def time_calls(call, repeat: int, number: int, warmup: int, sync=None) -> dict:
    """Wall-clock timing of ``call()``: ``warmup`` calls, then ``repeat`` runs of ``number`` calls each (a run's
    time is their mean); ``sync()``, when given, waits for queued work (a GPU stream) before a clock is read."""
    for _ in range(warmup):
        call()
    if sync:
        sync()
    results = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            call()
        if sync:
            sync()
        results.append((time.perf_counter() - t) / number)
    return stats(results)


def time_pytorch(model, batch: int, repeat: int, number: int, warmup: int, x=None) -> dict:
    """``x``: the input batch (a tensor or float32 NCHW array, ``batch`` images); default random normal."""
    import torch

    x = torch.randn(batch, 3, 32, 32) if x is None else torch.as_tensor(x)
    model.eval()
    with torch.inference_mode():
        return time_calls(lambda: model(x), repeat, number, warmup)


def bench(folder, *, repeat: int = 30, number: int = 3, warmup: int = 3, pytorch: str | None = None) -> dict:
    """Latency of the artifact in ``folder`` (built for this machine) and, with ``pytorch`` (a checkpoint path, or
    ``""`` for the shipped model), of PyTorch eager on that checkpoint at the same batch: ``{"artifact",
    "target", "rows"}``, a row per engine with median / p90 ms and images per second."""
    if repeat <= 0:
        raise SettingError("repeat", "must be positive")
    if number <= 0:
        raise SettingError("number", "must be positive")
    executable, manifest = artifact.load_local(folder)
    batch = manifest["input"]["shape"][0]
    rows = []
    if pytorch is not None:
        # PyTorch first: TVM's worker threads keep spinning after a run and slow a PyTorch run that follows
        import torch

        from compiler import zoo

        ckpt = zoo.load(manifest["model"], pytorch or None)
        rows.append({"engine": "pytorch", "model": manifest["model"], "precision": "fp32", "batch": batch,
                     "threads": torch.get_num_threads(),
                     **time_pytorch(ckpt.model, batch, repeat, number, warmup)})
    applied = manifest.get("runtime_applied") or {}
    rows.insert(0, {"engine": "tvm", "model": manifest["model"], "precision": manifest["precision"], "batch": batch,
                    "threads": applied.get("threads"), "threads_from": applied.get("source"),
                    **time_tvm(executable, batch, repeat, number, warmup)})
    for r in rows:
        r["images_per_s"] = round(1e3 * batch / r["median_ms"], 1)
    return {"artifact": str(folder), "target": manifest["target"]["name"], "rows": rows}
