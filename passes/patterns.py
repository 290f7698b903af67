"""Pattern helpers shared by the rewriting passes: what a Relax binding's value is (op name, constant, dtype,
static shape), whether a PrimFunc already has its schedule, a module with some functions replaced, and two TIR
builders the kernel rewrites share."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def is_scheduled(func) -> bool:
    """Whether the PrimFunc ``func`` is marked ``tirx.is_scheduled`` (a record or a fixed schedule gave it one)."""
    attrs = func.attrs
    return bool(attrs is not None and "tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"]) == 1)


def scheduled_like(new, func):
    """``new`` (the ``main`` of a schedule made from ``func``) as ``func``'s scheduled replacement: ``func``'s global
    symbol (or none, as a private kernel has), marked ``tirx.is_scheduled``."""
    symbol = (func.attrs or {}).get("global_symbol")
    new = new.with_attr("global_symbol", symbol) if symbol is not None else new.without_attr("global_symbol")
    return new.with_attr("tirx.is_scheduled", True)


def with_functions(mod: tvm.IRModule, updates: dict) -> tvm.IRModule:
    """A copy of ``mod`` (attributes and global infos kept) with the functions of ``updates`` ({GlobalVar: function})
    in place of its own; ``mod`` itself when ``updates`` is empty."""
    if not updates:
        return mod
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, func in updates.items():
        out[gv] = func
    return out


def op_name(expr) -> str | None:
    """The operator name of a call such as ``relax.nn.conv2d``; None for anything else."""
    if isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def call_tir_parts(expr) -> tuple | None:
    """``(callee, [arguments])`` of a ``relax.call_tir``; None for anything else."""
    if op_name(expr) != "relax.call_tir":
        return None
    return expr.args[0], list(expr.args[1].fields)


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


def i64(v):
    """An int64 TIR immediate of a Python int (anything else - an expression - as it is)."""
    from tvm import tirx

    return tirx.IntImm("int64", int(v)) if isinstance(v, (int, np.integer)) else v


def with_root_body(body, fn):
    """A PrimFunc body with ``fn`` applied to the statement inside its root block (to ``body`` itself where it has
    no root block): how a rewrite puts statements at a kernel's entry."""
    from tvm.s_tir import SBlock, SBlockRealize

    if isinstance(body, SBlockRealize) and not body.block.iter_vars:
        root = body.block
        return SBlockRealize(body.iter_values, body.predicate,
                             SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, fn(root.body),
                                    root.init, root.alloc_buffers, root.match_buffers, root.annotations))
    return fn(body)
