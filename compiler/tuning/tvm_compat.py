"""Every workaround this project needs for TVM 0.27's MetaSchedule, in one place (tested in tests/test_tvm_compat.py).

- :func:`register_tensor_intrinsics`: this project's x86 int8 tensor intrinsics (defined in :mod:`passes.vnni`:
  TVM 0.27's own VNNI intrinsic does not build with its LLVM) must be registered before a database whose traces
  tensorize with them is loaded or applied.
- :func:`preload_cpu_tensor_intrinsics`: ``import tvm.s_tir.tensor_intrin`` (done by every TuneContext) loads
  every backend's intrinsics, ~60 s here; CPU targets get only the CPU half.
- :func:`make_builder`: MetaSchedule's LocalBuilder starts a fresh worker pool for every batch and its worker
  imports all tensor intrinsics (tens of seconds counted against the build timeout); a copy of its worker with
  one pool per session, cross-compiling and cross-linking for the target.
- :func:`quiet_metaschedule`: MetaSchedule's logger set-up breaks on a logging handler without a name.

Each is a stand-in for something TVM does itself; with a TVM that fixes one, it can go without other changes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import tempfile

BUILD_TIMEOUT_S = 120.0  # one candidate's compile (the worker's start-up is not counted)
TENSOR_INTRIN = "tvm.s_tir.tensor_intrin"


def register_tensor_intrinsics() -> None:
    """Register this project's CPU tensor intrinsics (passes.vnni: vpdpbusd, vpmaddubsw) so that
    MetaScheduleApplyDatabase can replay tuned traces that tensorize with them (cheap; idempotent)."""
    from passes import vnni

    vnni.register()


def preload_cpu_tensor_intrinsics(spec) -> None:
    """Register only the CPU tensor intrinsics before MetaSchedule's TuneContext imports them all.

    ``import tvm.s_tir.tensor_intrin`` registers every backend's intrinsics; its CUDA, ROCm and Hexagon halves
    take ~50 of its ~60 s here (measured with -X importtime) and a CPU target's schedule rules never use them.
    For CPU targets the package is entered into sys.modules as a bare package holding the x86 and Arm
    intrinsics, so TuneContext's import is a no-op; any later ``import tvm.s_tir.tensor_intrin.cuda`` still
    loads that submodule normally. CUDA targets get the full import. Failing that, TVM does its own import.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = TENSOR_INTRIN
    if spec.kind != "cpu" or name in sys.modules:
        return
    try:
        found = importlib.util.find_spec(name)
        pkg = types.ModuleType(name, "Intrinsics for tensorization (CPU subset, see compiler.tuning.tvm_compat)")
        pkg.__path__ = list(found.submodule_search_locations)
        pkg.__package__ = name
        pkg.__spec__ = found
        sys.modules[name] = pkg
        importlib.import_module(name + ".x86")
        importlib.import_module(name + ".arm_cpu")
    except Exception:  # noqa: BLE001 - fall back to TVM's full import
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


@contextlib.contextmanager
def quiet_metaschedule():
    """MetaSchedule logs every round to stdout; keep that in work_dir/logs and only warnings on the console."""
    import logging

    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    old = lg.level
    # MetaSchedule's logger set-up (logging.create_loggers) re-lists this logger's handlers by name through
    # str.format: a handler without a name (pytest's capture handler, a user's own) or with braces in it breaks
    # it with "'NoneType' object has no attribute 'format'". Such handlers are set aside while tuning runs.
    foreign = [h for h in lg.handlers if h.get_name() is None or "{" in h.get_name() or "}" in h.get_name()]
    for h in foreign:
        lg.removeHandler(h)
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(old)
        for h in foreign:
            lg.addHandler(h)


# ---------------------------------------------------------------------------------------------------------------
# the builder: MetaSchedule's LocalBuilder worker, one pool per session


def _build_candidate(mod, target, _params, cuda_arch=None):
    """Compile one candidate in a builder worker: MetaSchedule's default_build without its import of
    tvm.s_tir.tensor_intrin (tens of seconds per fresh worker, and counted against the build timeout)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    if cuda_arch is None:
        return tvm_build(mod, target=target)
    from targets.cuda import cuda_compile_callback

    with cuda_compile_callback(cuda_arch):  # the board's sm with NVRTC 11.8, as build does
        return tvm_build(mod, target=target)


def _export_candidate(rt_mod, zig_target=None):
    """Write a candidate for the runner: a tar of objects (the measuring machine links it) for targets this
    machine's compiler links, a shared library cross-linked with zig (targets.export) for aarch64 boards."""
    workdir = tempfile.mkdtemp(prefix="tune-")
    if zig_target is None:
        from tvm.support.tar import tar

        path = os.path.join(workdir, "tvm_tmp_mod." + tar.output_format)
        rt_mod.export_library(path, fcompile=tar)
        return path
    from targets.export import zig_fcompile

    path = os.path.join(workdir, "tvm_tmp_mod.so")
    rt_mod.export_library(path, fcompile=zig_fcompile(zig_target))
    return path


def make_builder(spec, max_workers: int, timeout_sec: float = BUILD_TIMEOUT_S):
    """A MetaSchedule builder with one worker pool for the whole session (LocalBuilder starts a fresh pool for
    every batch). Call ``.close()`` when done."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    f_build = _build_candidate
    if spec.kind == "cuda":
        f_build = functools.partial(_build_candidate, cuda_arch=spec.cuda_arch)
    f_export = _export_candidate
    if spec.cross_compiled:
        f_export = functools.partial(_export_candidate, zig_target=f"{spec.triple}.{spec.glibc}")

    @derived_object
    class SessionBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec,
                                          maximum_process_uses=256, stdout=subprocess.DEVNULL)

        def build(self, build_inputs):
            results = []
            jobs = [(f_build, f_export, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            for r in self.pool.map_with_error_catching(lambda x: _worker_func(*x), jobs):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"builder: timeout, killed after {timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, f"builder: an exception occurred\n{r.value}"))
            return results

        def close(self):
            self.pool.shutdown(wait=False)

    return SessionBuilder()
