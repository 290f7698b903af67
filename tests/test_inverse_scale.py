"""InverseScaleQuantize: a float division by an element of a one-element buffer (the activation scale) becomes a
multiplication by its inverse, which LLVM hoists out of the loop; other divisions are left alone."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from helpers import run_quantize_kernels, scheduled_kernels, skip_unless_this_cpu_runs
from passes.inverse_scale import InverseScaleQuantize, inverse_scale


@T.prim_func(private=True, s_tir=True)
def before(x: T.Buffer((64,), "float32"), s: T.Buffer((1,), "float32"), q: T.Buffer((64,), "uint8")):
    T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
    for i in T.vectorized(64):
        q[i] = T.Cast("uint8", T.max(T.min(T.round(x[i] / s[0]), T.float32(255)), T.float32(0)))


@T.prim_func(private=True, s_tir=True)
def expected(x: T.Buffer((64,), "float32"), s: T.Buffer((1,), "float32"), q: T.Buffer((64,), "uint8")):
    T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
    for i in T.vectorized(64):
        q[i] = T.Cast("uint8", T.max(T.min(T.round(x[i] * (T.float32(1) / s[0])), T.float32(255)), T.float32(0)))


def test_before_expected():
    tvm.ir.assert_structural_equal(inverse_scale(before), expected)
    after = InverseScaleQuantize()(tvm.IRModule({"k": before}))
    tvm.ir.assert_structural_equal(after["k"], expected)


@T.prim_func(private=True, s_tir=True)
def per_channel(x: T.Buffer((64,), "float32"), s: T.Buffer((64,), "float32"), y: T.Buffer((64,), "float32")):
    T.func_attr({"tirx.is_scheduled": True})
    for i in range(64):
        y[i] = x[i] / s[i]


@T.prim_func(private=True, s_tir=True)
def by_constant(x: T.Buffer((64,), "float32"), y: T.Buffer((64,), "float32")):
    T.func_attr({"tirx.is_scheduled": True})
    for i in range(64):
        y[i] = x[i] / T.float32(64)


@T.prim_func(private=True, s_tir=True)
def integer(x: T.Buffer((64,), "int32"), s: T.Buffer((1,), "int32"), y: T.Buffer((64,), "int32")):
    T.func_attr({"tirx.is_scheduled": True})
    for i in range(64):
        y[i] = T.Div(x[i], s[0])


@pytest.mark.parametrize("func", [per_channel, by_constant, integer], ids=["per-channel", "constant", "integer"])
def test_other_divisions_are_left_alone(func):
    assert inverse_scale(func) is None
    assert InverseScaleQuantize()(tvm.IRModule({"k": func}))["k"].same_as(func)


def _quantize_kernel():
    """The shipped model's first AVX2 conv2d kernel whose epilogue quantizes for the next conv2d (9 calls a batch)."""
    kernels = scheduled_kernels("x86-64-v3")
    names = sorted(n for n in kernels if n.startswith("fused_conv2d_nchwc_int8") and "quantize_packed" in n)
    assert names, sorted(kernels)
    return names[0], kernels[names[0]]


def test_the_shipped_kernels_quantize_without_a_vector_division():
    """The compiled AVX2 kernel: vdivps (one for each 8 outputs) before, none after; its uint8 outputs on random
    inputs equal the division's but for rare off-by-one ties."""
    import targets
    from targets.pipeline import compile_target

    skip_unless_this_cpu_runs("x86-64-v3")
    name, func = _quantize_kernel()
    after = inverse_scale(func)
    assert after is not None, name
    compile_as = compile_target(targets.get("x86-64-v3"))
    libs = [tvm.compile(f.with_attr("global_symbol", "k"), target=compile_as) for f in (after, func)]
    divides = [lib.mod.inspect_source("asm").count("vdivps") for lib in libs]
    assert divides[0] == 0 and divides[1] > 0, divides

    inverse, divided = (r.astype(np.int32) for r in run_quantize_kernels(func, libs))
    assert len(np.unique(divided)) > 50  # the outputs spread over the uint8 range, not saturated
    diff = np.abs(inverse - divided)
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3, (diff > 0).sum()
