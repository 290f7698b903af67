"""Cost counting on Relax IR: multiply-accumulates of conv2d / matmul and parameter counts, from the IR's shapes.

Convention (the same as ``compiler.prune``'s, which halves torch's FlopCounterMode): MACs only, of conv2d
(``N * Cout * Hout * Wout * Cin / groups * KH * KW``) and matmul (``M * K * N``, batched: times the batch), for the
batch the IR is written for; BatchNorm (folded), bias adds, ReLU, pooling and adds are not counted. A symbolic
dimension (a dynamic batch) is counted as ``batch`` (default 1, i.e. per image).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

__all__ = ["CONVENTION", "count_flops"]

CONVENTION = "multiply-accumulates (MACs) of conv2d + matmul, counted from the Relax IR's shapes"

_PARAM_OPS = ("relax.nn.conv2d", "relax.matmul", "relax.add")


def _dims(expr, batch: int) -> list[int]:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        raise ValueError(f"cannot count: {expr} has no known shape")
    dims = []
    for d in ty.shape.values:
        if isinstance(d, tvm.tirx.IntImm):
            dims.append(int(d.value))
        elif isinstance(d, relax.Var):
            dims.append(batch)
        else:
            raise ValueError(f"cannot count: dimension {d} of {expr} is neither static nor a plain symbolic variable")
    return dims


def _bindings(expr):
    """Every VarBinding in a Relax function body, nested scopes included, in program order."""
    if isinstance(expr, relax.Function):
        yield from _bindings(expr.body)
    elif isinstance(expr, relax.SeqExpr):
        for block in expr.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    yield binding
                    yield from _bindings(binding.value)
        yield from _bindings(expr.body)
    elif isinstance(expr, relax.If):
        yield from _bindings(expr.true_branch)
        yield from _bindings(expr.false_branch)


def count_flops(mod: tvm.IRModule, batch: int = 1) -> dict:
    """MACs and parameters of every Relax function in ``mod``.

    Returns ``{"convention", "macs", "params", "unique_params", "batch", "layers"}``. ``layers`` has one row per
    conv2d / matmul binding: ``{"function", "layer", "op", "macs", "params"}`` (``params``: elements of its constant
    weight). ``params`` counts the elements of every constant operand of conv2d, matmul and add, once per use;
    ``unique_params`` counts each distinct constant once (the importer may share identical constants).
    """
    layers = []
    params = 0
    seen: dict[int, int] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for binding in _bindings(func):
            call = binding.value
            if not (isinstance(call, tvm.ir.Call) and isinstance(call.op, tvm.ir.Op)):
                continue
            name = str(call.op.name)
            if name not in _PARAM_OPS:
                continue
            for arg in call.args:
                if isinstance(arg, tvm.ir.GenericConst) and isinstance(arg.ty, relax.TensorType):
                    n = int(np.prod(arg.value.shape, dtype=np.int64))
                    params += n
                    seen[hash(arg)] = n
            if name == "relax.add":
                continue
            out = _dims(binding.var, batch)
            if name == "relax.nn.conv2d":
                w = _dims(call.args[1], batch)
                layout = str(call.attrs.kernel_layout)
                reduce = w[layout.index("I")] * w[layout.index("H")] * w[layout.index("W")]
                op = "conv2d"
            else:
                reduce = _dims(call.args[0], batch)[-1]
                op = "matmul"
            weight = call.args[1]
            layers.append(
                {
                    "function": str(gv.name_hint),
                    "layer": binding.var.name,
                    "op": op,
                    "macs": math.prod(out) * reduce,
                    "params": math.prod(_dims(weight, batch)) if isinstance(weight, tvm.ir.GenericConst) else 0,
                }
            )
    return {
        "convention": CONVENTION,
        "macs": sum(layer["macs"] for layer in layers),
        "params": params,
        "unique_params": sum(seen.values()),
        "batch": batch,
        "layers": layers,
    }
