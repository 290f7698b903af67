"""StripZeroChannels: physically remove provably-zero channels from a Relax module.

Structured pruning leaves a dense-shaped model where a pruned conv2d output channel has a zero filter and, after
BatchNorm folding, a zero bias-add constant, so the channel is exactly 0 everywhere. This pass proves which channels
are zero from the IR alone and deletes them: from the producing conv2d (output slices of its weight and of the
following bias constant), from every tensor they flow through, and from every consumer (input slices of conv2d and
matmul weights). The result computes the same function (up to float rounding of the shorter sums).

Algorithm, per Relax function:

1. *Forward zero analysis.* Every tensor binding of rank >= 2 whose axis 1 (the channel axis of NCHW and of (N, C))
   has a static extent gets one node per channel. In binding order, each recognised operator computes which output
   channels are provably zero from its inputs' zero channels and its constant operands:
   conv2d / matmul (all weight slices zero or multiplied by a zero input channel), bias add (both sides zero),
   multiply (either side zero), relu and other f(0) = 0 elementwise ops, max / avg / adaptive pooling, spatial
   reductions, spatial strided_slice, constant channel pad (padded channels are zero), concat (by segment),
   (N, C, 1, 1) <-> (N, C) reshape / flatten, variable aliases and tuple field reads.
2. *Channel spaces.* Operators that keep channels aligned (elementwise ops, pooling, pad and concat with their
   offsets, ...) join their operands' and result's channel nodes in one union-find class: a channel is removed
   from all of a class's tensors or from none. conv2d and matmul separate classes (their input channel is dropped
   by slicing the weight's input axis, their output channel by slicing its output axis).
3. *Decision.* A class is removed iff every member is provably zero and no member is pinned. Everything not
   understood pins the channels it touches: function parameters, the function's result, operands of any other
   operator (grouped or non-NCHW convolutions, channel slicing, non-constant weights, ...), match_cast, nested
   control flow. Each tensor keeps at least one channel (no zero-extent tensors).
4. *Rewrite* with an ExprMutator: new, sliced constants (the input module and its possibly shared constants are
   never mutated), adjusted pad widths and reshape targets; shapes of everything else are re-inferred.

Assumes finite activations (0 * inf is not 0); weights with non-finite values make their operator opaque.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import mutator
from passes import reports
from passes.binding_mutator import BindingMutator

__all__ = ["StripZeroChannels", "strip_zero_channels", "report_totals", "report_of"]

# ---------------------------------------------------------------- IR helpers

_BINARY_OPS = {"relax.add": "and", "relax.subtract": "and", "relax.multiply": "or"}
# Elementwise, channel-preserving ops with f(0) == 0.
_ZERO_PRESERVING_UNARY = {
    "relax.nn.relu",
    "relax.nn.gelu",
    "relax.nn.gelu_tanh",
    "relax.nn.silu",
    "relax.nn.leakyrelu",
    "relax.tanh",
    "relax.negative",
    "relax.astype",
}
_POOLS = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d"}
_REDUCTIONS = {"relax.mean", "relax.sum", "relax.max", "relax.min"}


def _op_name(expr) -> str | None:
    if isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def _is_var(expr) -> bool:
    return isinstance(expr, relax.Var)


def _is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.ty, relax.TensorType)


def _const_array(expr) -> np.ndarray:
    return expr.value.numpy()


def _new_const(arr: np.ndarray):
    """A fresh constant (never one shared with the input module), of the array's own dtype."""
    return relax.const(np.ascontiguousarray(arr), str(arr.dtype))


def _int(e) -> int | None:
    """A static integer from an IntImm / Python int, else None."""
    if isinstance(e, int):
        return e
    if isinstance(e, tvm.tirx.IntImm):
        return int(e.value)
    return None


def _shape(expr) -> list | None:
    """The shape (list of PrimExpr) of a tensor-typed expression, or None."""
    ty = expr.ty
    if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
        return list(ty.shape.values)
    return None


def _normalize_axes(axes, ndim: int) -> list[int] | None:
    out = []
    for a in axes:
        a = _int(a)
        if a is None or not -ndim <= a < ndim:
            return None
        out.append(a % ndim)
    return out


def _prim_equal(a, b) -> bool:
    return tvm_ffi.structural_equal(a, b, map_free_vars=False)


# ---------------------------------------------------------------- analysis


@dataclass
class _Layer:
    """A conv2d / matmul binding, for the report."""

    var: relax.Var
    op: str
    index: int
    x: relax.Var | None  # tracked input, or None
    out_before: int
    in_before: int


@dataclass
class _Plan:
    """What to remove in one function: kept channel indices per changed var, plus how to rewrite bindings."""

    kept: dict = field(default_factory=dict)  # Var -> np.ndarray of kept channel indices (only changed vars)
    rewrites: dict = field(default_factory=dict)  # Var -> (kind, info)
    layers: list = field(default_factory=list)
    nch: dict = field(default_factory=dict)  # Var -> channels before

    def keep(self, var) -> np.ndarray | None:
        return self.kept.get(var)

    def after(self, var) -> int:
        k = self.kept.get(var)
        return self.nch[var] if k is None else len(k)


class _ChannelAnalysis:
    """Zero-channel dataflow + channel-space union-find over one Relax function."""

    def __init__(self, func: relax.Function):
        self.func = func
        self.base: dict = {}  # Var -> first node id
        self.nch: dict = {}  # Var -> channel count
        self.ndim: dict = {}  # Var -> rank
        self.order: list = []  # tracked vars in definition order
        self.zero: dict = {}  # Var -> bool array (provably zero channels)
        self.parent: list[int] = []
        self.pinned: list[bool] = []
        self.tuples: dict = {}  # Var bound to a Tuple -> its fields
        self.rewrites: dict = {}
        self.layers: list[_Layer] = []
        self.handlers = {
            "relax.nn.conv2d": self._conv2d,
            "relax.matmul": self._matmul,
            "relax.nn.pad": self._pad,
            "relax.concat": self._concat,
            "relax.strided_slice": self._strided_slice,
            "relax.reshape": self._reshape,
            "relax.flatten": self._reshape,
            "relax.nn.adaptive_avg_pool2d": self._adaptive_pool,
        }
        for name in _BINARY_OPS:
            self.handlers[name] = self._binary
        for name in _ZERO_PRESERVING_UNARY:
            self.handlers[name] = self._unary
        for name in _POOLS:
            self.handlers[name] = self._pool
        for name in _REDUCTIONS:
            self.handlers[name] = self._reduce

    # ---- nodes

    def _track(self, var) -> None:
        if var in self.base:
            return
        shape = _shape(var)
        if shape is None or len(shape) < 2:
            return
        c = _int(shape[1])
        if c is None or c <= 0:
            return
        self.base[var] = len(self.parent)
        self.nch[var] = c
        self.ndim[var] = len(shape)
        self.order.append(var)
        self.parent.extend(range(len(self.parent), len(self.parent) + c))
        self.pinned.extend([False] * c)
        self.zero[var] = np.zeros(c, dtype=bool)

    def _tracked(self, expr) -> bool:
        return _is_var(expr) and expr in self.base

    def _find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def _union(self, a, b, offset_a: int = 0, offset_b: int = 0, count: int | None = None) -> None:
        """Join channel offset_a + k of a with channel offset_b + k of b, for k < count."""
        if count is None:
            count = self.nch[a]
        ba, bb = self.base[a] + offset_a, self.base[b] + offset_b
        for k in range(count):
            ra, rb = self._find(ba + k), self._find(bb + k)
            if ra != rb:
                self.parent[ra] = rb

    def _pin_var(self, var) -> None:
        if var in self.base:
            b = self.base[var]
            for k in range(self.nch[var]):
                self.pinned[b + k] = True
        if var in self.tuples:
            for f in self.tuples[var]:
                if _is_var(f):
                    self._pin_var(f)

    def _pin_expr(self, expr) -> None:
        if _is_var(expr):
            self._pin_var(expr)
            return
        for v in relax.analysis.free_vars(expr):
            self._pin_var(v)

    def _opaque(self, var, value) -> None:
        self._track(var)
        self._pin_var(var)
        self._pin_expr(value)

    # ---- driver

    def run(self) -> _Plan | None:
        func = self.func
        if not isinstance(func.body, relax.SeqExpr):
            return None
        for p in func.params:
            self._track(p)
            self._pin_var(p)
        for block in func.body.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    self._binding(binding.var, binding.value)
                else:  # MatchCast and anything else: not understood
                    self._opaque(binding.var, binding.value)
        self._pin_expr(func.body.body)
        return self._decide()

    def _binding(self, var, value) -> None:
        name = _op_name(value)
        if name in ("relax.nn.conv2d", "relax.matmul"):
            self._record_layer(var, value, name)
        if name is not None:
            self._track(var)
            handler = self.handlers.get(name)
            if handler is not None and self._tracked(var) and handler(var, value):
                return
        elif isinstance(value, tvm.ir.Tuple):
            self.tuples[var] = list(value.fields)
            return
        elif isinstance(value, tvm.ir.TupleGetItem):
            self._track(var)
            if self._tuple_get_item(var, value):
                return
        elif _is_var(value):
            if value in self.tuples:
                self.tuples[var] = self.tuples[value]
                return
            self._track(var)
            if self._same_channels(var, value):
                self._union(value, var)
                self.zero[var] = self.zero[value].copy()
                return
        self._opaque(var, value)

    def _record_layer(self, var, call, name: str) -> None:
        out_shape = _shape(var)
        x = call.args[0]
        x_shape = _shape(x)
        if out_shape is None or x_shape is None or len(out_shape) < 2:
            return
        c_out = _int(out_shape[1] if name == "relax.nn.conv2d" else out_shape[-1])
        c_in = _int(x_shape[1] if name == "relax.nn.conv2d" else x_shape[-1])
        if c_out is None or c_in is None:
            return
        index = sum(1 for layer in self.layers if layer.op == name.split(".")[-1])
        self.layers.append(_Layer(var, name.split(".")[-1], index, x if _is_var(x) else None, c_out, c_in))

    def _same_channels(self, a, b) -> bool:
        return (
            self._tracked(a) and self._tracked(b) and self.nch[a] == self.nch[b] and self.ndim[a] == self.ndim[b]
        )

    # ---- operator rules: validate first, then update state and return True; False = opaque

    def _conv2d(self, var, call) -> bool:
        a = call.attrs
        x, w = call.args
        if not (
            _int(a.groups) == 1
            and a.data_layout == "NCHW"
            and a.kernel_layout == "OIHW"
            and a.out_layout == "NCHW"
            and self._tracked(x)
            and _is_const(w)
            and self.ndim[x] == 4
            and self.ndim[var] == 4
        ):
            return False
        weight = _const_array(w)
        if weight.ndim != 4 or weight.shape[:2] != (self.nch[var], self.nch[x]) or not np.isfinite(weight).all():
            return False
        o, i = weight.shape[:2]
        slice_zero = ~np.any(weight.reshape(o, i, -1) != 0, axis=2)  # (O, I): this filter slice is all zero
        self.zero[var] = np.all(slice_zero | self.zero[x][None, :], axis=1)
        self.rewrites[var] = ("weight", (x, w, 0, 1))  # weight axis of output channels, of input channels
        return True

    def _matmul(self, var, call) -> bool:
        x, w = call.args
        if not (self._tracked(x) and _is_const(w) and self.ndim[x] == 2 and self.ndim[var] == 2):
            return False
        weight = _const_array(w)
        if weight.ndim != 2 or weight.shape != (self.nch[x], self.nch[var]) or not np.isfinite(weight).all():
            return False
        self.zero[var] = np.all((weight == 0) | self.zero[x][:, None], axis=0)
        self.rewrites[var] = ("weight", (x, w, 1, 0))
        return True

    def _binary(self, var, call) -> bool:
        c, r = self.nch[var], self.ndim[var]
        var_args, zeros, const_axes = [], [], {}
        for pos, arg in enumerate(call.args):
            if _is_var(arg):
                if not self._tracked(arg) or self.ndim[arg] != r or self.nch[arg] != c:
                    return False
                var_args.append(arg)
                zeros.append(self.zero[arg])
            elif _is_const(arg):
                arr = _const_array(arg)
                axis = 1 - (r - arr.ndim)
                if arr.ndim > r or not np.isfinite(arr).all():
                    return False
                if axis < 0 or arr.shape[axis] == 1:  # broadcast over channels
                    zeros.append(np.full(c, not np.any(arr != 0)))
                elif arr.shape[axis] == c:
                    zeros.append(~np.any(np.moveaxis(arr, axis, 0).reshape(c, -1) != 0, axis=1))
                    const_axes[pos] = axis
                else:
                    return False
            else:
                return False
        combine = np.logical_and if _BINARY_OPS[_op_name(call)] == "and" else np.logical_or
        self.zero[var] = combine.reduce(zeros)
        for arg in var_args:
            self._union(arg, var)
        if const_axes:
            self.rewrites[var] = ("consts", const_axes)
        return True

    def _unary(self, var, call) -> bool:
        x = call.args[0]
        if not self._same_channels(var, x):
            return False
        self._union(x, var)
        self.zero[var] = self.zero[x].copy()
        return True

    def _pool(self, var, call) -> bool:
        a = call.attrs
        x = call.args[0]
        if not (self._same_channels(var, x) and self.ndim[x] == 4 and a.layout == "NCHW" and a.out_layout == "NCHW"):
            return False
        # Every window must hold a real (zero) element: then max of zeros and -inf padding is 0, and the average
        # is 0 with or without counting the padding. Guaranteed without ceil mode when padding < kernel.
        pool = [_int(k) for k in a.pool_size]
        pad = [_int(p) for p in a.padding]
        sound = (
            not a.ceil_mode
            and all(_int(d) == 1 for d in a.dilation)
            and len(pad) == 4
            and pad[0] < pool[0]
            and pad[2] < pool[0]
            and pad[1] < pool[1]
            and pad[3] < pool[1]
        )
        self._union(x, var)
        self.zero[var] = self.zero[x] & sound
        return True

    def _adaptive_pool(self, var, call) -> bool:
        a = call.attrs
        x = call.args[0]
        if not (self._same_channels(var, x) and self.ndim[x] == 4 and a.layout == "NCHW" and a.out_layout == "NCHW"):
            return False
        self._union(x, var)
        self.zero[var] = self.zero[x].copy()
        return True

    def _reduce(self, var, call) -> bool:
        x = call.args[0]
        if not self._tracked(x) or call.attrs.axis is None or self.nch[x] != self.nch[var]:
            return False
        axes = _normalize_axes(call.attrs.axis, self.ndim[x])
        if axes is None or 0 in axes or 1 in axes:
            return False
        self._union(x, var)
        self.zero[var] = self.zero[x].copy()
        return True

    def _strided_slice(self, var, call) -> bool:
        x, axes = call.args[0], call.args[1]
        if not self._same_channels(var, x) or not isinstance(axes, tvm.ir.Tuple):
            return False
        axes = _normalize_axes(list(axes.fields), self.ndim[x])
        if axes is None or 1 in axes:
            return False
        self._union(x, var)
        self.zero[var] = self.zero[x].copy()
        return True

    def _pad(self, var, call) -> bool:
        a = call.attrs
        x = call.args[0]
        if len(call.args) != 1 or not self._tracked(x) or a.pad_mode != "constant" or self.ndim[x] != self.ndim[var]:
            return False
        width = [_int(p) for p in a.pad_width]
        if len(width) != 2 * self.ndim[x] or any(p is None or p < 0 for p in width):
            return False
        lo, hi, cx = width[2], width[3], self.nch[x]
        if lo + cx + hi != self.nch[var]:
            return False
        zero_value = float(a.pad_value) == 0.0
        spatial = any(p != 0 for k, p in enumerate(width) if k not in (2, 3))
        zero = np.full(self.nch[var], zero_value)
        zero[lo : lo + cx] = self.zero[x] & (zero_value or not spatial)
        self.zero[var] = zero
        self._union(x, var, 0, lo, cx)
        self.rewrites[var] = ("pad", (x, lo, hi))
        return True

    def _concat(self, var, call) -> bool:
        arg = call.args[0]
        if isinstance(arg, tvm.ir.Tuple):
            fields = list(arg.fields)
        elif _is_var(arg) and arg in self.tuples:
            fields = self.tuples[arg]
        else:
            return False
        axis = _int(call.attrs.axis)
        r = self.ndim[var]
        if axis is None or axis % r != 1:
            return False
        if not all(self._tracked(f) and self.ndim[f] == r for f in fields):
            return False
        if sum(self.nch[f] for f in fields) != self.nch[var]:
            return False
        offset = 0
        for f in fields:
            self._union(f, var, 0, offset)
            offset += self.nch[f]
        self.zero[var] = np.concatenate([self.zero[f] for f in fields])
        return True

    def _reshape(self, var, call) -> bool:
        """(N, C, 1, ...) <-> (N, C, 1, ...): only the trailing unit axes change."""
        x = call.args[0]
        if not self._tracked(x) or self.nch[x] != self.nch[var]:
            return False
        xs, ys = _shape(x), _shape(var)
        if _op_name(call) == "relax.reshape":
            if not isinstance(call.args[1], relax.ShapeExpr):
                return False
            ys = list(call.args[1].values)
        if len(ys) < 2 or not _prim_equal(xs[0], ys[0]) or _int(ys[1]) != self.nch[x]:
            return False
        if any(_int(d) != 1 for d in xs[2:] + ys[2:]):
            return False
        self._union(x, var)
        self.zero[var] = self.zero[x].copy()
        if _op_name(call) == "relax.reshape":
            self.rewrites[var] = ("reshape", ys)
        return True

    def _tuple_get_item(self, var, value) -> bool:
        tup = value.tuple_value
        if not (_is_var(tup) and tup in self.tuples):
            return False
        fields = self.tuples[tup]
        index = _int(value.index)
        if index is None or not 0 <= index < len(fields):
            return False
        src = fields[index]
        if not self._same_channels(var, src):
            return False
        self._union(src, var)
        self.zero[var] = self.zero[src].copy()
        return True

    # ---- decision

    def _decide(self) -> _Plan:
        n = len(self.parent)
        plan = _Plan(rewrites=self.rewrites, nch=dict(self.nch))
        if n:
            roots = np.fromiter((self._find(i) for i in range(n)), dtype=np.int64, count=n)
            zero = np.concatenate([self.zero[v] for v in self.order])
            removable = zero & ~np.asarray(self.pinned, dtype=bool)
            blocked = np.zeros(n, dtype=bool)  # per class root: some member must stay
            np.logical_or.at(blocked, roots, ~removable)
            for v in self.order:  # every tensor keeps at least one channel
                b, c = self.base[v], self.nch[v]
                if not blocked[roots[b : b + c]].any():
                    blocked[roots[b]] = True
            removed = ~blocked[roots]
            for v in self.order:
                b, c = self.base[v], self.nch[v]
                mask = removed[b : b + c]
                if mask.any():
                    plan.kept[v] = np.flatnonzero(~mask)
        plan.layers = self.layers
        return plan


# ---------------------------------------------------------------- rewrite


@mutator
class _Rewriter(BindingMutator):
    """Re-emit every binding with the kept channels; shapes are re-inferred by the block builder."""

    def __init__(self, mod: tvm.IRModule, plan: _Plan):
        super().__init__(mod)
        self.plan = plan

    def visit_call_(self, call):
        var = self.bound_var(call)
        if var is None:
            return super().visit_call_(call)
        rule = self.plan.rewrites.get(var)
        if rule is None:
            return super().visit_call_(call)
        kind, info = rule
        keep_out = self.plan.keep(var)
        if kind == "weight":
            x, w, out_axis, in_axis = info
            keep_in = self.plan.keep(x)
            if keep_out is None and keep_in is None:
                return super().visit_call_(call)
            weight = _const_array(w)
            if keep_out is not None:
                weight = np.take(weight, keep_out, axis=out_axis)
            if keep_in is not None:
                weight = np.take(weight, keep_in, axis=in_axis)
            args = [self.visit_expr(call.args[0]), _new_const(weight)]
            return tvm.ir.Call(call.op, args, call.attrs, call.ty_args)
        if keep_out is None:
            return super().visit_call_(call)
        if kind == "consts":
            args = []
            for pos, arg in enumerate(call.args):
                if pos in info:
                    arr = np.take(_const_array(arg), keep_out, axis=info[pos])
                    args.append(_new_const(arr))
                else:
                    args.append(self.visit_expr(arg))
            return tvm.ir.Call(call.op, args, call.attrs, call.ty_args)
        if kind == "pad":
            x, lo, hi = info
            c = self.plan.nch[var]
            width = [int(p) for p in call.attrs.pad_width]
            width[2] = int(np.count_nonzero(keep_out < lo))
            width[3] = int(np.count_nonzero(keep_out >= c - hi))
            return relax.op.nn.pad(
                self.visit_expr(x), width, str(call.attrs.pad_mode), float(call.attrs.pad_value)
            )
        if kind == "reshape":
            shape = list(info)
            shape[1] = tvm.tirx.IntImm("int64", len(keep_out))
            return relax.op.reshape(self.visit_expr(call.args[0]), shape)
        raise AssertionError(f"unknown rewrite {kind}")  # pragma: no cover


# ---------------------------------------------------------------- public API


def _report(fname: str, plan: _Plan) -> list[dict]:
    rows = []
    for layer in plan.layers:
        rows.append(
            {
                "function": fname,
                "layer": layer.var.name,
                "op": layer.op,
                "index": layer.index,
                "out_channels_before": layer.out_before,
                "out_channels_after": plan.after(layer.var) if layer.var in plan.nch else layer.out_before,
                "in_channels_before": layer.in_before,
                "in_channels_after": (
                    plan.after(layer.x) if layer.x is not None and layer.x in plan.nch else layer.in_before
                ),
            }
        )
    return rows


def strip_zero_channels(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[dict]]:
    """Remove provably-zero channels from every Relax function of ``mod``; ``mod`` itself is left unchanged
    (and returned as is when nothing can be removed).

    Returns ``(new_mod, report)``: one dict per conv2d / matmul binding, in program order, with keys
    ``function``, ``layer`` (binding name), ``op`` (``conv2d`` / ``matmul``), ``index`` (ordinal among the
    function's bindings of that op), ``out_channels_before``, ``out_channels_after``, ``in_channels_before``,
    ``in_channels_after`` (for matmul: the reduction dimension K and the output features). See
    :func:`report_totals` for the sums.
    """
    plans = {}
    report: list[dict] = []
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        plan = _ChannelAnalysis(func).run()
        if plan is None:
            continue
        report.extend(_report(str(gv.name_hint), plan))
        if plan.kept:
            plans[gv] = plan
    if not plans:
        return mod, report
    new_mod = mod
    for gv, plan in plans.items():
        rewriter = _Rewriter(new_mod, plan)
        new_func = rewriter.visit_expr(new_mod[gv])
        rewriter.builder_.update_func(gv, new_func)
        new_mod = rewriter.builder_.get()
    return new_mod, report


def report_totals(report: list[dict]) -> dict:
    """Sums over a :func:`strip_zero_channels` report (conv2d layers and matmul separately)."""
    totals = {}
    for op in ("conv2d", "matmul"):
        rows = [r for r in report if r["op"] == op]
        before = sum(r["out_channels_before"] for r in rows)
        after = sum(r["out_channels_after"] for r in rows)
        totals[op] = {
            "layers": len(rows),
            "layers_changed": sum(
                r["out_channels_after"] != r["out_channels_before"] or r["in_channels_after"] != r["in_channels_before"]
                for r in rows
            ),
            "out_channels_before": before,
            "out_channels_after": after,
            "out_channels_removed": before - after,
        }
    return totals


@tvm.transform.module_pass(opt_level=0, name="StripZeroChannels")
class StripZeroChannels:
    """Module pass form of :func:`strip_zero_channels`. The report travels with the module it returns: read it with
    :func:`report_of` (a module attribute, :mod:`passes.reports`); the pass object keeps no state."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        new_mod, report = strip_zero_channels(mod)
        return reports.attach(new_mod, reports.STRIP, report)


def report_of(mod: tvm.IRModule) -> list[dict] | None:
    """The report :class:`StripZeroChannels` attached to ``mod`` (None when the pass did not run on it)."""
    return reports.get(mod, reports.STRIP)
