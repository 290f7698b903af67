"""RowsFirstConv2d: a small-weight packed int8 conv2d kernel's parallel loop runs output rows first, every iteration
kept (the same values bit for bit); kernels with larger weights and those rows first already are left as they are."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from helpers import scheduled_kernels, skip_unless_this_cpu_runs
from passes import rows_first as rf
from passes.rows_first import RowsFirstConv2d, rows_first

# A 4 x 4 output of 4-channel blocks in 2 x 2 tiles; the parallel loop f runs the column tiles outside the row tiles
# (f // 2: columns, f % 2: rows). Rows first: g // 2 is the row tile, g % 2 the column tile.


@T.prim_func(private=True, s_tir=True)
def before(a: T.Buffer((1, 1, 4, 4, 4), "uint8"), w: T.Buffer((1, 1, 4, 4), "int8"),
           c: T.Buffer((1, 1, 4, 4, 4), "int32")):
    T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
    for f in T.parallel(4):
        for y1, x1, o, i in T.grid(2, 2, 4, 4):
            with T.sblock("conv2d_nchwc_int8_o_update"):
                v_y = T.axis.spatial(4, f % 2 * 2 + y1)
                v_x = T.axis.spatial(4, f // 2 * 2 + x1)
                v_o = T.axis.spatial(4, o)
                v_i = T.axis.reduce(4, i)
                T.reads(a[0, 0, v_y, v_x, v_i], w[0, 0, v_o, v_i])
                T.writes(c[0, 0, v_y, v_x, v_o])
                with T.init():
                    c[0, 0, v_y, v_x, v_o] = 0
                c[0, 0, v_y, v_x, v_o] = c[0, 0, v_y, v_x, v_o] + T.Cast("int32", a[0, 0, v_y, v_x, v_i]) * \
                    T.Cast("int32", w[0, 0, v_o, v_i])


@T.prim_func(private=True, s_tir=True)
def expected(a: T.Buffer((1, 1, 4, 4, 4), "uint8"), w: T.Buffer((1, 1, 4, 4), "int8"),
             c: T.Buffer((1, 1, 4, 4, 4), "int32")):
    T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
    for g in T.parallel(4):
        for y1, x1, o, i in T.grid(2, 2, 4, 4):
            with T.sblock("conv2d_nchwc_int8_o_update"):
                v_y = T.axis.spatial(4, g // 2 * 2 + y1)
                v_x = T.axis.spatial(4, g % 2 * 2 + x1)
                v_o = T.axis.spatial(4, o)
                v_i = T.axis.reduce(4, i)
                T.reads(a[0, 0, v_y, v_x, v_i], w[0, 0, v_o, v_i])
                T.writes(c[0, 0, v_y, v_x, v_o])
                with T.init():
                    c[0, 0, v_y, v_x, v_o] = 0
                c[0, 0, v_y, v_x, v_o] = c[0, 0, v_y, v_x, v_o] + T.Cast("int32", a[0, 0, v_y, v_x, v_i]) * \
                    T.Cast("int32", w[0, 0, v_o, v_i])


def test_before_expected():
    tvm.ir.assert_structural_equal(rows_first(before), expected)
    after = RowsFirstConv2d()(tvm.IRModule({"k": before}))
    tvm.ir.assert_structural_equal(after["k"], expected)


def test_rows_first_already_or_weights_over_the_limit_stay():
    assert rows_first(expected) is None
    assert rows_first(before, max_weight_bytes=15) is None  # 16 bytes of int8 weights
    assert rows_first(before, max_weight_bytes=16) is not None
    module = tvm.IRModule({"k": before})
    assert RowsFirstConv2d(max_weight_bytes=15)(module).same_as(module)


def _levels(func):
    from passes.rows_first import _update, _walk, loop_levels

    realize, loop = _update(func)
    domains = {n.loop_var: tvm.ir.Range.from_min_extent(n.min, n.extent) for n in _walk(func.body, tvm.tirx.For)}
    return loop_levels(realize, loop, domains), rf.weight_bytes(realize)


def _per_axis(levels) -> dict:
    out = {}
    for _, extent, axis in levels:
        out[axis] = out.get(axis, 1) * extent
    return out


def _run(func, target, args):
    with tvm.transform.PassContext(opt_level=3):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in args]
    lib["main"](*args)
    return args[-1].numpy()


def test_the_tiny_kernel_computes_the_same_values():
    rng = np.random.default_rng(0)
    args = [rng.integers(0, 256, (1, 1, 4, 4, 4)).astype("uint8"), rng.integers(-128, 128, (1, 1, 4, 4)).astype("int8"),
            np.full((1, 1, 4, 4, 4), 7, "int32")]
    want = np.einsum("nyxi,oi->nyxo", args[0][:, 0].astype(np.int64), args[1][0, 0].astype(np.int64))[:, None]
    for func in (before, rows_first(before)):
        np.testing.assert_array_equal(_run(func, "llvm", args), want)


def test_the_shipped_models_small_weight_kernels_run_rows_first():
    """x86-64-v3, the committed records: every tuned conv2d with weights up to the limit runs rows first after the
    pass (4 of the first stage's were not with session 24's records; 5 with session 21's), the larger ones keep the
    record's order."""
    kernels = {n: f for n, f in scheduled_kernels("x86-64-v3").items() if n.startswith("fused_conv2d_nchwc_int8")}
    changed = 0
    for name, func in kernels.items():
        levels, weights = _levels(func)
        after = rows_first(func)
        if weights > rf.MAX_WEIGHT_BYTES:
            assert after is None, name
            continue
        if after is not None:
            changed += 1
            assert levels != rf._rows_first_order(levels), name
            new_levels, _ = _levels(after)
            # the same extent along each output axis (levels of one axis that became adjacent read as one)
            assert _per_axis(new_levels) == _per_axis(levels), name
            levels = new_levels
        assert levels == rf._rows_first_order(levels), name
    assert changed == 4
    assert sum(_levels(f)[1] > rf.MAX_WEIGHT_BYTES for f in kernels.values()) >= 8


@pytest.mark.parametrize("n_threads", [1, 2])
def test_the_reordered_kernels_compute_the_same_values(n_threads):
    """Bit for bit, on random inputs, at 1 and 2 threads, each shipped kernel the pass reorders (AVX2 code)."""
    skip_unless_this_cpu_runs("x86-64-v3")
    import targets
    from compiler import threads

    target = targets.get("x86-64-v3").tvm_target()
    kernels = {n: f for n, f in scheduled_kernels("x86-64-v3").items() if n.startswith("fused_conv2d_nchwc_int8")}
    changed = {n: (f, rows_first(f)) for n, f in kernels.items() if rows_first(f) is not None}
    assert changed
    try:
        threads.set_tvm(n_threads)
        for name, pair in changed.items():
            rng = np.random.default_rng(0)
            args = []
            for param in pair[0].params:
                shape, dtype = [int(s) for s in param.shape], str(param.dtype)
                values = (rng.integers(0, 8, shape) if dtype == "uint8" else rng.integers(-4, 5, shape)
                          if "int" in dtype else rng.uniform(0.05, 0.5, shape))
                args.append(values.astype(dtype))
            # the reordered kernel first: its int32 tiles are a workspace that the original's run would leave filled
            outs = [_run(func, target, args) for func in pair[::-1]]
            np.testing.assert_array_equal(outs[0], outs[1], err_msg=name)
            assert len(np.unique(outs[0])) > 8, name
    finally:
        threads.set_tvm(threads.cores())


def test_x86_int8_targets_get_it_others_do_not():
    import targets
    from targets import pipeline

    for name in ("x86-64-v3", "x86-64-v4-vnni"):
        assert [type(p).__name__ for p in pipeline._rows_first(targets.get(name).tvm_target())] == ["RowsFirstConv2d"]
    assert pipeline._rows_first(targets.get("jetson-tx2").tvm_target()) == []
