"""ScheduleAmxConv2d: the packed int8 conv2d kernels on Intel AMX tiles (``tdpbusd``), with their epilogue fused.

AMX (Sapphire Rapids and later Xeons) multiplies whole tiles: ``tdpbusd`` is C[M x N] int32 += A[M x K] uint8 .
B[K/4 x N x 4] int8, up to 16 x 16 x 64 in one instruction, ~1,000 multiply-adds a cycle where AVX-512 VNNI does 128
(``benchmarks/amx_probe.md``). The packed layout :class:`passes.int8_layout.Int8Layout` emits already has AMX's
operands in place:

- an **A tile** is M output pixels of one row x K input channels: data NCHW[ic_bn]c holds a pixel's ic_bn channels
  contiguously, the next pixel ``stride * ic_bn`` bytes on (the tile row stride). Where the conv has one input
  block (ICC = 1) the KW taps of a row are contiguous too, so a row of A is KW * ic_bn bytes (K folded over kw);
- a **B tile** is the weight block OIHW[ic_bn/4]i[ob]o4i of one (oc block, ic block, kh, kw): K/4 rows of ob x 4
  bytes, which is the VNNI order ``tdpbusd`` wants;
- a **C tile** is M pixels x ob output channels of the int32 NCHW[ob]c output.

This pass (after FuseTIR, in place of MetaSchedule for these kernels) rewrites each fused kernel whose anchor is a
packed conv2d: the conv2d is split into tiles of M pixels (the largest divisor of the output width up to 16), each
tile computed by ``tilezero``, one ``tileloadd`` of A and of B and one ``tdpbusd`` per tap, and ``tilestored`` into
an M x ob int32 buffer the fused epilogue (requantize, bias, residual add, ReLU, quantize; inlined into one block)
reads right after, vectorized over ob: the int32 tensor never leaves the cache. A kernel of
:data:`PARALLEL_MIN_MACS` or more spreads its tiles over the thread pool in up to :data:`CHUNKS` contiguous chunks
of at least that much work (row bands of the output); each chunk configures the tile registers once (``ldtilecfg``:
200 cycles here, as much as a tile's work at batch 1) and puts the thread's previous configuration back when it is
done (:func:`_with_tiles`: ONNX Runtime, in the same process, keeps its own per thread); inside one thread-pool
launch each thread saves and restores it once for all the kernels instead (:func:`save_once_per_thread`). The
conv2d's integers are the same as the NCHW conv2d's (an exact int32 sum in another order); the float epilogue
rounds as its vectorized code does, and the AMX layout quantizes by the inverse scale
(:func:`passes.vnni._quantized`), so a requantized activation can differ from the VNNI build's by one step where a
value sits on a rounding tie.

Linux gives a process the tile state only once it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``);
every kernel asks at entry (one cheap syscall, idempotent), so an artifact runs in any process that loads it.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from passes import vnni
from passes.patterns import i64, is_scheduled, with_functions, with_root_body

__all__ = ["ScheduleAmxConv2d", "schedule_amx_conv2d", "tile_config", "is_amx_target", "save_once_per_thread",
           "CHUNKS", "PARALLEL_MIN_MACS"]

CHUNKS = 16  # at most this many contiguous tile chunks in a parallel kernel: each configures the tiles once
# a kernel below this many multiply-adds (~1 us of tiles) runs on one thread. Was 2 M until session 20: inside one
# thread-pool launch (passes/parallel_launch.py) with the tile save hoisted a split costs a barrier, and at 1 M the
# shipped batch-1 model runs 0.195 ms on 2 threads against 0.205 on 1 at 2 M (benchmarks/amx_threads.md)
PARALLEL_MIN_MACS = 1 << 20
MAX_K = 64  # bytes in a tile row
MAX_M = 16  # rows in a tile
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18
TILES_BLOCK, SAVED_CONFIG = "amx_tiles", "amx_saved_config"  # the block around a tile chunk, its saved configuration
# the 8 tile registers: up to 2 x 2 accumulators (2 output-channel blocks x 2 pixel runs), whose independent
# tdpbusd chains overlap; the 2 activation tiles and the 2 weight tiles they multiply
_C, _A, _B = (0, 1, 2, 3), (4, 5), (6, 7)


def tile_config(m: int, k: int, n_bytes: int) -> list[int]:
    """The 64-byte ``ldtilecfg`` operand (palette 1): C tiles m x n_bytes, A tiles m x k, B tiles k/4 x n_bytes."""
    cfg = [0] * 64
    cfg[0] = 1
    shapes = [(t, m, n_bytes) for t in _C] + [(t, m, k) for t in _A] + [(t, k // 4, n_bytes) for t in _B]
    for tile, rows, colsb in shapes:
        cfg[16 + 2 * tile] = colsb & 0xFF
        cfg[17 + 2 * tile] = colsb >> 8
        cfg[48 + tile] = rows
    return cfg


def _intrin(name: str, *args) -> tirx.Stmt:
    return tirx.Evaluate(tirx.call_llvm_intrin("void", name, *args))


def _i8(v: int):
    return tirx.IntImm("int8", v)


def _address(buf, indices):
    return tirx.call_intrin("handle", "tirx.address_of", tirx.BufferLoad(buf, [i64(i) for i in indices]))


def _region_buffer(region):
    return region.buffer if hasattr(region, "buffer") else region.source


def _linear(expr, var) -> int | None:
    """The integer coefficient of ``var`` in the affine ``expr`` (None when it is not affine in it)."""
    from tvm import sym

    coeffs = sym.detect_linear_equation(expr, [var])
    return None if len(coeffs) != 2 else int(coeffs[0])


class _Geometry:
    """Shapes, strides and the tiling of one packed conv2d block (None-returning :meth:`of` when AMX cannot run
    it)."""

    @classmethod
    def of(cls, block):
        if len(block.writes) != 1 or len(block.reads) != 2:
            return None
        out = _region_buffer(block.writes[0])
        reads = [_region_buffer(r) for r in block.reads]
        data = next((b for b in reads if str(b.dtype) == "uint8"), None)
        kern = next((b for b in reads if str(b.dtype) == "int8"), None)
        if data is None or kern is None or str(out.dtype) != "int32":
            return None
        try:
            n, icc, _, _, bn = (int(d) for d in data.shape)
            occ, icc2, kh, kw, bnq, ob, k4 = (int(d) for d in kern.shape)
            n2, occ2, oh, ow, ob2 = (int(d) for d in out.shape)
        except (TypeError, ValueError):  # a symbolic shape
            return None
        if (icc, occ, n, ob) != (icc2, occ2, n2, ob2) or k4 != 4 or bnq * 4 != bn or ob not in (8, 16) or bn > MAX_K:
            return None
        if len(block.iter_vars) != 10:
            return None
        v = [iv.var for iv in block.iter_vars]  # b, o, y, x, ob, kh, kw, ic_outer, ic_f, ic_s (conv2d_nchwc_int8)
        idx = [r.min for r in next(r for r in block.reads if _region_buffer(r).same_as(data)).region]
        sh, dh, sw, dw = _linear(idx[2], v[2]), _linear(idx[2], v[5]), _linear(idx[3], v[3]), _linear(idx[3], v[6])
        if None in (sh, dh, sw, dw) or dh != 1 or dw != 1:
            return None
        g = cls()
        g.data, g.kern, g.out = data, kern, out
        g.n, g.icc, g.bn, g.occ, g.kh, g.kw, g.ob, g.oh, g.ow, g.sh, g.sw = n, icc, bn, occ, kh, kw, ob, oh, ow, sh, sw
        g.m = max(d for d in range(1, MAX_M + 1) if ow % d == 0)
        g.fold = icc == 1 and kw * bn <= MAX_K  # a row's kw taps are contiguous: one tile row of kw * bn bytes
        g.k = kw * bn if g.fold else bn
        g.to = 2 if occ % 2 == 0 else 1  # output-channel blocks a group computes
        runs_x = ow // g.m
        g.pair = "x" if runs_x % 2 == 0 else ("y" if oh % 2 == 0 else None)  # where a group's second run is
        g.ts = 1 if g.pair is None else 2
        g.macs = n * occ * ob * oh * ow * icc * bn * kh * kw
        return g

    def taps(self):
        """(ic block, kh, kw) of each tdpbusd of a tile: loop extents."""
        return (self.icc, self.kh, 1 if self.fold else self.kw)


def _tile_body(g: _Geometry, b, o, y, x) -> tirx.Stmt:
    """One group of C tiles from (b, o, y, x): ``g.to`` output-channel blocks x ``g.ts`` runs of M pixels (the next
    M pixels of the row, or the next row: ``g.pair``), every tap accumulated, stored into ``g.out``."""
    runs = [(y, x + i * g.m) if g.pair == "x" else (y + i, x) for i in range(g.ts)]
    tiles = [(oi, si) for oi in range(g.to) for si in range(g.ts)]
    ic, kh, kw = (tirx.Var(name, "int64") if extent > 1 else i64(0)
                  for name, extent in zip(("ic", "kh", "kw"), g.taps()))
    step = []
    for si, (yy, xx) in enumerate(runs):
        step.append(_intrin("llvm.x86.tileloadd64", _i8(_A[si]),
                            _address(g.data, [b, ic, yy * g.sh + kh, xx * g.sw + kw, 0]), i64(g.sw * g.bn)))
    for oi in range(g.to):
        step.append(_intrin("llvm.x86.tileloadd64", _i8(_B[oi]), _address(g.kern, [o + oi, ic, kh, kw, 0, 0, 0]),
                            i64(4 * g.ob)))
    for oi, si in tiles:
        step.append(_intrin("llvm.x86.tdpbusd", _i8(_C[oi * 2 + si]), _i8(_A[si]), _i8(_B[oi])))
    loops = tirx.SeqStmt(step)
    for var, extent in reversed(list(zip((ic, kh, kw), g.taps()))):
        if extent > 1:
            loops = tirx.For(var, i64(0), i64(extent), tirx.ForKind.SERIAL, loops)
    zero = [_intrin("llvm.x86.tilezero", _i8(_C[oi * 2 + si])) for oi, si in tiles]
    store = [_intrin("llvm.x86.tilestored64", _i8(_C[oi * 2 + si]),
                     _address(g.out, [b, o + oi, runs[si][0], runs[si][1], 0]), i64(4 * g.ob)) for oi, si in tiles]
    return tirx.SeqStmt(zero + [loops] + store)


def _saved_config():
    return tirx.decl_buffer((64,), "uint8", name=SAVED_CONFIG, scope="local")


def _saving(saved, stmts: list) -> list:
    """``stmts`` between saving the thread's tile configuration into ``saved`` and putting it back."""
    return [_intrin("llvm.x86.sttilecfg", _address(saved, [0]))] + stmts + [
        _intrin("llvm.x86.ldtilecfg", _address(saved, [0]))]


def _with_tiles(g: _Geometry, body: tirx.Stmt):
    """``body`` with the tile registers configured for ``g`` around it, and the thread's previous configuration put
    back after it: other libraries in the process keep theirs per thread (ONNX Runtime's MLAS loads its AMX
    configuration once per thread and stops with SIGILL if someone else's is left in place), so the kernel saves it
    (``sttilecfg``; an unconfigured thread reads palette 0, which ``ldtilecfg`` restores as released tiles)."""
    from tvm.s_tir import SBlock, SBlockRealize

    cfg = tirx.decl_buffer((64,), "uint8", name="amx_tile_config", scope="local")
    saved = _saved_config()
    stores = [tirx.BufferStore(cfg, tirx.IntImm("uint8", byte), [i64(i)])
              for i, byte in enumerate(tile_config(g.m, g.k, 4 * g.ob))]
    seq = tirx.SeqStmt(_saving(saved, stores + [_intrin("llvm.x86.ldtilecfg", _address(cfg, [0])), body]))
    return SBlockRealize([], True, SBlock([], [], [], TILES_BLOCK, seq, alloc_buffers=[cfg, saved]))


def save_once_per_thread(stmt: tirx.Stmt) -> tirx.Stmt | None:
    """``stmt`` (the body of a thread-pool launch: every thread runs it, each its share of the parallel loops) with
    the save and restore of the thread's tile configuration moved out of every tile chunk to the start and the end
    of ``stmt``, once per thread (each chunk still loads its own configuration); None when it has no tile chunk.
    A chunk's save and restore cost ~0.15 us (``benchmarks/amx_threads.md``), as much as a batch-1 tile group."""
    import tvm_ffi
    from tvm.s_tir import SBlock, SBlockRealize

    found = []

    def drop_save(block):
        saved = [b for b in block.alloc_buffers if b.name == SAVED_CONFIG]
        if block.name_hint != TILES_BLOCK or not saved or not isinstance(block.body, tirx.SeqStmt):
            return block
        seq = list(block.body.seq)
        save, restore = _saving(saved[0], [])
        if not (tvm_ffi.structural_equal(seq[0], save) and tvm_ffi.structural_equal(seq[-1], restore)):
            return block
        found.append(block)
        return SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, tirx.SeqStmt(seq[1:-1]), None,
                      [b for b in block.alloc_buffers if not b.same_as(saved[0])], block.match_buffers,
                      block.annotations)

    body = tvm_ffi.structural_map(stmt, [(SBlock, drop_save)], order="post")
    if not found:
        return None
    saved = _saved_config()
    return SBlockRealize([], True, SBlock([], [], [], "amx_thread_tiles", tirx.SeqStmt(_saving(saved, [body])),
                                          alloc_buffers=[saved]))


def _request_tile_state() -> tirx.Stmt:
    """``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` through libc's ``syscall``: Linux keeps the tile
    state from a process until it asks (then the first tile instruction would be SIGILL)."""
    return tirx.Evaluate(tirx.call_extern("int64", "syscall", i64(SYS_ARCH_PRCTL), i64(ARCH_REQ_XCOMP_PERM),
                                          i64(XFEATURE_XTILEDATA)))


def is_tile_state_request(stmt) -> bool:
    """Whether ``stmt`` is the tile-state request :func:`_request_tile_state` makes (a process needs one)."""
    import tvm_ffi

    return isinstance(stmt, tirx.Evaluate) and tvm_ffi.structural_equal(stmt, _request_tile_state())


def schedule_amx_conv2d(func: tirx.PrimFunc, chunks: int = CHUNKS, parallel_min_macs: int = PARALLEL_MIN_MACS):
    """``func`` (a fused kernel: a packed conv2d block first, then elementwise blocks over its output) with the
    conv2d on AMX tiles and the epilogue fused per tile, marked ``tirx.is_scheduled``; None where the kernel does
    not have that shape (left to MetaSchedule)."""
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    try:
        root = sch.get_sblock("root")
        blocks = sch.get_child_blocks(root)
        if not blocks or sch.get(blocks[0]).name_hint != vnni.CONV_NAME:
            return None
        g = _Geometry.of(sch.get(blocks[0]))
        if g is None:
            return None
        for block in reversed(blocks[1:-1]):
            sch.compute_inline(block)
        blocks = sch.get_child_blocks(root)
        if len(blocks) > 2:
            return None
        conv, epilogue = blocks[0], (blocks[1] if len(blocks) == 2 else None)
        if epilogue is not None:
            written = _region_buffer(sch.get(epilogue).writes[0])
            if [int(d) for d in written.shape] != [int(d) for d in g.out.shape]:
                return None
        b, o, y, x, *_ = sch.get_loops(conv)
        xo, xi = sch.split(x, [None, g.m])
        group = []  # the loops a group of tiles spans, outermost first
        if g.to == 2:
            o, ot = sch.split(o, [None, 2])
            group.append(ot)
        if g.pair == "x":
            xo, xt = sch.split(xo, [None, 2])
            group.append(xt)
        elif g.pair == "y":
            y, yt = sch.split(y, [None, 2])
            group.append(yt)
        # rows outermost: the chunks of a batch-1 kernel are row bands, so a thread reads mostly the rows it wrote
        # in the kernel before (output-channel blocks first, a stage-3 kernel's halves each read the whole input,
        # half of it from the other core: 2.9 us whole, 3.3 us a half on 2 threads; row bands 2.4-2.5)
        sch.reorder(b, y, o, xo, *group, xi)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, xo)
            sch.vectorize(sch.get_loops(epilogue)[-1])  # the ob (8 or 16) channels of a tile row
        sch.blockize(group[0] if group else xi)
        fused = sch.fuse(b, y, o, xo)
        parallel = g.macs >= parallel_min_macs
        if parallel:
            # each chunk at least parallel_min_macs of work: ldtilecfg + the save and restore cost ~0.15 us a
            # chunk, 2 us a kernel at 16 chunks (measured: a 2.4M-MAC kernel 4.5 us serial, 6.5 us in 16 chunks
            # on one thread, 4.6 us in 2); a parallel loop is split statically, so more chunks than threads buy
            # nothing
            n = min(chunks, max(2, g.macs // max(1, parallel_min_macs)), int(sch.get(fused).extent))
            outer, _ = sch.split(fused, [n, None])
            sch.parallel(outer)
    except s_tir.ScheduleError:
        return None
    return _lower_tiles(sch.mod["main"], g, parallel).with_attr("tirx.is_scheduled", True)


def _lower_tiles(func: tirx.PrimFunc, g: _Geometry, parallel: bool) -> tirx.PrimFunc:
    """The blockized conv2d tile's body replaced by the tile instructions; the tile configuration put at the top
    of each parallel chunk (or of the kernel); the tile-state request at its entry."""
    import tvm_ffi
    from tvm.s_tir import SBlock

    tile_name = vnni.CONV_NAME + "_o"

    def rewrite_block(block):
        if block.name_hint != tile_name:
            return block
        b, o, y, x = (r.min for r in block.writes[0].region[:4])
        return SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, _tile_body(g, b, o, y, x),
                      None, block.alloc_buffers, block.match_buffers, block.annotations)

    placed = []

    def configure(loop):
        if not (parallel and loop.kind == tirx.ForKind.PARALLEL and not placed):
            return loop
        placed.append(loop)
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, _with_tiles(g, loop.body),
                        loop.thread_binding, loop.annotations)

    body = tvm_ffi.structural_map(func.body, [(SBlock, rewrite_block), (tirx.For, configure)], order="post")
    return func.with_body(with_root_body(
        body, lambda inner: tirx.SeqStmt([_request_tile_state(), inner if placed else _with_tiles(g, inner)])))


def is_amx_target(target) -> bool:
    """Whether the LLVM ``target``'s best int8 ISA is AMX (:func:`passes.vnni.target_int8_isa`: the one the int8
    layout was packed for)."""
    return vnni.target_int8_isa(target) == "amx"


@tvm.transform.module_pass(opt_level=0, name="ScheduleAmxConv2d")
class ScheduleAmxConv2d:
    """Every unscheduled packed int8 conv2d kernel of a legalized module on AMX tiles
    (:func:`schedule_amx_conv2d`); each keeps its name and signature. Kernels of another shape are left alone."""

    def __init__(self, chunks: int = CHUNKS, parallel_min_macs: int = PARALLEL_MIN_MACS):
        self.chunks, self.parallel_min_macs = chunks, parallel_min_macs

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or vnni.CONV_NAME not in gv.name_hint:
                continue
            if is_scheduled(func):
                continue
            scheduled = schedule_amx_conv2d(func, self.chunks, self.parallel_min_macs)
            if scheduled is not None:
                updates[gv] = scheduled
        return with_functions(mod, updates)
