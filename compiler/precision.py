"""Precision per target: which numeric format a build computes in, and why.

``auto`` takes the target's default (a fact of the target: fast int8 or not). Formats:

``fp32``          as imported
``fp16``          Relax's ToMixedPrecision: fp16 storage and arithmetic, float32 at the boundary
``int8``          :class:`passes.quantize.Quantize`: int8 conv2d/matmul with int32 accumulation, calibrated activation
                  scales (needs calibration images: :func:`calibration_images`), the first layer kept fp32; on x86
                  the conv2d layers packed for the CPU's int8 dot products (:class:`passes.int8_layout.Int8Layout`)
``int8-weights``  fp16 compute with int8-stored weights (:class:`passes.quantize_weights.QuantizeWeights`): the TX2's
                  format

The passes come from :func:`targets.pipeline.pipeline` (the one list build and tune share).

Use :func:`apply_with_report` to get the quantization report the manifest records; :func:`apply` returns the module
alone.
"""

from __future__ import annotations

import numpy as np

from compiler.errors import SettingError, UserError

CHOICES = ("auto", "fp32", "fp16", "int8", "int8-weights")
AVAILABLE = ("fp32", "fp16", "int8", "int8-weights")
# what to use instead while a format is not implemented yet (none now; kept for callers that look it up)
FALLBACK: dict = {}

DEFAULT_CALIB_IMAGES = 512
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_CALIBRATION = "minmax"
DEFAULT_KEEP = ("first",)  # see passes.quantize: the int8 classifier measured no loss


def choose(requested: str, spec) -> tuple[str, str]:
    """(precision, reason) for ``requested`` on the target ``spec`` (a targets.TargetSpec)."""
    if requested not in CHOICES:
        raise UserError(f"unknown precision '{requested}': choose one of {', '.join(CHOICES)}")
    if requested != "auto":
        if requested not in AVAILABLE:
            raise UserError(f"precision {requested} is not implemented yet; "
                            f"use one of {', '.join(AVAILABLE)} or auto")
        return requested, "requested with --precision"
    want, why = spec.default_precision, spec.precision_reason
    if want in AVAILABLE:
        return want, f"auto: {why}"
    got = FALLBACK[want]
    return got, f"auto: {why}; {want} is not implemented yet, so {got}"


def needs_calibration(precision: str) -> bool:
    return precision == "int8"


def calibration_images(data_dir, normalize: str, n: int = DEFAULT_CALIB_IMAGES, *, seed: int = 0,
                       allow_random: bool = False) -> tuple[np.ndarray, str]:
    """``n`` CIFAR-10 *training* images (a fixed-seed random subset), normalized, float32 NCHW, and a description
    for the manifest. Without CIFAR-10: random normal inputs when ``allow_random`` (an untrained model), else a
    UserError (calibrating a real model on noise would ruin its accuracy)."""
    from compiler import data

    if n <= 0:
        raise SettingError("calib_images", "must be positive")
    try:
        split = data.load_split(data_dir, "train")
    except UserError as e:
        if not allow_random:
            raise SettingError("data", f"must name a CIFAR-10 folder: int8 calibration needs its training images "
                                       f"({e}); or choose a precision without calibration (fp32, fp16, "
                                       "int8-weights)") from None
        rng = np.random.default_rng(seed)
        return (rng.standard_normal((n, 3, 32, 32)).astype(np.float32),
                f"{n} random normal inputs (no CIFAR-10 found): ranges not representative")
    n_take = min(n, len(split))
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:n_take])
    x = data.normalize(split.images[idx], normalize).numpy().astype(np.float32)
    return x, f"{n_take} CIFAR-10 training images (random subset, seed {seed})"


def apply_with_report(mod: tvm.IRModule, precision: str, *, calib_images: np.ndarray | None = None,
                      spec=None, method: str = DEFAULT_CALIBRATION, keep=DEFAULT_KEEP,
                      percentile: float | None = None, fuse_quantize: bool = True, uint8_residual: bool = True,
                      stored_calibration=None) -> tuple[tvm.IRModule, dict | None]:
    """``mod`` (fp32, stripped) in ``precision`` by the precision passes of :func:`targets.pipeline.pipeline`, and
    the quantization report (None for fp32 / fp16).

    int8: ``calib_images`` (float32 NCHW, normalized: :func:`calibration_images`) are run through the fp32 ``mod``
    on this CPU; ``spec`` (the build target) chooses the activation signedness and the int8 layout (uint8 and
    packed on x86, int8 NCHW elsewhere); ``method`` one of :data:`CALIBRATION_METHODS`; ``keep`` the layers left
    fp32 (``first``, ``last``, layer names such as ``conv2d3``, or ``none``); ``fuse_quantize``,
    ``uint8_residual``: :class:`passes.quantize.QuantConfig`'s (False: the layout before them,
    to measure); ``stored_calibration``: a :class:`passes.quantize.Calibration` of this model made earlier (the
    shipped model's, :func:`compiler.zoo.calibration`), used instead of running ``calib_images``."""
    from passes import quantize as q
    from passes import reports
    from targets.pipeline import pipeline

    if precision not in AVAILABLE:
        raise UserError(f"precision {precision} is not implemented")
    calibration, overrides = None, {}
    if precision == "int8":
        if calib_images is None and stored_calibration is None:
            raise UserError("precision int8 needs calibration images (compiler.precision.calibration_images)")
        if method not in CALIBRATION_METHODS:
            raise UserError(f"unknown calibration method '{method}': one of {', '.join(CALIBRATION_METHODS)}")
        overrides = {"method": method, "keep": tuple(keep), "fuse_quantize": bool(fuse_quantize),
                     "uint8_residual": bool(uint8_residual)}
        if percentile is not None:
            overrides["percentile"] = percentile
    try:
        passes = pipeline(spec, precision, **overrides)
        if precision == "int8":
            calibration = stored_calibration if stored_calibration is not None else q.calibrate(mod, calib_images)
        out = passes.precision_passes(calibration)(mod)
    except ValueError as e:
        raise UserError(f"int8 quantization: {e}") from None
    report = q.report_of(out) if precision in ("int8", "int8-weights") else None
    return reports.strip_all(out), report


def apply(mod: tvm.IRModule, precision: str, **kwargs) -> tvm.IRModule:
    """``mod`` in ``precision`` (see :func:`apply_with_report` for the keyword arguments int8 needs)."""
    return apply_with_report(mod, precision, **kwargs)[0]


# verification tolerance on the logits, relative to max(1, their largest magnitude); int8 also checks the argmax
# agreement (VERIFY_ARGMAX) because a calibrated int8 model is judged by its decisions, not by bit-level closeness
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8-weights": 5e-2, "int8": 0.15}
VERIFY_ARGMAX = {"int8": 0.75}
# on real CIFAR-10 images (build's --data, or the images shipped with the zoo model) the decisions must agree too:
# a compiled model that changes more than a few of 16-32 decisions is not the model that was verified
VERIFY_ARGMAX_REAL = {"fp32": 0.95, "fp16": 0.9, "int8-weights": 0.9, "int8": 0.75}
