"""RoundByConversion: a cast to 8 bits of a clipped ``round`` becomes a clipped ``lrint`` (one vcvtps2dq) with an
integer clip (saturating packs), the same byte for every non-NaN input; other casts are left alone."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from helpers import run_quantize_kernels, scheduled_kernels, skip_unless_this_cpu_runs
from passes.round_by_conversion import RoundByConversion, round_by_conversion


@T.prim_func(private=True, s_tir=True)
def before(x: T.Buffer((64,), "float32"), s: T.Buffer((1,), "float32"), q: T.Buffer((64,), "uint8")):
    T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
    for i in T.vectorized(64):
        q[i] = T.Cast("uint8", T.max(T.min(T.round(x[i] * s[0]), T.float32(255)), T.float32(0)))


@T.prim_func(private=True, s_tir=True)
def expected(x: T.Buffer((64,), "float32"), s: T.Buffer((1,), "float32"), q: T.Buffer((64,), "uint8")):
    T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
    for i in T.vectorized(64):
        q[i] = T.Cast("uint8", T.max(T.min(T.call_llvm_pure_intrin(
            "int32", "llvm.lrint", T.max(T.min(x[i] * s[0], T.float32(255)), T.float32(0))), 255), 0))


@T.prim_func(private=True, s_tir=True)
def before_int8(x: T.Buffer((64,), "float32"), q: T.Buffer((64,), "int8")):
    T.func_attr({"tirx.is_scheduled": True})
    for i in T.vectorized(64):
        q[i] = T.Cast("int8", T.min(T.max(T.round(x[i]), T.float32(-127)), T.float32(127)))


@T.prim_func(private=True, s_tir=True)
def expected_int8(x: T.Buffer((64,), "float32"), q: T.Buffer((64,), "int8")):
    T.func_attr({"tirx.is_scheduled": True})
    for i in T.vectorized(64):
        q[i] = T.Cast("int8", T.max(T.min(T.call_llvm_pure_intrin(
            "int32", "llvm.lrint", T.max(T.min(x[i], T.float32(127)), T.float32(-127))), 127), -127))


@pytest.mark.parametrize("func, want", [(before, expected), (before_int8, expected_int8)],
                         ids=["uint8 max(min)", "int8 min(max)"])
def test_before_expected(func, want):
    tvm.ir.assert_structural_equal(round_by_conversion(func), want)
    after = RoundByConversion()(tvm.IRModule({"k": func}))
    tvm.ir.assert_structural_equal(after["k"], want)


def test_a_kernel_no_record_scheduled_is_not_marked_scheduled():
    """(Regression: the first version marked every rewritten kernel scheduled, and the launch merging then took in
    the unscheduled classifier's quantize.)"""
    unscheduled = before.without_attr("tirx.is_scheduled")
    after = round_by_conversion(unscheduled)
    assert "tirx.is_scheduled" not in after.attrs
    tvm.ir.assert_structural_equal(after, expected.without_attr("tirx.is_scheduled"))


@T.prim_func(private=True, s_tir=True)
def past_the_type(x: T.Buffer((64,), "float32"), q: T.Buffer((64,), "uint8")):
    T.func_attr({"tirx.is_scheduled": True})
    for i in range(64):  # 300 does not fit a uint8: the cast wraps, the conversion would saturate
        q[i] = T.Cast("uint8", T.max(T.min(T.round(x[i]), T.float32(300)), T.float32(0)))


@T.prim_func(private=True, s_tir=True)
def not_rounded(x: T.Buffer((64,), "float32"), q: T.Buffer((64,), "uint8")):
    T.func_attr({"tirx.is_scheduled": True})
    for i in range(64):  # truncation toward zero, not rounding
        q[i] = T.Cast("uint8", T.max(T.min(x[i], T.float32(255)), T.float32(0)))


@T.prim_func(private=True, s_tir=True)
def bound_from_memory(x: T.Buffer((64,), "float32"), hi: T.Buffer((1,), "float32"), q: T.Buffer((64,), "uint8")):
    T.func_attr({"tirx.is_scheduled": True})
    for i in range(64):
        q[i] = T.Cast("uint8", T.max(T.min(T.round(x[i]), hi[0]), T.float32(0)))


@T.prim_func(private=True, s_tir=True)
def to_int32(x: T.Buffer((64,), "float32"), q: T.Buffer((64,), "int32")):
    T.func_attr({"tirx.is_scheduled": True})
    for i in range(64):
        q[i] = T.Cast("int32", T.max(T.min(T.round(x[i]), T.float32(255)), T.float32(0)))


@pytest.mark.parametrize("func", [past_the_type, not_rounded, bound_from_memory, to_int32],
                         ids=["bound past the type", "no round", "bound from memory", "int32 cast"])
def test_other_casts_are_left_alone(func):
    assert round_by_conversion(func) is None
    assert RoundByConversion()(tvm.IRModule({"k": func}))["k"].same_as(func)


def test_the_same_bytes_for_ties_and_out_of_range_values():
    """Compiled for this CPU (any x86-64 has cvtps2dq): ties round to even as round does, values past either bound
    and past int32 clip as the float clip does."""
    ties = np.arange(-3.5, 258.0, 0.5)
    edges = [-1e30, -3e9, -2.2e9, -0.49, -0.0, 0.49, 254.49, 254.51, 255.49, 255.5, 256.0, 3e9, 1e30, np.inf, -np.inf]
    values = np.concatenate([ties, edges, np.random.default_rng(0).uniform(-300, 600, 4096)]).astype("float32")
    values = np.resize(values, (len(values) + 63) // 64 * 64).reshape(-1, 64)
    scale = tvm.runtime.tensor(np.array([1.0], "float32"))
    libs = [tvm.compile(f.with_attr("global_symbol", "k"), target="llvm")
            for f in (round_by_conversion(before), before)]
    for row in values:
        outs = []
        for lib in libs:
            q = tvm.runtime.tensor(np.zeros(64, "uint8"))
            lib["k"](tvm.runtime.tensor(row), scale, q)
            outs.append(q.numpy())
        np.testing.assert_array_equal(outs[0], outs[1], err_msg=str(row))
    assert "cvtps2dq" in libs[0].mod.inspect_source("asm") and "roundps" not in libs[0].mod.inspect_source("asm")


def test_the_shipped_avx2_kernels_quantize_by_conversion():
    """Every quantize of the shipped model's AVX2 kernels is rewritten; the compiled stage-1 conv2d kernel has no
    vroundps left and its bytes equal the original's."""
    import targets
    from targets.pipeline import compile_target

    kernels = scheduled_kernels("x86-64-v3")
    quantizing = {name: f for name, f in kernels.items() if "tirx.round" in f.script() or "T.round" in f.script()}
    assert len(quantizing) >= 15, sorted(kernels)
    rewritten = {name: round_by_conversion(f) for name, f in quantizing.items()}
    assert all(f is not None and "T.round" not in f.script() for f in rewritten.values()), sorted(quantizing)

    skip_unless_this_cpu_runs("x86-64-v3")
    name = sorted(n for n in quantizing if n.startswith("fused_conv2d_nchwc_int8_cast"))[0]
    func, after = quantizing[name], rewritten[name]
    compile_as = compile_target(targets.get("x86-64-v3"))
    libs = [tvm.compile(f.with_attr("global_symbol", "k"), target=compile_as) for f in (after, func)]
    rounds = [lib.mod.inspect_source("asm").count("vroundps") for lib in libs]
    assert rounds[0] == 0 and rounds[1] > 0, rounds

    results = run_quantize_kernels(func, libs)
    assert len(np.unique(results[1])) > 50  # the outputs spread over the uint8 range, not saturated
    np.testing.assert_array_equal(results[0], results[1])
