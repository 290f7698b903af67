"""Why batch 1 on two threads does not beat one thread on AMX (issue 18 item 3): the tile unit alone, and the
shipped model's one-launch function traced thread by thread.

    python benchmarks/amx_threads.py [--split] [--parts] [--json OUT]

1. **Tile unit alone.** A kernel of two chunks, each ``rounds`` x 4 independent ``tdpbusd`` on registers (no
   memory traffic, the tile configuration saved, set and put back per chunk as :mod:`passes.amx` does), timed
   serial on one thread, and in 2 parallel chunks on 1 and 2 threads; once as a kernel of its own per call (one
   thread-pool launch each) and once as 20 such parallel loops in one launch with a barrier between them, as
   :mod:`passes.parallel_launch` runs a model.
2. **The model's launch, thread by thread.** The shipped pruned int8 ResNet56 lowered for x86-64-v4-amx at batch 1
   as ``build`` does (``--split``: every AMX conv2d in 2 chunks, ``ScheduleAmxConv2d(2, 0)``, so that every kernel
   has work for both threads); each statement of the launch gets the cycle counter (``llvm.readcyclecounter``)
   read by every thread before and after it. Prints, per kind of kernel, the time at 1 thread, and at 2 threads
   the slower thread's own work and the time from its start to the next one's (barrier wait included).

Needs an AMX CPU (Linux grants the tile state); exits 2 elsewhere. Results: ``benchmarks/amx_threads.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPS = 20  # parallel loops in the one-launch variant
LAUNCH = "pragma_parallel_launch_point"
BARRIER = "pragma_parallel_barrier_when_finish"


def _tile_kernel(rounds: int, parallel: bool, reps: int):
    """The PrimFunc of part 1: ``reps`` loops over 2 chunks (parallel or serial), one launch when parallel."""
    from tvm import tirx
    from tvm.s_tir import SBlock, SBlockRealize

    from passes import amx
    from passes.patterns import i64

    # the kernels' own statement builders, so the chunks configure and release the tiles as theirs do
    intrin, i8, address, C, A, B = amx._intrin, amx._i8, amx._address, amx._C, amx._A, amx._B

    class Geometry:  # a 16 x 64 A tile, 16 x 16 int32 C tiles
        m, k, ob = 16, 64, 16

    a = tirx.decl_buffer((2, 16, 64), "uint8", name="a")
    w = tirx.decl_buffer((2, 16, 64), "int8", name="w")
    out = tirx.decl_buffer((2, 4, 16, 16), "int32", name="out")

    def chunk(c):
        k = tirx.Var("k", "int64")
        step = [intrin("llvm.x86.tdpbusd", i8(C[t]), i8(A[t % 2]), i8(B[t // 2])) for t in range(4)]
        loads = [intrin("llvm.x86.tileloadd64", i8(tiles[t]), address(buf, [t, 0, 0]), i64(64))
                 for tiles, buf in ((A, a), (B, w)) for t in range(2)]
        body = tirx.SeqStmt([intrin("llvm.x86.tilezero", i8(t)) for t in C] + loads
                            + [tirx.For(k, i64(0), i64(rounds), tirx.ForKind.SERIAL, tirx.SeqStmt(step))]
                            + [intrin("llvm.x86.tilestored64", i8(C[t]), address(out, [c, t, 0, 0]), i64(64))
                               for t in range(4)])
        return amx._with_tiles(Geometry, body)

    loops = []
    for rep in range(reps):
        c = tirx.Var(f"chunk{rep}", "int64")
        loop = tirx.For(c, i64(0), i64(2), tirx.ForKind.PARALLEL if parallel else tirx.ForKind.SERIAL, chunk(c))
        last = rep == reps - 1
        loops.append(loop if last or not parallel else
                     tirx.AttrStmt(tirx.IntImm("int32", 0), BARRIER, tirx.IntImm("int32", 1), loop))
    body = tirx.SeqStmt(loops) if len(loops) > 1 else loops[0]
    if parallel and reps > 1:
        body = tirx.AttrStmt(tirx.IntImm("int32", 0), LAUNCH, tirx.IntImm("int32", 1), body)
    root = SBlock([], [], [], "root", tirx.SeqStmt([amx._request_tile_state(), body]), None, [], [], {})
    func = tirx.PrimFunc([a, w, out], SBlockRealize([], True, root))
    return func.with_attr("tirx.is_scheduled", True).with_attr("tirx.noalias", True).with_attr("global_symbol",
                                                                                                "main")


def tile_unit(target) -> list[dict]:
    import tvm

    from compiler import threads

    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ones((2, 16, 64), "uint8"), dev),
            tvm.runtime.tensor(np.ones((2, 16, 64), "int8"), dev),
            tvm.runtime.tensor(np.zeros((2, 4, 16, 16), "int32"), dev)]

    def timed(func, thread_counts, reps) -> list[float]:
        """Microseconds per step of ``func`` (``reps`` steps a call), compiled once, at each thread count."""
        with tvm.transform.PassContext(opt_level=3):
            lib = tvm.compile(func, target=target)
        times = []
        for n_threads in thread_counts:
            threads.set_tvm(n_threads)
            t = lib.mod.time_evaluator("main", dev, number=100, repeat=7, min_repeat_ms=20)(*args)
            times.append(float(np.median(t.results)) * 1e6 / reps)
        return times

    rows = []
    for rounds in (8, 32, 128, 512):
        serial, = timed(_tile_kernel(rounds, False, 1), (1,), 1)
        row = {"tdpbusd_per_chunk": 4 * rounds, "serial_1t_us": serial}
        for reps, key in ((1, "own_launch"), (REPS, "one_launch")):
            row[f"{key}_1t_us"], row[f"{key}_2t_us"] = timed(_tile_kernel(rounds, True, reps), (1, 2), reps)
        rows.append(row)
        print(f"  {4 * rounds:5d} tdpbusd a chunk: serial {serial:6.2f} us | own launch 1T "
              f"{row['own_launch_1t_us']:6.2f} 2T {row['own_launch_2t_us']:6.2f} | in one launch 1T "
              f"{row['one_launch_1t_us']:6.2f} 2T "
              f"{row['one_launch_2t_us']:6.2f} (half of serial {serial / 2:6.2f})", flush=True)
    return rows


def _callees(stmt) -> list:
    import tvm
    import tvm_ffi

    found = []
    tvm_ffi.structural_walk(stmt, [(tvm.ir.Call, lambda c: found.append(c.op)
                                    if isinstance(c.op, tvm.ir.GlobalVar) else None)])
    return found


def _instrumented(func, called=None):
    """``func`` (a MergeParallelLaunches PrimFunc) with every top-level launch statement bracketed by a cycle-counter
    read on each of 2 threads, into an extra int64 (2, 2 * parts + 1) output; and a label per part. ``called``:
    {GlobalVar: PrimFunc} of the functions its loops call (passes/outline_launch.py), whose blocks label a part."""
    import tvm_ffi
    from tvm import tirx
    from tvm.s_tir import SBlock, SBlockRealize

    from passes.patterns import i64

    root = func.body.block
    stmts = list(root.body.seq)
    at = next(i for i, s in enumerate(stmts) if isinstance(s, tirx.AttrStmt) and s.attr_key == LAUNCH)
    body = stmts[at].body
    tiles = body.block if isinstance(body, SBlockRealize) else None  # save / parts / restore, once per thread
    parts = list(tiles.body.seq[1:-1] if tiles is not None else body.seq)
    n = sum(not isinstance(p, tirx.DeclBuffer) for p in parts)
    trace = tirx.decl_buffer((2, 2 * n + 1), "int64", name="trace")

    def stamp(k):
        t = tirx.Var("thread", "int64")
        return tirx.For(t, i64(0), i64(2), tirx.ForKind.PARALLEL, tirx.BufferStore(
            trace, tirx.call_llvm_intrin("int64", "llvm.readcyclecounter"), [t, i64(k)]))

    def label(stmt):
        blocks, stores = [], []
        tvm_ffi.structural_walk(stmt, [(SBlock, lambda b: blocks.append(b.name_hint)),
                                       (tirx.BufferStore, lambda s: stores.append(s.buffer.name))])
        for callee in _callees(stmt):
            tvm_ffi.structural_walk((called or {})[callee].body, [(SBlock, lambda b: blocks.append(b.name_hint))])
        if any("amx" in b for b in blocks):
            return "AMX conv2d"
        if isinstance(stmt, tirx.For) and stmt.loop_var.name == "serial_part":
            return "zero border (1st thread)" if any("padded" in s for s in stores) else "serial kernel"
        names = sorted(set(blocks)) or ["?"]
        return names[0] if names[0] not in ("root",) else names[-1]

    new, labels = [], []
    for p in parts:
        if isinstance(p, tirx.DeclBuffer):
            new.append(p)
            continue
        j = len(labels)
        if isinstance(p, tirx.AttrStmt) and p.attr_key == BARRIER:  # stamp before the barrier, inside it
            labels.append(label(p.body))
            new += [stamp(2 * j), tirx.AttrStmt(p.node, p.attr_key, p.value, tirx.SeqStmt([p.body, stamp(2 * j + 1)]))]
        else:
            labels.append(label(p))
            new += [stamp(2 * j), p, stamp(2 * j + 1)]
    new.append(stamp(2 * n))
    body = tirx.SeqStmt(new)
    if tiles is not None:
        seq = tiles.body.seq
        body = SBlockRealize([], True, SBlock([], [], [], tiles.name_hint, tirx.SeqStmt([seq[0], *new, seq[-1]]),
                                              None, tiles.alloc_buffers, [], {}))
    stmts[at] = tirx.AttrStmt(stmts[at].node, LAUNCH, stmts[at].value, body)
    body = SBlockRealize([], True, SBlock([], [], [], "root", tirx.SeqStmt(stmts), None, root.alloc_buffers, [], {}))
    out = tirx.PrimFunc(list(func.params) + [trace], body)
    return out.with_attr("tirx.is_scheduled", True).with_attr("tirx.noalias", True).with_attr(
        "global_symbol", "main"), labels


def time_parts(func, called: dict, target, n: int, runs: int, warm: int):
    """Compile ``func`` (from :func:`_instrumented`, ``n`` parts) with the functions it calls, run it ``runs`` times
    at 1 and at 2 threads on random inputs and return, in microseconds (medians over the runs after ``warm``): each
    part at one thread, each thread's own work per part at two (shape (2, n)), each part's span at two (start to the
    next part: barrier waits included), the whole launch per thread count, and the counter's ticks per us."""
    import time

    import tvm

    from compiler import threads

    with tvm.transform.PassContext(opt_level=3):
        lib = tvm.compile(tvm.IRModule({tvm.ir.GlobalVar("main"): func, **called}), target=target)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    args = []
    for param in func.params:
        shape, dtype = [int(s) for s in param.shape], str(param.dtype)
        values = rng.integers(0, 5, shape) if "int" in dtype else rng.random(shape)
        args.append(tvm.runtime.tensor(values.astype(dtype), dev))
    # cycle counter -> microseconds: the counter against the wall clock over one run of calls
    per_us = {}
    stamps = {}
    for n_threads in (1, 2):
        threads.set_tvm(n_threads)
        kept = []
        t0, c0 = time.perf_counter(), None
        for i in range(runs):
            lib["main"](*args)
            if i == warm - 1:
                t0 = time.perf_counter()
                c0 = int(args[-1].numpy()[0, 0])
            if i >= warm:
                kept.append(args[-1].numpy().copy())
        per_us[n_threads] = (int(kept[-1][0, 0]) - c0) / ((time.perf_counter() - t0) * 1e6)
        stamps[n_threads] = np.array(kept, dtype=np.float64)
    rate = float(np.median(list(per_us.values())))  # counter ticks per microsecond
    one = np.median(stamps[1][:, 0, 1:2 * n:2] - stamps[1][:, 0, 0:2 * n:2], axis=0) / rate
    work2 = np.median(stamps[2][:, :, 1:2 * n:2] - stamps[2][:, :, 0:2 * n:2], axis=0) / rate  # (2, parts)
    span2 = np.median(stamps[2][:, :, 2:2 * n + 1:2] - stamps[2][:, :, 0:2 * n:2], axis=0) / rate
    total = {t: float(np.median(stamps[t][:, 0, 2 * n] - stamps[t][:, 0, 0]) / rate) for t in (1, 2)}
    return one, work2, span2, total, rate


def model_trace(split: int | None, show_parts: bool) -> dict:
    import tvm

    import targets
    from compiler import zoo
    from compiler.build import lower
    from compiler.tuning import database as tdb
    from compiler.tuning.tvm_compat import register_tensor_intrinsics
    from passes import amx
    from targets import pipeline

    register_tensor_intrinsics()
    ckpt = zoo.load("resnet56", None, None, quiet=True)
    spec = targets.get("x86-64-v4-amx")
    lowered = lower(ckpt.model, 1, "int8", spec, data_dir=None, normalize=ckpt.normalize, untrained=False,
                    shipped=zoo.calibration(ckpt, 512))
    target = pipeline.compile_target(spec)  # build's target: the LLVM options a merged launch is compiled with
    library, _ = tdb.find_library(spec, "int8", 1)
    db = tdb.combine(None, library)
    with target, db:  # build's passes up to the scheduled kernels, the AMX chunking swapped with --split
        passes = [amx.ScheduleAmxConv2d(2, split) if split is not None and isinstance(p, amx.ScheduleAmxConv2d) else p
                  for p in pipeline.kernel_passes(target, db)]
        mod = tvm.transform.Sequential(passes)(lowered.module)
    from passes.outline_launch import OUTLINED

    func = next(f for gv, f in mod.functions_items() if gv.name_hint == "fused_launch")
    # the functions the launch's loops call (passes/outline_launch.py), compiled with it
    called = {gv: f for gv, f in mod.functions_items()
              if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and OUTLINED in f.attrs}
    func, labels = _instrumented(func, called)
    one, work2, span2, total, rate = time_parts(func, called, target, len(labels), runs=400, warm=100)
    n = len(labels)
    kinds = {}
    for j, kind in enumerate(labels):
        k = kinds.setdefault(kind, {"parts": 0, "one_thread_us": 0.0, "slower_thread_work_us": 0.0, "span_us": 0.0})
        k["parts"] += 1
        k["one_thread_us"] += float(one[j])
        k["slower_thread_work_us"] += float(work2[:, j].max())
        k["span_us"] += float(span2[:, j].max())
        if show_parts:
            print(f"  {j:3d} {kind:28s} 1T {one[j]:6.2f} | 2T work {work2[0, j]:6.2f} {work2[1, j]:6.2f}"
                  f"  to next {span2[0, j]:6.2f}")
    print(f"  launch body: 1 thread {total[1]:.1f} us, 2 threads {total[2]:.1f} us ({n} statements; "
          f"counter {rate:.0f} ticks/us)")
    print(f"  {'kernel kind':28s} {'parts':>5s} {'1 thread us':>12s} {'2T slower thread us':>20s} "
          f"{'2T with waits us':>17s}")
    for kind, k in sorted(kinds.items(), key=lambda kv: -kv[1]["one_thread_us"]):
        print(f"  {kind:28s} {k['parts']:5d} {k['one_thread_us']:12.1f} {k['slower_thread_work_us']:20.1f} "
              f"{k['span_us']:17.1f}")
    return {"split": split, "launch_us": total, "kinds": kinds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", type=int, nargs="?", const=0, default=None, metavar="MIN_MACS",
                   help="every AMX conv2d of MIN_MACS multiply-adds or more (default 0: all) in 2 chunks "
                        "(without the flag: as build makes it)")
    p.add_argument("--parts", action="store_true", help="print every statement of the launch")
    p.add_argument("--no-tile-unit", action="store_true", help="skip part 1")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    from compiler import threads

    threads.prepare_tvm()
    import targets
    from passes import amx

    spec = targets.get("x86-64-v4-amx")
    target = spec.tvm_target()
    if not amx.is_amx_target(targets.get("host").tvm_target()):
        print("error: this CPU has no AMX (or Linux does not grant the tile state); this benchmark needs one",
              file=sys.stderr)
        return 2
    import subprocess

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU: {model}, {threads.cores()} cores")
    unit = []
    if not args.no_tile_unit:
        print("1. tile unit alone: 2 chunks of register-only tdpbusd, per call (us)")
        unit = tile_unit(target)
    split = "" if args.split is None else f" (AMX conv2d kernels of {args.split} multiply-adds and up in 2 chunks)"
    print(f"2. the shipped model's launch at batch 1{split}")
    trace = model_trace(args.split, args.parts)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": model, "tile_unit": unit, "model": trace}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
