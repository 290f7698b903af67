"""MergeParallelLaunches: consecutive CPU kernels run inside one thread-pool launch, with barriers between them.

A compiled CPU kernel with a ``parallel`` loop calls TVM's thread pool once (``TVMBackendParallelLaunch``): the
calling thread wakes the workers, runs its share, and waits for theirs. On the 2-vCPU VMs of this project that
fork-join costs ~0.8 us (``benchmarks/parallel_launch.md``), and a batch-1 int8 ResNet runs ~70 kernels of 1-5 us
each: splitting one across two threads saves about what the fork costs, so batch 1 on two threads ran no faster
than on one (issue 18 item 3). TVM's code generator has the means to do better: statements under a
``pragma_parallel_launch_point`` attribute run in one launch, on every thread of the pool; each ``parallel`` loop
inside is split statically among the threads, and ``pragma_parallel_barrier_when_finish`` puts a barrier (a spin on
one counter per thread, ~0.2 us) after the statement it wraps.

This pass (after every kernel has its schedule; :mod:`passes.fuse_pad` included) takes each run of consecutive
``call_tir`` bindings of a Relax function whose kernels have that shape (:func:`launchable`) and makes it one
PrimFunc:

- each kernel's body (a fresh copy: :func:`tvm.s_tir.renew_defs`) reads and writes the merged function's buffers:
  the run's inputs and the values used after it are its parameters; what only the run uses lives in a few slot
  buffers, shared by tensors whose lifetimes do not overlap (extra outputs nobody reads: as root-block
  allocations, this TVM's StorageRewrite shared the storage of slots live at the same time - wrong logits);
- every top-level ``parallel`` loop stays a parallel loop (each thread a contiguous share, as the pool split it
  before); the other top-level statements (small serial kernels, the zero border :mod:`passes.fuse_pad` writes)
  run on the first thread only (the first iteration of a parallel loop of two);
- a barrier follows each kernel (none after the zero border, which no kernel statement of its own reads or
  writes; none after the last);
- AMX's tile-state request (:func:`passes.amx.is_tile_state_request`, one syscall per process) is made once, before
  the launch.

One thread runs the launch inline and its barriers return at once. The values are the same as the separate
kernels' (the same statements in the same order, each store before the barrier that precedes its readers).

Inside the launch each thread saves its AMX tile configuration once, before all the kernels, and puts it back
after them (:func:`passes.amx.save_once_per_thread`), instead of once per tile chunk.

Measured (``benchmarks/parallel_launch.md``, ``benchmarks/amx_threads.md``): on AMX the shipped model at batch 1
goes 0.25 -> 0.20 ms at one thread (70 VM calls -> 3) and 0.27 -> 0.19 at two, where two threads now beat one
(median of 5 runs 0.193 against 0.201 ms); on x86-64-v4-vnni 0.48 -> 0.40 ms and on x86-64-v3 (AVX2) 0.87 -> 0.77,
both at two threads, where the separate kernels are fastest on one or two. The pipeline runs it for the runs with a
packed int8 conv2d in them (``int8_only``: int8 modules; fp32's tuned kernels gained nothing merged), and compiles
them with LLVM's LICM promotion limit raised (:data:`targets.pipeline.LLVM_OPTIONS`): in a launch body that long,
LLVM left the tensor intrinsics' scratch values and the conv2d accumulators in memory and the tuned VNNI and AVX2
kernels ran at half speed. Since session 25 :mod:`passes.outline_launch` follows it: each parallel loop of the launch
calls one function per kernel instead of holding a copy of its code.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from passes.binding_mutator import rewrite_functions
from passes.patterns import call_tir_parts, i64, is_scheduled

__all__ = ["MergeParallelLaunches", "launchable", "merge_kernels", "BORDER_ANNOTATION", "MAX_SCRATCH_BYTES",
           "MAX_KERNEL_BYTES"]

LAUNCH_POINT = "pragma_parallel_launch_point"
BARRIER = "pragma_parallel_barrier_when_finish"
BORDER_ANNOTATION = "pad_border"  # on fuse_pad's zero-border loops: disjoint from the kernel's own stores
# a run stops before the tensors only it uses would pass this many bytes (at batch 1 a ResNet56 is one run)
MAX_SCRATCH_BYTES = 4 << 20
MAX_KERNEL_BYTES = 256 << 10  # a kernel writing more than this is large enough to pay for its own launch


def _root(func: tirx.PrimFunc):
    from tvm.s_tir import SBlockRealize

    body = func.body
    if isinstance(body, SBlockRealize) and not body.block.iter_vars and not body.block.match_buffers:
        return body.block
    return None


def _statements(stmt) -> list:
    return [s for child in stmt.seq for s in _statements(child)] if isinstance(stmt, tirx.SeqStmt) else [stmt]


def _seq(stmts: list) -> tirx.Stmt:
    return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)


def _is_parallel_loop(stmt) -> bool:
    return isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.PARALLEL


def _has_parallel(stmt) -> bool:
    """Whether ``stmt`` has a ``parallel`` loop in it (itself included)."""
    import tvm_ffi

    found = []
    tvm_ffi.structural_walk(stmt, [(tirx.For, lambda loop: found.append(loop) if _is_parallel_loop(loop) else None)])
    return bool(found)


def _is_border(stmt) -> bool:
    return isinstance(stmt, tirx.For) and stmt.annotations is not None and BORDER_ANNOTATION in stmt.annotations


def launchable(func) -> bool:
    """Whether ``func`` (a scheduled PrimFunc in block form) can run inside a launch: every top-level statement of
    its root block is a ``parallel`` loop, a buffer declaration, or a statement with no parallel loop in it (a
    parallel loop below a serial one would be split inside every thread's copy of the serial one)."""
    if not isinstance(func, tirx.PrimFunc) or not is_scheduled(func):
        return False
    root = _root(func)
    if root is None:
        return False
    return not any(_has_parallel(stmt.body if _is_parallel_loop(stmt) else stmt) for stmt in _statements(root.body))


def _one_thread(stmts: list) -> tirx.Stmt:
    """``stmts`` on the first thread of the launch: the first iteration of a parallel loop of two (a loop of one
    would be simplified away before code generation)."""
    i = tirx.Var("serial_part", "int64")
    return tirx.For(i, i64(0), i64(2), tirx.ForKind.PARALLEL, tirx.IfThenElse(i == i64(0), _seq(stmts), None))


def _barrier(stmt) -> tirx.Stmt:
    return tirx.AttrStmt(tirx.IntImm("int32", 0), BARRIER, tirx.IntImm("int32", 1), stmt)


def _launch_parts(stmts: list, request) -> list:
    """One kernel's top-level statements as launch statements: declarations as they are, the tile-state request
    moved to ``request``, runs of serial statements on the first thread, and a barrier after each parallel loop and
    each serial run - but a run of zero-border loops that is not the kernel's last part (the kernel's own barrier
    follows later; none of its statements touches the border) - (:func:`merge_kernels` drops the run's last one)."""
    from passes import amx

    out, serial = [], []

    def flush(last: bool = False):
        if serial:
            part = _one_thread(list(serial))
            out.append(_barrier(part) if last or not _is_border(serial[0]) else part)
            serial.clear()

    for stmt in stmts:
        if isinstance(stmt, tirx.DeclBuffer):
            flush()
            out.append(stmt)
        elif isinstance(stmt, tirx.Evaluate) and amx.is_tile_state_request(stmt):
            request.append(stmt)
        elif _is_parallel_loop(stmt):
            flush()
            out.append(_barrier(stmt))
        else:
            if serial and _is_border(serial[-1]) != _is_border(stmt):
                flush()
            serial.append(stmt)
    flush(last=True)
    return out


def merge_kernels(funcs: list, args: list, outs: list, keep: list) -> tuple:
    """The PrimFunc running ``funcs`` (the run's kernels, in order) in one launch. ``args[i]``: the Relax
    arguments of kernel i; ``outs[i]``: the Relax var it binds; ``keep``: those of ``outs`` used after the run.
    Returns (PrimFunc, its Relax arguments, the Relax vars its first outputs bind, [(elements, dtype)] of its
    slot outputs).

    The tensors only the run uses share storage as the VM's planner would share it: each lives in a slot (one
    root-block buffer per dtype and lifetime class) from the kernel that writes it to the last that reads it."""
    import tvm_ffi
    from tvm import s_tir
    from tvm.s_tir import SBlock, SBlockRealize

    canon = []  # [(Relax value, the merged function's buffer var for it)]

    def canonical(expr):
        return next((b for e, b in canon if e.same_as(expr)), None)

    ext, ext_bufs, kernels, last_use = [], [], [], {}
    for i, (func, fargs, out) in enumerate(zip(funcs, args, outs)):
        func = s_tir.renew_defs(func)
        params = list(func.params)
        if len(params) != len(fargs) + 1:
            raise ValueError("a kernel with more than one output")
        renames = {}
        for buf, arg in zip(params[:-1], fargs):
            b = canonical(arg)
            if b is None:
                canon.append((arg, buf))
                ext.append(arg)
                ext_bufs.append(buf)
            else:
                renames[buf] = b
                last_use[b] = i
        canon.append((out, params[-1]))
        kernels.append((func, renames))
    kept = [o for o in outs if any(o.same_as(k) for k in keep)]
    out_bufs = [canonical(o) for o in kept]
    # slots: a scratch tensor takes the first slot of its dtype whose tenant's last reader came before its writer
    slots, tenants, decls, placed = [], [], [], {}
    for i, out in enumerate(outs):
        b = canonical(out)
        if any(b.same_as(k) for k in out_bufs):
            continue
        n, dtype = math.prod(int(d) for d in b.shape), str(b.dtype)
        j = next((j for j, (d, free_after) in enumerate(tenants) if d == dtype and free_after < i), None)
        if j is None:
            j = len(slots)
            slots.append([dtype, n])
            tenants.append((dtype, 0))
        slots[j][1] = max(slots[j][1], n)
        tenants[j] = (dtype, last_use.get(b, i))
        placed[b] = j
    slot_bufs = [tirx.decl_buffer([i64(n)], dtype, name=f"slot{j}") for j, (dtype, n) in enumerate(slots)]
    for b, j in placed.items():
        view = tirx.decl_buffer(list(b.shape), str(b.dtype), name=b.name)
        decls.append(tirx.DeclBuffer(view, data=slot_bufs[j].data))
        placed[b] = view
    allocs, body, request = [], [], []
    for func, renames in kernels:
        def rename(v, renames=renames):
            v = renames.get(v, v)
            return placed.get(v, v)

        root = _root(func)
        mapped = tvm_ffi.structural_map(root.body, [(tirx.Var, rename)], order="pre")
        allocs.extend(root.alloc_buffers)
        body.extend(_launch_parts(_statements(mapped), request))
    # no barrier after the run's last computing statement: the launch joins there
    while body and isinstance(body[-1], tirx.DeclBuffer):
        body.pop()
    if body and isinstance(body[-1], tirx.AttrStmt) and body[-1].attr_key == BARRIER:
        body[-1] = body[-1].body
    from passes import amx

    inner = _seq(body)
    inner = amx.save_once_per_thread(inner) or inner
    launch = tirx.AttrStmt(tirx.IntImm("int32", 0), LAUNCH_POINT, tirx.IntImm("int32", 1), inner)
    root = SBlock([], [], [], "root", _seq(request[:1] + decls + [launch]), None, allocs, [], {})
    # the slots are outputs nobody reads (the VM allocates and frees them as it plans its tensors): this TVM's
    # StorageRewrite, given them as allocations, shares the storage of slots that are live at once
    func = tirx.PrimFunc(ext_bufs + out_bufs + slot_bufs, SBlockRealize([], True, root))
    func = func.with_attr("tirx.is_scheduled", True).with_attr("tirx.noalias", True)
    return func, ext, kept, [(n, dtype) for dtype, n in slots]


def _launch_bytes(binding, mod) -> int | None:
    """The bytes the kernel of ``binding`` writes, where it can join a run; None where it cannot."""
    call = call_tir_parts(binding.value) if isinstance(binding, relax.VarBinding) else None
    ty = binding.value.ty
    if call is None or not isinstance(call[0], tvm.ir.GlobalVar) or not launchable(mod[call[0]]) \
            or not isinstance(ty, relax.TensorType):
        return None
    import numpy as np

    size = math.prod(int(d) for d in ty.shape.values) * np.dtype(str(ty.dtype)).itemsize
    return size if size <= MAX_KERNEL_BYTES else None


def _uses_tiles(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` is an AMX tile kernel (:mod:`passes.amx`: it requests the tile state at its entry)."""
    from passes import amx

    return any(amx.is_tile_state_request(s) for s in _statements(_root(func).body))


def _is_int8_conv2d(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` is a packed int8 conv2d kernel: AMX tiles, or a block of :func:`passes.vnni.conv2d_nchwc_int8`
    (VNNI, AVX-512, AVX2 dot products)."""
    import tvm_ffi
    from tvm.s_tir import SBlock

    from passes import vnni

    if _uses_tiles(func):
        return True
    names = []
    tvm_ffi.structural_walk(func.body, [(SBlock, lambda b: names.append(b.name_hint))])
    return any(name.startswith(vnni.CONV_NAME) for name in names)


def _runs(func: relax.Function, mod: tvm.IRModule, int8_only: bool = False) -> list:
    """[(bindings of a run, the vars of it used after it)] for each run of two or more launchable kernels (with
    ``int8_only``, of the runs with a packed int8 conv2d kernel in them)."""
    flat = [b for block in func.body.blocks for b in block.bindings]
    last_use = {}  # var -> index of the last binding using it (len(flat): the function's result)
    for i, binding in enumerate(flat):
        for v in relax.analysis.free_vars(binding.value):
            last_use[v] = i
    for v in relax.analysis.free_vars(func.body.body):
        last_use[v] = len(flat)
    runs = []

    def close(run, end):
        if len(run) >= 2 and (not int8_only or any(_is_int8_conv2d(mod[call_tir_parts(b.value)[0]]) for b in run)):
            runs.append((run, [b.var for b in run if last_use.get(b.var, -1) >= end]))

    start = 0
    for block in func.body.blocks:
        if isinstance(block, relax.DataflowBlock):
            run, written = [], 0
            for i, binding in enumerate(block.bindings, start):
                size = _launch_bytes(binding, mod)
                if size is None or written > MAX_SCRATCH_BYTES:
                    close(run, i)
                    run, written = [], 0
                if size is not None:
                    run.append(binding)
                    written += size
            close(run, start + len(block.bindings))
        start += len(block.bindings)
    return runs


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, runs):
        super().__init__(mod)
        self.mod = mod
        self.last = {run[-1].var: (run, keep) for run, keep in runs}
        self.inside = {b.var for run, _ in runs for b in run}
        self.changed = 0  # kernels merged

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var not in self.inside:
            return super().visit_var_binding_(binding)
        if var not in self.last:
            return None
        run, keep = self.last[var]
        calls = [call_tir_parts(b.value) for b in run]
        func, ext, kept, slots = merge_kernels([self.mod[gv] for gv, _ in calls], [a for _, a in calls],
                                               [b.var for b in run], keep)
        gv = self.builder_.add_func(func, "fused_launch")
        tys = [k.ty for k in kept] + [relax.TensorType(relax.ShapeExpr([n]), dtype) for n, dtype in slots]
        call = relax.call_tir(gv, relax.Tuple([self.visit_expr(a) for a in ext]), tys if len(tys) > 1 else tys[0])
        if len(tys) == 1:
            self.set_var_remap(kept[0], self.builder_.emit(call, kept[0].name))
        else:
            tup = self.builder_.emit(call, "launch")
            for j, k in enumerate(kept):
                self.set_var_remap(k, self.builder_.emit(relax.TupleGetItem(tup, j), k.name))
        self.changed += len(run)
        return None


@tvm.transform.module_pass(opt_level=0, name="MergeParallelLaunches")
class MergeParallelLaunches:
    """Each run of consecutive launchable kernels (:func:`launchable`) of every Relax function: one PrimFunc, one
    thread-pool launch (:func:`merge_kernels`). Run it last among the kernel rewrites, before lowering.
    ``int8_only``: only runs with a packed int8 conv2d kernel in them (where it was measured to pay: an fp32
    module's tuned kernels ran no faster in one launch). Compile the result with :data:`targets.pipeline.LLVM_OPTIONS`.
    """

    def __init__(self, int8_only: bool = False):
        self.int8_only = int8_only

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        def rewriter(mod, func):
            runs = _runs(func, mod, self.int8_only)
            return _Rewriter(mod, runs) if runs else None

        return rewrite_functions(mod, rewriter)
