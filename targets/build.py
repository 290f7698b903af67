"""Relax IRModule -> TVM Executable for a named target.

CUDA targets: TVM's CUDA legalization, then (optionally) the schedules of a MetaSchedule tuning database, then
DLight's default GPU rules ending in ``Fallback`` so that *every* PrimFunc gets thread bindings - a function no
rule schedules would otherwise be compiled as host code without a word. CPU targets: TVM's default pipeline for
the target (with the tuning database applied after legalization when one is given).

Board targets compile their CUDA C at build time for the board's sm with NVRTC 11.8 (:mod:`targets.cuda`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import tvm
from tvm import relax

from compiler.errors import UserError
from targets import TargetSpec
from targets.cuda import cuda_compile_callback


def _gpu_rules():
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(
        dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback(),
    )


def _stages(spec: TargetSpec):
    """TVM's per-backend stage lists (the pipeline modules themselves: TVM 0.27's dispatchers in
    tvm.relax.pipeline reach for ``backend.cuda.dataflow_lower_passes``, which the package does not export)."""
    import importlib

    backend = "cuda" if spec.kind == "cuda" else "cpu_generic"
    return importlib.import_module(f"tvm.relax.backend.{backend}.pipeline")


def open_database(database):
    """A MetaSchedule database from a Database object or a work dir holding database_workload.json +
    database_tuning_record.json (the layout of tuning_logs/<target>/<model>-<variant>/)."""
    if database is None:
        return None
    from tvm.s_tir import meta_schedule as ms

    # loading int8 records parses traces that tensorize with them, and MetaScheduleApplyDatabase replays them
    register_tensor_intrinsics()
    if isinstance(database, ms.database.Database):
        return database
    work_dir = Path(database)
    missing = [n for n in ("database_workload.json", "database_tuning_record.json") if not (work_dir / n).is_file()]
    if missing:
        raise UserError(f"tuning database {work_dir} has no {' or '.join(missing)}")
    return ms.database.JSONDatabase(
        path_workload=str(work_dir / "database_workload.json"),
        path_tuning_record=str(work_dir / "database_tuning_record.json"),
        allow_missing=False,
    )


def register_tensor_intrinsics() -> None:
    """Register this project's CPU tensor intrinsics (passes.vnni's vpdpbusd) so that MetaScheduleApplyDatabase
    can replay tuned traces that tensorize with them (cheap; idempotent)."""
    from passes import vnni

    vnni.register()


def relax_pipeline(spec: TargetSpec, database=None) -> tvm.transform.Pass:
    """The Relax pass pipeline for ``spec`` (a module pass; run it under the target, as compile_module does)."""
    target = spec.tvm_target()
    db = open_database(database)
    if spec.kind == "cpu" and db is None:
        return relax.get_default_pipeline(target)

    stages = _stages(spec)
    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    tuned = [relax.transform.MetaScheduleApplyDatabase(enable_warning=False)] if db is not None else []
    schedule = [_gpu_rules()] if spec.kind == "cuda" else []

    @tvm.transform.module_pass(opt_level=0, name=f"targets.pipeline.{spec.name}")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        scope = db if db is not None else contextlib.nullcontext()
        with target, scope:
            seq = tvm.transform.Sequential(
                stages.library_dispatch_passes(target) + legalize + tuned + schedule
                + stages.dataflow_lower_passes(target) + stages.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def unscheduled_gpu_functions(mod: tvm.IRModule) -> list[str]:
    """Device PrimFuncs of a lowered module that have no GPU thread binding (they would run as host code)."""
    from tvm import tirx

    bad = []
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs or {}
        if "tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"]) == 1:
            continue
        if "tirx.is_host_func" in attrs and int(attrs["tirx.is_host_func"]) == 1:
            continue  # meant for the host: VMShapeLower's shape functions (symbolic batch)
        text = func.script()
        if "threadIdx" not in text and "blockIdx" not in text:
            bad.append(gvar.name_hint)
    return bad


def compile_module(mod: tvm.IRModule, spec: TargetSpec, database=None):
    """Build ``mod`` (``main(x: (N,3,32,32) f32) -> (N,10)``) for ``spec``; returns a ``tvm.relax`` Executable.

    For NVRTC targets the CUDA compile callback is active during the build (it runs there when this machine has
    the CUDA runtime loaded; otherwise the CUDA C stays in the module and :func:`targets.export_library`
    compiles and embeds it). The executable carries ``targets_spec`` and ``targets_cuda`` (the
    :class:`targets.cuda.CompileRecord`, or None) for the export.
    """
    target = spec.tvm_target()
    with target:
        lowered = relax_pipeline(spec, database)(mod)
    if spec.kind == "cuda":
        bad = unscheduled_gpu_functions(lowered)
        if bad:
            raise RuntimeError(f"no GPU schedule for {', '.join(bad)}: they would run on the host CPU")
    ctx = (cuda_compile_callback(spec.cuda_arch) if spec.cuda_compiler == "nvrtc-11.8"
           else contextlib.nullcontext(None))
    with ctx as record:
        executable = relax.build(lowered, target=target, relax_pipeline=None)
    executable.targets_spec = spec
    executable.targets_cuda = record
    return executable
