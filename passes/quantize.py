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

**x86 int8 layout**: on x86 CPUs with int8 dot products (AVX-512 VNNI ``vpdpbusd``; AVX-512BW / AVX2
``vpmaddubsw`` + ``vpmaddwd``) the uint8 conv2d layers are then packed by a separate pass,
:class:`passes.int8_layout.Int8Layout` (``QuantConfig.vnni_layout`` / ``int8_isa`` say which; :func:`quantize`
runs both). On the ``vpmaddubsw`` ISAs the weights are 7-bit (``QuantConfig.weight_max`` 63: see
:data:`passes.vnni.MADDUBS_WEIGHT_MAX`).

**int8-weights**: :mod:`passes.quantize_weights`.

The pass form is :class:`Quantize` (its report travels as a module attribute: :func:`report_of`);
:func:`quantize` is the function form, ``(new module, report)``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from passes import calibration as calib
from passes import reports
from passes.binding_mutator import BindingMutator
from passes.patterns import const as _const, dtype as _dtype, is_const as _is_const, op_name as _op_name

__all__ = [
    "QuantConfig", "Layer", "Calibration", "Quantize", "config_for", "find_layers", "calibrate", "quantize",
    "quantize_weight", "constant_bytes", "report_of", "DEFAULT_KEEP",
]

DEFAULT_KEEP = ("first",)
_KEEP_WORDS = ("first", "last", "none")
_NONNEG_PASSTHROUGH = {
    "relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d", "relax.strided_slice",
    "relax.reshape", "relax.flatten", "relax.mean", "relax.sum", "relax.max", "relax.permute_dims",
    "relax.squeeze", "relax.expand_dims", "relax.nn.dropout",
}


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
    # x86 int8 dot products: uint8 conv2d layers in the packed layout (passes.int8_layout) for int8_isa
    vnni_layout: bool = False
    int8_isa: str = "vnni"  # a key of passes.vnni.ISAS: vnni, avx512, avx2
    weight_max: int = 127  # int8 weights in [-weight_max, weight_max] (63 for the vpmaddubsw ISAs)
    # packed layout: a conv2d whose output only the next packed conv2d reads quantizes in its own epilogue
    fuse_quantize: bool = True
    # with it: a residual add reading such a quantized activation reads the uint8 tensor (dequantized in its conv's
    # epilogue) instead of the float one, so the block output is never written as float
    uint8_residual: bool = True

    def __post_init__(self):
        if self.method not in calib.METHODS:
            raise ValueError(f"unknown calibration method '{self.method}': one of {', '.join(calib.METHODS)}")
        if not 0 < self.percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        if not 1 <= self.weight_max <= 127:
            raise ValueError("weight_max must be in [1, 127]")
        object.__setattr__(self, "keep", tuple(self.keep))

    def describe(self) -> dict:
        return {"method": self.method, "percentile": self.percentile if self.method == "percentile" else None,
                "unsigned_activations": self.unsigned_activations, "keep": list(self.keep),
                "vnni_layout": self.vnni_layout, "int8_isa": self.int8_isa if self.vnni_layout else None,
                "weight_max": self.weight_max}


def config_for(spec, **overrides) -> QuantConfig:
    """The configuration for a target (:class:`targets.TargetSpec`): uint8 activations where the int8 kernels
    multiply uint8 by int8 (x86: ``vpdpbusd``, ``vpmaddubsw``); int8 x int8 elsewhere (CUDA ``dp4a``/IMMA, Arm
    ``sdot``). On an x86 target with int8 dot products (:func:`passes.vnni.target_int8_isa`) the uint8 conv2d
    layers are packed for them (:class:`passes.int8_layout.Int8Layout`), with 7-bit weights where the kernels
    use the saturating ``vpmaddubsw``."""
    import platform

    from passes import vnni

    x86 = spec.kind == "cpu" and not spec.cross_compiled and platform.machine() in ("x86_64", "AMD64")
    isa = vnni.target_int8_isa(spec) if x86 else None
    weight_max = 127 if isa is None or vnni.ISAS[isa].weight_max == 127 else vnni.MADDUBS_WEIGHT_MAX - 1
    return replace(QuantConfig(unsigned_activations=x86, vnni_layout=isa is not None, int8_isa=isa or "vnni",
                               weight_max=weight_max), **overrides)


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
    out, tuples = set(), {}

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
            elif isinstance(v, relax.Tuple):  # normal form binds a concat's operands as a tuple first
                tuples[b.var] = v
                ok = all(nn(f) for f in v.fields)
            elif isinstance(v, relax.TupleGetItem):  # e.g. max_pool2d's (values, indices) pair from torch.export
                t = tuples.get(v.tuple_value) if isinstance(v.tuple_value, relax.Var) else v.tuple_value
                ok = isinstance(t, relax.Tuple) and nn(t.fields[v.index])
            elif name == "relax.concat":
                args = v.args[0]
                ok = all(nn(f) for f in args.fields) if isinstance(args, relax.Tuple) else nn(args)
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


def quantize_weight(w: np.ndarray, axis: int, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 along ``axis``: (``Wq`` int8 in [-qmax, qmax], scales float32 of length
    ``w.shape[axis]``) with ``W ~= Wq * scale``; an all-zero channel gets scale 1 (and Wq 0)."""
    w = np.asarray(w, dtype=np.float64)
    red = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.abs(w).max(axis=red) if red else np.abs(w)
    scale = np.where(amax > 0, amax / float(qmax), 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.astype(np.float64).reshape(shape)), -qmax, qmax).astype(np.int8)
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

    def save(self, file) -> None:
        """Write to ``file`` (a path or binary file object) as a compressed npz: one histogram per distinct input."""
        distinct = list({id(h): h for h in self.histograms.values()}.values())
        which = [next(i for i, h in enumerate(distinct) if h is self.histograms[n]) for n in self.layer_names]
        arrays = {"layer_names": np.array(self.layer_names), "histogram_of_layer": np.array(which, dtype=np.int64),
                  "info": np.array([self.func_name]), "images_batch": np.array([self.images, self.batch])}
        for i, h in enumerate(distinct):
            arrays[f"counts{i}"], arrays[f"state{i}"] = h.counts, h.state()
        np.savez_compressed(file, **arrays)

    @classmethod
    def load(cls, file) -> "Calibration":
        """The Calibration :meth:`save` wrote; ValueError on anything else (nothing in the file is executed)."""
        try:
            with np.load(file, allow_pickle=False) as z:
                names = [str(n) for n in z["layer_names"]]
                which = z["histogram_of_layer"].astype(np.int64)
                func_name, (images, batch) = str(z["info"][0]), (int(v) for v in z["images_batch"])
                n_hist = int(which.max()) + 1 if len(which) else 0
                hists = [calib.Histogram.from_state(z[f"counts{i}"], z[f"state{i}"]) for i in range(n_hist)]
        except (KeyError, OSError, EOFError, TypeError, ValueError, IndexError, zipfile.BadZipFile) as e:
            raise ValueError(f"not a calibration file of this project ({e})") from None
        if not names or len(which) != len(names) or which.min() < 0 or images <= 0 or batch <= 0:
            raise ValueError("not a calibration file of this project (layer table inconsistent)")
        return cls(func_name, names, {n: hists[int(i)] for n, i in zip(names, which)}, images, batch)


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


@mutator
class _Int8Rewriter(BindingMutator):
    def __init__(self, mod: tvm.IRModule, plan: _Plan):
        super().__init__(mod)
        self.plan = plan
        self.quantized = {}  # (new x, dtype, scale) -> quantized var: one quantize per shared input

    def visit_call_(self, call):
        var = self.bound_var(call)
        if var is None or var not in self.plan.rewrites:
            return super().visit_call_(call)
        layer, act_dtype, s_x, wq, s_w = self.plan.rewrites[var]
        x = self.visit_expr(layer.x)
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


def _requant(s_x, s_w: np.ndarray) -> np.ndarray:
    """float32 ``s_x * s_w[c]`` (computed in float64, rounded once)."""
    return (np.float64(s_x) * s_w.astype(np.float64)).astype(np.float32)


def _quantize(mod: tvm.IRModule, calibration: Calibration, config: QuantConfig) -> tuple[tvm.IRModule, dict]:
    """The NCHW int8 rewrite and its report (see :class:`Quantize`)."""
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
        wq, s_w = quantize_weight(l.weight, l.out_axis, config.weight_max)
        plan.rewrites[l.var] = (l, act_dtype, s_x, wq, s_w)
        row.update(precision="int8", activation_dtype=act_dtype, threshold=float(t), scale=float(s_x),
                   layout="NCHW/OIHW", observed_min=float(h.min), observed_max=float(h.max),
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
        "vnni_layout": False,  # Int8Layout sets it when it packs the module
        "keep": list(config.keep),
        "kept": [{"layer": r["name"], "reason": r["reason"]} for r in rows if r["precision"] != "int8"],
        "layers": rows,
        "int8_layers": sum(r["precision"] == "int8" for r in rows),
        "constant_bytes": {"before": constant_bytes(mod), "after": constant_bytes(new_mod)},
    }
    if config.weight_max != 127:
        report["weight_range"] = [-config.weight_max, config.weight_max]
    return new_mod, report


@tvm.transform.module_pass(opt_level=0, name="Quantize")
class Quantize:
    """int8 compute for ``calibration.func_name`` (the fp32 module that was calibrated, or one with the same layers:
    e.g. the same IR at another batch size), in NCHW. The report (the scheme, the calibration, one row per layer:
    name, op, weight shape, precision - ``int8`` or ``fp32`` with the reason it was kept -, activation dtype,
    threshold and scale) is attached to the module it returns (:func:`report_of`). Run
    :class:`passes.int8_layout.Int8Layout` after it for the packed x86 layout."""

    def __init__(self, calibration: Calibration, config: QuantConfig | None = None) -> None:
        self.calibration, self.config = calibration, config or QuantConfig()

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        new_mod, report = _quantize(mod, self.calibration, self.config)
        return reports.attach(new_mod, reports.QUANTIZE, report)


def report_of(mod: tvm.IRModule) -> dict | None:
    """The quantization report :class:`Quantize` (or QuantizeWeights) attached to ``mod``, None if none ran."""
    return reports.get(mod, reports.QUANTIZE)


def quantize(mod: tvm.IRModule, calibration: Calibration, config: QuantConfig | None = None) -> tuple[tvm.IRModule, dict]:
    """:class:`Quantize`, then (``config.vnni_layout``) :class:`passes.int8_layout.Int8Layout` for
    ``config.int8_isa`` as a function: ``(new_mod, report)``; ``mod`` is unchanged."""
    from passes.int8_layout import Int8Layout

    config = config or QuantConfig()
    passes = [Quantize(calibration, config)] + ([Int8Layout(config.int8_isa, calibration.func_name,
                                                                           config.fuse_quantize,
                                                                           config.uint8_residual)]
                                                if config.vnni_layout else [])
    out = tvm.transform.Sequential(passes)(mod)
    report = report_of(out)
    return out.without_attr(reports.QUANTIZE), report


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
    return rw.builder_.get()


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
