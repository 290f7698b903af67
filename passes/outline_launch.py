"""OutlineLaunchLoops: one copy of each kernel's code in a merged launch, called from its parallel loops.

:mod:`passes.parallel_launch` copies every kernel's body into the one launch: the shipped int8 ResNet56 at batch 1
is a function of ~72,000 x86 instructions (~400 KB of code) for ~20 distinct kernels called 57 times, against a
64 KB L1 instruction cache, and LLVM allocates registers over all of it at once (the AVX2 launch kept 2.4x more
vector values on the stack per dot product than the same kernels compiled one by one).

This pass moves the body of each ``parallel`` loop of a launch into a private PrimFunc of the module, which takes the
loop's index and the data pointers of the buffers the body uses; the loop calls it, so each thread still runs its
share of the iterations. Bodies that are the same up to their buffers (every call of one kernel) share one function.
The statements, and so the values, are the same; what changes is where the code is and what LLVM sees at once:

- the loop's pragmas (a record's ``pragma_auto_unroll_max_step``, which unrolls the loops inside it) go with the
  body; without them the inner loops stayed rolled and the conv2d kernels kept their accumulators in memory;
- the body's small scratch buffers (the dot product's values, "local" scope: workspaces until now) become stack
  buffers of the function (LowerTVMBuiltin gives a workspace the device of the exported function it is in, and an
  internal function has none); a body that allocates :data:`STACK_BYTES` or more stays in the launch;
- the index is passed as int32 (the launch's loop variable is narrowed to it later) with its range assumed.

:class:`KeepLoopsInternal` runs after Relax's AttachGlobalSymbol, which gives every PrimFunc a global symbol, and
takes it off the outlined functions again: they stay internal functions called directly, not packed functions.

Measured (``benchmarks/outline_launch.md``, shipped model, batch 1, ms at 1 / 2 threads): x86-64-v3 (AVX2)
0.917 / 0.544 -> 0.809 / 0.511, x86-64-v4-vnni 0.384 / 0.332 -> 0.347 / 0.298, AMX unchanged; logits
bit-identical.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx

from passes.parallel_launch import LAUNCH_POINT
from passes.patterns import with_functions

__all__ = ["OutlineLaunchLoops", "KeepLoopsInternal", "outline_launch", "OUTLINED", "STACK_BYTES"]

OUTLINED = "outlined_launch_loop"  # the attribute marking a function this pass made of a loop body
STACK_BYTES = 1024  # LowerTVMBuiltin puts a "global" buffer under this many bytes on the stack (kMaxStackAlloca)


def _is_buffer(var) -> bool:
    """Whether the Var ``var`` is a buffer (this TVM's buffers are Vars with a buffer type)."""
    try:
        var.dtype  # noqa: B018 - only a Var with a buffer type has one
    except AttributeError:
        return False
    return True


def _bytes(buf) -> int | None:
    dims = [int(d) if isinstance(d, tirx.IntImm) else None for d in buf.shape]
    if None in dims:
        return None
    dtype = str(buf.dtype)
    scalar, lanes = (dtype.split("x") + ["1"])[:2]
    return int(np.prod(dims)) * int(lanes) * np.dtype(scalar).itemsize


def _on_stack(stmt):
    """``stmt`` with the buffers it allocates as "global" buffers (stack buffers under :data:`STACK_BYTES`), or None
    where one is larger or of unknown size."""
    from tvm.s_tir import SBlock

    renamed, too_large = {}, []

    def stacked(buf):
        size = _bytes(buf)
        if size is None or size >= STACK_BYTES:
            too_large.append(buf)
            return buf
        new = tirx.decl_buffer(list(buf.shape), str(buf.dtype), name=buf.name, scope="global")
        renamed[buf] = new
        return new

    def block(b):
        if not b.alloc_buffers:
            return b
        return SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, b.body, b.init,
                      [stacked(x) for x in b.alloc_buffers], b.match_buffers, b.annotations)

    stmt = tvm_ffi.structural_map(stmt, [(SBlock, block), (tirx.AllocBuffer, lambda a: tirx.AllocBuffer(stacked(
        a.buffer)))], order="post")
    if too_large:
        return None
    return tvm_ffi.structural_map(stmt, [(tirx.Var, lambda v: renamed.get(v, v))], order="pre")


def _free_buffers(stmt) -> list:
    """The buffers ``stmt`` uses that it does not define itself, in order of first use."""
    from tvm.s_tir import SBlock

    defined, used = set(), []

    def block(b):
        defined.update(b.alloc_buffers)
        defined.update(m.buffer for m in b.match_buffers)

    def var(v):
        if _is_buffer(v) and v not in used:
            used.append(v)

    tvm_ffi.structural_walk(stmt, [(SBlock, block), (tirx.DeclBuffer, lambda d: defined.add(d.buffer)),
                                   (tirx.AllocBuffer, lambda a: defined.add(a.buffer)), (tirx.Var, var)])
    return [b for b in used if b not in defined]


def _free_scalars(stmt, index) -> list:
    """The scalar variables ``stmt`` uses and does not define, ``index`` aside (block iteration variables and loop
    variables count as defined: ``undefined_vars`` does not know blocks)."""
    from tvm.s_tir import SBlock

    defined = {index}
    tvm_ffi.structural_walk(stmt, [(SBlock, lambda b: defined.update(iv.var for iv in b.iter_vars)),
                                   (tirx.For, lambda f: defined.add(f.loop_var))])
    return [v for v in tirx.analysis.undefined_vars(stmt) if not _is_buffer(v) and v not in defined]


def outline_loop(loop: tirx.For):
    """(the PrimFunc of ``loop``'s body, the buffers a call passes it), or None where the body cannot leave the
    launch: it allocates a workspace (:func:`_on_stack`) or uses a scalar variable other than the loop's."""
    from tvm.s_tir import SBlock, SBlockRealize

    body = _on_stack(loop.body)
    if body is None or _free_scalars(body, loop.loop_var):
        return None
    buffers = _free_buffers(body)
    index = tirx.Var("i", "int32")
    handles = [tirx.Var(f"p{k}", tvm.ir.PointerType(tvm.ir.PrimType(str(b.dtype)))) for k, b in enumerate(buffers)]
    views = {b: tirx.decl_buffer(list(b.shape), str(b.dtype), name=b.name, data=h, strides=list(b.strides),
                                 elem_offset=b.elem_offset) for b, h in zip(buffers, handles)}
    loop_index = tirx.Cast(str(loop.loop_var.ty), index)
    inner = tvm_ffi.structural_map(body, [(tirx.Var, lambda v: loop_index if v.same_as(loop.loop_var)
                                           else views.get(v, v))], order="pre")
    for key, value in (loop.annotations or {}).items():
        if key.startswith("pragma_"):
            inner = tirx.AttrStmt(tirx.IntImm("int32", 0), key, value, inner)
    stmts = [tirx.DeclBuffer(view, data=h) for view, h in zip(views.values(), handles)]
    in_range = tirx.all(index >= 0, index < tirx.Cast("int32", loop.extent))  # what the loop stated
    stmts.append(tirx.Evaluate(tirx.assume(in_range)))
    root = SBlock([], [], [], "root", tirx.SeqStmt(stmts + [inner]), None, [], [], {})
    func = tirx.PrimFunc([index] + handles, SBlockRealize([], True, root))
    return func.with_attr("tirx.is_scheduled", True).with_attr("tirx.noalias", True).with_attr(OUTLINED, True), buffers


def outline_launch(func: tirx.PrimFunc, functions: list, name: str) -> tirx.PrimFunc | None:
    """``func`` with the body of each parallel loop of its launch a call; ``functions``: [(GlobalVar, PrimFunc)] of the
    bodies outlined so far, which it extends (new ones named ``name`` and a number) and reuses (a body structurally
    equal to one outlined before calls that one). None where no loop was outlined."""
    count = 0

    def visit(loop):
        nonlocal count
        if loop.kind != tirx.ForKind.PARALLEL or loop.loop_var.name == "serial_part":
            return loop
        outlined = outline_loop(loop)
        if outlined is None:
            return loop
        sub, buffers = outlined
        gv = next((g for g, f in functions if tvm_ffi.structural_equal(f, sub)), None)
        if gv is None:
            gv = tvm.ir.GlobalVar(f"{name}{len(functions)}")
            functions.append((gv, sub))
        count += 1
        args = [tirx.Cast("int32", loop.loop_var)] + [b.data for b in buffers]
        call = tirx.Evaluate(tvm.ir.Call(gv, args, ret_ty="int32"))
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, call, None, loop.annotations)

    def launch(attr):
        if attr.attr_key != LAUNCH_POINT:
            return attr
        body = tvm_ffi.structural_map(attr.body, [(tirx.For, visit)], order="pre")
        return tirx.AttrStmt(attr.node, attr.attr_key, attr.value, body)

    body = tvm_ffi.structural_map(func.body, [(tirx.AttrStmt, launch)], order="pre")
    return func.with_body(body) if count else None


def _has_launch(func: tirx.PrimFunc) -> bool:
    found = []
    tvm_ffi.structural_walk(func.body, [(tirx.AttrStmt, lambda a: found.append(a)
                                         if a.attr_key == LAUNCH_POINT else None)])
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="OutlineLaunchLoops")
class OutlineLaunchLoops:
    """:func:`outline_launch` on every PrimFunc of the module with a launch in it (``MergeParallelLaunches`` makes
    them); the outlined bodies join the module, one function each, shared across the launches."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        functions, updates = [], {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and _has_launch(func):
                new = outline_launch(func, functions, f"{gv.name_hint}_loop")
                if new is not None:
                    updates[gv] = new
        updates.update(functions)
        return with_functions(mod, updates)


@tvm.transform.module_pass(opt_level=0, name="KeepLoopsInternal")
class KeepLoopsInternal:
    """The functions :class:`OutlineLaunchLoops` made, without a global symbol: run after Relax's AttachGlobalSymbol
    (which gives every PrimFunc one, and MakePackedAPI would then turn each call into a packed call)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {gv: f.without_attr("global_symbol") for gv, f in mod.functions_items()
                   if isinstance(f, tirx.PrimFunc) and f.attrs is not None and OUTLINED in f.attrs}
        return with_functions(mod, updates)
