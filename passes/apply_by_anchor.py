"""ApplyByAnchor: tuning records applied to kernels that differ from the tuned one only around the conv2d.

MetaScheduleApplyDatabase applies a record to a PrimFunc structurally equal to the one it was tuned on. A fused
kernel is its anchor block (the conv2d or matmul: the reduction that carries the FLOPs) plus an epilogue FuseOps
put around it, and the epilogue changes whenever a graph pass changes what follows the conv2d (a quantize taken
into the epilogue by :class:`passes.int8_layout.Int8Layout`, a residual add or not) although the conv2d, and its
best schedule, do not. MetaSchedule has the means (``module_equality="anchor-block"`` and
``schedule_using_anchor_trace``: the anchor's part of the trace replayed, the other blocks inlined or
parallelized), but its Database.QuerySchedule replays the trace on the stored workload, not the one asked for.

This pass runs after MetaScheduleApplyDatabase: every PrimFunc still unscheduled whose anchor block a record of
``database`` was tuned on (the best such record) gets that record's trace by
``tvm.s_tir.meta_schedule.schedule_using_anchor_trace``, and is marked ``tirx.is_scheduled``; a kernel the trace
does not replay on is left for the fallback schedule (never an error). Exact records always win: they were
applied before.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from passes.patterns import is_scheduled, scheduled_like, with_functions

__all__ = ["ApplyByAnchor", "by_anchor_block"]


def by_anchor_block(database):
    """An in-memory MetaSchedule database with ``database``'s records keyed by anchor block (each anchor's best
    record wins): ``database`` must list its records (a JSON or memory database, not a union)."""
    from tvm.s_tir import meta_schedule as ms

    out = ms.database.MemoryDatabase(module_equality="anchor-block")
    for record in database.get_all_tuning_records():
        workload = out.commit_workload(record.workload.mod)
        out.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target,
                                                          record.args_info))
    return out


@tvm.transform.module_pass(opt_level=0, name="ApplyByAnchor")
class ApplyByAnchor:
    """Schedule the unscheduled PrimFuncs with the records of ``databases`` (each a database of
    :func:`by_anchor_block`; the first that has the kernel's anchor wins), under ``target`` (default: the current
    target)."""

    def __init__(self, *databases, target=None):
        self.databases, self.target = databases, target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        from tvm import s_tir
        from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace

        target = self.target if self.target is not None else tvm.target.Target.current()
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            query = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            for db in self.databases:
                record = db.query_tuning_record(query, target, gv.name_hint)
                if record is None:
                    continue
                sch = s_tir.Schedule(query)
                try:
                    schedule_using_anchor_trace(sch, record.trace, target)
                except Exception:  # noqa: BLE001 - the trace does not replay here: the fallback schedule takes it
                    continue
                updates[gv] = scheduled_like(sch.mod["main"], func)
                break
        return with_functions(mod, updates)
