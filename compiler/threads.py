"""Thread counts: which one runs a model fastest on this machine, and how TVM is set to it.

At batch 1 a tuned CIFAR model is ~100 kernels of a few microseconds each; a fork/join per kernel can make two
threads slower than one (measured on a 2-core Zen 4: 1.5 ms vs 0.45 ms). So nothing here assumes "more is
faster": ``build`` times the module at every candidate count and records the fastest in the manifest, every
loader applies it, and ``compare`` times each engine at each count.

TVM's thread pool is sized once per process from ``TVM_NUM_THREADS`` (else ``OMP_NUM_THREADS``, else half the
logical CPUs on x86); :func:`prepare_tvm` sizes it to this machine's cores before the first run so that any count
up to that can be chosen later with :func:`set_tvm`. A ``TVM_NUM_THREADS`` the user set always wins.
"""

from __future__ import annotations

import os
import time

ENV = "TVM_NUM_THREADS"
# TVM's AffinityMode kSpecifyThreadShareAllCore. Its default (kBig) pins worker i to core i and leaves the calling
# thread (which runs a share of every parallel loop) free; when the OS puts the calling thread on worker 1's core,
# both share that core while the other idles and every parallel kernel runs at one core's speed. Measured with the
# shipped int8 ResNet56 at batch 64 on 2 threads (2-vCPU Xeon VM): 14-16 ms, but 27-30 ms with the calling thread
# on core 1; with no worker pinned, 14.6-16.6 ms wherever the calling thread is (benchmarks/thread_affinity.md).
SHARE_ALL_CORES = -3
_user_env = os.environ.get(ENV)  # what the user's environment said before this project touched it


def user_tvm_threads() -> int | None:
    """The thread count the user chose with ``TVM_NUM_THREADS`` (None when unset or not a positive number)."""
    try:
        n = int(_user_env) if _user_env is not None else None
    except ValueError:
        return None
    return n if n and n > 0 else None


def cores() -> int:
    """Cores this process may use (physical where the OS tells them apart from SMT siblings)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or allowed
    except ImportError:
        physical = allowed
    return max(1, min(allowed, physical))


def candidates() -> list[int]:
    """Thread counts worth timing here: 1, 2, 4, ... and all cores."""
    n, out, c = cores(), [], 1
    while c < n:
        out.append(c)
        c *= 2
    return out + [n]


def prepare_tvm() -> None:
    """Size TVM's pool to this machine's cores (before TVM runs anything) unless the user set ``TVM_NUM_THREADS``."""
    if _user_env is None:
        os.environ[ENV] = str(cores())


def for_measurement(n: int) -> int:
    """Make the kernels MetaSchedule measures on this machine run on ``n`` threads (its runner's worker processes
    inherit this environment), unless the user set ``TVM_NUM_THREADS``; the count they run on.

    Without it TVM sizes a process's pool to half the logical CPUs on x86 - one thread on a 2-vCPU VM - and a
    search for a ``num-cores`` 2 target would rank every candidate by its one-thread time, blind to how its
    parallel loop splits (measured on a 2-core Zen 1: kernels tuned that way ran no faster on two threads)."""
    user = user_tvm_threads()
    if user is not None:
        return user
    os.environ[ENV] = str(int(n))
    return int(n)


def set_tvm(n: int) -> int:
    """Run TVM kernels on ``n`` threads from now on (capped at the pool's size); the count now in use."""
    import tvm
    import tvm_ffi

    prepare_tvm()
    config = tvm_ffi.get_global_func("runtime.config_threadpool")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if 0 < int(n) <= len(cpus):
        # kSpecifyThreadShareAllCore: every worker may run on all of this process's cores, none pinned to one
        config(SHARE_ALL_CORES, int(n), [str(c) for c in cpus])
    else:  # kBig, TVM's default; it caps nothing and pins nothing when there are more threads than cores
        config(1, int(n))
    time.sleep(0.02)  # let workers of a larger count stop spinning before anything is timed
    return int(tvm.runtime.num_threads())


def init_measurement_worker() -> None:
    """MetaSchedule LocalRunner's initializer: the process that times candidates configures TVM's pool as
    :func:`set_tvm` does (no thread pinned), at the count :func:`for_measurement` put in its environment; with
    TVM's default pool a candidate timed while the calling thread shares worker 1's core runs at one core's speed
    and is ranked as if it were twice as slow."""
    n = user_tvm_threads() or cores()
    set_tvm(n)


def thread_affinities() -> list[list[int]]:
    """The cores each thread of this process may run on, TVM's pool started first (Linux; empty elsewhere): to
    check that none is pinned."""
    if not os.path.isdir("/proc/self/task") or not hasattr(os, "sched_getaffinity"):
        return []
    import tvm

    tvm.runtime.num_threads()  # TVM starts its pool lazily: as the first kernel would, if nothing configured it
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            out.append(sorted(os.sched_getaffinity(int(tid))))
        except OSError:  # the thread ended meanwhile
            continue
    return out


def apply_recorded(manifest: dict) -> dict:
    """Set TVM to the thread count ``manifest`` recorded as fastest; ``{"threads", "source"}`` of what is used."""
    user = user_tvm_threads()
    if user is not None:
        return {"threads": set_tvm(user), "source": f"{ENV}={user} (yours)"}
    best = ((manifest.get("runtime") or {}).get("threads"))
    if not isinstance(best, int) or best <= 0:
        return {"threads": set_tvm(cores()), "source": "no recorded count: this machine's cores"}
    n = min(best, cores())
    return {"threads": set_tvm(n), "source": "measured fastest at build" + ("" if n == best else
                                                                          f" ({best}, capped at {n} cores)")}


def fastest(time_at, counts: list[int] | None = None) -> tuple[int, dict[int, dict]]:
    """``time_at(n)`` -> a stats dict with ``median_ms`` for each candidate count; ``(best count, {n: stats})``."""
    results = {n: time_at(n) for n in (counts or candidates())}
    best = min(results, key=lambda n: (results[n]["median_ms"], n))
    return best, results


def at_best(time_at, counts: list[int] | None = None) -> tuple[dict, dict]:
    """:func:`fastest`, shaped for a report: (stats of the fastest count, ``{"threads", "threads_ms"}``)."""
    best, results = fastest(time_at, counts)
    return results[best], {"threads": best, "threads_ms": {str(n): r["median_ms"] for n, r in results.items()}}
