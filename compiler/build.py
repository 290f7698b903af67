"""``build``: checkpoint -> Relax IR -> our passes -> target build -> verified artifact folder.

    import (BN folded) -> strip zeroed channels -> precision -> target pipeline (+ tuning database) -> module
    -> verify against PyTorch (on this CPU; board targets are verified through a host build of the same IR)
    -> artifact folder written atomically: model.so, manifest.json, deploy/ (boards)
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass
import time
from pathlib import Path

import numpy as np
import torch

from compiler import console, data, fileio, precision, zoo
from compiler.errors import SettingError, UserError

ARTIFACT_FORMAT = "cifar-hybrid-compiler/artifact"
MANIFEST = "manifest.json"
LIBRARY = "model.so"
VERIFY_SAMPLES = 16
VERIFY_SAMPLES_SHIPPED = 32  # all the shipped verification images: they cost nothing to read
# a static batch is compiled into every kernel and buffer: 1024 images is already 12 MB of input; the time and
# memory to compile and verify grow with it (batch 100000 took over 6 GB)
MAX_BATCH = 1024


@dataclass
class VerificationInputs:
    x: torch.Tensor  # normalized float32 NCHW
    description: str
    real: bool  # real CIFAR-10 images: the argmax agreement is then a real requirement
    shipped: dict | None = None  # the zoo's verification set (with the shipped model's logits), when used


def verification_inputs(data_dir: str | None, normalize: str, n: int, model_name: str | None = None
                        ) -> VerificationInputs:
    """The first ``n`` CIFAR-10 test images from ``data_dir``; without CIFAR-10 the shipped model's verification
    images (``compiler/zoo/<model>.verify.npz``); random inputs only where neither exists."""
    try:
        split = data.load_split(data_dir, "test").head(n)
        return VerificationInputs(data.normalize(split.images, normalize), f"{len(split)} CIFAR-10 test images",
                                  real=True)
    except UserError:
        pass
    shipped = zoo.verification_set(model_name)
    if shipped is not None:
        images = torch.from_numpy(shipped["images"][:max(n, VERIFY_SAMPLES_SHIPPED)])
        return VerificationInputs(data.normalize(images, normalize),
                                  f"{len(images)} CIFAR-10 test images shipped in compiler/zoo (no --data)",
                                  real=True, shipped=shipped)
    g = torch.Generator().manual_seed(0)
    return VerificationInputs(torch.randn(n, 3, 32, 32, generator=g),
                              f"{n} random normal inputs (no CIFAR-10 found)", real=False)


def run_module(executable, x: np.ndarray, batch: int) -> np.ndarray:
    """Run a compiled module (built for this CPU) over ``x`` in chunks of its static batch size."""
    import tvm
    from tvm import relax

    from compiler.engines.base import in_chunks

    vm = relax.VirtualMachine(executable, tvm.cpu())
    return in_chunks(lambda chunk: vm["main"](tvm.runtime.tensor(chunk)).numpy(), x, batch)


def _top1_on(verify: VerificationInputs, logits: np.ndarray) -> float | None:
    """Top-1 (%) of the compiled module on the shipped verification images (None for other inputs)."""
    if verify.shipped is None:
        return None
    labels = verify.shipped["labels"][:len(logits)]
    return round(100.0 * float((logits.argmax(1) == labels).mean()), 2)


THREAD_TIMING = {"repeat": 10, "number": 2, "warmup": 2}


def measure_threads(executable, batch: int) -> dict:
    """Time ``executable`` at each candidate thread count on this machine: the manifest's ``runtime`` entry, whose
    ``threads`` every loader applies (compiler.threads)."""
    from compiler import bench, threads

    if threads.user_tvm_threads() is not None:
        n = threads.set_tvm(threads.user_tvm_threads())
        return {"threads": n, "measured_ms": None, "how": f"{threads.ENV}={n} set by the user: not measured",
                "cpu": console.cpu_name()}
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype("float32")

    def time_at(n: int) -> dict:
        threads.set_tvm(n)
        return bench.time_tvm(executable, batch, x=x, **THREAD_TIMING)

    _, used = threads.at_best(time_at)
    threads.set_tvm(used["threads"])
    return {"threads": used["threads"], "measured_ms": used["threads_ms"],
            "how": f"median of {THREAD_TIMING['repeat']} runs at each count at build time, this machine",
            "cpu": console.cpu_name()}


def board_threads(spec) -> dict:
    """What is known of the thread count for an artifact that does not run here."""
    if spec.kind == "cuda":
        return {"threads": None, "measured_ms": None,
                "how": "the GPU runs the kernels; host threads only launch them (TVM's default is fine)"}
    if spec.kind == "cpu" and not spec.cross_compiled:
        return {"threads": None, "measured_ms": None,
                "how": "not measured (this CPU lacks the class's features): time it on a CPU of the class with "
                       "`bench --artifact`, TVM_NUM_THREADS=1, 2, ..."}
    return {"threads": None, "measured_ms": None,
            "how": "not measured (built for another machine): on the board, time it with TVM_NUM_THREADS=1, 2, ..."}


@dataclass
class Lowered:
    """The target-independent half of a build: what the target pipeline (and tuning) receives."""

    dense: object  # Relax IRModule as imported (BN folded)
    stripped: object  # after strip_zero_channels (fp32): what MACs and parameters are counted on
    module: object  # after strip + precision
    strip_report: list
    quant_report: dict | None
    calibration: str | None  # what the int8 calibration ran on


def lower(model: torch.nn.Module, batch: int, prec: str, spec=None, *, data_dir=None, normalize="cifar",
          calib_images: int = precision.DEFAULT_CALIB_IMAGES, calibration: str = precision.DEFAULT_CALIBRATION,
          keep=precision.DEFAULT_KEEP, untrained: bool = False, fuse_quantize: bool = True,
          uint8_residual: bool = True, shipped: tuple | None = None) -> Lowered:
    """Import -> the graph passes of :func:`targets.pipeline.pipeline` for ``spec`` and ``prec``: BN folded, zeroed
    channels stripped, precision (int8: calibrated on training images). tune lowers with this function too.
    ``shipped``: (Calibration, description) stored for this model (:func:`compiler.zoo.calibration`), used for
    int8 when no CIFAR-10 folder is given (``data_dir`` None and CIFAR10_DIR unset)."""
    from compiler import frontend
    from passes import reports
    from passes.strip_zero_channels import report_of
    from targets.pipeline import pipeline

    fp32 = pipeline(spec, "fp32").fp32()  # fold BN + strip: the same passes for every precision
    dense = frontend.import_model(model, batch)
    stripped = fp32(dense)
    strip_report = report_of(stripped)
    stripped = reports.strip_all(stripped)
    kwargs, calib_desc = {}, None
    if precision.needs_calibration(prec):
        kwargs = {"spec": spec, "method": calibration, "keep": keep, "fuse_quantize": fuse_quantize,
                  "uint8_residual": uint8_residual}
        if shipped is not None and data_dir is None and not os.environ.get("CIFAR10_DIR"):
            kwargs["stored_calibration"], calib_desc = shipped
        else:
            kwargs["stored_calibration"], calib_desc = calibrate(model, data_dir, normalize, calib_images, spec,
                                                                 batch=max(batch, 64), untrained=untrained)
    module, quant_report = precision.apply_with_report(stripped, prec, **kwargs)
    return Lowered(dense, stripped, module, strip_report, quant_report, calib_desc)


def calibrate(model: torch.nn.Module, data_dir, normalize: str, n: int = precision.DEFAULT_CALIB_IMAGES, spec=None,
              *, batch: int = 64, untrained: bool = False) -> tuple:
    """(passes.quantize.Calibration, description): the activation histograms :func:`lower` quantizes ``model``
    with, from ``n`` CIFAR-10 training images run through its fp32 IR at ``batch`` (a larger batch than the
    build's: far fewer runs of the untuned fp32 module)."""
    from compiler import frontend
    from passes import quantize as q
    from targets.pipeline import pipeline

    images, desc = precision.calibration_images(data_dir, normalize, n, allow_random=untrained)
    fp32 = pipeline(spec, "fp32").fp32()
    try:
        return q.calibrate(fp32(frontend.import_model(model, batch)), images), desc
    except ValueError as e:
        raise UserError(f"int8 calibration: {e}") from None


def check_batch(batch: int, field: str = "batch") -> int:
    if not 0 < batch <= MAX_BATCH:
        raise SettingError(field, f"must be between 1 and {MAX_BATCH}, got {batch} (a static batch is compiled "
                                  "into every kernel; larger ones need gigabytes to compile and verify)")
    return batch


def check_out(out: Path, *inputs) -> Path:
    """Refuse ``--out`` unless it is new, an empty folder or an earlier artifact of this project (before any work)."""
    from compiler.artifact import is_artifact

    return fileio.check_output(out, is_ours=is_artifact, inputs=inputs,
                               what="artifact of this project (a folder with its manifest.json)")


def parse_keep(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"first,conv2d3"`` (or a sequence of names) -> the layers kept fp32; ``none`` keeps none."""
    items = tuple(x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip())
    return () if items in ((), ("none",)) else items


@dataclass(frozen=True)
class QuantSettings:
    """int8 calibration, shared by build, tune and compare (so the module tuned is the module built)."""

    calib_images: int = precision.DEFAULT_CALIB_IMAGES
    calibration: str = precision.DEFAULT_CALIBRATION
    keep_fp32: tuple[str, ...] = precision.DEFAULT_KEEP

    def __post_init__(self):
        if self.calib_images <= 0:
            raise SettingError("calib_images", "must be positive")
        if self.calibration not in precision.CALIBRATION_METHODS:
            raise SettingError("calibration", f"must be one of {', '.join(precision.CALIBRATION_METHODS)}, "
                                              f"got {self.calibration!r}")
        object.__setattr__(self, "keep_fp32", parse_keep(self.keep_fp32))


@dataclass(frozen=True)
class BuildSettings:
    """What ``build`` compiles and how; validated when made."""

    target: str = "jetson-tx2"
    precision: str = "auto"
    batch: int = 1
    out: str | Path | None = None  # default artifacts/<model>-<target>
    data: str | Path | None = None  # CIFAR-10: calibration (training images) and verification (test images)
    quant: QuantSettings = QuantSettings()
    tuning_log: str | Path | None = None  # default: tuning_logs/<target>/<model>-<variant>/ when it exists

    def __post_init__(self):
        check_batch(self.batch)
        if self.precision not in precision.CHOICES:
            raise SettingError("precision", f"must be one of {', '.join(precision.CHOICES)}, "
                                            f"got {self.precision!r}")


def load_for_build(model: str | None, checkpoint: str | Path | None, normalize: str | None, *,
                   quiet: bool = False):
    """(Checkpoint, note): the given checkpoint, else the shipped one; where none is shipped, the model with
    UNTRAINED weights and a note saying so (the pipeline still runs; accuracy is chance)."""
    from compiler.checkpoint import Checkpoint
    from compiler.models import build_model

    try:
        return zoo.load(model, checkpoint, normalize, quiet=quiet), None
    except UserError:
        if checkpoint is not None:
            raise
    name = model or zoo.DEFAULT_MODEL
    torch.manual_seed(0)
    untrained = Checkpoint(name, build_model(name).eval(), normalize or data.DEFAULT_NORMALIZATION)
    note = (f"no trained {name} is shipped with the package yet: built with UNTRAINED weights (accuracy is "
            "chance); pass a checkpoint for a real model")
    if not quiet:
        console.warn(note)
    return untrained, note


def build(ckpt, settings: BuildSettings, *, untrained_note: str | None = None, progress: bool = True) -> dict:
    """Compile ``ckpt`` (a :class:`compiler.checkpoint.Checkpoint`) into a verified artifact folder:
    ``{"artifact": folder, "manifest": {...}}``. Refuses (UserError) to write one that differs from PyTorch."""
    import targets

    from compiler import threads
    from compiler.tuning import database as tuning_db

    threads.prepare_tvm()  # before any module runs (calibration): thread counts up to the cores can be timed
    t_start = time.perf_counter()
    spec = targets.get(settings.target)
    prec, prec_reason = precision.choose(settings.precision, spec)
    out = Path(settings.out or f"artifacts/{ckpt.model_name}-{spec.name}")
    check_out(out, ckpt.path, settings.data, settings.tuning_log)
    q = settings.quant

    steps = console.progress(total=5, desc="build", unit="step", leave=False, disable=not progress or None)
    steps.set_postfix_str("import + strip" + (" + calibrate" if precision.needs_calibration(prec) else ""))
    lowered = lower(ckpt.model, settings.batch, prec, spec, data_dir=settings.data, normalize=ckpt.normalize,
                    calib_images=q.calib_images, calibration=q.calibration, keep=q.keep_fp32,
                    untrained=untrained_note is not None, shipped=zoo.calibration(ckpt, q.calib_images))
    steps.update()
    steps.set_postfix_str(f"compile for {spec.name}")
    variant = tuning_db.variant_of(lowered.module, prec)
    database, tuning_info = tuning_db.find_database(spec, ckpt.model_name, variant, explicit_dir=settings.tuning_log)
    library, library_info = tuning_db.find_library(spec, prec, settings.batch)  # for the kernels it lacks
    schedules = tuning_db.combine(database, library)
    first = database if library is not None else None  # to tell apart what each scheduled
    applied = tuning_db.tasks_applied(lowered.module, spec, schedules, first) if schedules is not None else None
    executable = targets.compile_module(lowered.module, spec, database=schedules)
    steps.update()
    steps.set_postfix_str("verify against PyTorch")
    verification = verify(ckpt, lowered.module, executable, spec, prec, settings)
    steps.update()
    steps.set_postfix_str("time thread counts")
    # an x86 class above this CPU's is built here but never run here (its instructions would SIGILL)
    runtime = measure_threads(executable, settings.batch) if targets.runs_here(spec) else board_threads(spec)
    steps.set_postfix_str("write artifact")
    facts = {"precision": prec, "precision_reason": prec_reason,
             "tuning": tuning_db.manifest_entry(tuning_info, applied, library_info), "runtime": runtime,
             "verification": verification, "note": untrained_note, "t_start": t_start}
    manifest = write_artifact(out, executable, ckpt, spec, settings, lowered, facts)
    steps.update()
    steps.close()
    return {"artifact": str(out), "manifest": manifest}


def verify(ckpt, mod, executable, spec, prec: str, settings: BuildSettings) -> dict:
    """Run the compiled module on this CPU (board targets: a host build of the same IR) beside PyTorch; the
    manifest's ``verification`` entry, or a UserError when it differs beyond the precision's tolerance."""
    import targets

    v = verification_inputs(settings.data, ckpt.normalize, VERIFY_SAMPLES, ckpt.model_name)
    with torch.inference_mode():
        ref = ckpt.model(v.x).numpy()
    if not np.isfinite(ref).all():
        raise UserError("the model itself (PyTorch) outputs NaN or infinite logits on the verification inputs; "
                        "its weights are broken; artifact not written")
    if v.shipped is not None and zoo.is_shipped(ckpt):
        stored = v.shipped["logits"][:len(ref)]
        if not np.allclose(ref, stored, atol=1e-3, rtol=1e-3):
            raise UserError(f"the shipped {ckpt.model_name} does not reproduce its recorded logits (max |diff| "
                            f"{float(np.abs(ref - stored).max()):.3g}): the package's compiler/zoo files are "
                            "damaged; reinstall it")
    runs_here = spec.kind == "cpu" and not spec.cross_compiled and targets.runs_here(spec)
    host = spec if runs_here else targets.get("host")
    runnable = executable if runs_here else targets.compile_module(mod, host)
    got = run_module(runnable, v.x.numpy(), settings.batch)
    max_abs_diff = float(np.abs(got - ref).max())
    tolerance = precision.TOLERANCE[prec] * max(1.0, float(np.abs(ref).max()))
    argmax_agree = float((got.argmax(1) == ref.argmax(1)).mean())
    min_agree = (precision.VERIFY_ARGMAX_REAL if v.real else precision.VERIFY_ARGMAX).get(prec, 0.0)
    if not np.isfinite(max_abs_diff) or max_abs_diff > tolerance or argmax_agree < min_agree:
        raise UserError(f"compiled module differs from PyTorch by {max_abs_diff:.3g} (tolerance {tolerance:.3g} "
                        f"for {prec}), argmax agreement {argmax_agree:.2f} (needs {min_agree:.2f}) on "
                        f"{v.description}; artifact not written")
    return {"max_abs_diff": max_abs_diff, "tolerance": tolerance, "argmax_agreement": argmax_agree,
            "argmax_agreement_required": min_agree, "real_images": v.real, "top1_on_inputs": _top1_on(v, got),
            "inputs": v.description, "run_on": f"{host.name} ({platform.machine()})"}


def write_artifact(out: Path, executable, ckpt, spec, settings: BuildSettings, lowered: Lowered,
                   facts: dict) -> dict:
    """The artifact folder (atomically): model.so and manifest.json; the manifest."""
    import targets
    import tvm

    from compiler.artifact import is_artifact

    with fileio.atomic_dir(out, replace_if=is_artifact) as tmp:
        with console.filter_native_stderr():
            exported = targets.export_library(executable, tmp / LIBRARY, spec)
        manifest = manifest_for(ckpt, spec, settings, lowered, facts)
        manifest["artifact"] = {"file": LIBRARY, "sha256": fileio.sha256_file(tmp / LIBRARY),
                                "bytes": (tmp / LIBRARY).stat().st_size, **(exported or {})}
        manifest.update(tvm_version=tvm.__version__, torch_version=torch.__version__,
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        build_seconds=round(time.perf_counter() - facts["t_start"], 1))
        fileio.write_json(tmp / MANIFEST, manifest)
    return manifest


def manifest_for(ckpt, spec, settings: BuildSettings, lowered: Lowered, facts: dict) -> dict:
    """The manifest's facts about the model, the target and the lowering (the file entries come after export)."""
    from passes.analysis import count_flops
    from passes.quantize import constant_bytes

    batch, mean_std = settings.batch, data.NORMALIZATIONS[ckpt.normalize]
    # precision changes no MAC count; count on the fp32 IR (int8-weights wraps each conv2d in a function of its own)
    flops_dense, flops_compiled = count_flops(lowered.dense), count_flops(lowered.stripped)  # whole static batch
    return {
        "format": ARTIFACT_FORMAT,
        "version": 1,
        "model": ckpt.model_name,
        "target": {"name": spec.name, "tvm": spec.target_json(), "kind": spec.kind,
                   "cross_compiled": spec.cross_compiled, "cpu_features": spec.required_cpu_features()},
        "precision": facts["precision"],
        "precision_reason": facts["precision_reason"],
        "input": {"name": "x", "shape": [batch, 3, 32, 32], "dtype": "float32", "layout": "NCHW",
                  "preprocess": "uint8 RGB / 255, then (x - mean) / std per channel",
                  "normalize": ckpt.normalize, "mean": list(mean_std[0]), "std": list(mean_std[1])},
        "output": {"shape": [batch, 10], "dtype": "float32", "meaning": "logits"},
        "classes": list(data.CLASSES),
        "flops": {"unit": "multiply-accumulates per image, counted on the Relax IR",
                  "dense": flops_dense["macs"] // batch, "compiled": flops_compiled["macs"] // batch},
        "params": {"dense": flops_dense["params"], "compiled": flops_compiled["params"]},
        "weight_bytes": {"dense": constant_bytes(lowered.dense)["total"],
                         "compiled": constant_bytes(lowered.module)["total"],
                         "note": "bytes of the constants in the Relax IR (fp32 dense; compiled: after strip + precision)"},
        "strip": lowered.strip_report,
        "quantization": None if lowered.quant_report is None else {
            "calibration_images": lowered.calibration,
            "method": settings.quant.calibration if lowered.calibration else None,
            **lowered.quant_report},
        "tuning": facts["tuning"],
        "checkpoint": {"path": ckpt.path, "sha256": ckpt.sha256, "pruning": ckpt.pruning is not None,
                       "shipped": zoo.is_shipped(ckpt), "note": facts["note"]},
        "runtime": facts["runtime"],
        "verification": facts["verification"],
    }
