"""Post-training int8 quantization of a Relax module: ``int8`` compute and ``int8-weights`` (int8 storage, fp16 compute).

**int8** (:func:`quantize`). Every ``conv2d`` / ``matmul`` whose weight is a float32 constant becomes::

    xq  = R.quantize(x, s_x, 0, out_dtype=uint8|int8)          # per-tensor activation scale from calibration
    acc = R.nn.conv2d(xq, Wq, out_dtype="int32")              # Wq: int8 constant, symmetric per output channel
    y   = R.multiply(R.astype(acc, "float32"), s_x * s_w)     # requantize to float: one (1,C,1,1) / (1,M) constant

The bias add and ReLU that follow stay as they are; TVM's FuseOps fuses conv2d + astype + multiply + bias + relu
into one kernel, so the requantization, bias and ReLU run in the convolution's epilogue. Activations between
layers (residual adds, pooling) stay float32. Weights: ``s_w[c] = max|W[c]| / 127``, ``Wq = clip(round(W / s_w),
-127, 127)``. Activations: a threshold ``T`` per tensor from calibration (:mod:`passes.calibration`),
``s_x = T / 255`` with uint8 for a tensor that is provably non-negative from the IR (a ReLU output, through pooling,
slicing, zero padding, reshapes, concat, sums of such) when the kernels multiply uint8 by int8 (x86 VNNI:
``vpdpbusd``), else ``s_x = T / 127`` with int8. Layers named in ``keep`` stay float32 (recorded in the report).

Defaults, measured on the shared ResNet56 (93.39 % fp32, 512 training images for calibration, top-1 on the test
set): ``minmax`` calibration with the first conv and the classifier kept fp32 gives 93.47 % on all 10 000 images
(99.6 % argmax agreement with fp32 on the first 2 000); entropy 93.0 % and percentile 99.99 93.35 % on the first
2 000 (fp32: 92.95 %). Only the first conv is kept by default: it reads the signed, 3-channel image (uint8 does
not apply, and the K = 27 reduction is too short to pay for itself). The classifier is int8 since the int8 linear
layer measured no loss (PyTorch simulation of this quantization, all 10 000 test images: dense 93.39 -> 93.41,
50 %-pruned 92.40 -> 92.41) and keeping it fp32 cost 1.9 kB, 0.35 % of a pruned int8 model's weights.

**x86 AVX-512 VNNI** (``QuantConfig.vnni_layout``, set by :func:`config_for` on such a CPU): ``vpdpbusd`` needs 4
consecutive uint8 input channels and a contiguous 16 x 4 int8 weight tile, which NCHW / OIHW does not have, so
MetaSchedule cannot tensorize the conv2d above. There each uint8 conv2d is emitted in the packed layout of
:mod:`passes.vnni` instead (kernels made with ``emit_te``; ob, the output-channel block, is 16 or, for widths
8 / 24 / 40 / ... that 16-blocks would pad, 8: a ymm vpdpbusd)::

    xp  = quantize_repack(pack_float(x), [s_x])   # uint8 NCHW[ic_bn]c, the conv's zero padding applied, ic to 4k
    acc = conv2d_nchwc_int8(xp, Wp)           # int32 NCHW[ob]c; Wp: OIHW[ic_bn/4]i[ob]o4i, oc zero-padded to ob*k
    y   = unpack(astype(acc, f32) * pack(s_x * s_w))   # float32 NCHW, padding channels dropped

The integers are the same as the NCHW conv2d's (an exact int32 sum in another order: bit-identical outputs).
FuseOps puts the requantize, bias, ReLU and residual add in the conv's epilogue; activations stay packed from conv
to conv (the next conv's quantize_repack reads them there). In the packed kernels ``s_x`` is a tensor argument,
not an immediate, so they do not depend on the calibration: a tuning database serves any checkpoint with the same
stripped shapes (the NCHW ``R.quantize`` in front of the int8 classifier still inlines its scale).

**int8-weights** (:func:`quantize_weights`), on an fp16 module (``ToMixedPrecision``): every conv2d / matmul weight
constant is stored int8 per output channel and dequantized in front of the fp16 conv2d. The dequantize and the
conv2d are wrapped in one private ``Primitive`` Relax function per layer, so the build pipelines' FoldConstant
cannot fold the dequantize back into an fp16 constant; FuseTIR turns each into one kernel that reads int8 weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from passes import calibration as calib
from passes.binding_mutator import BindingMutator

__all__ = [
    "QuantConfig", "Layer", "Calibration", "config_for", "find_layers", "calibrate", "quantize",
    "quantize_weights", "quantize_weight", "constant_bytes", "DEFAULT_KEEP",
]

DEFAULT_KEEP = ("first",)
_KEEP_WORDS = ("first", "last", "none")
_NONNEG_PASSTHROUGH = {
    "relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d", "relax.strided_slice",
    "relax.reshape", "relax.flatten", "relax.mean", "relax.sum", "relax.max", "relax.permute_dims",
    "relax.squeeze", "relax.expand_dims", "relax.nn.dropout",
}


def _op_name(expr) -> str | None:
    if isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def _is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.ty, relax.TensorType)


def _dtype(expr) -> str | None:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _const(arr: np.ndarray):
    return relax.const(np.ascontiguousarray(arr), str(arr.dtype))


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class QuantConfig:
    """How :func:`quantize` quantizes. ``keep``: layers left in float32 - ``"first"`` (layers reading a function
    parameter: the normalized image), ``"last"`` (the last conv2d/matmul: the classifier), layer names
    (``conv2d0``, ``matmul0``, ...) or ``"none"``."""

    method: str = calib.DEFAULT_METHOD
    percentile: float = calib.DEFAULT_PERCENTILE
    unsigned_activations: bool = True
    keep: tuple = DEFAULT_KEEP
    # x86 AVX-512 VNNI: uint8 conv2d layers in the packed layout vpdpbusd needs (see _emit_packed_conv)
    vnni_layout: bool = False

    def __post_init__(self):
        if self.method not in calib.METHODS:
            raise ValueError(f"unknown calibration method '{self.method}': one of {', '.join(calib.METHODS)}")
        if not 0 < self.percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        object.__setattr__(self, "keep", tuple(self.keep))

    def describe(self) -> dict:
        return {"method": self.method, "percentile": self.percentile if self.method == "percentile" else None,
                "unsigned_activations": self.unsigned_activations, "keep": list(self.keep),
                "vnni_layout": self.vnni_layout}


def config_for(spec, **overrides) -> QuantConfig:
    """The configuration for a target (:class:`targets.TargetSpec`): uint8 activations where the int8 kernels
    multiply uint8 by int8 (x86 VNNI ``vpdpbusd``); int8 x int8 elsewhere (CUDA ``dp4a``/IMMA, Arm ``sdot``). On
    AVX-512 VNNI the uint8 conv2d layers are emitted in the packed layout MetaSchedule tensorizes with vpdpbusd."""
    import platform

    from passes import vnni

    x86 = spec.kind == "cpu" and not spec.cross_compiled and platform.machine() in ("x86_64", "AMD64")
    return replace(QuantConfig(unsigned_activations=x86, vnni_layout=x86 and vnni.target_has_vnni(spec)),
                   **overrides)


# ---------------------------------------------------------------- layers


@dataclass
class Layer:
    """A quantizable conv2d / matmul binding of one function."""

    index: int  # program order among the function's quantizable layers
    op: str  # "conv2d" | "matmul"
    ordinal: int  # program order among layers of the same op
    var: relax.Var
    call: tvm.ir.Call
    x: relax.Expr
    weight: np.ndarray
    nonneg: bool  # the input is provably >= 0
    reads_param: bool  # the input is a parameter of the function

    @property
    def name(self) -> str:
        return f"{self.op}{self.ordinal}"

    @property
    def out_axis(self) -> int:
        return 0 if self.op == "conv2d" else 1  # OIHW / (K, M)

    @property
    def macs_per_output(self) -> int:
        w = self.weight
        return int(np.prod(w.shape[1:])) if self.op == "conv2d" else int(w.shape[0])


def _nonneg_vars(func: relax.Function) -> set:
    """Vars of ``func`` whose value is provably >= 0 everywhere (a forward pass over the bindings)."""
    out = set()

    def nn(e) -> bool:
        if isinstance(e, relax.Var):
            return e in out
        if _is_const(e):
            return bool(np.all(e.value.numpy() >= 0))
        return False

    for block in func.body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            v, name = b.value, _op_name(b.value)
            ok = False
            if isinstance(v, relax.Var):
                ok = nn(v)
            elif name == "relax.nn.relu":
                ok = True
            elif name in _NONNEG_PASSTHROUGH:
                ok = nn(v.args[0])
            elif name == "relax.nn.pad":
                ok = nn(v.args[0]) and float(v.attrs.pad_value) >= 0
            elif name in ("relax.add", "relax.multiply", "relax.maximum"):
                ok = nn(v.args[0]) and nn(v.args[1])
            elif name == "relax.concat" and isinstance(v.args[0], relax.Tuple):
                ok = all(nn(f) for f in v.args[0].fields)
            if ok:
                out.add(b.var)
    return out


def find_layers(func: relax.Function, weight_dtype: str = "float32") -> list[Layer]:
    """The conv2d (NCHW/OIHW) and 2-D matmul bindings of ``func`` with a constant ``weight_dtype`` weight."""
    nonneg = _nonneg_vars(func)
    params = set(func.params)
    layers, per_op = [], {"conv2d": 0, "matmul": 0}
    for block in func.body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            call, name = b.value, _op_name(b.value)
            if name not in ("relax.nn.conv2d", "relax.matmul"):
                continue
            x, w = call.args[0], call.args[1]
            if not _is_const(w) or _dtype(w) != weight_dtype or _dtype(x) != weight_dtype:
                continue
            if not isinstance(x, relax.Var):
                continue
            if name == "relax.nn.conv2d":
                a = call.attrs
                if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
                    continue
                op = "conv2d"
            else:
                if len(w.ty.shape.values) != 2 or len(x.ty.shape.values) != 2:
                    continue
                op = "matmul"
            layers.append(Layer(len(layers), op, per_op[op], b.var, call, x, w.value.numpy(), x in nonneg,
                                x in params))
            per_op[op] += 1
    return layers


def _kept(layers: list[Layer], keep) -> dict:
    """{layer index: reason} for the layers ``keep`` leaves in higher precision."""
    out = {}
    names = {l.name: l for l in layers}
    for k in keep:
        if k == "none":
            continue
        if k == "first":
            for l in layers:
                if l.reads_param:
                    out[l.index] = ("first layer: its input is the normalized image (signed, 3 channels); "
                                    f"{100 * _mac_share(layers, l):.2f}% of the MACs")
        elif k == "last":
            if layers:
                l = layers[-1]
                out[l.index] = ("last layer (classifier): its output is the logits; "
                                f"{100 * _mac_share(layers, l):.2f}% of the MACs")
        elif k in names:
            out[names[k].index] = "named in keep"
        else:
            raise ValueError(f"keep: unknown layer '{k}' (layers: {', '.join(names)}; or {', '.join(_KEEP_WORDS)})")
    return out


def _mac_share(layers: list[Layer], layer: Layer) -> float:
    def macs(l):
        n_out = np.prod([int(v) for v in l.var.ty.shape.values])
        return float(n_out) * l.macs_per_output

    total = sum(macs(l) for l in layers)
    return macs(layer) / total if total else 0.0


# ---------------------------------------------------------------- weights


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 along ``axis``: (``Wq`` int8 in [-127, 127], scales float32 of length
    ``w.shape[axis]``) with ``W ~= Wq * scale``; an all-zero channel gets scale 1 (and Wq 0)."""
    w = np.asarray(w, dtype=np.float64)
    red = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.abs(w).max(axis=red) if red else np.abs(w)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.astype(np.float64).reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


# ---------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """Histograms of the calibrated layer inputs of one function (see :func:`calibrate`)."""

    func_name: str
    layer_names: list  # names of the layers in program order (a check that the module still matches)
    histograms: dict  # layer name -> calibration.Histogram (layers sharing an input share the histogram)
    images: int
    batch: int

    def threshold(self, name: str, config: QuantConfig, unsigned: bool) -> float:
        return self.histograms[name].threshold(config.method, 256 if unsigned else 128, config.percentile)


def calibrate(mod: tvm.IRModule, images: np.ndarray, *, func_name: str = "main", target=None,
              progress=None) -> Calibration:
    """Run the fp32 ``mod`` on ``images`` (float32 NCHW, normalized) and histogram the input of every
    quantizable layer of ``func_name``. One run serves every method and keep option (:class:`QuantConfig`)."""
    func = mod[func_name]
    layers = find_layers(func)
    if not layers:
        raise ValueError(f"{func_name} has no float32 conv2d/matmul with a constant weight to quantize")
    inputs, index = [], {}
    for l in layers:
        if l.x not in index:
            index[l.x] = len(inputs)
            inputs.append(l.x)
    got = calib.collect(mod, inputs, images, func_name=func_name, target=target, progress=progress)
    hists = {l.name: got.histograms[index[l.x]] for l in layers}
    return Calibration(func_name, [l.name for l in layers], hists, got.images, got.batch)


# ---------------------------------------------------------------- int8 rewrite


@dataclass
class _Plan:
    # binding var -> (Layer, act dtype, s_x, Wq, s_w)
    rewrites: dict = field(default_factory=dict)
    packed: set = field(default_factory=set)  # binding vars of conv2d layers emitted in the VNNI layout


def _packable(layer: Layer, act_dtype: str) -> bool:
    """A conv2d the VNNI layout takes: uint8 activations (vpdpbusd multiplies u8 by s8), NCHW, no groups."""
    return layer.op == "conv2d" and act_dtype == "uint8" and int(layer.call.attrs.groups) == 1


@mutator
class _Int8Rewriter(BindingMutator):
    def __init__(self, mod: tvm.IRModule, plan: _Plan):
        super().__init__(mod)
        self.plan = plan
        self.quantized = {}  # (new x, dtype, scale) -> quantized var: one quantize per shared input
        # VNNI layout: original binding var -> (its value in NCHW[ob]c: a new var, logical channels)
        self.packed_of = {}
        self.unpacked = {}  # original binding var -> an NCHW unpack of its packed twin
        self.float_packed = {}  # original NCHW float var -> its NCHW[ob]c copy (pack_float)

    def visit_call_(self, call):
        var = self.bound_var(call)
        if var is None or var not in self.plan.rewrites:
            if var is not None and self.plan.packed:
                packed = self._packed_elementwise(call)
                if packed is not None:
                    self.packed_of[var] = packed
                elif any(a in self.packed_of for a in call.args):
                    # any other reader of a packed value (pooling, slicing, the shortcut's channel pad) reads an
                    # unpack of it: so the whole NCHW chain before it is dead
                    args = [self._unpacked(a) if a in self.packed_of else a for a in call.args]
                    return super().visit_call_(relax.Call(call.op, args, call.attrs, call.ty_args))
            return super().visit_call_(call)
        layer, act_dtype, s_x, wq, s_w = self.plan.rewrites[var]
        x = self.visit_expr(layer.x)
        if var in self.plan.packed:
            return self._emit_packed_conv(layer, x, s_x, wq, s_w)
        key = (x, act_dtype, float(s_x))
        xq = self.quantized.get(key)
        if xq is None:
            xq = self.builder_.emit(relax.op.quantize(x, relax.const(np.float32(s_x), "float32"),
                                                      relax.const(0, act_dtype), axis=1, out_dtype=act_dtype))
            self.quantized[key] = xq
        if layer.op == "conv2d":
            a = call.attrs
            acc = relax.op.nn.conv2d(xq, _const(wq), strides=a.strides, padding=a.padding, dilation=a.dilation,
                                     groups=int(a.groups), out_dtype="int32")
            shape = (1, -1, 1, 1)
        else:
            acc = relax.op.matmul(xq, _const(wq), out_dtype="int32")
            shape = (1, -1)
        acc = self.builder_.emit(acc)
        real = self.builder_.emit(relax.op.astype(acc, "float32"))
        return relax.op.multiply(real, _const(_requant(s_x, s_w).reshape(shape)))

    def _emit_packed_conv(self, layer, x, s_x, wq, s_w):
        """The conv2d in the layout vpdpbusd needs (:mod:`passes.vnni`)::

            xf  = pack_float(x)                            # only where x is not already a packed conv's output
            xp  = quantize_repack(xf, [s_x])             # uint8 NCHW[ic_bn]c, conv padding and channel blocks zero
            acc = conv2d_nchwc_int8(xp, pack(Wq))         # int32 NCHW[ob]c: OIHW[ic_bn/4]i[ob]o4i weight constant
            y   = unpack(astype(acc, f32) * pack(s_x * s_w))   # float32 NCHW, the padding channels dropped

        The same integers as the NCHW conv2d (a reordered exact int32 sum); FuseOps puts astype * requant in the
        conv's epilogue and unpack in the elementwise kernels after it. An NCHW input is packed as float first
        (shared with a residual add that reads it packed) and quantized from there: one kernel that quantizes
        while it gathers NCHW into NCHW[c] measured 47 us for ResNet56's 16 x 32 x 32 stem output, the float
        pack plus quantize_repack 10 + 1 us (tuned, 1 thread). The activation scale is a tensor argument, so
        these kernels do not depend on the calibration (a database tuned on one checkpoint serves another with the
        same stripped shapes)."""
        from passes import vnni

        a = layer.call.attrs
        oc, ic = wq.shape[:2]
        _, ic_bn = vnni.ic_block(ic)
        padding = [int(p) for p in a.padding]
        key = ("packed", x, float(s_x), ic_bn, tuple(padding))
        xp = self.quantized.get(key)
        if xp is None:
            scale = _const(np.array([s_x], np.float32))
            src = self.packed_of.get(layer.x)  # the input is already NCHW[ob]c: quantize it from there
            src = src[0] if src is not None else self._float_packed(layer.x)
            xp = self.builder_.emit_te(vnni.quantize_repack, src, scale, int(ic), ic_bn, padding,
                                       primfunc_name_hint=vnni.REPACK_NAME)
            self.quantized[key] = xp
        acc = self.builder_.emit_te(vnni.conv2d_nchwc_int8, xp, _const(vnni.pack_weight(wq)),
                                    [int(v) for v in a.strides], [int(v) for v in a.dilation],
                                    primfunc_name_hint=vnni.CONV_NAME)
        real = self.builder_.emit(relax.op.astype(acc, "float32"))
        y = self.builder_.emit(relax.op.multiply(real, _const(vnni.pack_channels(_requant(s_x, s_w)))))
        self.packed_of[layer.var] = (y, int(oc))
        return self.builder_.call_te(vnni.unpack, y, int(oc), primfunc_name_hint=vnni.UNPACK_NAME)

    def _float_packed(self, var):
        """NCHW[ob]c float copy of an NCHW float var (one per var, whoever asks: a packed conv or a residual add)."""
        from passes import vnni

        got = self.float_packed.get(var)
        if got is None:
            got = self.builder_.emit_te(vnni.pack_float, self.visit_expr(var),
                                        primfunc_name_hint=vnni.FLOAT_PACK_NAME)
            self.float_packed[var] = got
        return got

    def _unpacked(self, var):
        from passes import vnni

        got = self.unpacked.get(var)
        if got is None:
            y, c = self.packed_of[var]
            got = self.builder_.emit_te(vnni.unpack, y, c, primfunc_name_hint=vnni.UNPACK_NAME)
            self.unpacked[var] = got
        return got

    _PACKED_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.maximum", "relax.minimum", "relax.nn.relu")

    def _packed_elementwise(self, call):
        """The NCHW[ob]c twin of an elementwise op on an output of a packed conv (bias add, ReLU, residual add):
        emitted next to the NCHW op, so activations stay packed from conv to conv and the NCHW chain is only
        kept where something else reads it (dead code elimination drops the rest). Padding channels are zero
        and stay zero (their requantize scale and bias are 0). Returns (packed var, channels) or None."""
        from passes import vnni

        name = _op_name(call)
        if name not in self._PACKED_OPS or not isinstance(call.ty, relax.TensorType):
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
                args.append(self.packed_of[a][0])
            elif _is_const(a) and _dtype(a) == "float32":
                v = a.value.numpy()
                if v.ndim == 0:
                    args.append(a)
                elif v.shape == (1, c, 1, 1):
                    args.append(_const(vnni.pack_channels(v.reshape(-1))))
                else:
                    return None
            elif isinstance(a, relax.Var) and _static_shape(a.ty) == out_shape and _dtype(a) == "float32":
                args.append(self._float_packed(a))
            else:
                return None
        op = call.op
        new = relax.Call(op, args, call.attrs)
        return self.builder_.emit(new), c


def _packed_layout(oc: int) -> str:
    from passes import vnni

    return f"NCHW[x]c/OIHW[x/4]i{vnni.oc_block(oc)}o4i (VNNI)"


def _static_shape(ty) -> tuple | None:
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    try:
        return tuple(int(v) for v in ty.shape.values)
    except (TypeError, ValueError):
        return None


def _requant(s_x, s_w: np.ndarray) -> np.ndarray:
    """float32 ``s_x * s_w[c]`` (computed in float64, rounded once)."""
    return (np.float64(s_x) * s_w.astype(np.float64)).astype(np.float32)


def quantize(mod: tvm.IRModule, calibration: Calibration, config: QuantConfig | None = None) -> tuple[tvm.IRModule, dict]:
    """int8 compute for ``calibration.func_name`` of ``mod`` (the fp32 module that was calibrated, or one with the
    same layers: e.g. the same IR at another batch size). Returns ``(new_mod, report)``; ``mod`` is unchanged.

    ``report``: the scheme, the calibration (method, images), and one row per layer: name, op, weight shape,
    precision (``int8`` or ``fp32`` with the reason it was kept), activation dtype, threshold and scale."""
    config = config or QuantConfig()
    func_name = calibration.func_name
    func = mod[func_name]
    layers = find_layers(func)
    if [l.name for l in layers] != calibration.layer_names:
        raise ValueError("the module's layers differ from the calibrated module's")
    kept = _kept(layers, config.keep)
    plan, rows = _Plan(), []
    for l in layers:
        row = {"name": l.name, "op": l.op, "weight_shape": list(l.weight.shape)}
        if l.index in kept:
            row.update(precision="fp32", reason=kept[l.index])
            rows.append(row)
            continue
        unsigned = bool(config.unsigned_activations and l.nonneg)
        act_dtype, qmax = ("uint8", 255.0) if unsigned else ("int8", 127.0)
        t = calibration.threshold(l.name, config, unsigned)
        h = calibration.histograms[l.name]
        if t <= 0.0:
            t = 1.0  # an all-zero input: any scale gives exact zeros
        s_x = np.float32(t / qmax)
        wq, s_w = quantize_weight(l.weight, l.out_axis)
        plan.rewrites[l.var] = (l, act_dtype, s_x, wq, s_w)
        packed = config.vnni_layout and _packable(l, act_dtype)
        if packed:
            plan.packed.add(l.var)
        row.update(precision="int8", activation_dtype=act_dtype, threshold=float(t), scale=float(s_x),
                   layout=_packed_layout(wq.shape[0]) if packed else "NCHW/OIHW",
                   observed_min=float(h.min), observed_max=float(h.max),
                   clipped_fraction=_clipped(h, t))
        rows.append(row)
    new_mod = _apply_plan(mod, func_name, plan)
    report = {
        "scheme": ("weights int8 symmetric per output channel; activations per tensor, zero point 0 "
                   "(uint8 when provably non-negative and the kernels take uint8, else int8); int32 accumulation; "
                   "requantize to float32 (acc * s_x * s_w[c]) fused with bias and ReLU"),
        "calibration": {"method": config.method,
                        "percentile": config.percentile if config.method == "percentile" else None,
                        "images": calibration.images, "batch": calibration.batch,
                        "run": "fp32 Relax module, default CPU pipeline"},
        "unsigned_activations": config.unsigned_activations,
        "vnni_layout": config.vnni_layout,
        "keep": list(config.keep),
        "kept": [{"layer": r["name"], "reason": r["reason"]} for r in rows if r["precision"] != "int8"],
        "layers": rows,
        "int8_layers": sum(r["precision"] == "int8" for r in rows),
        "constant_bytes": {"before": constant_bytes(mod), "after": constant_bytes(new_mod)},
    }
    return new_mod, report


def _clipped(h: calib.Histogram, t: float) -> float:
    hist, width = h.trimmed()
    if width == 0 or hist.sum() == 0:
        return 0.0
    k = int(np.floor(t / width))
    return float(hist[k + 1:].sum() / hist.sum()) if k + 1 < len(hist) else 0.0


def _apply_plan(mod, func_name, plan):
    if not plan.rewrites:
        return mod
    rw = _Int8Rewriter(mod, plan)
    gv = mod.get_global_var(func_name)
    new_func = rw.visit_expr(mod[func_name])
    rw.builder_.update_func(gv, new_func)
    out = rw.builder_.get()
    if plan.packed:  # the NCHW twins nothing reads any more (and their kernels)
        out = relax.transform.DeadCodeElimination([func_name])(out)
    return out


# ---------------------------------------------------------------- int8-weights (fp16 compute)


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
    ``FoldConstant`` first). Returns ``(new_mod, report)``; activations and arithmetic stay ``dtype``."""
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


# ---------------------------------------------------------------- accounting


def constant_bytes(mod: tvm.IRModule) -> dict:
    """Bytes of the tensor constants in the Relax functions of ``mod``, in total and by dtype (each constant
    object counted once)."""
    seen, by_dtype = set(), {}

    def visit(e):
        if _is_const(e) and e not in seen:
            seen.add(e)
            arr = e.value.numpy()
            by_dtype[str(arr.dtype)] = by_dtype.get(str(arr.dtype), 0) + int(arr.nbytes)

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return {"total": sum(by_dtype.values()), "by_dtype": dict(sorted(by_dtype.items()))}
