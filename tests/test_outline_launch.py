"""OutlineLaunchLoops: each parallel loop of a merged launch calls one function per kernel (its body, shared by every
call of that kernel), and the module computes exactly what the launch with the kernels' code inside it did."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from compiler import threads
from helpers import elementwise_kernel, shipped_lowered, skip_unless_this_cpu_runs
from passes.outline_launch import OUTLINED, KeepLoopsInternal, OutlineLaunchLoops, outline_launch
from passes.parallel_launch import MergeParallelLaunches

SHAPE = (64, 64)


def _chain() -> tvm.IRModule:
    """main(x) = (2 * (2x) + x) * 2: the doubling kernel three times, an add once."""
    double = elementwise_kernel(lambda a: a * 2.0, 1, SHAPE)
    add = elementwise_kernel(lambda a, b: a + b, 2, SHAPE)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(SHAPE), "float32"))
    ty = relax.TensorType(list(SHAPE), "float32")
    with bb.function("main", [x]):
        with bb.dataflow():
            gd, ga = bb.add_func(double, "double"), bb.add_func(add, "add")
            a = bb.emit(relax.call_tir(gd, [x], ty))
            b = bb.emit(relax.call_tir(gd, [a], ty))
            c = bb.emit(relax.call_tir(ga, [b, x], ty))
            out = bb.emit_output(bb.emit(relax.call_tir(gd, [c], ty)))
        bb.emit_func_output(out)
    return bb.get()


def _build_and_run(mod, x, n_threads):
    """``mod`` built as ``targets.pipeline`` builds: Relax's pipeline, then the outlined functions kept internal."""
    target = tvm.target.Target({"kind": "llvm"})
    with target:
        lowered = KeepLoopsInternal()(relax.get_default_pipeline(target)(mod))
    ex = relax.build(lowered, target=target, relax_pipeline=None)
    threads.set_tvm(n_threads)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()


def test_a_launch_calls_one_function_per_kernel_and_computes_the_same():
    merged = MergeParallelLaunches()(_chain())
    after = OutlineLaunchLoops()(merged)
    outlined = [gv.name_hint for gv, f in after.functions_items()
                if isinstance(f, tirx.PrimFunc) and f.attrs is not None and OUTLINED in f.attrs]
    assert len(outlined) == 2, outlined  # the doubling kernel's body once for its three calls, the add's once
    launch = after["fused_launch"].script()
    assert launch.count("fused_launch_loop") == 4 and "T.parallel" in launch
    x = np.random.default_rng(0).standard_normal(SHAPE).astype("float32")
    for n in (1, 2):
        np.testing.assert_array_equal(_build_and_run(after, x, n), (2 * (2 * x) + x) * 2)
    lowered = KeepLoopsInternal()(relax.get_default_pipeline(tvm.target.Target({"kind": "llvm"}))(after))
    assert all("global_symbol" not in lowered[name].attrs for name in outlined)  # called directly, not packed


@T.prim_func(private=True, s_tir=True)
def scratch(x: T.Buffer((8, 64), "float32"), y: T.Buffer((8, 64), "float32")):
    T.func_attr({"tirx.is_scheduled": True})
    with T.attr(0, "pragma_parallel_launch_point", 1):
        for i in T.parallel(8, annotations={"pragma_auto_unroll_max_step": 16}):
            with T.sblock("row"):
                small = T.sblock_alloc_buffer((64,), "float32", scope="local")  # 256 bytes: on the stack
                for j in range(64):
                    small[j] = x[i, j] * T.float32(2)
                for j in range(64):
                    y[i, j] = small[j] + T.float32(1)
        for i in T.parallel(8):
            with T.sblock("wide"):
                large = T.sblock_alloc_buffer((512,), "float32")  # 2 KB: a workspace, which needs the launch
                for j in range(64):
                    large[j * 8] = y[i, j]
                for j in range(64):
                    y[i, j] = large[j * 8] * T.float32(3)


def test_scratch_moves_to_the_stack_a_workspace_keeps_its_loop_in_the_launch():
    functions = []
    after = outline_launch(scratch, functions, "k")
    assert len(functions) == 1  # the first loop only
    sub = functions[0][1].script()
    assert 'scope="local"' not in sub and "small" in sub  # now a "global" buffer: LowerTVMBuiltin stacks it
    assert "pragma_auto_unroll_max_step" in sub  # the loop's pragma goes with its body
    text = after.script()
    assert text.count("k0(") == 1 and "large" in text  # loop 1 calls k0 (each thread its share); loop 2 stays


@pytest.fixture(scope="module")
def shipped_v3():
    return shipped_lowered("x86-64-v3", "int8")


def test_the_shipped_avx2_launch_calls_a_function_per_kernel(shipped_v3):
    """Compiled nowhere (any CPU): the launch's ~60 parallel loops call ~20 functions (one per distinct kernel), the
    dot products are all in those, and each keeps its record's unroll pragma. (Regression: outlined without the
    parallel loop's pragmas, the records' inner loops stayed rolled, accumulators went through memory around every
    vpmaddubsw, and the stage-3 48-channel kernel ran 28 us against 22 inline; the stem conv2d 224 against 16.)"""
    launch = shipped_v3["fused_launch"].script()
    functions = {gv.name_hint: f for gv, f in shipped_v3.functions_items()
                 if isinstance(f, tirx.PrimFunc) and f.attrs is not None and OUTLINED in f.attrs}
    calls = re.findall(r"\b(fused_launch_loop\d+)\(", launch)
    assert len(calls) >= 55 and 15 <= len(functions) <= 30 and set(calls) == set(functions), (len(calls), functions)
    assert "pmadd.ub.sw" not in launch
    assert sum("pmadd.ub.sw" in f.script() for f in functions.values()) >= 15
    # each loop's pragmas (the records' unroll steps) are statements around its function's body
    import tvm_ffi

    pragmas = {}
    for name, f in functions.items():
        found = set()
        tvm_ffi.structural_walk(f.body, [(tirx.AttrStmt, lambda a: found.add((a.attr_key, int(a.value)))
                                          if a.attr_key.startswith("pragma_") else None)])
        pragmas[name] = found

    annotated = []

    def check(loop):
        if loop.kind == tirx.ForKind.PARALLEL and isinstance(loop.body, tirx.Evaluate):
            name = loop.body.value.op.name_hint
            wanted = {(k, int(v)) for k, v in (loop.annotations or {}).items() if k.startswith("pragma_")}
            assert wanted <= pragmas[name], (name, wanted, pragmas[name])
            annotated.append(bool(wanted))

    tvm_ffi.structural_walk(shipped_v3["fused_launch"].body, [(tirx.For, check)])
    assert sum(annotated) >= 50, annotated  # the tuned conv2d kernels' loops


def test_the_shipped_avx2_launch_runs_no_large_layout_kernel_on_one_thread(shipped_v3):
    """The statements the launch runs on its first thread only (``serial_part``) store into small buffers alone: the
    shortcut pack of 8,192 elements and the 10,368-element repack are parallel loops (passes/schedule_layout.py,
    LAUNCH_PARALLEL_MIN_ELEMENTS). (Regression: run on the first thread, the next conv2d's second thread read all
    of the pack from the first core's cache: 7.1 us against 4.8 in the trace.)"""
    import math

    import tvm_ffi

    from passes.parallel_launch import BORDER_ANNOTATION

    def sizes(stmt, into):
        tvm_ffi.structural_walk(stmt, [(tirx.BufferStore, lambda s: into.append(
            (s.buffer.name, math.prod(int(d) for d in s.buffer.shape))))])

    serial = []  # what the first thread stores, but the zero borders of padded buffers (passes/fuse_pad.py)

    def visit(loop):
        if loop.kind == tirx.ForKind.PARALLEL and loop.loop_var.name == "serial_part":
            sizes(tvm_ffi.structural_map(loop.body, [(tirx.For, lambda n: tirx.Evaluate(0) if BORDER_ANNOTATION in (
                n.annotations or {}) else n)], order="post"), serial)

    tvm_ffi.structural_walk(shipped_v3["fused_launch"].body, [(tirx.For, visit)])
    assert serial and max(n for _, n in serial) <= 4096, sorted(set(serial))  # 8,192 and 10,368 are not there
    functions = [f for f in shipped_v3.functions.values() if isinstance(f, tirx.PrimFunc) and f.attrs is not None
                 and OUTLINED in f.attrs]
    packs = []
    for f in functions:
        sizes(f.body, packs)
    assert any("pack_float" in name and n == 8192 for name, n in packs), sorted(set(packs))


def test_the_shipped_avx2_module_computes_the_same_outlined():
    """Built as build builds it, with the loops outlined and without: the same logits bit for bit, at 1 and 2
    threads (the same statements, in the same order)."""
    import targets
    from compiler import zoo
    from compiler.build import lower
    from compiler.tuning import database as tdb
    from targets import pipeline

    skip_unless_this_cpu_runs("x86-64-v3")
    spec = targets.get("x86-64-v3")
    ckpt = zoo.load("resnet56", None, None, quiet=True)
    lowered = lower(ckpt.model, 1, "int8", spec, data_dir=None, normalize=ckpt.normalize, untrained=False,
                    shipped=zoo.calibration(ckpt, 512))
    database, _ = tdb.find_database(spec, ckpt.model_name, tdb.variant_of(lowered.module, "int8"))
    library, _ = tdb.find_library(spec, "int8", 1)
    schedules = tdb.combine(database, library)
    step = pipeline._outline_launches
    exes = [targets.compile_module(lowered.module, spec, database=schedules)]
    pipeline._outline_launches = lambda target: []
    try:
        exes.append(targets.compile_module(lowered.module, spec, database=schedules))
    finally:
        pipeline._outline_launches = step
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32"))
    for n in (1, 2):
        threads.set_tvm(n)
        outlined, inline = (relax.VirtualMachine(ex, tvm.cpu())["main"](x).numpy() for ex in exes)
        np.testing.assert_array_equal(outlined, inline)
