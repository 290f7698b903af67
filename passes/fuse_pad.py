"""FusePadIntoProducer: a packed int8 conv2d writes its uint8 output straight into the zero-padded tensor the next
conv2d reads, so the padding kernel between them goes away.

:class:`passes.int8_layout.Int8Layout` quantizes an activation in the epilogue of the conv2d that makes it
(``vnni_quantize_packed``, NCHW[ob]c) and pads it for the next conv2d in a kernel of its own (``vnni_pad_repack``:
NCHW[ic_bn]c with the conv's spatial zero padding). At batch 1 that kernel moves a few kilobytes: its cost is the
call itself, and a residual network has one per conv2d (51 of the pruned ResNet56's 116 kernel calls). Where the
unpadded tensor ``q`` sits in the padded one ``p`` at fixed strides - one channel block of ``p`` holding all of
``q``'s (``ic_bn = OB * ob``) or the same blocks (``ic_bn = ob``), and no zero channels to add - ``q`` is a strided
view of ``p``'s interior; at batch 1 also where each block of ``p`` holds ``split`` consecutive blocks of ``q`` (AVX2's
conv2d writes 8-channel blocks, the next one reads 16: a 6-D view, :class:`View`). Then, after every schedule is applied (tuned, fixed or fallback), this pass:

- gives the producing kernel ``p`` as its output buffer: its body writes the view (the same stores, other
  strides), and a few loops at its start write the zero border (the padding rows and columns) - so the producer
  writes exactly what the padding kernel wrote;
- gives every other reader of ``q`` (a residual add fused into a later conv2d's epilogue reads the block input
  in uint8) ``p`` in its place, read through the same view;
- drops the padding kernel.

The values every kernel computes are unchanged (bit-identical logits; ``tests/test_fuse_pad.py``); each rewritten
kernel is a new PrimFunc (``<name>_padded``), the original stays for call sites that keep it. A vectorized loop
over ``q`` wider than its channel block (a tuned epilogue vectorized across pixels) is cut into vectors of one
block, which stay contiguous in the view. Kernels that read ``q`` otherwise than by loads in their blocks (a pointer
into it, a tensor intrinsic's operand), or in vectors that are not whole blocks, keep the pad.
Measured in ``benchmarks/pad_fusion.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from passes.binding_mutator import rewrite_functions
from passes.patterns import call_tir_parts, i64, static_shape, with_root_body
from passes.parallel_launch import BORDER_ANNOTATION

__all__ = ["FusePadIntoProducer", "PAD_ATTR", "SPLIT_MAX_BATCH", "View", "view_of", "with_view_param"]

# the attribute Int8Layout gives each vnni_pad_repack PrimFunc: [top, left, bottom, right, real channels]
PAD_ATTR = "vnni_pad"
# The largest batch at which a split view (View.split) replaces its pad kernel. The producer then writes half of each
# 16-byte pixel per pass; at batch 1 that beats a kernel call and a barrier, at batch 64 the pad kernel's contiguous
# copy is cheaper. x86-64-v3, shipped model, this Xeon (benchmarks/pad_fusion.md, session 22), 2 threads: batch 1
# 0.616 -> 0.592 ms, batch 64 28.61 -> 30.04 ms.
SPLIT_MAX_BATCH = 1


@dataclass(frozen=True)
class View:
    """Where a packed tensor of ``shape`` (N, OB, H, W, ob) lies in the padded tensor of ``padded``
    (N, ICB, H + top + bottom, W + left + right, ic_bn): element strides and offset of the interior. With
    ``split`` > 1 each channel block of the padded tensor holds ``split`` consecutive blocks of the packed one
    (``ic_bn = split * ob``: AVX2's conv2d writes 8-channel blocks and the next one reads 16); no single stride
    steps over those, so the interior is the 6-D view (N, OB // split, split, H, W, ob) of :meth:`interior` and
    every access ``[n, o, y, x, c]`` becomes ``[n, o // split, o % split, y, x, c]``."""

    shape: tuple
    padded: tuple
    top: int
    left: int
    strides: tuple
    offset: int
    split: int = 1

    def interior(self) -> tuple[tuple, tuple]:
        """(shape, strides) of the interior's buffer: ``shape`` and ``strides``, or the 6-D ones of a split."""
        if self.split == 1:
            return self.shape, self.strides
        n, ob_count, h, w, ob = self.shape
        plane = self.padded[2] * self.padded[3] * self.padded[4]
        return ((n, ob_count // self.split, self.split, h, w, ob),
                (self.strides[0], plane, ob, self.strides[2], self.strides[3], 1))

    def border(self) -> list[tuple[int, int, int, int]]:
        """The padding of one channel block as (y0, y1, x0, x1) strips: rows above and below, then the columns
        left and right of the interior rows."""
        _, _, h, w, _ = self.shape
        _, _, hp, wp, _ = self.padded
        strips = [(0, self.top, 0, wp), (self.top + h, hp, 0, wp),
                  (self.top, self.top + h, 0, self.left), (self.top, self.top + h, self.left + w, wp)]
        return [s for s in strips if s[1] > s[0] and s[3] > s[2]]


def view_of(shape, padded, pad) -> View | None:
    """The :class:`View` of a packed (N, OB, H, W, ob) tensor inside the padded (N, ICB, Hp, Wp, ic_bn) tensor
    ``vnni_pad_repack`` makes of it with ``pad`` = [top, left, bottom, right, channels]; None where the interior is
    not a strided view (a channel block of ``p`` spans part of several of ``q``'s, or ``p`` has zero channels the
    producer does not write)."""
    n, ob_count, h, w, ob = (int(d) for d in shape)
    n2, ib_count, hp, wp, ic_bn = (int(d) for d in padded)
    top, left, bottom, right, channels = (int(v) for v in pad)
    if n != n2 or hp != h + top + bottom or wp != w + left + right or min(top, left, bottom, right) < 0:
        return None
    if channels != ib_count * ic_bn or channels > ob_count * ob:
        return None
    plane = hp * wp * ic_bn
    split = 1
    if ib_count == 1 and ob_count * ob == ic_bn:  # every block of q side by side in p's one block
        o_stride = ob
    elif ic_bn == ob and ib_count == ob_count:  # the same blocks
        o_stride = plane
    elif ic_bn % ob == 0 and ib_count * (ic_bn // ob) == ob_count:  # split consecutive blocks of q in each of p's
        o_stride, split = None, ic_bn // ob
    else:
        return None
    strides = (ib_count * plane, o_stride, wp * ic_bn, ic_bn, 1)
    return View(tuple(int(d) for d in shape), tuple(int(d) for d in padded), top, left, strides,
                (top * wp + left) * ic_bn, split)


def _zero_border(p: tirx.Buffer, view: View) -> tirx.Stmt:
    """Loops writing 0 to ``p``'s padding, the channel block vectorized (the batch loop parallel at batch 16+)."""
    n, ib_count, _, _, ic_bn = view.padded
    zero = tirx.const(0, str(p.dtype))
    stmts = []
    for y0, y1, x0, x1 in view.border():
        b, cb, y, x, c = (tirx.Var(name, "int64") for name in ("b", "cb", "y", "x", "c"))
        body = tirx.BufferStore(p, zero, [b, cb, y + i64(y0), x + i64(x0), c])
        for var, extent, kind in ((c, ic_bn, tirx.ForKind.VECTORIZED), (x, x1 - x0, tirx.ForKind.SERIAL),
                                  (y, y1 - y0, tirx.ForKind.SERIAL), (cb, ib_count, tirx.ForKind.SERIAL),
                                  (b, n, tirx.ForKind.PARALLEL if n >= 16 else tirx.ForKind.SERIAL)):
            body = tirx.For(var, i64(0), i64(extent), kind, body)
        # marked for passes.parallel_launch: no store of the kernel's own touches the border
        stmts.append(tirx.For(body.loop_var, body.min, body.extent, body.kind, body.body,
                              annotations={BORDER_ANNOTATION: 1}))
    return tirx.SeqStmt(stmts) if len(stmts) > 1 else stmts[0]


def with_view_param(func: tirx.PrimFunc, index: int, view: View, output: bool) -> tirx.PrimFunc:
    """``func`` with parameter ``index`` (a packed (N, OB, H, W, ob) buffer) taking the padded tensor instead:
    the body reads (``output`` False) or writes (True: and zeroes the border first) the interior through a strided
    view of it (a ``DeclBuffer`` on the padded tensor's data)."""
    import tvm_ffi

    old = func.params[index]
    wide = _wide_loops(func, old.name, view.shape[-1])
    if wide:
        func = func.with_body(_split_vectors(func.body, wide, view.shape[-1]))
    padded = tirx.decl_buffer([i64(d) for d in view.padded], str(old.dtype), name=f"{old.name}_padded")
    shape, strides = view.interior()
    interior = tirx.decl_buffer([i64(d) for d in shape] if view.split > 1 else list(old.shape), str(old.dtype),
                                name=old.name, strides=[i64(s) for s in strides], elem_offset=i64(view.offset))
    head = [tirx.DeclBuffer(interior, data=padded.data)] + ([_zero_border(padded, view)] if output else [])
    if view.split > 1:
        body = _split_blocks(func.body, old, interior, view)
    else:  # every use of the parameter's buffer var (loads, stores, block regions) becomes the view
        body = tvm_ffi.structural_map(func.body, [(tirx.Var, lambda v: interior if v.same_as(old) else v)],
                                      order="post")
    body = with_root_body(body, lambda inner: tirx.SeqStmt(head + [inner]))
    params = [padded if i == index else p for i, p in enumerate(func.params)]
    return tirx.PrimFunc(params, body, func.ret_type, func.attrs)


def _split_blocks(body, old: tirx.Buffer, interior: tirx.Buffer, view: View):
    """``body`` with every load, store and block region of ``old`` (N, OB, H, W, ob) on the 6-D ``interior`` of a
    split view: ``[n, o, y, x, c]`` -> ``[n, o // split, o % split, y, x, c]``; a region over several blocks covers
    the whole of both block dimensions. ValueError where ``old`` is used otherwise, or the block index is a vector."""
    import tvm_ffi
    from tvm.ir.expr import TensorLoad, TensorRegion

    split = view.split
    _, ib_count, _, _, _, _ = view.interior()[0]

    def indices(idx):
        n, o, y, x, c = idx
        if getattr(o.ty, "lanes", 1) != 1:
            raise ValueError(f"{old.name}: a vector over channel blocks")
        k = tirx.const(split, str(o.ty.dtype))
        return [n, tirx.floordiv(o, k), tirx.floormod(o, k), y, x, c]

    def region(r):
        n, o, y, x, c = r
        try:
            one = int(o.extent) == 1
        except TypeError:
            one = False
        if one:
            k = tirx.const(split, str(o.min.ty.dtype))
            blocks = [tvm.ir.Range.from_min_extent(tirx.floordiv(o.min, k), i64(1)),
                      tvm.ir.Range.from_min_extent(tirx.floormod(o.min, k), i64(1))]
        else:
            blocks = [tvm.ir.Range.from_min_extent(i64(0), i64(ib_count)),
                      tvm.ir.Range.from_min_extent(i64(0), i64(split))]
        return [n, *blocks, y, x, c]

    def load(node):  # this TVM's BufferLoad node (TensorLoad: ``source``, ``indices``)
        return tirx.BufferLoad(interior, indices(node.indices)) if node.source.same_as(old) else node

    def store(node):
        return tirx.BufferStore(interior, node.value, indices(node.indices)) if node.buffer.same_as(old) else node

    def buffer_region(node):  # a block's read / write region (TensorRegion: ``source``, ``region``)
        return tirx.BufferRegion(interior, region(node.region)) if node.source.same_as(old) else node

    out = tvm_ffi.structural_map(body, [(TensorLoad, load), (tirx.BufferStore, store),
                                        (TensorRegion, buffer_region)], order="post")
    left = []
    tvm_ffi.structural_walk(out, [(tirx.Var, lambda v: left.append(v) if v.same_as(old) else None)])
    if left:
        raise ValueError(f"{old.name} is used otherwise than by loads, stores and block regions")
    return out


def _wide_loops(func: tirx.PrimFunc, name: str, lanes: int) -> list:
    """The vectorized loops of ``func`` over buffer ``name`` wider than ``lanes`` (its channel block)."""
    import tvm_ffi

    wide = []

    def visit(loop):
        if loop.kind == tirx.ForKind.VECTORIZED:
            try:
                narrow = int(loop.extent) <= lanes
            except TypeError:  # a symbolic extent
                narrow = False
            if not narrow:
                wide.append(loop)

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit)])
    return [loop for loop in wide if f"{name}[" in loop.script()]


def _viewable(func: tirx.PrimFunc, index: int, lanes: int) -> bool:
    """Whether parameter ``index`` of ``func`` (a packed NCHW[lanes]c buffer) can become a strided view as it is
    scheduled: accessed only by element loads and stores (no pointer into it, no tensor-intrinsic operand), and
    every vectorized loop over it a whole number of channel blocks (:func:`_split_vectors` cuts those)."""
    name = func.params[index].name
    text = func.script()
    if any(f"{marker}({name}[" in text or f"{marker}({name}," in text
           for marker in ("T.address_of", "T.match_buffer", "T.access_ptr", "T.tvm_access_ptr")):
        return False
    for loop in _wide_loops(func, name, lanes):
        try:
            if int(loop.extent) % lanes or int(loop.min) != 0:
                return False
        except TypeError:
            return False
    return True


def _split_vectors(body, wide: list, lanes: int):
    """``body`` with each loop of ``wide`` (vectorized, over a multiple of ``lanes``) cut into a serial loop of
    vectors of ``lanes``. A tuned epilogue vectorized over the flattened output (64 lanes: 8 pixels of 8
    channels) is contiguous in the packed layout and a gather or scatter through the view: measured 15.9 -> 24.7 us
    (x86-64-v3's first-stage conv2 kernel) before this cut; vectors of one channel block stay contiguous."""
    import tvm_ffi

    def cut(loop):
        if not any(loop.same_as(w) for w in wide):
            return loop
        dtype = str(loop.loop_var.ty.dtype)
        outer = tirx.Var(f"{loop.loop_var.name}_o", dtype)
        inner = tirx.Var(f"{loop.loop_var.name}_i", dtype)
        index = outer * tirx.const(lanes, dtype) + inner
        new_body = tvm_ffi.structural_map(loop.body, [(tirx.Var, lambda v: index if v.same_as(loop.loop_var)
                                                      else v)], order="post")
        vec = tirx.For(inner, tirx.const(0, dtype), tirx.const(lanes, dtype), tirx.ForKind.VECTORIZED, new_body)
        return tirx.For(outer, tirx.const(0, dtype), tirx.const(int(loop.extent) // lanes, dtype),
                        tirx.ForKind.SERIAL, vec)

    return tvm_ffi.structural_map(body, [(tirx.For, cut)], order="pre")


def _splittable(func: tirx.PrimFunc, index: int, view: View, output: bool) -> bool:
    """Whether :func:`with_view_param` can put parameter ``index`` of ``func`` on a split view (every use of it a
    load, store or block region whose channel-block index is a scalar)."""
    try:
        with_view_param(func, index, view, output)
    except ValueError:
        return False
    return True


def _plan(func: relax.Function, mod: tvm.IRModule):
    """{q var: (p var, View)} of the pads of ``func`` that can go, and {call var: [(arg index, View)]} of the
    kernels reading a dropped ``q``."""
    calls, readers, escapes = {}, {}, set()
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            call = call_tir_parts(value) if isinstance(binding, relax.VarBinding) else None
            if call is None:
                escapes.update(relax.analysis.free_vars(value))
                continue
            calls[binding.var] = call
            for j, arg in enumerate(call[1]):
                if isinstance(arg, relax.Var):
                    readers.setdefault(arg, []).append((binding.var, j))
                else:
                    escapes.update(relax.analysis.free_vars(arg))
    escapes.update(relax.analysis.free_vars(func.body.body))
    pairs, consumers = {}, {}
    for p, (gv, args) in calls.items():
        pad = mod[gv] if isinstance(gv, tvm.ir.GlobalVar) else None
        if not isinstance(pad, tirx.PrimFunc) or pad.attrs is None or PAD_ATTR not in pad.attrs or len(args) != 1:
            continue
        q = args[0]
        if q in pairs:  # a second pad of the same tensor reads the first one's output through the view
            continue
        if q not in calls or q in escapes or not isinstance(q, relax.DataflowVar) \
                or not isinstance(p, relax.DataflowVar):
            continue
        producer = mod[calls[q][0]]
        if not isinstance(producer, tirx.PrimFunc) or len(producer.params) != len(calls[q][1]) + 1:
            continue
        shape, padded = _shape(q), _shape(p)
        view = None if shape is None or padded is None else view_of(shape, padded, list(pad.attrs[PAD_ATTR]))
        if view is None or str(q.ty.dtype) != str(p.ty.dtype) or (view.split > 1 and shape[0] > SPLIT_MAX_BATCH):
            continue
        others = [(var, j) for var, j in readers.get(q, []) if not var.same_as(p)]
        if len(others) + 1 != len(readers.get(q, [])):  # the pad reads q once
            continue
        lanes = shape[-1]
        uses = [(producer, len(calls[q][1]), True)] + [(mod[calls[var][0]], j, False) for var, j in others]
        if not all(_viewable(f, j, lanes) for f, j, _ in uses) \
                or (view.split > 1 and not all(_splittable(f, j, view, out) for f, j, out in uses)):
            continue
        pairs[q] = (p, view)
        for var, j in others:
            consumers.setdefault(var, []).append((j, view))
    return pairs, consumers


def _shape(var) -> tuple | None:
    ty = var.ty
    return static_shape(ty.shape) if isinstance(ty, relax.TensorType) else None


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, pairs, consumers):
        super().__init__(mod)
        self.mod, self.pairs, self.consumers = mod, pairs, consumers
        self.drop = {p for p, _ in pairs.values()}
        self.variants = {}
        self.changed = 0  # pads dropped

    def _variant(self, gv, changes) -> tvm.ir.GlobalVar:
        key = (gv, tuple((j, view, out) for j, view, out in changes))
        if key not in self.variants:
            func = self.mod[gv]
            for j, view, out in changes:
                func = with_view_param(func, j, view, out)
            self.variants[key] = self.builder_.add_func(func, f"{gv.name_hint}_padded")
        return self.variants[key]

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var in self.drop:
            return
        call = call_tir_parts(binding.value)
        changes = [(j, view, False) for j, view in self.consumers.get(var, [])]
        out = self.pairs.get(var)
        if call is None or (not changes and out is None):
            return super().visit_var_binding_(binding)
        gv, args = call
        ty = binding.value.ty
        if out is not None:
            changes.append((len(args), out[1], True))
            ty = out[0].ty
        new = relax.call_tir(self._variant(gv, sorted(changes, key=lambda c: c[0])),
                             relax.Tuple([self.visit_expr(a) for a in args]), ty)
        emitted = self.builder_.emit(new, (out[0] if out is not None else var).name)
        self.set_var_remap(var, emitted)
        if out is not None:
            self.set_var_remap(out[0], emitted)
            self.changed += 1
        return None


@tvm.transform.module_pass(opt_level=0, name="FusePadIntoProducer")
class FusePadIntoProducer:
    """Drop each ``vnni_pad_repack`` whose input is a strided view of its output (:func:`view_of`): the producer
    writes the padded tensor, the other readers read it (see the module docstring). Run it on scheduled kernels."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        def rewriter(mod, func):
            pairs, consumers = _plan(func, mod)
            return _Rewriter(mod, pairs, consumers) if pairs else None

        return rewrite_functions(mod, rewriter)
