"""FoldConstantLayout: reshape / permute_dims of a constant folded in numpy, before Relax's ``FoldConstant``.

The PyTorch importer emits every conv2d bias as ``R.reshape(bias, (1, C, 1, 1))`` and the linear weight as
``R.permute_dims(W)`` on constants. ``FoldConstant`` folds them by compiling and running each op with LLVM: ~0.1 s
a constant, 6 s for ResNet56's 56 (twice per int8 build). A reshape or transpose of a constant is a numpy view:
this pass folds those in microseconds, with the same constants as a result, and leaves everything else to
``FoldConstant``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from passes.patterns import const as _const, is_const as _is_const, op_name as _op_name, static_shape

__all__ = ["FoldConstantLayout"]


def fold(call) -> relax.Expr | None:
    """The constant ``call`` evaluates to when it is a reshape / permute_dims of a constant, else None."""
    name = _op_name(call)
    if name not in ("relax.reshape", "relax.permute_dims") or not _is_const(call.args[0]):
        return None
    data = call.args[0].value.numpy()
    if name == "relax.reshape":
        shape = static_shape(call.args[1])
        if shape is None or int(np.prod(shape)) != data.size:
            return None
        return _const(data.reshape(shape))
    axes = call.attrs.axes
    return _const(np.transpose(data, None if axes is None else [int(a) for a in axes]))


@mutator
class _Folder(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        folded = fold(call)
        return call if folded is None else folded


@tvm.transform.module_pass(opt_level=0, name="FoldConstantLayout")
class FoldConstantLayout:
    """Fold reshape / permute_dims of constants in every Relax function of the module."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        folder = _Folder(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                folder.builder_.update_func(gv, folder.visit_expr(func))
        return folder.builder_.get()
