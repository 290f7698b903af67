"""Per-kernel latency of the module `build` compiles (its tuning database applied), at 1 and 2 threads.

    python benchmarks/kernel_profile.py [--checkpoint CKPT] [--target host] [--precision int8] [--tuning-log DIR]

Lowers the model exactly as `build` does (compiler.build.lower, then the target pipeline with the database
`build` would pick), compiles every PrimFunc the Relax ``main`` calls on its own (``--separate``: with launch merging off, so each
kernel is a row), and times it with TVM's
time_evaluator on random inputs (hot caches: a lower bound of its cost inside the model). Prints one row per
kernel: calls per image, microseconds per call at 1 and 2 threads, and the totals; the sum is close to, not equal
to, the model's latency (the VM's own overhead and cold caches are not in it). This TVM build has no Relax VM
profiler, hence this script.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--checkpoint", default=None, help="default: the shipped model")
    p.add_argument("--target", default="host")
    p.add_argument("--precision", default="int8")
    p.add_argument("--batch", type=int, default=1, help="batch size the module is built for (default 1)")
    p.add_argument("--tuning-log", default=None, help="default: the database build would apply")
    p.add_argument("--data", default=None, help="CIFAR-10 folder for the int8 calibration (default: random images)")
    p.add_argument("--separate", action="store_true", help="launch merging off (targets.pipeline._merge_launches): "
                                                           "one row per kernel instead of one for the launch")
    args = p.parse_args(argv)

    from compiler import threads

    threads.prepare_tvm()
    import tvm
    from tvm import tirx

    import targets
    from compiler import console, zoo
    from compiler.build import lower
    from compiler.tuning import database as tuning_db
    from compiler.tuning.tvm_compat import register_tensor_intrinsics
    from targets import pipeline
    from targets.build import relax_pipeline

    ckpt = zoo.load(args.model, args.checkpoint, None, quiet=True)
    spec = targets.get(args.target)
    lowered = lower(ckpt.model, args.batch, args.precision, spec, data_dir=args.data, normalize=ckpt.normalize,
                    untrained=args.data is None)
    variant = tuning_db.variant_of(lowered.module, args.precision)
    db, info = tuning_db.find_database(spec, ckpt.model_name, variant, explicit_dir=args.tuning_log)
    library, library_info = tuning_db.find_library(spec, args.precision, args.batch)  # what build adds
    db = tuning_db.combine(db, library)
    register_tensor_intrinsics()
    target = spec.tvm_target()
    compile_as = pipeline.compile_target(spec)  # with the LLVM options a merged launch is compiled with
    merge = pipeline._merge_launches
    if args.separate:
        pipeline._merge_launches = lambda target: []
    try:
        with target:
            low = relax_pipeline(spec, db)(lowered.module)
    finally:
        pipeline._merge_launches = merge
    calls = collections.Counter(re.findall(r"^\s+(\w+)\(", low["main"].script(), re.M))
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    rows = []
    for gv, func in low.functions_items():
        name = gv.name_hint
        if not isinstance(func, tirx.PrimFunc) or name not in calls:
            continue
        lib = tvm.compile(func.with_attr("global_symbol", name), target=compile_as)
        tensors = []
        for param in func.params:
            shape, dtype = [int(s) for s in param.shape], str(param.dtype)
            a = (rng.integers(0, 5, shape) if "int" in dtype else rng.random(shape)).astype(dtype)
            tensors.append(tvm.runtime.tensor(a, dev))
        us = {}
        for n in (1, 2):
            threads.set_tvm(n)
            t = lib.mod.time_evaluator(name, dev, number=50, repeat=5, min_repeat_ms=20)(*tensors)
            us[n] = float(np.median(t.results)) * 1e6
        attrs = func.attrs or {}
        rows.append({"kernel": name, "calls": calls[name], "us_1": round(us[1], 1), "us_2": round(us[2], 1),
                     "total_us_1": round(calls[name] * us[1], 1), "total_us_2": round(calls[name] * us[2], 1),
                     "scheduled": "fixed" if "vnni_" in name and "conv2d" not in name
                     and "tirx.is_scheduled" in attrs else ("tuned" if "tirx.is_scheduled" in attrs else "default")})
    rows.sort(key=lambda r: -r["total_us_1"])
    print(console.table(rows, ["kernel", "calls", "us_1", "us_2", "total_us_1", "total_us_2", "scheduled"],
                        title=f"{ckpt.model_name} {args.precision} batch {args.batch} for {spec.name} on {console.cpu_name()}; "
                              f"database: {info.get('path') or 'none'}, library: {library_info.get('path') or 'none'}"))
    print(f"sum of kernels: {sum(r['total_us_1'] for r in rows):.1f} us at 1 thread, "
          f"{sum(r['total_us_2'] for r in rows):.1f} us at 2; {sum(r['calls'] for r in rows)} calls per batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
