"""Can this TVM reach Intel AMX? One int8 tile multiply-accumulate (``tdpbusd``: C[16x16] int32 += A[16x64] uint8 .
B[16x64] int8, B in the VNNI layout [k/4][n][k%4]) written in TIR with LLVM's AMX intrinsics, built for
``-mcpu=sapphirerapids``, checked against numpy and timed.

    python benchmarks/amx_probe.py [--reps 100000]

Linux hands a process the AMX tile state only after it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``); the kernel configures its tiles itself (``ldtilecfg``, palette 1). Exits 0 with a line
saying so on a CPU without AMX (``amx_tile`` / ``amx_int8`` not in /proc/cpuinfo). Not used by any build: it
measures what an AMX class could gain (``benchmarks/amx_probe.md``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def tile_kernel():
    from tvm.script import tirx as T

    def intrin(name, *args):
        return T.evaluate(T.call_llvm_intrin("void", name, *args))

    @T.prim_func
    def amx_dot(A: T.Buffer((16, 64), "uint8"), B: T.Buffer((16, 64), "int8"), C: T.Buffer((16, 16), "int32"),
                reps: T.int32):
        T.func_attr({"global_symbol": "amx_dot", "tir.noalias": True})
        cfg = T.alloc_buffer((64,), "uint8")
        for i in range(64):
            cfg[i] = T.uint8(0)
        cfg[0] = T.uint8(1)  # palette 1
        for t in range(3):  # tiles 0 (C), 1 (A), 2 (B): 16 rows of 64 bytes each
            cfg[16 + 2 * t] = T.uint8(64)  # bytes per row (u16, little end)
            cfg[48 + t] = T.uint8(16)  # rows
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(0)))
        for _ in range(reps):
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(1), T.address_of(A[0, 0]),
                                          T.int64(64)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(2), T.address_of(B[0, 0]),
                                          T.int64(64)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(0), T.int8(1), T.int8(2)))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(0), T.address_of(C[0, 0]),
                                      T.int64(64)))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    return amx_dot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=100_000)
    args = p.parse_args(argv)
    from targets import x86

    missing = {"amx_tile", "amx_int8"} - (x86.cpu_flags() or frozenset())
    if missing:
        print(f"this CPU has no AMX ({', '.join(sorted(missing))} missing): nothing to probe")
        return 0
    import tvm

    from compiler import console

    if not x86.request_amx():
        raise SystemExit("error: Linux refused this process the AMX tile state (arch_prctl; Linux 5.16 or later)")
    lib = tvm.compile(tile_kernel(), target=tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"}))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 64), dtype=np.uint8)
    b = rng.integers(-128, 128, (16, 64), dtype=np.int8)
    dev = tvm.cpu()
    A, B, C = (tvm.runtime.tensor(x, dev) for x in (a, b, np.zeros((16, 16), np.int32)))
    fn = lib["amx_dot"]
    fn(A, B, C, 1)
    # B[k // 4, n * 4 + k % 4] is weight (k, n): the VNNI layout, 4 consecutive k of one n side by side
    w = b.astype(np.int32).reshape(16, 16, 4).transpose(0, 2, 1).reshape(64, 16)
    ref = a.astype(np.int32) @ w
    exact = np.array_equal(C.numpy(), ref)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn(A, B, C, args.reps)
        times.append(time.perf_counter() - t0)
    best = min(times)
    macs = args.reps * 16 * 16 * 64
    print(f"{console.cpu_name()}: tdpbusd 16x16x64 equals numpy: {exact}; {args.reps:,} of them (operands in L1) "
          f"in {best * 1e3:.3f} ms = {macs / best / 1e9:,.0f} GMAC/s on one core")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
