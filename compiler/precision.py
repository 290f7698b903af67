"""Precision per target: which numeric format a build computes in, and why.

``auto`` takes the target's default (a fact of the target: fast int8 or not). What this module can apply today:
``fp32`` (as imported) and ``fp16`` (Relax's ToMixedPrecision: fp16 storage and arithmetic). The int8 formats
come from the quantization pass; until it exists they are refused with a clear message, and ``auto`` falls back
to the nearest format that exists and says so.
"""

from __future__ import annotations

import tvm
from tvm import relax

from compiler.errors import UserError

CHOICES = ("auto", "fp32", "fp16", "int8", "int8-weights")
AVAILABLE = ("fp32", "fp16")
# what to use instead while a format is not implemented yet
FALLBACK = {"int8": "fp32", "int8-weights": "fp16"}


def choose(requested: str, spec) -> tuple[str, str]:
    """(precision, reason) for ``requested`` on the target ``spec`` (a targets.TargetSpec)."""
    if requested not in CHOICES:
        raise UserError(f"unknown precision '{requested}': choose one of {', '.join(CHOICES)}")
    if requested != "auto":
        if requested not in AVAILABLE:
            raise UserError(f"precision {requested} is not implemented yet (int8 quantization pass pending); "
                            f"use one of {', '.join(AVAILABLE)} or auto")
        return requested, "requested with --precision"
    want, why = spec.default_precision, spec.precision_reason
    if want in AVAILABLE:
        return want, f"auto: {why}"
    got = FALLBACK[want]
    return got, f"auto: {why}; {want} is not implemented yet, so {got}"


def apply(mod: tvm.IRModule, precision: str) -> tvm.IRModule:
    if precision == "fp32":
        return mod
    if precision == "fp16":
        # fp16 storage and arithmetic (the TX2's fast path); inputs and logits stay float32 at the boundary
        # FoldConstant turns the casts of constant weights into fp16 constants: half the bytes in the module
        mod = relax.transform.ToMixedPrecision(out_dtype="float16")(mod)
        return relax.transform.FoldConstant()(mod)
    raise UserError(f"precision {precision} is not implemented yet")


# verification tolerance on the logits, relative to their largest magnitude
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
