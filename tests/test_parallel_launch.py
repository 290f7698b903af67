"""MergeParallelLaunches (issue 18 item 3): a run of small CPU kernels becomes one PrimFunc, one thread-pool launch
with barriers between the kernels, and computes exactly what the separate kernels did, on one thread and on two."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir, te, tirx

from compiler import threads
from helpers import elementwise_kernel
from passes.parallel_launch import BARRIER, LAUNCH_POINT, MergeParallelLaunches, launchable
from passes.patterns import call_tir_parts

SHAPE = (64, 64)


def _kernel(fn, arity: int, parallel: bool) -> tirx.PrimFunc:
    """An elementwise float32 kernel of ``arity`` inputs, scheduled: rows on the thread pool or serial."""
    return elementwise_kernel(fn, arity, SHAPE, parallel)


def _module(chain) -> tvm.IRModule:
    """main(x) applying ``chain``: [(kernel, [indices of earlier values it reads; 0 is x])]."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(SHAPE), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            values = [x]
            for k, (func, reads) in enumerate(chain):
                gv = bb.add_func(func, f"k{k}")
                values.append(bb.emit(relax.call_tir(gv, [values[r] for r in reads],
                                                     relax.TensorType(list(SHAPE), "float32"))))
            out = bb.emit_output(values[-1])
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x, n_threads):
    ex = relax.build(mod, target=tvm.target.Target({"kind": "llvm"}))
    threads.set_tvm(n_threads)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()


def _calls(mod) -> list[str]:
    calls = [call_tir_parts(b.value) for block in mod["main"].body.blocks for b in block.bindings]
    return [call[0].name_hint for call in calls if call is not None]


def test_a_chain_of_kernels_is_one_launch_and_computes_the_same():
    double = _kernel(lambda a: a * 2.0, 1, True)
    chain = [
        (double, [0]),                                     # a = 2x
        (_kernel(lambda a, b: a + b, 2, False), [1, 0]),   # b = a + x      (serial: the first thread's)
        (_kernel(lambda a, b: a - b, 2, True), [2, 1]),    # c = b - a      (reads two earlier values)
        (double, [3]),                                     # d = 2c         (the same kernel again)
        (_kernel(lambda a, b: a * b, 2, True), [4, 2]),    # e = d * b
    ]
    before = _module(chain)
    after = MergeParallelLaunches()(before)
    assert _calls(after) == ["fused_launch"]
    merged = after["fused_launch"]
    text = merged.script()
    assert text.count(LAUNCH_POINT) == 1 and text.count(BARRIER) == 4  # after each kernel but the last
    # params: x, e and the slots of a..d, by lifetime (last read: a by k2, b by k4, c by k3, d by k4): a and b
    # take two; c, written by k2 while a is still read there, a third; d, written by k3, a's again
    assert len(merged.params) == 2 + 3
    x = np.random.default_rng(0).standard_normal(SHAPE).astype("float32")
    a = 2 * x
    b = a + x
    want = (2 * (b - a)) * b
    for n in (1, 2):
        np.testing.assert_array_equal(_run(before, x, n), want)
        np.testing.assert_array_equal(_run(after, x, n), want)


def test_values_used_after_the_run_are_outputs_of_the_merged_kernel():
    double = _kernel(lambda a: a * 2.0, 1, True)
    chain = [(double, [0]), (double, [1]), (_kernel(lambda a, b: a + b, 2, True), [2, 1])]
    after = MergeParallelLaunches()(_module(chain))
    assert _calls(after) == ["fused_launch"]
    x = np.arange(np.prod(SHAPE), dtype="float32").reshape(SHAPE)
    for n in (1, 2):
        np.testing.assert_array_equal(_run(after, x, n), 4 * x + 2 * x)


def test_a_parallel_loop_under_a_serial_one_is_not_launchable():
    ins = te.placeholder(SHAPE, "float32", name="a")
    out = te.compute(SHAPE, lambda i, j: ins[i, j] + 1.0, name="out")
    sch = s_tir.Schedule(te.create_prim_func([ins, out]))
    _, j = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(j)  # every thread would run the serial row loop and split each row
    nested = sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
    assert not launchable(nested)
    assert launchable(_kernel(lambda a: a + 1.0, 1, True))
    assert not launchable(_kernel(lambda a: a + 1.0, 1, True).without_attr("tirx.is_scheduled"))
    # and a chain through it is left as it was
    chain = [(_kernel(lambda a: a * 2.0, 1, True), [0]), (nested, [1])]
    assert _calls(MergeParallelLaunches()(_module(chain))) == ["k0", "k1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    threads.set_tvm(threads.cores())


def test_int8_only_leaves_a_run_without_int8_conv2d_kernels():
    double = _kernel(lambda a: a * 2.0, 1, True)
    before = _module([(double, [0]), (double, [1])])
    assert _calls(MergeParallelLaunches(int8_only=True)(before)) == ["k0", "k0"]
    assert _calls(MergeParallelLaunches()(before)) == ["fused_launch"]


def _shipped_lowered(target_name: str, precision: str):
    """The shipped model as ``build`` lowers it, the merged launch holding every kernel's code (no outlining: that
    is ``tests/test_outline_launch.py``'s)."""
    from helpers import shipped_lowered

    return shipped_lowered(target_name, precision, outline=False)


@pytest.mark.parametrize("target_name", ["x86-64-v4-amx", "x86-64-v3"])
def test_builds_for_x86_merge_the_int8_module_and_leave_the_fp32_one(target_name):
    """The shipped pruned ResNet56 in int8 runs its kernels in one launch, on AMX and on AVX2 alike; in fp32 (no
    int8 conv2d; tuned kernels that ran no faster merged) nothing is merged. The lowering pipeline is built without
    the precision, so this is the check that the pass runs at all."""
    kernels = {}
    for precision in ("int8", "fp32"):
        low = _shipped_lowered(target_name, precision)
        kernels[precision] = [gv.name_hint for gv, f in low.functions_items() if isinstance(f, tirx.PrimFunc)]
        if precision == "int8":
            launch = next(f for gv, f in low.functions_items() if gv.name_hint == "fused_launch").script()
    # int8: the one launch, the classifier's matmul and (AMX) the input quantize before the first tile kernel
    assert "fused_launch" in kernels["int8"] and len(kernels["int8"]) <= 4, kernels["int8"]
    assert "fused_launch" not in kernels["fp32"] and len(kernels["fp32"]) >= 10, kernels["fp32"]  # distinct kernels
    if target_name == "x86-64-v4-amx":  # the tile configuration saved once per thread for the whole launch
        assert launch.count("llvm.x86.sttilecfg") == 1 and launch.count("llvm.x86.ldtilecfg") > 40
    else:
        assert "llvm.x86.avx2.pmadd.ub.sw" in launch and "llvm.x86.sttilecfg" not in launch


def _scratch_stores(target) -> int:
    """Stores into the dot-product intrinsics' scratch values (``passes/vnni.py``: A_i32, A_bytes, B_bytes, pairs)
    in the LLVM IR of the shipped model's x86-64-v3 int8 launch, compiled for ``target``."""
    import re

    low = _shipped_lowered("x86-64-v3", "int8")
    launch = next(f for gv, f in low.functions_items() if gv.name_hint == "fused_launch")
    with tvm.transform.PassContext(opt_level=3):
        lib = tvm.compile(tvm.IRModule({"main": launch.with_attr("global_symbol", "main")}), target=target)
    ir = lib.mod.inspect_source("ll")
    return len(re.findall(r"^\s+store [^,]+, ptr %(?:A_i32|A_bytes|B_bytes|pairs)\d*,", ir, re.M))


def test_a_merged_launch_keeps_the_dot_product_scratch_in_registers():
    """Regression (issue 21): LLVM's LICM keeps a loop's values in registers only up to 250 memory accesses in it, so
    in the one-launch body the tuned AVX2 conv2d kernels stored and reloaded the intrinsics' scratch values and
    accumulators around every vpmaddubsw and ran at half speed. compile_target raises the limit: the stores left are
    a few per kernel (216 for 27 conv2d kernels; 2,116 without the option: in most unrolled dot-product
    sequences, one per scratch value and dot product)."""
    from targets import get
    from targets.pipeline import LLVM_OPTIONS, compile_target

    target = compile_target(get("x86-64-v3"))
    assert list(target.attrs["cl-opt"]) == list(LLVM_OPTIONS)
    with_option = _scratch_stores(target)
    without = _scratch_stores(get("x86-64-v3").tvm_target())
    assert with_option <= 10 * 27 and 5 * with_option < without, (with_option, without)


def test_a_zero_border_gets_no_barrier_unless_it_ends_its_kernel():
    """fuse_pad's border loops (marked pad_border) write what no statement of their kernel touches: the kernel's own
    barrier follows them, also when a buffer declaration comes between; a border that ends the kernel gets one."""
    from passes.parallel_launch import BORDER_ANNOTATION, _launch_parts

    buf = tirx.decl_buffer([4], "float32", name="p")
    one = tirx.IntImm("int64", 1)

    def loop(kind, border=False):
        i = tirx.Var("i", "int64")
        return tirx.For(i, tirx.IntImm("int64", 0), one, kind, tirx.BufferStore(buf, tirx.FloatImm("float32", 0), [i]),
                        annotations={BORDER_ANNOTATION: 1} if border else None)

    def shape(parts):
        return [("barrier " if isinstance(p, tirx.AttrStmt) and p.attr_key == BARRIER else "")
                + type(p.body if isinstance(p, tirx.AttrStmt) else p).__name__ for p in parts]

    view = tirx.DeclBuffer(tirx.decl_buffer([4], "float32", name="v"), data=buf.data)
    border, serial, parallel = (lambda: loop(tirx.ForKind.SERIAL, True)), (lambda: loop(tirx.ForKind.SERIAL)), \
        (lambda: loop(tirx.ForKind.PARALLEL))
    assert shape(_launch_parts([border(), border(), view, parallel()], [])) == ["For", "DeclBuffer", "barrier For"]
    assert shape(_launch_parts([serial(), view, parallel()], [])) == ["barrier For", "DeclBuffer", "barrier For"]
    assert shape(_launch_parts([parallel(), border()], [])) == ["barrier For", "barrier For"]
