"""The kernel library on a pruned ResNet that no one tuned: kernels covered and latency, against untuned
schedules and a tuning run dedicated to that model (issue 18: within 25 % of the dedicated run).

    python benchmarks/kernel_library.py [--depth 32] [--flops-reduction 0.4] [--batch 1] [--trials 800] [--json OUT]

The model: a CIFAR ResNet of ``--depth`` with random weights, pruned one-shot by the project's pruner (l1,
global allocation, widths rounded to 8) to ``--flops-reduction``: shapes no committed database was tuned for.
It is lowered as ``build`` lowers it (int8, ``host``), compiled three ways - no database, the committed kernel
library ``build`` finds (``tuning_logs/<target>/kernels-<precision>-b<batch>``), and a database tuned for this very
model with ``--trials`` trials (a temporary folder) - and each is timed at 1 and 2 threads, interleaved over
``--rounds`` rounds (median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pruned_model(depth: int, ratio: float, seed: int):
    import torch

    from compiler.models import build_model
    from compiler.prune import dependency, importance, pruner

    torch.manual_seed(seed)
    model = build_model(f"resnet{depth}").eval()
    graph = dependency.analyze(model)
    done = pruner.prune(model, graph, importance.l1_norm(model, graph), ratio)
    widths = [len(done.kept[g.name]) for g in graph.groups if g.prunable]
    return model, widths, done.flops_reduction


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--flops-reduction", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="int8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--target", default="host")
    p.add_argument("--trials", type=int, default=800, help="trials of the dedicated tuning run (0: --dedicated "
                                                            "holds it already)")
    p.add_argument("--dedicated", default=None, metavar="DIR",
                   help="where the dedicated database goes (default: a temporary folder); rerun with --trials 0 "
                        "to time again without tuning again")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from compiler import threads

    threads.prepare_tvm()
    import targets
    from compiler import console
    from compiler.build import lower, measure_threads
    from compiler.tuning import database as tuning_db
    from compiler.tuning.session import tune_module

    spec = targets.get(args.target)
    model, widths, cut = pruned_model(args.depth, args.flops_reduction, args.seed)
    print(f"resnet{args.depth}, l1 one-shot {100 * cut:.1f} % MACs cut, inner widths {widths}", flush=True)
    low = lower(model, args.batch, args.precision, spec, untrained=True, calib_images=64)
    library, lib_info = tuning_db.find_library(spec, args.precision, args.batch)
    if library is None:
        print(f"error: no kernel library for {spec.name} {args.precision}: {lib_info['note']}", file=sys.stderr)
        return 2
    covered = tuning_db.tasks_applied(low.module, spec, library)
    print(f"kernel library {lib_info['path']}: {covered['applied']}/{covered['tasks']} kernels covered "
          f"(missing: {covered['missing']})", flush=True)

    with tempfile.TemporaryDirectory(prefix="dedicated-") as tmp:
        folder = Path(args.dedicated) if args.dedicated else Path(tmp) / "db"
        if args.trials > 0:
            tune_module(low.module, spec, f"resnet{args.depth}", args.precision, args.batch, args.trials,
                        directory=folder, show_progress=True)
        meta = tuning_db.read_meta(folder)
        dedicated = tuning_db.open_database(folder)
        builds = {"untuned": targets.compile_module(low.module, spec, database=None),
                  "kernel library": targets.compile_module(low.module, spec, database=library),
                  "dedicated tuning": targets.compile_module(low.module, spec, database=dedicated)}
        ded_cov = tuning_db.tasks_applied(low.module, spec, dedicated)
    times: dict[str, dict[int, list[float]]] = {k: {} for k in builds}
    for _ in range(args.rounds):
        for name, exe in builds.items():
            for n, row in measure_threads(exe, args.batch)["measured_ms"].items():
                times[name].setdefault(int(n), []).append(float(row))
    rows = []
    for name, by_n in times.items():
        med = {n: statistics.median(v) for n, v in by_n.items()}
        rows.append({"schedules": name, **{f"{n} thread ms": round(ms, 3) for n, ms in sorted(med.items())},
                     "best ms": round(min(med.values()), 3)})
    ded = next(r["best ms"] for r in rows if r["schedules"] == "dedicated tuning")
    for r in rows:
        r["vs dedicated"] = f"{r['best ms'] / ded:.2f}x"
    print(console.table(rows, list(rows[0]), title=f"resnet{args.depth} pruned {100 * cut:.1f} %, {args.precision}, "
                                                    f"batch {args.batch}, {console.cpu_name()}"))
    result = {"model": f"resnet{args.depth}", "flops_reduction": round(cut, 4), "widths": widths,
              "precision": args.precision, "batch": args.batch, "target": spec.name, "cpu": console.cpu_name(),
              "library": {"path": lib_info["path"], "applied": covered["applied"], "tasks": covered["tasks"],
                          "missing": covered["missing"]},
              "dedicated": {"trials": meta["trials"], "seconds": meta["seconds"], "applied": ded_cov["applied"],
                            "tasks": ded_cov["tasks"]},
              "rows": rows, "rounds": args.rounds}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
