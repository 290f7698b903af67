"""The shipped model's one-launch function traced kernel by kernel on any x86 int8 target, at 1 and 2 threads.

    python benchmarks/launch_trace.py --target x86-64-v3 [--twice] [--runs 1500]

The shipped pruned int8 ResNet56 lowered as ``build`` lowers it (its records, at batch 1); every statement of the
merged launch (:mod:`passes.parallel_launch`; each loop calls its kernel's function, :mod:`passes.outline_launch`)
gets the cycle counter read by every thread before and after it (``benchmarks/amx_threads.py``'s instrumentation).
Per statement: the kernel function it calls and its parallel extent, the microseconds at one thread, each thread's
own work at two, the span (start to the next statement: barrier included) and the two-thread speed-up.

``--twice``: every kernel (each statement with a barrier) runs twice in a row. The second run's inputs are in both
cores' caches (the first run read them), the first run's are where the kernel before left them: mostly in the
cache of the core that wrote them. The difference is what moving activations between the cores costs.
Results: ``benchmarks/layout_in_launch.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _lowered_launch(target_name: str):
    import tvm
    from tvm import tirx

    import targets
    from compiler import zoo
    from compiler.build import lower
    from compiler.tuning import database as tdb
    from compiler.tuning.tvm_compat import register_tensor_intrinsics
    from passes.outline_launch import OUTLINED
    from targets import pipeline

    register_tensor_intrinsics()
    ckpt = zoo.load("resnet56", None, None, quiet=True)
    spec = targets.get(target_name)
    lowered = lower(ckpt.model, 1, "int8", spec, data_dir=None, normalize=ckpt.normalize, untrained=False,
                    shipped=zoo.calibration(ckpt, 512))
    database, _ = tdb.find_database(spec, ckpt.model_name, tdb.variant_of(lowered.module, "int8"))
    library, _ = tdb.find_library(spec, "int8", 1)
    db = tdb.combine(database, library)
    target = pipeline.compile_target(spec)
    with target, db:
        mod = tvm.transform.Sequential(pipeline.kernel_passes(target, db))(lowered.module)
    func = next(f for gv, f in mod.functions_items() if gv.name_hint == "fused_launch")
    called = {gv: f for gv, f in mod.functions_items()
              if isinstance(f, tirx.PrimFunc) and f.attrs is not None and OUTLINED in f.attrs}
    return func, called, target


def _twice(func):
    """``func`` with every barrier-wrapped parallel loop of its launch run twice (the copy with a fresh loop var)."""
    import tvm_ffi
    from amx_threads import BARRIER, LAUNCH
    from tvm import tirx
    from tvm.s_tir import SBlock, SBlockRealize

    root = func.body.block
    stmts = list(root.body.seq)
    at = next(i for i, s in enumerate(stmts) if isinstance(s, tirx.AttrStmt) and s.attr_key == LAUNCH)
    parts = []
    for p in stmts[at].body.seq:
        parts.append(p)
        if isinstance(p, tirx.AttrStmt) and p.attr_key == BARRIER and isinstance(p.body, tirx.For):
            loop = p.body
            var = tirx.Var(loop.loop_var.name + "_again", loop.loop_var.ty.dtype)
            body = tvm_ffi.structural_map(loop.body, [(tirx.Var, lambda v, var=var, old=loop.loop_var:
                                                        var if v.same_as(old) else v)])
            parts.append(tirx.AttrStmt(p.node, p.attr_key, p.value,
                                       tirx.For(var, loop.min, loop.extent, loop.kind, body, None, loop.annotations)))
    stmts[at] = tirx.AttrStmt(stmts[at].node, stmts[at].attr_key, stmts[at].value, tirx.SeqStmt(parts))
    return func.with_body(SBlockRealize([], True, SBlock([], [], [], "root", tirx.SeqStmt(stmts), None,
                                                         root.alloc_buffers, [], {})))


def _describe(func) -> list[str]:
    """Per launch statement (DeclBuffers skipped, as the instrumentation does): "extent callee"."""
    from amx_threads import BARRIER, LAUNCH, _callees
    from tvm import tirx

    root = func.body.block
    launch = next(s for s in root.body.seq if isinstance(s, tirx.AttrStmt) and s.attr_key == LAUNCH)
    out = []
    for p in launch.body.seq:
        if isinstance(p, tirx.DeclBuffer):
            continue
        s = p.body if isinstance(p, tirx.AttrStmt) and p.attr_key == BARRIER else p
        extent = int(s.extent) if isinstance(s, tirx.For) and isinstance(s.extent, tirx.IntImm) else "-"
        callees = [c.name_hint for c in _callees(p)]
        again = " again" if isinstance(s, tirx.For) and s.loop_var.name.endswith("_again") else ""
        out.append(f"{extent} {callees[0] if callees else ''}{again}")
    return out


def trace(target_name: str, twice: bool, runs: int) -> dict:
    from amx_threads import _instrumented, time_parts

    func, called, target = _lowered_launch(target_name)
    if twice:
        func = _twice(func)
    described = _describe(func)
    func, labels = _instrumented(func, called)
    n = len(labels)
    one, work, span, total, _ = time_parts(func, called, target, n, runs=runs, warm=runs // 5)
    parts = [{"label": labels[j], "kernel": described[j], "one_thread_us": float(one[j]),
              "work_us": [float(work[0, j]), float(work[1, j])], "span_us": float(span[:, j].max())}
             for j in range(n)]
    return {"target": target_name, "twice": twice, "launch_us": total, "parts": parts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="x86-64-v3")
    p.add_argument("--twice", action="store_true", help="run every kernel twice in a row")
    p.add_argument("--runs", type=int, default=1500)
    args = p.parse_args(argv)
    result = trace(args.target, args.twice, args.runs)
    print(f"{args.target}: launch {result['launch_us'][1]:.1f} us at 1 thread, {result['launch_us'][2]:.1f} at 2")
    print(f"{'#':>3} {'kind':24} {'extent kernel':28} {'1T us':>7} {'2T work us':>15} {'span':>6} {'x':>5}")
    for j, part in enumerate(result["parts"]):
        if part["one_thread_us"] < 0.3 and part["span_us"] < 0.3:
            continue
        w0, w1 = part["work_us"]
        print(f"{j:3d} {part['label'][:24]:24} {part['kernel'][:28]:28} {part['one_thread_us']:7.2f} {w0:7.2f} "
              f"{w1:7.2f} {part['span_us']:6.2f} {part['one_thread_us'] / part['span_us']:5.2f}")
    if args.twice:  # each kernel's first run against its second
        moved = [(a, b) for a, b in zip(result["parts"], result["parts"][1:]) if b["kernel"].endswith(" again")]
        first = sum(a["span_us"] for a, _ in moved)
        again = sum(b["span_us"] for _, b in moved)
        first1 = sum(a["one_thread_us"] for a, _ in moved)
        again1 = sum(b["one_thread_us"] for _, b in moved)
        print(f"kernels run twice: 2 threads {first:.1f} us first, {again:.1f} again; "
              f"1 thread {first1:.1f} / {again1:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
