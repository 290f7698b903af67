"""Batch-1 latency of artifacts built for x86-64 classes, timed on this CPU in one process, interleaved.

    TVM_NUM_THREADS=1 taskset -c 0 python benchmarks/x86_classes.py ART... [--rounds 5] [--json OUT]

Each artifact is loaded as every verb loads it (compiler.artifact.load_local: refused on a CPU below its class),
then timed with compiler.bench's time_evaluator scheme (median of ``--repeat`` runs of ``--number`` calls) in
``--rounds`` rounds, the artifacts interleaved within each round so that load from other jobs on a shared machine
falls on all of them alike; the median over rounds is reported with the spread. Also prints the physical limit:
compiled MACs / the class's peak int8 or fp32 multiply-accumulates per cycle of one core, in cycles: divide by the
clock the core really runs (``benchmarks/avx2_peak.c`` measures it; ``/proc/cpuinfo`` shows a VM's nominal clock,
2.6 GHz on the Xeon that runs at 4.0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# peak multiply-accumulates per cycle of one core, by class and precision (the vector units the kernels use):
# fp32: 2 FMA ports x (256 / 32) lanes on AVX2, x (512 / 32) on AVX-512 with two 512-bit FMA units (Skylake-SP
# Gold 6xxx / Platinum); Zen 4 executes 512-bit ops as two 256-bit halves, so its AVX-512 peak is the AVX2 one.
# int8: vpmaddubsw + vpmaddwd is 2 instructions per (lanes x 4) MACs, vpdpbusd 1.
PEAK_MACS_PER_CYCLE = {
    ("x86-64-v3", "fp32"): 16, ("x86-64-v3", "int8"): 2 * 32 / 2,
    ("x86-64-v4", "fp32"): 32, ("x86-64-v4", "int8"): 2 * 64 / 2,
    ("x86-64-v4-vnni", "fp32"): 32, ("x86-64-v4-vnni", "int8"): 2 * 64,
    # AMX: one 16 x 16 x 64 tdpbusd (16,384 MACs) every 16 cycles (the conv2d kernels; the rest is VNNI)
    ("x86-64-v4-amx", "fp32"): 32, ("x86-64-v4-amx", "int8"): 1024,
}
PEAK_NOTE = ("per core: fp32 = FMA ports x fp32 lanes; int8 = ports x int8 lanes, halved where it takes "
             "vpmaddubsw + vpmaddwd; Zen 4 runs 512-bit vectors as two 256-bit halves, so its real peak is half "
             "the v4 figures")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--number", type=int, default=5)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--write-precision", action="store_true",
                   help="record the medians per class in tuning_logs/x86_precision.json (what --precision auto "
                        "reads), with this command and the CPU")
    args = p.parse_args(argv)

    from compiler import artifact, bench, console, threads

    loaded = []
    for folder in args.artifacts:
        exe, m = artifact.load_local(folder)
        threads.set_tvm(1)
        loaded.append((folder, exe, m))
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    times = {folder: [] for folder, _, _ in loaded}
    for _ in range(args.rounds):
        for folder, exe, m in loaded:
            times[folder].append(bench.time_tvm(exe, 1, args.repeat, args.number, 2, x=x)["median_ms"])
    rows = []
    for folder, _, m in loaded:
        ms = sorted(times[folder])
        cls = m["target"]["name"] if m["target"]["name"] != "host" else _class_of_host()
        macs = m["flops"]["compiled"]
        peak = PEAK_MACS_PER_CYCLE.get((cls, "int8" if m["precision"] == "int8" else "fp32"))
        rows.append({"artifact": folder, "target": m["target"]["name"], "class": cls, "precision": m["precision"],
                     "tuned": _tuned(m.get("tuning") or {}),
                     "median_ms": float(np.median(ms)), "min_ms": ms[0], "max_ms": ms[-1], "macs": macs,
                     "peak_macs_per_cycle": peak, "limit_cycles": round(macs / peak) if peak else None})
    print(console.table(rows, ["target", "class", "precision", "tuned", "median_ms", "min_ms", "max_ms", "macs",
                               "peak_macs_per_cycle", "limit_cycles"],
                        title=f"batch 1, 1 thread, {console.cpu_name()}, {args.rounds} interleaved rounds"))
    print(f"peak: {PEAK_NOTE}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": console.cpu_name(), "rounds": args.rounds, "rows": rows},
                                              indent=1) + "\n")
    if args.write_precision:
        write_precision(rows, loaded, " ".join([*_pinning(), "python", "benchmarks/x86_classes.py", *sys.argv[1:]]))
    return 0


def write_precision(rows: list[dict], loaded: list, command: str) -> None:
    """tuning_logs/x86_precision.json: per class, the fp32 and int8 medians (both must have been timed)."""
    import datetime

    from compiler import console, fileio
    from targets import x86

    try:
        data = json.loads(x86.MEASURED.read_text())
    except (OSError, ValueError):
        data = {}
    out = {"format": x86.MEASURED_FORMAT, "model": "resnet56 shipped (pruned, 50.4% of the MACs cut)", "batch": 1,
           "classes": data.get("classes", {})}
    manifests = {folder: m for folder, _, m in loaded}
    import targets

    here = targets.host_class()
    where = f"{console.cpu_name()} -mcpu={targets.get('host').device['mcpu']}, a {here} CPU"
    for cls in {r["class"] for r in rows}:
        got = {r["precision"]: r for r in rows if r["class"] == cls}
        if "int8" not in got or "fp32" not in got:
            continue
        out["classes"][cls] = {
            "fp32_ms": round(got["fp32"]["median_ms"], 4), "int8_ms": round(got["int8"]["median_ms"], 4),
            "tuned": {p: got[p]["tuned"] for p in ("fp32", "int8")},
            "databases": {p: (manifests[got[p]["artifact"]].get("tuning") or {}).get("database") for p in ("fp32", "int8")},
            "threads": 1, "where": where, "command": command,
            "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    fileio.write_json(x86.MEASURED, out)


def _pinning() -> list[str]:
    """The thread count and CPU pinning this process ran under, as the words of a command line that sets them
    (``TVM_NUM_THREADS=1 taskset -c 0``): the one-thread medians are only comparable measured the same way."""
    import os

    words = [f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}"] if os.environ.get("TVM_NUM_THREADS") else []
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < (os.cpu_count() or len(cpus)):
        words += ["taskset", "-c", ",".join(map(str, cpus))]
    return words


def _tuned(t: dict) -> str:
    """``applied/tasks`` of the tuning records (the model's database or the kernel library), and the conv2d kernels
    on AMX tiles (a fixed schedule, no records) after a ``; ``."""
    amx = f"; {t['amx_conv2d']} conv2d on AMX tiles" if t.get("amx_conv2d") else ""
    if not t.get("database") and not (t.get("library") or {}).get("database"):
        return "untuned" + amx
    return f"{t.get('tasks_applied')}/{t.get('tasks')}{amx}"


def _class_of_host() -> str | None:
    import targets

    return targets.host_class()


if __name__ == "__main__":
    sys.exit(main())
