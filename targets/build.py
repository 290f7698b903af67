"""Relax IRModule -> TVM Executable for a named target, with the passes of :mod:`targets.pipeline`.

CUDA targets: TVM's CUDA legalization, then (optionally) the schedules of a MetaSchedule tuning database, then
DLight's default GPU rules ending in ``Fallback`` so that *every* PrimFunc gets thread bindings - a function no
rule schedules would otherwise be compiled as host code without a word (:func:`unscheduled_gpu_functions` checks).
CPU targets: TVM's default pipeline for the target (with the tuning database applied after legalization when one
is given).

Board targets compile their CUDA C at build time for the board's sm with NVRTC 11.8 (:mod:`targets.cuda`).
"""

from __future__ import annotations

import contextlib

import tvm
from tvm import relax

from targets import TargetSpec
from targets.cuda import cuda_compile_callback
from targets.pipeline import compile_target


def relax_pipeline(spec: TargetSpec, database=None) -> tvm.transform.Pass:
    """The Relax pass pipeline for ``spec`` (a module pass; run it under the target, as compile_module does):
    :meth:`targets.pipeline.Pipeline.lowering`."""
    from targets.pipeline import pipeline

    return pipeline(spec).lowering(database)


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
    target = compile_target(spec)  # the spec's target, with the LLVM options a merged launch needs
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
