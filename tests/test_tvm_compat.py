"""compiler.tuning.tvm_compat: the workarounds for TVM 0.27's MetaSchedule each do what they stand in for."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from compiler.tuning import database

from conftest import ROOT


def test_builder_cross_compiles_for_aarch64():
    """Board targets: the builder links each candidate for aarch64 with zig (targets.export), here, no board."""
    import targets
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.script import tirx as T

    from compiler.tuning.tvm_compat import make_builder

    @T.prim_func(s_tir=True)
    def add_one(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for i in range(64):
            with T.sblock("b"):
                vi = T.axis.remap("S", [i])
                b[vi] = a[vi] + T.float32(1)

    import tvm

    spec = targets.get("aarch64-cpu")
    builder = make_builder(spec, max_workers=1)
    try:
        (result,) = builder.build([BuilderInput(tvm.IRModule({"main": add_one}), database.tune_target(spec))])
    finally:
        builder.close()
    assert result.error_msg is None, result.error_msg
    head = Path(result.artifact_path).read_bytes()[:20]
    assert result.artifact_path.endswith(".so") and head[:4] == b"\x7fELF"
    assert int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    shutil.rmtree(Path(result.artifact_path).parent, ignore_errors=True)


def test_preload_registers_only_the_cpu_tensor_intrinsics():
    """CPU targets: tvm.s_tir.tensor_intrin is a bare package with its x86 and Arm halves (TuneContext's import of
    it is then a no-op, not a minute of CUDA / ROCm / Hexagon intrinsics); CUDA targets are left to TVM."""
    code = """if True:
        import sys
        import targets
        from compiler.tuning.tvm_compat import TENSOR_INTRIN, preload_cpu_tensor_intrinsics

        preload_cpu_tensor_intrinsics(targets.get("jetson-tx2"))
        assert TENSOR_INTRIN not in sys.modules  # CUDA: TVM's own full import, later
        preload_cpu_tensor_intrinsics(targets.get("host"))
        assert TENSOR_INTRIN + ".x86" in sys.modules and TENSOR_INTRIN + ".arm_cpu" in sys.modules
        assert TENSOR_INTRIN + ".cuda" not in sys.modules
        import tvm.s_tir.tensor_intrin  # what TuneContext does: the preloaded package
        assert sys.modules[TENSOR_INTRIN].__doc__.startswith("Intrinsics for tensorization (CPU subset")
        from tvm.s_tir import TensorIntrin
        TensorIntrin.get("dot_16x4_avx512")  # the x86 intrinsics are registered
    """
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=600)


def test_register_tensor_intrinsics_is_idempotent():
    from tvm.s_tir import TensorIntrin

    from compiler.tuning.tvm_compat import register_tensor_intrinsics
    from passes import vnni

    register_tensor_intrinsics()
    register_tensor_intrinsics()
    for name in (*vnni.OC_BLOCKS.values(), vnni.AVX512_NAME, vnni.AVX2_NAME):
        assert TensorIntrin.get(name) is not None


def test_quiet_metaschedule_sets_unnamed_handlers_aside():
    """MetaSchedule's logger set-up formats every handler's name: an unnamed one (pytest's, a user's) is set
    aside while tuning runs and comes back after, with the level."""
    from compiler.tuning.tvm_compat import quiet_metaschedule

    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed, braces, named = logging.NullHandler(), logging.NullHandler(), logging.NullHandler()
    braces.set_name("{mine}")
    named.set_name("mine")
    level = lg.level
    for h in (unnamed, braces, named):
        lg.addHandler(h)
    try:
        with quiet_metaschedule():
            assert unnamed not in lg.handlers and braces not in lg.handlers and named in lg.handlers
            assert lg.level == logging.WARNING
        assert unnamed in lg.handlers and braces in lg.handlers and lg.level == level
    finally:
        for h in (unnamed, braces, named):
            lg.removeHandler(h)
