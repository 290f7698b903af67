"""Variants of ``build``'s int8 pipeline measured side by side: each variant is the module ``build`` makes with the
same records (its tuning database and kernel library) under a context that swaps a pipeline step; the table gives
its kernel calls, the latency at 1 and 2 threads (TVM's time_evaluator on the Relax VM as ``build`` times it; median
of ``--rounds`` rounds interleaved between the builds), max |logit difference| against the first (default) variant
and, with ``--data``, top-1 on the CIFAR-10 test images. Used by ``pad_fusion.py`` and ``parallel_launch.py``.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--model", default="resnet56")
    p.add_argument("--checkpoint", default=None, help="default: the shipped pruned model")
    p.add_argument("--target", default="host")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--data", default=None, help="CIFAR-10 folder: top-1 (default: no top-1); the calibration is the "
                                                "shipped one")
    p.add_argument("--json", default=None, help="write the results here")


@contextlib.contextmanager
def swapped(obj, name: str, value):
    """``obj.name`` (a pipeline step, e.g. ``targets.pipeline._epilogues``) replaced by ``value`` for the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def main_with(doc: str, variants: dict, baseline: str, argv=None) -> int:
    """A benchmark script's ``main``: the arguments of :func:`add_arguments` (description: ``doc``'s first line),
    then :func:`compare` of ``variants`` against ``baseline``."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_arguments(p)
    return compare(p.parse_args(argv), variants, baseline)


def main_step_on_off(doc: str, step: str, on: str, off: str, argv=None) -> int:
    """:func:`main_with` for two variants: ``build``'s pipeline as it is (named ``on``) and with its step
    ``targets.pipeline.<step>`` removed (``off``, the baseline)."""
    from targets import pipeline

    variants = {on: lambda: swapped(pipeline, step, getattr(pipeline, step)),
                off: lambda: swapped(pipeline, step, lambda target: [])}
    return main_with(doc, variants, off, argv)


def compare(args, variants: dict, baseline: str, available=None) -> int:
    """Build, time and tabulate ``variants`` ({name: a no-argument context manager factory}, the default first; a
    name ``available(name, target)`` rejects is left out) for ``args`` (:func:`add_arguments`); the speed-up column is
    against ``baseline``. Returns 0 where the baseline's logits equal the default's bit for bit, else 1."""
    from compiler import threads

    threads.prepare_tvm()
    import numpy as np
    import tvm

    import targets
    from benchmarks.int8_fusion import top1
    from compiler import bench, console, zoo
    from compiler.build import lower
    from compiler.tuning import database as tuning_db
    from passes import vnni
    from targets.build import relax_pipeline

    ckpt = zoo.load(args.model, args.checkpoint, None, quiet=True)
    spec = targets.get(args.target)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 32, 32)).astype("float32")
    builds = {}
    for name, variant in variants.items():
        if available is not None and not available(name, spec.tvm_target()):
            continue
        with variant():
            lowered = lower(ckpt.model, args.batch, "int8", spec, data_dir=None, normalize=ckpt.normalize,
                            untrained=False, shipped=zoo.calibration(ckpt, 512))
            db, info = tuning_db.find_database(spec, ckpt.model_name, tuning_db.variant_of(lowered.module, "int8"))
            library, library_info = tuning_db.find_library(spec, "int8", args.batch)
            schedules = tuning_db.combine(db, library)
            with spec.tvm_target():
                low = relax_pipeline(spec, schedules)(lowered.module)
            exe = targets.compile_module(lowered.module, spec, database=schedules)
        calls = [c for c in re.findall(r"^\s+(\w+)\(", low["main"].script(), re.M) if not c.startswith("R")]
        vm = tvm.relax.VirtualMachine(exe, tvm.cpu())
        builds[name] = {"exe": exe, "logits": vm["main"](tvm.runtime.tensor(x)).numpy(), "kernel_calls": len(calls),
                        "pad_calls": sum(vnni.PAD_NAME in c for c in calls), "database": info.get("path"),
                        "library": library_info.get("path"),
                        "top1": top1(exe, args.batch, args.data, ckpt.normalize) if args.data else None}
    default = next(iter(builds))
    ref = builds[default]["logits"]
    timing = dict(repeat=30 if args.batch == 1 else 10, number=20 if args.batch == 1 else 1, warmup=5)
    samples = {(v, n): [] for v in builds for n in (1, 2)}
    for _ in range(args.rounds):
        for n in (1, 2):
            threads.set_tvm(n)
            for name, b in builds.items():
                samples[(name, n)].append(bench.time_tvm(b["exe"], args.batch, x=x, **timing)["median_ms"])
    rows = []
    for name, b in builds.items():
        ms = {n: round(statistics.median(samples[(name, n)]), 4) for n in (1, 2)}
        rows.append({"build": name, "kernel calls": b["kernel_calls"], "pad kernels": b["pad_calls"],
                     "1 thread ms": ms[1], "2 threads ms": ms[2], "2 vs 1": f"{ms[1] / ms[2]:.2f}x",
                     "fastest round ms": round(min(min(samples[(name, n)]) for n in (1, 2)), 4),
                     "max |diff| vs default": float(np.abs(b["logits"] - ref).max()),
                     "top-1 %": b["top1"] if b["top1"] is not None else "-"})
    base = next(r for r in rows if r["build"] == baseline)
    base = min(base["1 thread ms"], base["2 threads ms"])
    for r in rows:
        r[f"vs {baseline}"] = f"{base / min(r['1 thread ms'], r['2 threads ms']):.2f}x"
    database, library = (tuning_db.shown(builds[default][k]) if builds[default][k] else "none"
                         for k in ("database", "library"))
    title = (f"{ckpt.model_name} int8 batch {args.batch} for {spec.name} on {console.cpu_name()} ({args.rounds} "
             f"interleaved rounds, median); database {database}, library {library}")
    print(console.table(rows, list(rows[0]), title=title))
    if args.json:
        out = {"cpu": console.cpu_name(), "target": spec.name, "batch": args.batch, "rounds": args.rounds,
               "checkpoint": args.checkpoint or "shipped", "rows": rows,
               "samples_ms": {f"{v} / {n} thread(s)": s for (v, n), s in samples.items()}}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    same = bool(np.array_equal(builds[baseline]["logits"], ref))
    print(f"{baseline} equals the default bit for bit: {same}")
    return 0 if same else 1
