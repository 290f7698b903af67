"""ScheduleLayoutKernels: a fixed schedule for the layout kernels of the packed int8 conv2d (quantize + repack,
pack, unpack), so they are fast without tuning and MetaSchedule spends no trials on them.

:class:`passes.int8_layout.Int8Layout` emits, around every packed conv2d, kernels that only move and convert data:
``vnni_quantize_repack`` (float NCHW[ob]c -> uint8 NCHW[ic_bn]c, zero padded), ``vnni_pack_float`` and
``vnni_unpack`` (and FuseOps' fusions of them with a slice or pad). Tuned by MetaSchedule they stayed scalar: on an
AVX2 Zen 3 the 10 calls of the first repack (16 channels, 32 x 32) took 12.7 us each with the tuned schedule
against 3.3 us with this one, and the layout kernels were ~17 % of the pruned ResNet56's int8 latency. The
schedule is the one every injective kernel wants: producers inlined into the one output block, the innermost
axis vectorized (the channel block: 8 or 16 lanes), the rest fused and parallel only where the kernel is large
enough for a second thread to pay for waking it (:data:`PARALLEL_MIN_ELEMENTS`; inside one thread-pool launch,
where the threads are awake, :data:`LAUNCH_PARALLEL_MIN_ELEMENTS`: :func:`targets.pipeline.legalize_passes`).

The pass runs after FuseTIR (:func:`targets.pipeline.legalize_passes`) and marks each kernel it scheduled
``tirx.is_scheduled``: MetaScheduleApplyDatabase leaves them alone, and ``tune`` does not extract them. The
conv2d kernels and everything else are untouched.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from passes import vnni
from passes.patterns import is_scheduled, with_functions

__all__ = ["ScheduleLayoutKernels", "is_layout_kernel", "schedule_injective", "PARALLEL_MIN_ELEMENTS",
           "LAUNCH_PARALLEL_MIN_ELEMENTS"]

# below this many output elements a kernel runs on one thread: measured on a 2-core Zen 3 (time_evaluator, hot),
# a 64 x 8 x 8 repack took 1.0 us serial and 2.5 us parallel on 2 threads; a 16 x 34 x 34 one 3.3 us and 2.8 us
PARALLEL_MIN_ELEMENTS = 16384
# the same for kernels that run inside one thread-pool launch (passes.parallel_launch: every x86 int8 target), where
# a parallel loop costs a barrier (~0.2 us), not waking the pool; a serial kernel there also runs on the first thread
# only, so the next kernel's other thread reads all of its output from the first core's cache. Shipped model,
# x86-64-v3, 2 threads, traced per kernel (benchmarks/layout_in_launch.md): the 4 x 16 x 16 x 8 shortcut pack
# 2.0 -> 1.0 us and the conv2d reading it 7.1 -> 4.8 us, a 2 x 18 x 18 x 16 repack 2.6 -> 1.0 us; the 4,096-element
# ones were slower parallel (0.4 -> 0.9 us)
LAUNCH_PARALLEL_MIN_ELEMENTS = 8192
_LAYOUT_NAMES = (vnni.REPACK_NAME, vnni.FLOAT_PACK_NAME, vnni.UNPACK_NAME, vnni.PAD_NAME)
_VECTOR_LANES = (8, 4)  # 8: the channel block every packed tensor has (ob 8 or 16), so loads stay contiguous


def is_layout_kernel(name: str, func) -> bool:
    """A PrimFunc :class:`~passes.int8_layout.Int8Layout` emitted to move data (alone or fused with slices and
    pads), not yet scheduled (one with a reduction in it fails :func:`schedule_injective` and stays as it is)."""
    if not isinstance(func, tirx.PrimFunc) or vnni.CONV_NAME in name:
        return False
    if not any(k in name for k in _LAYOUT_NAMES):
        return False
    return not is_scheduled(func)


def _extent(sch, loop) -> int | None:
    try:
        return int(sch.get(loop).extent)
    except TypeError:
        return None


def schedule_injective(func, parallel_min: int = PARALLEL_MIN_ELEMENTS):
    """``func`` (a PrimFunc of spatial blocks only) with every block but the last inlined, its innermost axis
    vectorized and the others fused (parallel when the output has ``parallel_min`` elements or more); None where
    the function does not have that shape (a symbolic extent, a block that cannot be inlined)."""
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        for block in reversed(blocks[:-1]):
            sch.compute_inline(block)
        out = sch.get_child_blocks(sch.get_sblock("root"))
        if len(out) != 1:
            return None
        loops = sch.get_loops(out[0])
        extents = [_extent(sch, lp) for lp in loops]
        if not loops or any(e is None for e in extents):
            return None
        inner = loops[-1]
        lanes = next((v for v in _VECTOR_LANES if extents[-1] % v == 0), None)
        if lanes is not None:
            outer_inner, inner = sch.split(inner, [None, lanes]) if extents[-1] != lanes else (None, inner)
            sch.vectorize(inner)
            rest = list(loops[:-1]) + ([outer_inner] if outer_inner is not None else [])
        else:
            rest = list(loops)
        total = 1
        for e in extents:
            total *= e
        # the outer loops fused, the two before the vector kept apart: fusing them too buries the vector loads
        # under a div / mod chain (the first repack of the ResNet56: 11 us all fused, 7 us one kept, 3.3 us two)
        outer = rest[:-2] if len(rest) > 2 else rest[:1]
        if outer:
            fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            if total >= parallel_min:
                sch.parallel(fused)
    except Exception:  # noqa: BLE001 - a ScheduleError: not a plain injective kernel, left to MetaSchedule
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


@tvm.transform.module_pass(opt_level=0, name="ScheduleLayoutKernels")
class ScheduleLayoutKernels:
    """Schedule the packed int8 layout kernels of a legalized module (:func:`schedule_injective`); each keeps its
    name and signature."""

    def __init__(self, parallel_min: int = PARALLEL_MIN_ELEMENTS):
        self.parallel_min = parallel_min

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not is_layout_kernel(gv.name_hint, func):
                continue
            scheduled = schedule_injective(func, self.parallel_min)
            if scheduled is not None:
                updates[gv] = scheduled
        return with_functions(mod, updates)
