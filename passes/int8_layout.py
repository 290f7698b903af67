"""Int8Layout: the int8 conv2d layers of a quantized module (:class:`passes.quantize.Quantize`) in the packed
layout x86 int8 dot-product instructions need.

``vpdpbusd`` (AVX-512 VNNI) and ``vpmaddubsw`` + ``vpmaddwd`` (AVX2, AVX-512BW) multiply 4 consecutive uint8 input
channels by a contiguous ob x 4 int8 weight tile, which NCHW / OIHW does not have, so MetaSchedule cannot tensorize
the NCHW conv2d. This pass finds each chain :class:`~passes.quantize.Quantize` emits for a uint8 conv2d::

    xq = R.quantize(x, s_x, 0, out_dtype="uint8");  acc = R.nn.conv2d(xq, Wq, out_dtype="int32")
    y  = R.multiply(R.astype(acc, "float32"), requant)

and emits it in the packed layout of :mod:`passes.vnni` (kernels made with ``emit_te``; ob, the output-channel
block, is one the ISA's intrinsics compute: :data:`passes.vnni.ISAS`)::

    xp  = quantize_repack(pack_float(x), [s_x])   # uint8 NCHW[ic_bn]c, the conv's zero padding applied, ic to 4k
    acc = conv2d_nchwc_int8(xp, Wp)           # int32 NCHW[ob]c; Wp: OIHW[ic_bn/4]i[ob]o4i, oc zero-padded to ob*k
    y   = unpack(astype(acc, f32) * pack(requant))   # float32 NCHW, padding channels dropped

The integers are the same as the NCHW conv2d's (an exact int32 sum in another order: bit-identical outputs; for
the ``vpmaddubsw`` ISAs as long as the weights are 7-bit, which :func:`passes.quantize.config_for` arranges and
this pass checks). The bias add, ReLU and residual add after a packed conv get NCHW[ob]c twins, so activations stay
packed from conv to conv (the next conv's quantize_repack reads them there); whatever else reads them reads an
unpack. In the packed kernels ``s_x`` is a tensor argument, not an immediate, so they do not depend on the
calibration: a tuning database serves any checkpoint with the same stripped shapes.

The quantization report attached to the module (:mod:`passes.reports`) gets each packed layer's layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from passes import reports, vnni
from passes.fuse_pad import PAD_ATTR
from passes.binding_mutator import BindingMutator
from passes.patterns import const as _const, dtype as _dtype, is_const as _is_const, op_name as _op_name, static_shape

__all__ = ["Int8Layout", "layout_name"]

_PACKED_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.maximum", "relax.minimum", "relax.nn.relu")


def _static_shape(ty) -> tuple | None:
    return static_shape(ty.shape) if isinstance(ty, relax.TensorType) else None


def layout_name(oc: int, isa: str = "vnni") -> str:
    """The layout a packed conv2d with ``oc`` outputs gets, as the quantization report writes it."""
    return f"NCHW[x]c/OIHW[x/4]i{vnni.oc_block(oc, isa)}o4i ({vnni.ISAS[isa].label})"


@dataclass
class _Chain:
    """One uint8 conv2d as Quantize emits it, found by its requantize multiply ``y``."""

    name: str  # conv2d<k>: the layer's name in the quantization report
    x: relax.Var  # the float input the conv quantizes
    scale: np.float32  # s_x
    wq: np.ndarray  # int8 OIHW
    requant: np.ndarray  # float32 per output channel
    attrs: object  # the conv2d's attributes
    inner: tuple  # the bindings the packed kernels replace: (xq, acc, real)
    sole_reader: bool = False  # the chain's quantize is the only reader of x (no float copy of x is needed)
    residual_reader: bool = False  # the others are adds (a residual): they can take x as the quantize made it


def _adds_only(readers: list, own: str) -> bool:
    """One ``own`` (the chain's quantize) among ``readers`` (op names), and at least one other, all ``relax.add``."""
    return readers.count(own) == 1 and len(readers) > 1 and all(r in (own, "relax.add") for r in readers)


def _find_chains(func: relax.Function, weight_max: int) -> dict:
    """{requantize var: _Chain} of the packable conv2d layers of ``func`` (uint8 input, no groups, NCHW, int8
    constant weight within +-``weight_max``), and the set of bindings no one else reads once they are packed."""
    values, uses, conv_ordinal, readers = {}, {}, {}, {}

    def count(e, reader):
        if isinstance(e, relax.Var):
            uses[e] = uses.get(e, 0) + 1
            readers.setdefault(e, []).append(reader)

    for block in func.body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            values[b.var] = b.value
            if _op_name(b.value) == "relax.nn.conv2d":
                conv_ordinal[b.var] = len(conv_ordinal)
            relax.analysis.post_order_visit(b.value, lambda e, r=_op_name(b.value): count(e, r))
    relax.analysis.post_order_visit(func.body.body, lambda e: count(e, None))

    def bound(expr, name):
        v = values.get(expr) if isinstance(expr, relax.Var) else None
        return v if v is not None and _op_name(v) == name else None

    chains = {}
    for var, value in values.items():
        if _op_name(value) != "relax.multiply" or not _is_const(value.args[1]):
            continue
        real_var = value.args[0]
        real = bound(real_var, "relax.astype")
        acc = bound(real.args[0], "relax.nn.conv2d") if real is not None else None
        xq = bound(acc.args[0], "relax.quantize") if acc is not None else None
        if xq is None or not _is_const(acc.args[1]) or _dtype(acc.args[1]) != "int8":
            continue
        a = acc.attrs
        if (int(a.groups) != 1 or str(a.out_dtype) != "int32" or _dtype(acc.args[0]) != "uint8"
                or (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW")):
            continue
        scale, zero = xq.args[1], xq.args[2]
        if not (_is_const(scale) and _is_const(zero)) or scale.value.numpy().size != 1 \
                or np.any(zero.value.numpy() != 0) or not isinstance(xq.args[0], relax.Var):
            continue
        wq = acc.args[1].value.numpy()
        requant = value.args[1].value.numpy()
        if requant.shape != (1, wq.shape[0], 1, 1) or _dtype(real_var) != "float32":
            continue
        if np.abs(wq.astype(np.int32)).max(initial=0) > weight_max:
            raise ValueError(f"conv2d{conv_ordinal[real.args[0]]}: int8 weights beyond +-{weight_max}, which the "
                             "target's vpmaddubsw kernels would saturate (quantize with passes.quantize.config_for)")
        chains[var] = _Chain(f"conv2d{conv_ordinal[real.args[0]]}", xq.args[0],
                             np.float32(scale.value.numpy().reshape(())), wq, requant.reshape(-1), a,
                             (acc.args[0], real.args[0], real_var), uses.get(xq.args[0], 0) == 1,
                             _adds_only(readers.get(xq.args[0], []), "relax.quantize"))
    # the NCHW bindings of a chain are dropped when only the chain reads them (a quantized input may be shared)
    inner_uses = {}
    for c in chains.values():
        for v in c.inner:
            inner_uses[v] = inner_uses.get(v, 0) + 1
    skip = {v for v, n in inner_uses.items() if uses.get(v, 0) == n}
    return chains, skip


@mutator
class _Packer(BindingMutator):
    def __init__(self, mod: tvm.IRModule, chains: dict, skip: set, isa: str, fuse_quantize: bool = True,
                 uint8_residual: bool = True):
        super().__init__(mod)
        self.chains, self.skip, self.isa = chains, skip, isa
        # AMX: quantize by the inverse scale (passes.vnni._quantized), what the tile kernels' epilogue is bound by;
        # the VNNI and AVX2 layouts keep R.quantize's division (their tuned records were made with it)
        self.reciprocal = vnni.ISAS[isa].inverse_scale
        self.fuse_quantize, self.uint8_residual = fuse_quantize, uint8_residual
        self.uint8_of = {}  # original NCHW float var -> (its uint8 NCHW[ob]c quantize, scale): residual adds read it
        self.fused = self.residuals = 0  # quantizes taken into a conv2d epilogue; residual adds reading uint8
        self.quantized = {}  # (x, s_x, ic_bn, padding) -> packed uint8 input: one quantize_repack per shared input
        self.packed_of = {}  # original binding var -> (its value in NCHW[ob]c: a new var, logical channels)
        self.unpacked = {}  # original binding var -> an NCHW unpack of its packed twin
        self.float_packed = {}  # original NCHW float var -> its NCHW[ob]c copy (pack_float)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.skip:  # the NCHW quantize / conv2d / astype of a packed chain: not emitted
            return
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        var = self.bound_var(call)
        if var is not None and var in self.chains:
            return self._emit_packed_conv(var, self.chains[var])
        if var is not None:
            packed = self._packed_elementwise(call)
            if packed is not None:
                self.packed_of[var] = packed
            elif any(a in self.packed_of for a in call.args):
                # any other reader of a packed value (pooling, slicing, the shortcut's channel pad) reads an
                # unpack of it: so the whole NCHW chain before it is dead
                args = [self._unpacked(a) if a in self.packed_of else a for a in call.args]
                return super().visit_call_(relax.Call(call.op, args, call.attrs, call.ty_args))
        return super().visit_call_(call)

    def _emit_packed_conv(self, var, c: _Chain):
        """xp = quantize_repack(packed x, [s_x]); acc = conv2d_nchwc_int8(xp, pack(Wq));
        y = astype(acc, f32) * pack(requant); the NCHW value is unpack(y).

        An NCHW input is packed as float first (shared with a residual add that reads it packed) and quantized from
        there: one kernel that quantizes while it gathers NCHW into NCHW[c] measured 47 us for ResNet56's 16 x 32 x
        32 stem output, the float pack plus quantize_repack 10 + 1 us (tuned, 1 thread)."""
        oc, ic = c.wq.shape[:2]
        _, ic_bn = vnni.ic_block(ic, self.isa)
        padding = [int(p) for p in c.attrs.padding]
        key = (c.x, float(c.scale), ic_bn, tuple(padding))
        xp = self.quantized.get(key)
        if xp is None:
            scale = _const(np.array([c.scale], np.float32))
            src = self.packed_of.get(c.x)  # the input is already NCHW[ob]c: quantize it from there
            residual = c.residual_reader and self.uint8_residual
            if src is not None and self.fuse_quantize and (c.sole_reader or residual):
                # quantized where it is made (FuseOps puts the quantize into the producing conv's epilogue), then
                # padded and re-blocked at 1 byte an element: the float activation is never written; a residual
                # add that reads it too reads the uint8 tensor, dequantized in its own conv's epilogue
                q = self.builder_.emit_te(vnni.quantize_packed, src[0], scale, reciprocal=self.reciprocal,
                                          primfunc_name_hint=vnni.QUANTIZE_NAME)
                xp = self.builder_.emit_te(vnni.pad_repack, q, int(ic), ic_bn, padding,
                                           primfunc_name_hint=vnni.PAD_NAME,
                                           primfunc_attrs={PAD_ATTR: [*padding, int(ic)]})
                self.fused += 1
                if residual:
                    self.uint8_of[c.x] = (q, scale)
            else:
                src = src[0] if src is not None else self._float_packed(c.x)
                xp = self.builder_.emit_te(vnni.quantize_repack, src, scale, int(ic), ic_bn, padding,
                                           reciprocal=self.reciprocal,
                                           primfunc_name_hint=vnni.REPACK_NAME)
            self.quantized[key] = xp
        acc = self.builder_.emit_te(vnni.conv2d_nchwc_int8, xp, _const(vnni.pack_weight(c.wq, self.isa)),
                                    [int(v) for v in c.attrs.strides], [int(v) for v in c.attrs.dilation],
                                    primfunc_name_hint=vnni.CONV_NAME)
        real = self.builder_.emit(relax.op.astype(acc, "float32"))
        y = self.builder_.emit(relax.op.multiply(real, _const(vnni.pack_channels(c.requant, isa=self.isa))))
        self.packed_of[var] = (y, int(oc))
        return self.builder_.call_te(vnni.unpack, y, int(oc), primfunc_name_hint=vnni.UNPACK_NAME)

    def _float_packed(self, var):
        """NCHW[ob]c float copy of an NCHW float var (one per var, whoever asks: a packed conv or a residual add)."""
        got = self.float_packed.get(var)
        if got is None:
            got = self.builder_.emit_te(vnni.pack_float, self.visit_expr(var), self.isa,
                                        primfunc_name_hint=vnni.FLOAT_PACK_NAME)
            self.float_packed[var] = got
        return got

    def _unpacked(self, var):
        got = self.unpacked.get(var)
        if got is None:
            y, c = self.packed_of[var]
            got = self.builder_.emit_te(vnni.unpack, y, c, primfunc_name_hint=vnni.UNPACK_NAME)
            self.unpacked[var] = got
        return got

    def _packed_elementwise(self, call):
        """The NCHW[ob]c twin of an elementwise op on an output of a packed conv (bias add, ReLU, residual add):
        emitted next to the NCHW op, so activations stay packed from conv to conv and the NCHW chain is only
        kept where something else reads it (dead code elimination drops the rest). Padding channels are zero
        and stay zero (their requantize scale and bias are 0). Returns (packed var, channels) or None."""
        name = _op_name(call)
        if name not in _PACKED_OPS or not isinstance(call.ty, relax.TensorType):
            return None
        out_shape = _static_shape(call.ty)
        if out_shape is None or len(out_shape) != 4 or str(call.ty.dtype) != "float32":
            return None
        channels = {self.packed_of[a][1] for a in call.args if a in self.packed_of}
        if len(channels) != 1:
            return None
        (c,) = channels
        if out_shape[1] != c:
            return None
        args = []
        for a in call.args:
            if a in self.packed_of:
                if _static_shape(a.ty) != out_shape:
                    return None
                if name == "relax.add" and a in self.uint8_of:  # a residual read at 1 byte an element
                    q, scale = self.uint8_of[a]
                    real = self.builder_.emit(relax.op.astype(q, "float32"))
                    args.append(self.builder_.emit(relax.op.multiply(real, scale)))
                    self.residuals += 1
                    continue
                args.append(self.packed_of[a][0])
            elif _is_const(a) and _dtype(a) == "float32":
                v = a.value.numpy()
                if v.ndim == 0:
                    args.append(a)
                elif v.shape == (1, c, 1, 1):
                    args.append(_const(vnni.pack_channels(v.reshape(-1), isa=self.isa)))
                else:
                    return None
            elif isinstance(a, relax.Var) and _static_shape(a.ty) == out_shape and _dtype(a) == "float32":
                args.append(self._float_packed(a))
            else:
                return None
        return self.builder_.emit(relax.Call(call.op, args, call.attrs)), c


@tvm.transform.module_pass(opt_level=0, name="Int8Layout")
class Int8Layout:
    """Pack the uint8 conv2d layers of ``func_name`` for ``isa`` (a key of :data:`passes.vnni.ISAS`: ``"vnni"``,
    ``"avx512"``, ``"avx2"``); a module with none is returned unchanged."""

    def __init__(self, isa: str = "vnni", func_name: str = "main", fuse_quantize: bool = True,
                 uint8_residual: bool = True) -> None:
        if isa not in vnni.ISAS:
            raise ValueError(f"unknown int8 ISA '{isa}': one of {', '.join(vnni.ISAS)}")
        self.isa, self.func_name = isa, func_name
        self.fuse_quantize, self.uint8_residual = fuse_quantize, uint8_residual

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.func_name not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        chains, skip = _find_chains(mod[self.func_name], vnni.ISAS[self.isa].weight_max)
        out, fused, residuals = mod, 0, 0
        if chains:
            packer = _Packer(mod, chains, skip, self.isa, self.fuse_quantize, self.uint8_residual)
            gv = mod.get_global_var(self.func_name)
            packer.builder_.update_func(gv, packer.visit_expr(mod[self.func_name]))
            fused, residuals = packer.fused, packer.residuals
            # the NCHW twins nothing reads any more (and their kernels)
            out = relax.transform.DeadCodeElimination([self.func_name])(packer.builder_.get())
        report = reports.get(out, reports.QUANTIZE)
        if report is None:
            return out
        from passes.quantize import constant_bytes

        layouts = {c.name: layout_name(c.wq.shape[0], self.isa) for c in chains.values()}
        for row in report.get("layers", []):
            if row["name"] in layouts:
                row["layout"] = layouts[row["name"]]
        # fused_quantize: conv2d inputs quantized in the producing conv2d's epilogue; uint8_residuals: residual adds
        # that read such an input (rounded to its scale) instead of the float activation
        report.update(vnni_layout=True, int8_isa=self.isa, fused_quantize=fused, uint8_residuals=residuals)
        report["constant_bytes"]["after"] = constant_bytes(out)
        return reports.attach(out, reports.QUANTIZE, report)
