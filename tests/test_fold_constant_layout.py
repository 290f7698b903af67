"""passes/fold_constant_layout.py: reshape / permute_dims of constants folded in numpy, exactly as Relax's
FoldConstant folds them (which compiles each op with LLVM)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes.fold_constant_layout import FoldConstantLayout


def _module(bias: np.ndarray, weight: np.ndarray) -> tvm.IRModule:
    """x (1, 4, 2, 2) + reshape(bias, (1, 4, 1, 1)); y = reshape(x, (1, 16)) @ permute_dims(weight)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 2, 2), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            b = bb.emit(relax.op.reshape(relax.const(bias), (1, 4, 1, 1)))
            h = bb.emit(relax.op.add(x, b))
            flat = bb.emit(relax.op.reshape(h, (1, 16)))  # not a constant: stays
            w = bb.emit(relax.op.permute_dims(relax.const(weight)))
            out = bb.emit_output(relax.op.matmul(flat, w))
        bb.emit_func_output(out)
    return bb.get()


def _expected(bias: np.ndarray, weight: np.ndarray) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 2, 2), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            b = bb.emit(relax.const(bias.reshape(1, 4, 1, 1)))
            h = bb.emit(relax.op.add(x, b))
            flat = bb.emit(relax.op.reshape(h, (1, 16)))
            w = bb.emit(relax.const(np.ascontiguousarray(weight.T)))
            out = bb.emit_output(relax.op.matmul(flat, w))
        bb.emit_func_output(out)
    return bb.get()


def test_constants_fold_in_numpy_and_the_rest_stays():
    rng = np.random.default_rng(0)
    bias, weight = rng.standard_normal(4).astype("float32"), rng.standard_normal((3, 16)).astype("float32")
    before = _module(bias, weight)
    after = FoldConstantLayout()(before)
    # after normalization the folded constants are bound to their vars, as FoldConstant leaves them
    tvm.ir.assert_structural_equal(relax.transform.CanonicalizeBindings()(after),
                                   relax.transform.CanonicalizeBindings()(_expected(bias, weight)))
    # the same module as Relax's own FoldConstant makes of it
    tvm.ir.assert_structural_equal(relax.transform.FoldConstant()(after), relax.transform.FoldConstant()(before))


def test_a_reshape_that_does_not_fit_is_left_to_relax():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.reshape(relax.const(np.zeros(6, "float32")), (2, 3)))
            out = bb.emit_output(relax.op.add(x, relax.op.sum(c, axis=[1])))
        bb.emit_func_output(out)
    mod = bb.get()
    # (2, 3) is a fit; a symbolic target shape is not folded
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    y = relax.Var("y", relax.TensorType((n,), "float32"))
    with bb.function("main", [y]):
        with bb.dataflow():
            c = bb.emit(relax.op.reshape(relax.const(np.zeros(6, "float32")), relax.ShapeExpr([n])))
            out = bb.emit_output(relax.op.add(y, c))
        bb.emit_func_output(out)
    sym = bb.get()
    tvm.ir.assert_structural_equal(FoldConstantLayout()(sym), sym)
    folded = FoldConstantLayout()(mod)
    assert "reshape" not in folded.script() and "reshape" in mod.script()
