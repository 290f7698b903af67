"""Where TVM's threads run: TVM's default thread pool (kBig: worker i pinned to core i, the calling thread free)
against the pool ``compiler.threads.set_tvm`` configures (kSpecifyThreadShareAllCore: no thread pinned), each with
the calling thread left free and pinned to every core in turn (what the OS may do to it; pinning it to worker 1's
core is the case where two threads share one core).

    python benchmarks/thread_affinity.py ARTIFACT [ARTIFACT ...] [--threads 2] [--rounds 3] [--json OUT]

ARTIFACT: a CPU artifact folder from ``build`` (its batch is read from the manifest). Every (pool, placement) runs
in a fresh process (TVM sizes its pool once per process), rounds interleaved; prints the median over rounds of
each process's median latency (TVM's time_evaluator on the Relax VM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys
sys.path.insert(0, {root!r})
from compiler import artifact, bench, threads
pool, place, folder, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
exe, manifest = artifact.load_local(folder)
batch = int(manifest["input"]["shape"][0])
if pool == "tvm-default":
    import tvm_ffi
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)
else:
    threads.set_tvm(n)
if place != "free":
    os.sched_setaffinity(0, {{int(place)}})
small = batch == 1
s = bench.time_tvm(exe, batch, repeat=30 if small else 10, number=20 if small else 3, warmup=3)
print(json.dumps({{"batch": batch, "ms": s["median_ms"]}}))
"""


def run(pool: str, place: str, folder: str, n: int) -> dict:
    env = dict(os.environ, TVM_NUM_THREADS=str(n))
    r = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), pool, place, folder, str(n)],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode:
        raise SystemExit(f"error: {pool} {place} {folder}: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    places = ["free"] + [str(c) for c in cores]
    pools = ["tvm-default", "set_tvm"]
    times: dict = {}
    for r in range(args.rounds):
        for folder in args.artifacts:
            for pool in pools:
                for place in places:
                    got = run(pool, place, folder, args.threads)
                    times.setdefault((folder, got["batch"], pool, place), []).append(got["ms"])
                    print(f"round {r + 1}/{args.rounds} {folder} {pool} calling thread {place}: {got['ms']:.3f} ms",
                          file=sys.stderr, flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, {len(cores)} cores, {args.threads} TVM threads, median of {args.rounds} rounds (ms)\n")
    print("| artifact | batch | pool | " + " | ".join(f"calling thread {p}" for p in places) + " |")
    print("| --- | ---: | --- | " + " | ".join("---:" for _ in places) + " |")
    rows = []
    for folder in args.artifacts:
        for pool in pools:
            key = [k for k in times if k[0] == folder and k[2] == pool]
            batch = key[0][1]
            med = {p: statistics.median(times[(folder, batch, pool, p)]) for p in places}
            rows.append({"artifact": folder, "batch": batch, "pool": pool, "ms": med,
                         "rounds": {p: times[(folder, batch, pool, p)] for p in places}})
            print(f"| {Path(folder).name} | {batch} | {pool} | " + " | ".join(f"{med[p]:.3f}" for p in places) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
