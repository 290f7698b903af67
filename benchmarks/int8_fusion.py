"""The quantize taken into the producing conv2d's epilogue and the uint8 residual (issue 18 item 3), measured: the
pruned int8 ResNet56 built as ``build`` builds it, three ways, the same tuning database and kernel library applied
to each:

- ``before``: every packed conv2d input made by a float ``vnni_quantize_repack`` from the float activation;
- ``fused``: where only the next conv2d reads an activation (conv1 -> conv2 of a block), ``vnni_quantize_packed``
  inside the producing conv2d's kernel, then a 1-byte ``vnni_pad_repack`` (the same integers as before);
- ``fused + uint8 residual`` (the default): also the block outputs, whose residual add then reads the uint8
  tensor, dequantized in its conv2d's epilogue (other numbers: the residual is rounded to the conv's input scale).

    python benchmarks/int8_fusion.py [--checkpoint CKPT] [--batch 1] [--rounds 7] [--data DIR] [--json OUT]

Prints the kernel calls per batch, how many kernels records scheduled, the latency at 1 and 2 threads (TVM's
time_evaluator on the Relax VM as ``build`` times it; median of ``--rounds`` rounds interleaved between the
builds; the fastest round too, since a shared VM's memory bandwidth comes and goes), max |logit difference|
against ``before`` and, with ``--data``, top-1 on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"before": dict(fuse_quantize=False, uint8_residual=False),
            "fused": dict(fuse_quantize=True, uint8_residual=False),
            "fused + uint8 residual": dict(fuse_quantize=True, uint8_residual=True)}


def top1(exe, batch: int, data_dir, normalize: str) -> float:
    import numpy as np
    import tvm

    from compiler import data

    split = data.load_split(data_dir, "test")
    x = data.normalize(split.images, normalize).numpy()
    labels = split.labels.numpy()
    vm = tvm.relax.VirtualMachine(exe, tvm.cpu())
    n = len(labels) // batch * batch
    hits = 0
    for i in range(0, n, batch):
        out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[i:i + batch]))).numpy()
        hits += int((out.argmax(1) == labels[i:i + batch]).sum())
    return 100.0 * hits / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--checkpoint", default=None, help="default: the shipped pruned model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--data", default=None, help="CIFAR-10 folder: calibration and top-1 (default: random images, "
                                                "no top-1)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    from compiler import threads

    threads.prepare_tvm()
    import numpy as np
    import tvm

    import targets
    from compiler import bench, console, zoo
    from compiler.build import lower
    from compiler.tuning import database as tuning_db
    from targets.pipeline import pipeline

    ckpt = zoo.load(args.model, args.checkpoint, None, quiet=True)
    spec = targets.get("host")
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 32, 32)).astype("float32")
    builds = {}
    for name, layout in VARIANTS.items():
        lowered = lower(ckpt.model, args.batch, "int8", spec, data_dir=args.data, normalize=ckpt.normalize,
                        untrained=args.data is None, **layout)
        variant = tuning_db.variant_of(lowered.module, "int8")
        db, info = tuning_db.find_database(spec, ckpt.model_name, variant)
        library, library_info = tuning_db.find_library(spec, "int8", args.batch)
        schedules = tuning_db.combine(db, library)
        applied = tuning_db.tasks_applied(lowered.module, spec, schedules) if schedules is not None else None
        exe = targets.compile_module(lowered.module, spec, database=schedules)
        vm = tvm.relax.VirtualMachine(exe, tvm.cpu())
        logits = vm["main"](tvm.runtime.tensor(x)).numpy()
        legal = pipeline(spec).legalize()(lowered.module)
        calls = re.findall(r"R\.call_tir\((\w+)", legal["main"].script())
        builds[name] = {"exe": exe, "logits": logits, "variant": variant, "database": info.get("path"),
                        "library": library_info.get("path"), "applied": applied, "kernel_calls": len(calls),
                        "kernels": len(set(calls)), "ms": {},
                        "top1": top1(exe, args.batch, args.data, ckpt.normalize) if args.data else None}
    ref = builds["before"]["logits"]
    timing = dict(repeat=30 if args.batch == 1 else 10, number=20 if args.batch == 1 else 1, warmup=5)
    samples = {(v, n): [] for v in builds for n in (1, 2)}
    for _ in range(args.rounds):
        for n in (1, 2):
            for name, b in builds.items():
                threads.set_tvm(n)
                samples[(name, n)].append(bench.time_tvm(b["exe"], args.batch, x=x, **timing)["median_ms"])
    rows = []
    for name, b in builds.items():
        for n in (1, 2):
            b["ms"][n] = round(statistics.median(samples[(name, n)]), 4)
        a = b["applied"] or {}
        b["min"] = {n: round(min(samples[(name, n)]), 4) for n in (1, 2)}
        rows.append({"build": name, "kernel calls": b["kernel_calls"], "tuned": f"{a.get('applied')}/{a.get('tasks')}",
                     "1 thread ms": b["ms"][1], "2 threads ms": b["ms"][2],
                     "2 vs 1": f"{b['ms'][1] / b['ms'][2]:.2f}x", "fastest round ms": min(b["min"].values()),
                     "vs before (median, best count)": f"{min(builds['before']['ms'].values()) / min(b['ms'].values()):.2f}x",
                     "max |diff| vs before": float(np.abs(b["logits"] - ref).max()),
                     "top-1 %": b["top1"] if b["top1"] is not None else "-"})
    title = (f"{ckpt.model_name} int8 batch {args.batch} on {console.cpu_name()} ({args.rounds} interleaved rounds, "
             f"median); database {tuning_db.shown(builds['before']['database']) if builds['before']['database'] else 'none'}"
             f", library {tuning_db.shown(builds['before']['library']) if builds['before']['library'] else 'none'}")
    print(console.table(rows, list(rows[0]), title=title))
    if args.json:
        out = {"cpu": console.cpu_name(), "batch": args.batch, "rounds": args.rounds,
               "checkpoint": args.checkpoint or "shipped", "rows": rows,
               "samples_ms": {f"{v} / {n} thread(s)": s for (v, n), s in samples.items()}}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    same = bool(np.array_equal(builds["fused"]["logits"], ref))
    print(f"fused equals before bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
