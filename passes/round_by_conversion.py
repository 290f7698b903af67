"""RoundByConversion: a quantize's round, clip and cast to 8 bits become one rounding conversion and saturating packs.

Every int8 kernel ends in a quantize, ``uint8(max(min(round(y), 255.0), 0.0))`` (int8: -128 / 127), computed in
float: LLVM lowers it to ``vroundps`` (two uops on Intel's vector ports), ``vminps``, ``vmaxps``, ``vcvttps2dq``, and
then truncates to bytes. The same value is ``uint8(max(min(lrint(max(min(y, 255.0), 0.0)), 255), 0))``: ``lrint``
rounds in the current rounding mode, as ``round`` does here (TVM lowers it to ``llvm.nearbyint``; ``vroundps $12``),
and is one ``vcvtps2dq``; the clamp before it keeps the value in range (out of range ``lrint`` is undefined); the
integer clamp after it is what LLVM recognises as the saturating ``vpackssdw`` / ``vpackuswb`` the bytes are packed
with anyway. On the AVX2 kernels of the shipped model that is two uops fewer on the busiest ports per vector of eight
outputs, and one ``vextracti128`` fewer (``benchmarks/round_by_conversion.md``).

It runs after the kernels are scheduled (after their records apply, so every record still matches its kernel; a
kernel keeps its attributes, so one that was not scheduled is not marked scheduled) and rewrites every such ``Cast``
whose clip bounds are the cast type's own range or inside it, in either order of ``min`` and ``max``. The result is
the same byte for every input but NaN.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

from passes.patterns import with_functions

__all__ = ["RoundByConversion", "round_by_conversion", "RANGES"]

RANGES = {"uint8": (0, 255), "int8": (-128, 127)}  # the casts rewritten, and the values each can hold


def _float_const(expr) -> float | None:
    return float(expr.value) if isinstance(expr, tirx.FloatImm) else None


def _clip(expr):
    """``(inner, lo, hi)`` for ``max(min(inner, hi), lo)`` or ``min(max(inner, lo), hi)`` with float constant bounds,
    else None."""
    outer_max = isinstance(expr, tirx.Max)
    if not (outer_max or isinstance(expr, tirx.Min)):
        return None
    inner_type = tirx.Min if outer_max else tirx.Max
    inner = expr.a
    if not isinstance(inner, inner_type):
        return None
    outer_bound, inner_bound = _float_const(expr.b), _float_const(inner.b)
    if outer_bound is None or inner_bound is None:
        return None
    lo, hi = (outer_bound, inner_bound) if outer_max else (inner_bound, outer_bound)
    return inner.a, lo, hi


def _is_round(expr) -> bool:
    return isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "tirx.round"


def _rewrite(cast):
    dtype = str(cast.ty)
    if dtype not in RANGES:
        return None
    clip = _clip(cast.value)
    if clip is None or not _is_round(clip[0]):
        return None
    rounded, lo, hi = clip
    low, high = RANGES[dtype]
    if not (lo.is_integer() and hi.is_integer() and low <= lo <= hi <= high):
        return None
    y = rounded.args[0]
    ftype = str(y.ty)
    clamped = tirx.Max(tirx.Min(y, tirx.const(hi, ftype)), tirx.const(lo, ftype))
    converted = tirx.call_llvm_pure_intrin("int32", "llvm.lrint", clamped)
    return tirx.Cast(dtype, tirx.Max(tirx.Min(converted, tirx.const(int(hi), "int32")),
                                     tirx.const(int(lo), "int32")))


def round_by_conversion(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` with every ``uint8`` / ``int8`` cast of a clipped ``round`` written as a clipped ``lrint``; None when
    it has none."""
    count = 0

    def rewrite(node):
        nonlocal count
        new = _rewrite(node)
        if new is None:
            return node
        count += 1
        return new

    body = tvm_ffi.structural_map(func.body, [(tirx.Cast, rewrite)], order="post")
    return func.with_body(body) if count else None  # its attributes as they were: scheduled or not


@tvm.transform.module_pass(opt_level=0, name="RoundByConversion")
class RoundByConversion:
    """:func:`round_by_conversion` on every PrimFunc of the module it applies to (the others are left as they are)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewritten = {gv: round_by_conversion(func) for gv, func in mod.functions_items()
                     if isinstance(func, tirx.PrimFunc)}
        return with_functions(mod, {gv: func for gv, func in rewritten.items() if func is not None})
