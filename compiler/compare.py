"""``compare``: one model, side by side in one process on the same input batch - PyTorch eager, ONNX Runtime,
OpenVINO, TVM and (where it exists) TensorRT - with speed-ups relative to PyTorch eager on the dense fp32 model
and to the fastest CPU peer.

Rows (each model in each precision), every engine behind :mod:`compiler.engines`:

* ``pytorch``      eager, dense fp32 and pruned fp32 (the physically shrunk copy: removed channels deleted)
* ``onnxruntime``  the same models exported once to ONNX (:mod:`compiler.engines.onnx`), fp32; and static int8
                   of the pruned model (QDQ, per-channel int8 weights, activations calibrated on the same
                   training images as TVM's int8 build, the same layers kept fp32)
* ``openvino``     the same ONNX files, fp32 and the same int8 QDQ model (optional package: a row says why not)
* ``tvm``          artifacts built here for ``host`` (fp32 dense, fp32 pruned, int8 pruned; tuning databases in
                   tuning_logs/ apply by themselves), or the folders given with ``--artifact``
* ``tensorrt``     fp32 / fp16 / int8 engines from the same ONNX when the tensorrt package imports and a CUDA GPU
                   is present; otherwise one row saying why it is not available

Without ``--pruned`` the int8 rows are of the dense model. Every row also shows how far its logits are from
PyTorch fp32 of the same model on a few test images (max |diff|, argmax agreement). Timing follows ``bench``
(warm-up, then ``--repeat`` runs of ``--number`` calls each; median and p90). The CPU peers are timed before TVM
runs anything in the process: TVM's worker threads keep spinning after a run and slow what follows.
"""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compiler import console, data, pair, precision
from compiler.build import BuildSettings, QuantSettings
from compiler.engines import Timing, Unavailable, measure
from compiler.errors import SettingError, UserError

CHECK_IMAGES = 16
DEFAULT_BATCH = 1
BASELINE = ("pytorch", "dense", "fp32")
ENGINE_ORDER = ("pytorch", "onnxruntime", "openvino", "tvm", "tensorrt")
# the goals for the best TVM row on the pruned model (issue 21)
GOALS = {"tvm_vs_pytorch_dense": 6.0, "tvm_vs_best_peer": 1.5}


@dataclass(frozen=True)
class CompareSettings:
    """What compare measures and how; validated when made."""

    data: str | Path | None = None
    batch: int | None = None  # default: the given artifacts' batch, else 1
    artifacts: tuple[str | Path, ...] = ()  # time these TVM artifacts instead of building them here
    timing: Timing = Timing()
    threads: int | None = None  # every engine at this count (default: each at its fastest count)
    quant: QuantSettings = QuantSettings()
    keep: str | Path | None = None  # keep the ONNX files and artifacts here (default: a temporary folder)

    def __post_init__(self):
        if self.batch is not None:
            BuildSettings(target="host", batch=self.batch)  # the same range as build's
        if self.threads is not None and self.threads <= 0:
            raise SettingError("threads", "must be positive")
        object.__setattr__(self, "artifacts", tuple(self.artifacts or ()))


def thread_counts(n: int | None) -> list[int]:
    """The thread counts every engine is timed at: ``[n]`` (``--threads N``), else each candidate up to the cores."""
    from compiler import threads

    if n is not None and n <= 0:
        raise SettingError("threads", "must be positive")
    threads.prepare_tvm()
    return [n] if n is not None else threads.candidates()


def test_batch(data_dir, n: int):
    """The first ``n`` CIFAR-10 test images, uint8 NCHW (tiled when the test set is smaller)."""
    import torch

    images = data.load_split(data_dir, "test").images[:n]
    if len(images) < n:
        images = images[torch.as_tensor(np.resize(np.arange(len(images)), n))]
    return images


def normalized(images, normalize: str) -> np.ndarray:
    return np.ascontiguousarray(data.normalize(images, normalize).numpy(), dtype=np.float32)


def build_artifact(ckpt, prec: str, batch: int, out: Path, *, data_dir, quant: QuantSettings,
                   target: str = "host") -> dict:
    """``build`` in-process (same pipeline, verification, tuning lookup and artifact folder); its result dict."""
    from compiler.build import build

    settings = BuildSettings(target=target, precision=prec, batch=batch, out=out, data=data_dir, quant=quant)
    return build(ckpt, settings, progress=False)


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    from compiler import threads

    cpu = console.cpu_name()
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "tvm_num_threads_env": threads.user_tvm_threads(), "platform": platform.platform()}
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _is_keep_dir(folder: Path) -> bool:
    """What --keep may reuse: a folder holding only what compare writes there (ONNX files, artifact folders)."""
    from compiler.artifact import is_artifact

    return all(p.name.startswith(".") or (p.is_file() and ".onnx" in p.name) or (p.is_dir() and is_artifact(p))
               for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# rows


def row(engine: str, model: str, prec: str, batch: int, stats: dict | None = None, reason: str | None = None,
        **extra) -> dict:
    r = {"engine": engine, "model": model, "precision": prec, "batch": batch,
         "median_ms": None, "p90_ms": None, "available": stats is not None}
    if stats is not None:
        r.update(median_ms=stats["median_ms"], p90_ms=stats["p90_ms"], runs=stats["runs"],
                 images_per_s=round(1e3 * batch / stats["median_ms"], 1))
    else:
        r["reason"] = reason
    r.update(extra)
    return r


def fastest(rows: list[dict], engines, kind: str) -> dict | None:
    got = [r for r in rows if r["available"] and r["engine"] in engines and r["model"] == kind]
    return min(got, key=lambda r: r["median_ms"]) if got else None


def cpu_peers() -> tuple[str, ...]:
    return tuple(e for e in ENGINE_ORDER if e not in ("tvm", "tensorrt"))


def best_rows(rows: list[dict], kind: str) -> dict:
    """The fastest TVM row and the fastest CPU peer's row (PyTorch, ONNX Runtime, OpenVINO) on the ``kind``
    model, their ratios, and whether the goals are met."""
    base = next((r for r in rows if (r["engine"], r["model"], r["precision"]) == BASELINE and r["available"]), None)
    tvm, peer = fastest(rows, ("tvm",), kind), fastest(rows, cpu_peers(), kind)
    if not (tvm and peer and base):
        return {}
    keep = ("engine", "precision", "median_ms", "threads")
    best = {"tvm": {k: tvm.get(k) for k in keep}, "peer": {k: peer.get(k) for k in keep},
            "tvm_vs_pytorch_dense": round(base["median_ms"] / tvm["median_ms"], 2),
            "tvm_vs_best_peer": round(peer["median_ms"] / tvm["median_ms"], 2)}
    best["goals"] = {f"{k} >= {v:g}": best[k] >= v for k, v in GOALS.items()}
    return best


def finish(rows: list[dict]) -> list[dict]:
    """Speed-ups (relative to PyTorch eager dense fp32; and to the fastest CPU peer on the row's model), sorted."""
    base = next(r for r in rows if (r["engine"], r["model"], r["precision"]) == BASELINE)
    peers = {kind: fastest(rows, cpu_peers(), kind) for kind in ("dense", "pruned")}
    for r in rows:
        peer = peers.get(r["model"])
        r["speedup"] = round(base["median_ms"] / r["median_ms"], 2) if r["available"] else None
        r["vs_best_peer"] = round(peer["median_ms"] / r["median_ms"], 2) if r["available"] and peer else None
    return sorted(rows, key=lambda r: (ENGINE_ORDER.index(r["engine"]), r["model"], r["precision"]))


# ---------------------------------------------------------------------------------------------------------------
# measuring


@dataclass
class Bench:
    """The batch every engine runs, the check images and PyTorch's logits on them, per model kind."""

    batch: int
    x_of: dict
    check_of: dict
    reference: dict
    timing: Timing
    counts: list[int]
    models: dict  # kind -> (Checkpoint, the model PyTorch runs)
    int8_of: str
    work: Path = Path(".")
    onnx: dict = field(default_factory=dict)  # (kind, precision) -> ONNX path
    onnx_info: dict = field(default_factory=dict)
    calib_desc: str | None = None  # what the int8 ONNX was calibrated on

    def measure(self, engine, kind: str, prec: str, threads: bool = True, **extra) -> dict:
        """One available row: ``engine`` timed at each thread count, checked against PyTorch at the fastest."""
        try:
            got = measure(engine, self.x_of[kind], self.timing, self.counts if threads else None,
                          check=(self.check_of[kind], self.reference[kind]))
        finally:
            engine.close()
        used = {"threads": got.threads, "threads_ms": got.threads_ms} if threads else {}
        return row(engine.name, kind, prec, self.batch, got.stats, **used, **got.agreement, **extra)

    def cases(self) -> list[tuple[str, str]]:
        """(kind, precision) of the ONNX-based rows: fp32 of every model, int8 of the pruned one (else dense)."""
        return [(k, "fp32") for k in self.models] + [(self.int8_of, "int8")]


def pytorch_rows(b: Bench) -> list[dict]:
    from compiler.engines.pytorch import PyTorch

    rows = []
    for kind, (ck, model) in b.models.items():
        r = b.measure(PyTorch(model), kind, "fp32",
                      note="shrunk copy (removed channels deleted)" if kind == "pruned" else "eager")
        if model is ck.model:  # the reference itself
            r.pop("max_abs_diff"), r.pop("argmax_agree")
        rows.append(r)
    return rows


def onnx_files(b: Bench, name: str, data_dir, quant: QuantSettings) -> list:
    """Export each model to ONNX and quantize the int8 one (into ``b.onnx``; no rows of its own)."""
    from compiler.engines.onnx import export_onnx, quantize_onnx

    for kind, (_, model) in b.models.items():
        try:
            b.onnx_info[kind] = export_onnx(model, b.work / f"{name}-{kind}-fp32.onnx", b.x_of[kind])
            b.onnx[(kind, "fp32")] = Path(b.onnx_info[kind]["file"])
        except Exception as e:  # noqa: BLE001 - an exporter failure costs only the rows that need the ONNX
            b.onnx_info[kind] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
            console.warn(f"ONNX export of the {kind} model failed: {b.onnx_info[kind]['error']}")
    if (b.int8_of, "fp32") not in b.onnx:
        return []
    key = f"{b.int8_of}-int8"
    calib, b.calib_desc = precision.calibration_images(data_dir, b.models[b.int8_of][0].normalize, quant.calib_images)
    try:
        b.onnx_info[key] = quantize_onnx(b.onnx[(b.int8_of, "fp32")], b.work / f"{name}-{key}.onnx", calib,
                                         quant.calibration, quant.keep_fp32)
        b.onnx[(b.int8_of, "int8")] = Path(b.onnx_info[key]["file"])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's quantizer failing costs the int8 rows only
        b.onnx_info[key] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
        console.warn(f"ONNX Runtime int8 quantization failed: {b.onnx_info[key]['error']}")
    return []


def onnx_engine_rows(b: Bench, engine: str) -> list[dict]:
    """ONNX Runtime or OpenVINO on every ONNX file (a row with the reason where one is missing)."""
    from compiler.engines import openvino
    from compiler.engines.onnx import OPSET
    from compiler.engines.onnxruntime import OnnxRuntime

    if engine == "openvino" and openvino.unavailable():
        return [row("openvino", "dense", "fp32/int8", b.batch, reason=openvino.unavailable())]
    rows = []
    for kind, prec in b.cases():
        path = b.onnx.get((kind, prec))
        if path is None:
            err = b.onnx_info.get(kind if prec == "fp32" else f"{b.int8_of}-int8", {}).get("error")
            rows.append(row(engine, kind, prec, b.batch, reason=f"no ONNX model: {err or 'export failed'}"))
            continue
        qdq = f", QDQ, {b.onnx_info[f'{kind}-int8']['activations']} activations" if prec == "int8" else ""
        if engine == "onnxruntime":
            rows.append(b.measure(OnnxRuntime(path), kind, prec, note=f"opset {OPSET}{qdq}"))
        else:
            rows.append(b.measure(openvino.OpenVINO(path, b.batch), kind, prec,
                                  note=f"OpenVINO {openvino.version()} CPU, static batch{qdq}"))
    return rows


def tensorrt_rows(b: Bench) -> list[dict]:
    from compiler.engines import tensorrt

    why = tensorrt.unavailable()
    if why:
        return [row("tensorrt", "dense", "/".join(tensorrt.PRECISIONS), b.batch, reason=why)]
    rows = []
    for kind in b.models:
        for prec in tensorrt.PRECISIONS:
            src = b.onnx.get((kind, "int8" if prec == "int8" else "fp32"))
            if src is None:
                if not (prec == "int8" and kind != b.int8_of):
                    rows.append(row("tensorrt", kind, prec, b.batch, reason="no ONNX model to build from"))
                continue
            try:
                rows.append(b.measure(tensorrt.TensorRT(src, prec, b.batch), kind, prec, threads=False,
                                      note="explicit quantization (QDQ ONNX)" if prec == "int8" else ""))
            except (Unavailable, RuntimeError) as e:  # an engine that does not build is a row, not a crash
                rows.append(row("tensorrt", kind, prec, b.batch,
                                reason=f"TensorRT failed: {type(e).__name__}: {str(e).strip()[:300]}"))
    return rows


def tvm_rows(b: Bench, name: str, given: list, s: CompareSettings, keep_paths: bool) -> list[dict]:
    """The given artifacts, or host builds of fp32 dense, fp32 pruned and int8 (pruned), each timed."""
    from compiler.engines.tvm import TVM, tuning_note

    rows, jobs = [], [(kind, Path(folder)) for kind, folder, _ in given]
    for kind, prec in ([] if given else b.cases()):
        try:
            res = build_artifact(b.models[kind][0], prec, b.batch, b.work / f"{name}-{kind}-{prec}-b{b.batch}",
                                 data_dir=s.data, quant=s.quant)
            jobs.append((kind, Path(res["artifact"])))
        except UserError as e:
            rows.append(row("tvm", kind, prec, b.batch, reason=f"build refused: {e}"))
    for kind, folder in jobs:
        engine = TVM(folder)
        m = engine.manifest
        rows.append(b.measure(engine, kind, m["precision"], recorded_threads=(m.get("runtime") or {}).get("threads"),
                              note=tuning_note(m), artifact=str(folder) if keep_paths else None))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# the orchestration


def given_artifacts(s: CompareSettings, dense, pruned) -> tuple[list, int]:
    """The ``artifacts`` as (kind, folder, manifest), checked before the long work; and the batch to run."""
    from compiler import artifact

    given = []
    for folder in s.artifacts:
        manifest = artifact.read_manifest(folder)
        if manifest["model"] != dense.model_name:
            raise UserError(f"{folder} is a {manifest['model']} artifact, not {dense.model_name}")
        artifact.check_runs_here(folder, manifest)
        sha = manifest["checkpoint"].get("sha256")
        kind = ("pruned" if pruned is not None and sha == pruned.sha256 else "dense" if sha == dense.sha256
                else "pruned" if manifest["checkpoint"].get("pruning") else "dense")
        if kind == "pruned" and pruned is None:
            raise UserError(f"{folder} was built from a pruned checkpoint: give that checkpoint as the pruned model")
        ck = pruned if kind == "pruned" else dense
        if manifest["input"]["normalize"] != ck.normalize:
            raise UserError(f"{folder} expects {manifest['input']['normalize']} normalization, the {kind} "
                            f"checkpoint {ck.normalize}: load it with normalize={manifest['input']['normalize']}")
        given.append((kind, folder, manifest))
    batches = {m["input"]["shape"][0] for _, _, m in given}
    if len(batches) > 1:
        raise UserError(f"the artifacts are compiled for different batches ({sorted(batches)}); "
                        "compare one batch at a time")
    batch = s.batch or (batches.pop() if batches else DEFAULT_BATCH)
    for _, folder, m in given:
        if m["input"]["shape"][0] != batch:
            raise UserError(f"{folder} is compiled for batch {m['input']['shape'][0]}, not batch {batch}")
    return given, batch


def bench_for(dense, pruned, s: CompareSettings, batch: int, counts: list[int]) -> Bench:
    """The inputs of every engine and PyTorch's reference logits (the checkpoints' own dense-shaped models: what
    build verifies against)."""
    import torch

    models = {"dense": (dense, dense.model)}
    if pruned is not None:
        models["pruned"] = (pruned, pair.shrunk(pruned))
    raw = test_batch(s.data, max(batch, CHECK_IMAGES))
    inputs = {k: normalized(raw, ck.normalize) for k, (ck, _) in models.items()}
    check_of = {k: v[:CHECK_IMAGES] for k, v in inputs.items()}
    with torch.inference_mode():
        reference = {k: ck.model(torch.from_numpy(check_of[k])).numpy() for k, (ck, _) in models.items()}
    return Bench(batch, {k: v[:batch] for k, v in inputs.items()}, check_of, reference, s.timing, counts, models,
                 "pruned" if pruned is not None else "dense")


def compare(dense, pruned, s: CompareSettings, *, progress: bool = True) -> dict:
    """Every engine on the dense checkpoint and its pruned copy (or None); the rows, the best TVM row against the
    best CPU peer, and what it all ran on."""
    pair.check_dense(dense)
    counts = thread_counts(s.threads)
    t_start, start = time.perf_counter(), machine()
    if s.keep:
        from compiler import fileio

        fileio.check_output(s.keep, is_ours=_is_keep_dir, field="keep", what="keep folder of compare",
                            inputs=(dense.path, pruned and pruned.path, s.data, *s.artifacts))
    given, batch = given_artifacts(s, dense, pruned)
    b = bench_for(dense, pruned, s, batch, counts)
    ctx = contextlib.nullcontext(s.keep) if s.keep else tempfile.TemporaryDirectory(prefix="compare-")
    steps = console.progress(total=6, desc="compare", unit="step", leave=False, disable=not progress or None)
    with ctx as work:
        b.work = Path(work)
        b.work.mkdir(parents=True, exist_ok=True)
        rows = []
        for what, step in (("pytorch", lambda: pytorch_rows(b)),
                           ("onnx export + int8", lambda: onnx_files(b, dense.model_name, s.data, s.quant)),
                           ("onnxruntime", lambda: onnx_engine_rows(b, "onnxruntime")),
                           ("openvino", lambda: onnx_engine_rows(b, "openvino")),
                           ("tensorrt", lambda: tensorrt_rows(b)),
                           ("tvm", lambda: tvm_rows(b, dense.model_name, given, s, bool(s.keep or given)))):
            steps.set_postfix_str(what)
            rows += step()
            steps.update()
        steps.close()
    rows = finish(rows)
    return {
        "model": dense.model_name,
        "checkpoint": dense.path,
        "pruned": pruned.path if pruned is not None else None,
        "normalize": {k: ck.normalize for k, (ck, _) in b.models.items()},
        "batch": batch,
        "input": f"the first {batch} CIFAR-10 test images (normalized per model); agreement on the first "
                 f"{CHECK_IMAGES}",
        "timing": {"repeat": s.timing.repeat, "number": s.timing.number, "warmup": s.timing.warmup,
                   "scheme": "warm-up calls, then repeat x (mean of number calls); median and p90",
                   "threads": (f"--threads {s.threads} for every engine" if s.threads else
                               f"each engine at its fastest of {counts} threads (row: threads, threads_ms)")},
        "calibration": {"images": b.calib_desc, "method": s.quant.calibration, "keep_fp32": list(s.quant.keep_fp32)},
        "onnx": b.onnx_info,
        "rows": rows,
        "baseline": "pytorch dense fp32",
        "seconds": round(time.perf_counter() - t_start, 1),
        "machine_at_start": start,
        "best": best_rows(rows, b.int8_of),
        "machine_at_end": machine(),
    }
