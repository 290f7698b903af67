"""passes/parallel_fallback.py: what no tuning record scheduled runs its leading spatial loops on the thread pool;
scheduled kernels, GPU targets and small kernels are left as they are."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, te
from tvm.script import ir as I
from tvm.script import tirx as T

from passes.parallel_fallback import MIN_PARALLEL_ITERATIONS, ParallelFallback

CPU = tvm.target.Target({"kind": "llvm"})


@I.ir_module
class Before:
    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((16, 32, 16), "float32"), B: T.Buffer((16, 32), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i, j, k in T.grid(16, 32, 16):
            with T.sblock("B"):
                v_i, v_j, v_k = T.axis.remap("SSR", [i, j, k])
                T.reads(A[v_i, v_j, v_k])
                T.writes(B[v_i, v_j])
                with T.init():
                    B[v_i, v_j] = T.float32(0.0)
                B[v_i, v_j] = B[v_i, v_j] + A[v_i, v_j, v_k]


@I.ir_module
class Expected:
    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((16, 32, 16), "float32"), B: T.Buffer((16, 32), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for ax0_ax1_fused in T.parallel(512):
            for ax2 in range(16):
                with T.sblock("B"):
                    v0 = T.axis.spatial(16, ax0_ax1_fused // 32)
                    v1 = T.axis.spatial(32, ax0_ax1_fused % 32)
                    v2 = T.axis.reduce(16, ax2)
                    T.reads(A[v0, v1, v2])
                    T.writes(B[v0, v1])
                    with T.init():
                        B[v0, v1] = T.float32(0.0)
                    B[v0, v1] = B[v0, v1] + A[v0, v1, v2]


def _row_sum(n: int, m: int, k: int) -> tvm.IRModule:
    """B[i, j] = sum_k A[i, j, k], the same function as ``Before`` at another size."""
    a = te.placeholder((n, m, k), name="A")
    r = te.reduce_axis((0, k), name="k")
    b = te.compute((n, m), lambda i, j: te.sum(a[i, j, r], axis=r), name="B")
    return tvm.IRModule({"main": te.create_prim_func([a, b]).with_attr("global_symbol", "main")})


def _apply(mod: tvm.IRModule, target=CPU) -> tvm.IRModule:
    with target:
        return ParallelFallback()(mod)


def test_the_leading_spatial_loops_are_fused_and_parallel():
    tvm.ir.assert_structural_equal(_apply(Before), Expected)
    # the module passed in is left as it was (DLight's ApplyDefaultSchedule alone writes into it)
    assert "tirx.is_scheduled" not in Before["main"].attrs
    tvm.ir.assert_structural_equal(_row_sum(16, 32, 16), Before, map_free_vars=True)


def test_scheduled_small_and_gpu_kernels_are_left_as_they_are():
    scheduled = tvm.IRModule({"main": Before["main"].with_attr("tirx.is_scheduled", True)})
    tvm.ir.assert_structural_equal(_apply(scheduled), scheduled)
    small = _row_sum(4, 8, 16)  # 512 iterations
    assert 4 * 8 * 16 < MIN_PARALLEL_ITERATIONS
    tvm.ir.assert_structural_equal(_apply(small), small)
    # a CUDA kernel needs thread bindings, which this rule does not give: DLight's GPU rules schedule those
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_62"}, host=CPU)
    tvm.ir.assert_structural_equal(_apply(Before, cuda), Before)


@pytest.mark.parametrize("batch", [1, 4])
def test_an_untuned_host_build_of_a_conv2d_computes_what_numpy_does(batch):
    """The host pipeline without a database: every kernel goes through ParallelFallback, and the result is the
    same conv2d + bias + relu numpy computes (tolerance: fp32 summation order over 3 x 3 x 8 terms)."""
    from targets import get as get_target
    from targets.pipeline import pipeline

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 8, 16, 16)).astype("float32")
    w = rng.standard_normal((16, 8, 3, 3)).astype("float32")
    bias = rng.standard_normal((1, 16, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), padding=1))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    spec = get_target("host")
    lowering = pipeline(spec, "fp32").lowering()
    exe = tvm.compile(bb.get(), spec.tvm_target(), relax_pipeline=lowering)
    vm = relax.VirtualMachine(exe, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(pad, (3, 3), axis=(2, 3))  # N, C, H, W, 3, 3
    want = np.maximum(np.einsum("nchwij,ocij->nohw", windows, w) + bias, 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the fused conv2d kernel is the one that got the parallel loop
    from targets.pipeline import legalize_passes

    target = spec.tvm_target()
    with target:
        kernels = tvm.transform.Sequential(legalize_passes(target) + [ParallelFallback()])(bb.get())
    conv = [f for gv, f in kernels.functions.items() if "conv2d" in gv.name_hint]
    assert len(conv) == 1 and "T.parallel" in conv[0].script()
