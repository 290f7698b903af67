"""Batch-1 latency with and without MergeParallelLaunches (one thread-pool launch per run of kernels), at 1 and 2
threads, on the shipped pruned int8 ResNet56; the logits of both builds compared.

    python benchmarks/parallel_launch.py [--target x86-64-v4-amx] [--rounds 7]

Builds the module twice (``build``'s lowering and its kernel library; once with the pass, once without), then
times each (``compiler.bench.time_tvm``: 20 calls x 10 repeats after 3 warm-up) at 1 and 2 threads, rounds
interleaved; prints the median of the rounds' medians and every 2-thread round.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="x86-64-v4-amx")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)

    from compiler import threads

    threads.prepare_tvm()
    import tvm
    from tvm import relax

    from amx_vs_vnni import _build
    from compiler import bench, zoo
    from passes.parallel_launch import MergeParallelLaunches
    from targets import pipeline

    ckpt = zoo.load("resnet56", None, None, quiet=True)
    merge = pipeline._merge_launches
    builds = {}
    for name, passes in (("separate", lambda *_: []), ("one launch", lambda *_: [MergeParallelLaunches()])):
        pipeline._merge_launches = passes
        try:
            builds[name] = _build(args.target, 1, ckpt)
        finally:
            pipeline._merge_launches = merge
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    logits = {}
    for name, ex in builds.items():
        for n in (1, 2):
            threads.set_tvm(n)
            vm = relax.VirtualMachine(ex, tvm.cpu())
            logits[(name, n)] = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    ref = logits[("separate", 1)]
    diff = max(float(np.abs(v - ref).max()) for v in logits.values())
    times = {(k, n): [] for k in builds for n in (1, 2)}
    for _ in range(args.rounds):
        for n in (1, 2):
            threads.set_tvm(n)
            for name, ex in builds.items():
                times[(name, n)].append(bench.time_tvm(ex, 1, 10, 20, 3)["median_ms"])
    print(f"{args.target}, batch 1, max |logit difference| over builds and thread counts: {diff:g}")
    print("| build | 1 thread (ms) | 2 threads (ms) | 2-thread rounds |")
    print("| --- | ---: | ---: | --- |")
    for name in builds:
        print(f"| {name} | {np.median(times[(name, 1)]):.3f} | {np.median(times[(name, 2)]):.3f} | "
              + " ".join(f"{t:.3f}" for t in times[(name, 2)]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
