"""Pattern helpers shared by the rewriting passes: what a Relax binding's value is (op name, constant, dtype,
static shape), and whether a PrimFunc already has its schedule."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def is_scheduled(func) -> bool:
    """Whether the PrimFunc ``func`` is marked ``tirx.is_scheduled`` (a record or a fixed schedule gave it one)."""
    attrs = func.attrs
    return bool(attrs is not None and "tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"]) == 1)


def op_name(expr) -> str | None:
    """The operator name of a call such as ``relax.nn.conv2d``; None for anything else."""
    if isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def is_const(expr) -> bool:
    """A tensor constant."""
    return isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.ty, relax.TensorType)


def dtype(expr) -> str | None:
    """The dtype of a tensor-typed expression; None where it is not a tensor."""
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def static_shape(shape) -> tuple | None:
    """The dimensions of a ``relax.ShapeExpr`` as ints; None for anything else or a symbolic dimension."""
    if not isinstance(shape, relax.ShapeExpr):
        return None
    try:
        return tuple(int(v) for v in shape.values)
    except (TypeError, ValueError):
        return None


def const(arr: np.ndarray):
    """A Relax constant of a numpy array, with the array's dtype."""
    return relax.const(np.ascontiguousarray(arr), str(arr.dtype))
