"""The padding kernels of the packed int8 conv2d written by the producing conv2d instead (issue 18 item 3,
``passes/fuse_pad.py``), measured: the pruned int8 ResNet56 built as ``build`` builds it for ``--target``, with the
same records, with and without :class:`passes.fuse_pad.FusePadIntoProducer`; on an AMX target also the AMX layout
as it was before this change (16-channel output blocks for the 8-channel conv2d layers too).

    python benchmarks/pad_fusion.py [--target host] [--batch 1] [--rounds 7] [--data DIR] [--json OUT]

Prints the kernel calls per batch, the latency at 1 and 2 threads (TVM's time_evaluator on the Relax VM as
``build`` times it; median of ``--rounds`` rounds interleaved between the builds), max |logit difference| against
the default build and, with ``--data``, top-1 on the CIFAR-10 test images. Exits 1 if the build with pads as kernels
(same layout) does not equal the default bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT = "pads written by the producer (default)"
KERNELS = "pads as kernels"
AMX_16 = "pads as kernels, AMX 16-channel blocks for 8 channels (before)"


@contextlib.contextmanager
def _variant(name: str):
    """The pipeline as the variant ``name`` builds it (module attributes swapped for the build, then restored)."""
    from passes import vnni
    from targets import pipeline

    fuse, oc_block = pipeline._fuse_pads, vnni.oc_block
    if name != DEFAULT:
        pipeline._fuse_pads = lambda target: []
    if name == AMX_16:
        vnni.oc_block = lambda oc, isa="vnni": 16 if isa == "amx" else oc_block(oc, isa)
    try:
        yield
    finally:
        pipeline._fuse_pads, vnni.oc_block = fuse, oc_block


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--checkpoint", default=None, help="default: the shipped pruned model")
    p.add_argument("--target", default="host")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--data", default=None, help="CIFAR-10 folder: top-1 (default: no top-1); the calibration is the "
                                                "shipped one")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

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
    amx = vnni.target_int8_isa(spec.tvm_target()) == "amx"
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 32, 32)).astype("float32")
    builds = {}
    for name in [DEFAULT, KERNELS] + ([AMX_16] if amx else []):
        with _variant(name):
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
    ref = builds[DEFAULT]["logits"]
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
    base = min(rows[1]["1 thread ms"], rows[1]["2 threads ms"])
    for r in rows:
        r["vs pads as kernels"] = f"{base / min(r['1 thread ms'], r['2 threads ms']):.2f}x"
    database, library = (tuning_db.shown(builds[DEFAULT][k]) if builds[DEFAULT][k] else "none"
                         for k in ("database", "library"))
    title = (f"{ckpt.model_name} int8 batch {args.batch} for {spec.name} on {console.cpu_name()} ({args.rounds} "
             f"interleaved rounds, median); database {database}, library {library}")
    print(console.table(rows, list(rows[0]), title=title))
    if args.json:
        out = {"cpu": console.cpu_name(), "target": spec.name, "batch": args.batch, "rounds": args.rounds,
               "checkpoint": args.checkpoint or "shipped", "rows": rows,
               "samples_ms": {f"{v} / {n} thread(s)": s for (v, n), s in samples.items()}}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    same = bool(np.array_equal(builds[KERNELS]["logits"], ref))
    print(f"pads as kernels equals the default bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
