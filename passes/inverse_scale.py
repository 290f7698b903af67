"""InverseScaleQuantize: a scheduled kernel's quantize multiplies by the inverse of its scale instead of dividing.

The packed int8 conv2d kernels end in the next conv2d's quantize, ``clip(round(x / scale[0]), 0, 255)``, with the
activation scale a ``(1,)`` tensor (:func:`passes.vnni.quantize_packed`: so one tuning record fits every
calibration). The division stays a division in the compiled loop - LLVM may not turn ``x / s`` into ``x * (1 / s)``
without fast-math - and a vector ``vdivps`` is slow: the AVX2 build of the shipped model's first stage-1 conv2d
kernel ran one 8-lane ``vdivps`` (5 cycles of throughput on Golden Cove, ~3.5 on Zen 3) for every 8 outputs, which
over the model's ~49,000 output vectors is ~60 us of a 0.77 ms module. AMX's kernels quantize by the inverse scale
already (:data:`passes.vnni.ISAS`, ``inverse_scale``), as OpenVINO's and oneDNN's quantize do.

This pass rewrites, in every PrimFunc, each floating-point ``x / s[0]`` whose divisor is an element of a
one-element buffer as ``x * (1 / s[0])``: the one division is loop-invariant and LLVM hoists it out of the loop.
It runs on scheduled kernels (after the records are applied), so every record still matches its kernel exactly; the
kernels' loops do not change. The result differs from the division's only where ``x / s`` lies within an ulp of a
rounding tie (``x`` is an int32 sum times a per-channel float: a uint8 activation off by one, rarely; the test
suite's tolerances and ``benchmarks/inverse_scale.md`` hold the measured differences).
"""

from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import tirx

from passes.patterns import scheduled_like, with_functions

__all__ = ["InverseScaleQuantize", "inverse_scale"]


def _scalar_load(expr) -> bool:
    """``expr`` reads an element of a one-element buffer (a scale passed as a ``(1,)`` tensor)."""
    from tvm.ir.expr import TensorLoad

    if not isinstance(expr, TensorLoad):
        return False
    shape = [int(d) if isinstance(d, (int, tirx.IntImm)) else None for d in expr.source.shape]
    return None not in shape and math.prod(shape) == 1


def inverse_scale(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` with every float ``x / s[0]`` (``s`` a one-element buffer) written ``x * (1 / s[0])``; None when it
    has none."""
    count = 0

    def rewrite(node):
        nonlocal count
        dtype = str(node.ty)  # a scalar float (the lanes come with vectorization, later)
        if dtype.startswith("float") and _scalar_load(node.b):
            count += 1
            return tirx.Mul(node.a, tirx.Div(tirx.const(1.0, dtype), node.b))
        return node

    body = tvm_ffi.structural_map(func.body, [(tirx.Div, rewrite)], order="post")
    return scheduled_like(func.with_body(body), func) if count else None


@tvm.transform.module_pass(opt_level=0, name="InverseScaleQuantize")
class InverseScaleQuantize:
    """:func:`inverse_scale` on every PrimFunc of the module it applies to (the others are left as they are)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewritten = {gv: inverse_scale(func) for gv, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)}
        return with_functions(mod, {gv: func for gv, func in rewritten.items() if func is not None})
