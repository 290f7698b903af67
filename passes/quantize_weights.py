"""QuantizeWeights: int8-stored weights for an fp16 module (``precision int8-weights``: fp16 compute, the TX2's format).

On an fp16 module (``ToMixedPrecision`` + ``FoldConstant``), every conv2d / matmul weight constant is stored int8
symmetric per output channel and dequantized in front of the fp16 conv2d. The dequantize and the conv2d are wrapped
in one private ``Primitive`` Relax function per layer, so the build pipelines' FoldConstant cannot fold the
dequantize back into an fp16 constant; FuseTIR turns each into one kernel that reads int8 weights. The report
(one row per layer with its largest weight error) is attached to the module (:func:`passes.quantize.report_of`).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from passes import reports
from passes.binding_mutator import BindingMutator
from passes.quantize import Layer, _const, constant_bytes, find_layers, quantize_weight

__all__ = ["QuantizeWeights", "quantize_weights"]


@mutator
class _WeightRewriter(BindingMutator):
    def __init__(self, mod: tvm.IRModule, rewrites: dict, dtype: str):
        super().__init__(mod)
        self.rewrites = rewrites  # binding var -> (Layer, Wq, scale)
        self.dtype = dtype

    def visit_call_(self, call):
        var = self.bound_var(call)
        if var is None or var not in self.rewrites:
            return super().visit_call_(call)
        layer, wq, scale = self.rewrites[var]
        x = self.visit_expr(layer.x)
        shape = [1] * wq.ndim
        shape[layer.out_axis] = -1
        s = scale.astype(self.dtype).reshape(shape)
        gv = self.builder_.add_func(_dequant_layer_func(layer, x, wq, s, self.dtype), f"dequantize_{layer.op}")
        return relax.Call(gv, [x, _const(wq), _const(s)])


def _dequant_layer_func(layer: Layer, x, wq: np.ndarray, s: np.ndarray, dtype: str) -> relax.Function:
    """``fn(x, wq, s) = op(x, astype(wq, dtype) * s)``: a private Primitive function (FuseTIR makes it one kernel)."""
    bb = relax.BlockBuilder()
    px = relax.Var("x", x.ty)
    pw = relax.Var("w", relax.TensorType(wq.shape, "int8"))
    ps = relax.Var("s", relax.TensorType(s.shape, dtype))
    call = layer.call
    with bb.function("f", [px, pw, ps], attrs={"Primitive": True}, private=True):
        with bb.dataflow():
            w = bb.emit(relax.op.multiply(relax.op.astype(pw, dtype), ps))
            if layer.op == "conv2d":
                a = call.attrs
                y = relax.op.nn.conv2d(px, w, strides=a.strides, padding=a.padding, dilation=a.dilation,
                                       groups=int(a.groups), out_dtype=str(a.out_dtype) or dtype)
            else:
                y = relax.op.matmul(px, w, out_dtype=str(call.attrs.out_dtype) or dtype)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()["f"]


def quantize_weights(mod: tvm.IRModule, dtype: str = "float16", func_name: str = "main") -> tuple[tvm.IRModule, dict]:
    """int8-stored weights for the ``dtype`` conv2d/matmul layers of an fp16 module (run ``ToMixedPrecision`` +
    ``FoldConstant`` first). Returns ``(new_mod, report)``; activations and arithmetic stay ``dtype``. The pass
    form is :class:`QuantizeWeights`."""
    func = mod[func_name]
    layers = find_layers(func, weight_dtype=dtype)
    rewrites, rows = {}, []
    for l in layers:
        wq, scale = quantize_weight(l.weight, l.out_axis)
        rewrites[l.var] = (l, wq, scale)
        err = float(np.abs(wq.astype(np.float64) * scale.reshape(
            [-1 if a == l.out_axis else 1 for a in range(wq.ndim)]) - l.weight.astype(np.float64)).max())
        rows.append({"name": l.name, "op": l.op, "weight_shape": list(l.weight.shape), "precision": "int8-weights",
                     "max_weight_error": err})
    if rewrites:
        rw = _WeightRewriter(mod, rewrites, dtype)
        gv = mod.get_global_var(func_name)
        new_func = rw.visit_expr(mod[func_name])
        rw.builder_.update_func(gv, new_func)
        new_mod = rw.builder_.get()
    else:
        new_mod = mod
    report = {
        "scheme": (f"weights stored int8 symmetric per output channel, dequantized to {dtype} inside each layer's "
                   f"kernel; {dtype} activations and arithmetic"),
        "layers": rows,
        "constant_bytes": {"before": constant_bytes(mod), "after": constant_bytes(new_mod)},
    }
    return new_mod, report


@tvm.transform.module_pass(opt_level=0, name="QuantizeWeights")
class QuantizeWeights:
    """Module pass form of :func:`quantize_weights`; the report travels as the module's quantization report."""

    def __init__(self, dtype: str = "float16", func_name: str = "main") -> None:
        self.dtype, self.func_name = dtype, func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        new_mod, report = quantize_weights(mod, self.dtype, self.func_name)
        return reports.attach(new_mod, reports.QUANTIZE, report)
