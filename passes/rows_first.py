"""RowsFirstConv2d: a small-weight packed int8 conv2d kernel's parallel loop ordered output rows first.

A tuned packed int8 conv2d kernel (:func:`passes.vnni.conv2d_nchwc_int8`) runs its output tiles over one
``parallel`` loop, the fusion of the record's outer tile loops (batch, output-channel block, rows, columns, in the
order the record chose). On two threads each thread takes one contiguous half of that loop. Where the record put a
column or channel-block level outside the row levels, each thread's half is a set of columns (or channels) over every
row, so it reads input rows the other core wrote in the kernel before (whose epilogue,
:mod:`passes.epilogue_at_conv`, wrote its tiles on the thread that computed them) and writes rows the other core reads
next. Ordered rows first, each thread's half is a band of rows, the band it wrote and will read, in both kernels.

The rewrite keeps every iteration and only changes their order, so the values are the same bit for bit: the loop's
variable ``f`` (extent ``E``), whose levels the block bindings read as ``f // lower % extent``
(``tvm.sym.detect_iter_map``), becomes ``f = sum(digit_j(g) * lower_j)`` of a new variable ``g`` over the same extent,
in which the batch levels come first, then the output-row levels, then the rest in their old order; the bindings are
simplified again with ``g``'s range. The iterations of a ``parallel`` loop are independent, so any order is valid.
(MetaSchedule's ``reorder`` cannot do this: the loop is already fused and annotated.)

Only kernels whose int8 weights are at most :data:`MAX_WEIGHT_BYTES` change: with rows first each thread reads all of
a kernel's weights, and a stage-3 kernel's (36 KB at 64 channels) no longer fit one core's L1 beside its tiles.

Measured (``benchmarks/rows_first.md``, shipped pruned ResNet56, batch 1, 9 interleaved rounds): x86-64-v3 (AVX2 code)
0.825 / 0.553 -> 0.827 / 0.503 ms at 1 / 2 threads, logits bit-identical; VNNI and AMX unchanged (their kernels
parallelize by rows already).
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx

from passes.patterns import is_scheduled, scheduled_like, with_functions

__all__ = ["RowsFirstConv2d", "rows_first", "loop_levels", "MAX_WEIGHT_BYTES"]

MAX_WEIGHT_BYTES = 4096  # the shipped model's first-stage kernels (16 channels: 2,304 bytes) and none larger
BATCH_AXIS, ROW_AXIS = 0, 2  # of the packed (N, OB, H, W, ob) conv2d output


def _walk(node, kind):
    import tvm_ffi

    found = []
    tvm_ffi.structural_walk(node, (kind, lambda n: found.append(n)), order="pre")
    return found


def _update(func: tirx.PrimFunc):
    """The tensorized conv2d's update block realize and the outermost ``parallel`` loop above it, or None."""
    from passes import vnni

    for loop in _walk(func.body, tirx.For):  # outermost first
        if loop.kind != tirx.ForKind.PARALLEL:
            continue
        realizes = [r for r in _walk(loop.body, s_tir.SBlockRealize)
                    if r.block.name_hint == vnni.CONV_UPDATE_BLOCK]
        if realizes:
            return (realizes[0], loop) if len(realizes) == 1 else None
    return None


def weight_bytes(realize) -> int:
    """Bytes of the int8 buffers the update block reads (its weights)."""
    return sum(math.prod(int(d) for d in r.source.shape) for r in realize.block.reads
               if str(r.source.dtype) == "int8")


def loop_levels(realize, loop, domains: dict) -> list[tuple[int, int, int]] | None:
    """The levels of ``loop``'s variable, outermost first, as ``(lower, extent, output axis)``: the finest split
    ``f // lower % extent`` that every output index of the update block ``realize`` reads whole; None where a level
    is not in exactly one output axis, or the indices are not affine in the loops (``domains``: var -> Range)."""
    import tvm_ffi

    f, extent = loop.loop_var, int(loop.extent)
    values = {iv.var: v for iv, v in zip(realize.block.iter_vars, realize.iter_values)}
    (written,) = realize.block.writes
    splits = []  # (lower, extent, axis)
    for axis, rng in enumerate(written.region):
        index = tvm_ffi.structural_map(rng.min, [(tirx.Var, lambda v: values.get(v, v))], order="post")
        found = tvm.sym.detect_iter_map([index], domains)
        if not found.indices:
            return None
        for s in _walk(found.indices, tvm.sym.IterSplitExpr):
            if isinstance(s.source.source, tirx.Var) and s.source.source.same_as(f):
                splits.append((int(s.lower_factor), int(s.extent), axis))
    bounds = sorted({1, extent} | {b for lo, n, _ in splits for b in (lo, lo * n)})
    levels = []
    for lo, hi in zip(bounds, bounds[1:]):
        if hi % lo:
            return None
        axes = {axis for s_lo, n, axis in splits if s_lo <= lo and hi <= s_lo * n}
        if len(axes) != 1:
            return None
        levels.append((lo, hi // lo, axes.pop()))
    return levels[::-1]


def _rows_first_order(levels: list) -> list:
    return sorted(levels, key=lambda level: 0 if level[2] == BATCH_AXIS else 1 if level[2] == ROW_AXIS else 2)


def rows_first(func: tirx.PrimFunc, max_weight_bytes: int = MAX_WEIGHT_BYTES) -> tirx.PrimFunc | None:
    """``func`` (a scheduled packed int8 conv2d kernel) with its parallel loop ordered rows first; None where it is
    not such a kernel, its weights are over ``max_weight_bytes``, or the loop is rows first already."""
    import tvm_ffi

    if not isinstance(func, tirx.PrimFunc) or not is_scheduled(func):
        return None
    found = _update(func)
    if found is None:
        return None
    realize, loop = found
    if not isinstance(loop.extent, tvm.tirx.IntImm) or weight_bytes(realize) > max_weight_bytes:
        return None
    domains = {n.loop_var: tvm.ir.Range.from_min_extent(n.min, n.extent) for n in _walk(func.body, tirx.For)}
    levels = loop_levels(realize, loop, domains)
    if levels is None:
        return None
    order = _rows_first_order(levels)
    if order == levels:
        return None
    dtype = str(loop.loop_var.ty.dtype)
    const = lambda v: tirx.const(v, dtype)  # noqa: E731
    g = tirx.Var(loop.loop_var.name, dtype)
    f_of_g, stride = const(0), 1
    for lower, extent, _ in reversed(order):  # innermost first
        digit = g // const(stride) if stride > 1 else g
        if stride * extent < int(loop.extent):
            digit = digit % const(extent)
        f_of_g, stride = f_of_g + digit * const(lower), stride * extent
    analyzer = tvm.sym.Analyzer()
    for var, rng in domains.items():
        if not var.same_as(loop.loop_var):
            analyzer.bind(var, rng)
    analyzer.bind(g, tvm.ir.Range.from_min_extent(const(0), loop.extent))

    def simplified(r):
        return s_tir.SBlockRealize([analyzer.simplify(v) for v in r.iter_values], analyzer.simplify(r.predicate),
                                   r.block)

    body = tvm_ffi.structural_map(loop.body, [(tirx.Var, lambda v: f_of_g if v.same_as(loop.loop_var) else v)],
                                  order="post")
    body = tvm_ffi.structural_map(body, [(s_tir.SBlockRealize, simplified)], order="post")
    new_loop = tirx.For(g, loop.min, loop.extent, loop.kind, body, loop.thread_binding, loop.annotations)
    new_body = tvm_ffi.structural_map(func.body, [(tirx.For, lambda n: new_loop if n.same_as(loop) else n)],
                                      order="pre")
    return scheduled_like(func.with_body(new_body), func)


@tvm.transform.module_pass(opt_level=0, name="RowsFirstConv2d")
class RowsFirstConv2d:
    """:func:`rows_first` on every PrimFunc of the module it applies to (the others are left as they are)."""

    def __init__(self, max_weight_bytes: int = MAX_WEIGHT_BYTES):
        self.max_weight_bytes = max_weight_bytes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        moved = {gv: rows_first(func, self.max_weight_bytes) for gv, func in mod.functions_items()
                 if isinstance(func, tirx.PrimFunc)}
        return with_functions(mod, {gv: func for gv, func in moved.items() if func is not None})
