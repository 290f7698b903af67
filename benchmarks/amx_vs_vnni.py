"""The shipped pruned ResNet56 in int8 on one CPU with AMX: its conv2d kernels on VNNI (``x86-64-v4-vnni``) and on
AMX tiles (``x86-64-v4-amx``), built in this process and timed interleaved.

    python benchmarks/amx_vs_vnni.py [--batch 1] [--threads 1] [--rounds 5] [--json OUT]

Both builds take the shipped calibration and every record ``build`` would apply (the kernel library of the batch;
the VNNI build also the model's own database where one fits). Timing is ``build``'s: TVM's time_evaluator on the
Relax VM (median of 10 runs of 20 calls at batch 1, of 3 at larger batches), ``--rounds`` rounds with the builds
interleaved, the median over rounds reported with every round. A third build, AMX without the tile-state request
each kernel makes at entry (the process asks once, here), prices that syscall. Exits 0 with a line saying so on a
CPU without AMX.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _build(name: str, batch: int, ckpt, no_request: bool = False):
    import targets
    from compiler import zoo
    from compiler.build import lower
    from compiler.tuning import database as tdb
    from passes import amx

    spec = targets.get(name)
    lowered = lower(ckpt.model, batch, "int8", spec, data_dir=None, normalize=ckpt.normalize, untrained=False,
                    shipped=zoo.calibration(ckpt, 512))
    db, _ = tdb.find_database(spec, ckpt.model_name, tdb.variant_of(lowered.module, "int8"))
    library, _ = tdb.find_library(spec, "int8", batch)
    request = amx._request_tile_state
    if no_request:
        from tvm import tirx

        amx._request_tile_state = lambda: tirx.Evaluate(tirx.IntImm("int32", 0))
    try:
        return targets.compile_module(lowered.module, spec, database=tdb.combine(db, library))
    finally:
        amx._request_tile_state = request


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import targets
    from compiler import bench, console, threads, zoo

    if not targets.host_amx():
        print("this CPU has no AMX int8 (or Linux does not give the tile state): nothing to compare")
        return 0
    threads.set_tvm(args.threads)
    ckpt = zoo.load("resnet56", None, None, quiet=True)
    builds = {"VNNI (x86-64-v4-vnni)": _build("x86-64-v4-vnni", args.batch, ckpt),
              "AMX (x86-64-v4-amx)": _build("x86-64-v4-amx", args.batch, ckpt),
              "AMX, no tile request in the kernels": _build("x86-64-v4-amx", args.batch, ckpt, no_request=True)}
    times = {k: [] for k in builds}
    for _ in range(args.rounds):
        for name, executable in builds.items():
            number = 20 if args.batch == 1 else 3
            times[name].append(bench.time_tvm(executable, args.batch, 10, number, 3)["median_ms"])
    base = float(np.median(times["VNNI (x86-64-v4-vnni)"]))
    rows = [{"build": k, "median_ms": float(np.median(v)), "vs_vnni": f"{base / float(np.median(v)):.2f}x",
             "images_per_s": round(args.batch * 1e3 / float(np.median(v))),
             "rounds_ms": " ".join(f"{x:.3f}" for x in v)}
            for k, v in times.items()]
    print(console.table(rows, ["build", "median_ms", "vs_vnni", "images_per_s", "rounds_ms"],
                        title=f"shipped resnet56 int8, batch {args.batch}, {args.threads} thread(s), "
                              f"{console.cpu_name()}, {args.rounds} interleaved rounds"))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": console.cpu_name(), "batch": args.batch,
                                               "threads": args.threads, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
