"""ParallelFallback: a schedule for the CPU kernels nothing else scheduled: the leading spatial loops of each block
fused and run on the thread pool.

Without a tuning record a CPU PrimFunc is compiled as TVM legalized it: one serial loop nest on one core. That is
what an untuned host build runs, what calibration runs (the fp32 module at batch 64 over the calibration images)
and what a board build's host check runs. Parallelizing the outer spatial loops (batch x output channels x rows
for a conv2d) is always legal, costs nothing to find, and uses every core; MetaSchedule's records, where they exist,
are applied before it and win (it skips scheduled functions, as every DLight rule does). A block with less work
than :data:`MIN_PARALLEL_ITERATIONS` stays serial: waking the pool costs about 2 us, more than a small
elementwise kernel takes on one core.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func

__all__ = ["MIN_PARALLEL_ITERATIONS", "ParallelFallback", "ParallelSpatial"]

MIN_PARALLEL_ITERATIONS = 4096  # iterations of a block's whole loop nest (about 4 us of scalar work)


def _iterations(sch: s_tir.Schedule, loops) -> int | None:
    """The product of the loops' extents; None when one is symbolic (a dynamic batch: assumed large)."""
    total = 1
    for loop in loops:
        extent = sch.get(loop).extent
        if not isinstance(extent, tirx.IntImm):
            return None
        total *= int(extent.value)
    return total


class ParallelSpatial(dl.ScheduleRule):
    """Each block's leading spatial loops fused into one parallel loop (blocks nested in another block's loops,
    without a spatial loop, or with less than :data:`MIN_PARALLEL_ITERATIONS` of work are left as they are)."""

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        changed = False
        for info in infos:
            kinds = info.dom_kind()
            leading = len(kinds) - len(kinds.lstrip("S"))
            loops = sch.get_loops(info.block_rv)
            if leading == 0 or len(loops) < leading:
                continue
            work = _iterations(sch, loops)
            if work is not None and work < MIN_PARALLEL_ITERATIONS:
                continue
            try:
                outer = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
                sch.parallel(outer)
                changed = True
            except Exception:  # noqa: BLE001 - a loop nest this rule does not fit stays serial
                continue
        return sch if changed else None


@tvm.transform.module_pass(opt_level=0, name="ParallelFallback")
class ParallelFallback:
    """DLight's ApplyDefaultSchedule with :class:`ParallelSpatial`: run under a CPU target (``with target:``).
    ApplyDefaultSchedule writes the scheduled functions into the module it is given; this pass gives it a copy, so
    the caller's module is left as it was."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        fresh = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs, global_infos=mod.global_infos)
        return dl.ApplyDefaultSchedule(ParallelSpatial())(fresh)
