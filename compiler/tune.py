"""``tune``: MetaSchedule (XGBoost cost model) on exactly the module ``build`` compiles, locally or over TVM RPC.

    checkpoint -> compiler.build.lower (import, strip zeroed channels, precision) -> legalize + fuse (the build
    pipeline's front half) -> MetaSchedule tasks -> builder (cross-compiles for the target) -> runner (this
    machine, or the boards behind a TVM RPC tracker) -> tuning_logs/<target>/<model>-<variant>/

The database is MetaSchedule's JSON database: each measured trial is appended as it finishes, so Ctrl-C or a
crash keeps every finished record, and the same command run again continues the same database. ``build`` finds
it by target, model and variant (see :mod:`compiler.tuning`).

Several RPC servers registered under one key measure in parallel (one runner worker per server): that is how
tuning grows from one board to a farm.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from compiler import cli, console, data, fileio, precision, tuning, zoo
from compiler.build import BuildSettings, QuantSettings
from compiler.errors import SettingError, UserError

TRACKER_TIMEOUT_S = 5.0  # connecting to / asking the tracker; an unreachable tracker fails within this
BUILD_TIMEOUT_S = 120.0  # one candidate's compile (the worker's start-up is not counted)
MAX_TRIALS_PER_ITER = 64


def configure(p) -> None:
    p.add_argument("--target", required=True, help="named target (see `python -m compiler targets`)")
    cli.add_model_args(p)
    p.add_argument("--precision", default="auto", choices=precision.CHOICES,
                   help="as for build: the tuned module must be the one build compiles")
    p.add_argument("--batch", type=int, default=1, help="static batch size (as for build)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="CIFAR-10 folder for int8 calibration, as for build (default: env CIFAR10_DIR)")
    p.add_argument("--trials", type=int, required=True,
                   help="measurements to run in this session (added to what the database already holds)")
    p.add_argument("--tracker", metavar="HOST:PORT",
                   help="TVM RPC tracker to measure through (default: measure on this machine)")
    p.add_argument("--key", help="RPC key the boards registered under (with --tracker)")
    p.add_argument("--log-dir", metavar="DIR",
                   help="database folder (default: tuning_logs/<target>/<model>-<variant>/)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds one measurement (RPC session) may take (default 30)")
    p.add_argument("--trials-per-iter", type=int, default=None, metavar="N",
                   help="candidates per task per round (default: trials / tasks, at most 64)")
    p.add_argument("--num-cores", type=int, default=None, metavar="N",
                   help="CPU targets: cores the target has (default: this machine's for host, else 4)")
    p.add_argument("--population", type=int, default=None, metavar="N",
                   help="candidates the evolutionary search evolves per round (default 512, MetaSchedule's; "
                        "smaller rounds are faster on a slow or busy machine and find less)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the search")
    from compiler.build import add_quantization_args

    add_quantization_args(p)  # int8: the same calibration options as build, so the same module is tuned
    cli.add_json_arg(p)


# ---------------------------------------------------------------------------------------------------------------
# RPC tracker


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--tracker must be HOST:PORT, got '{text}'")
    return host.strip("[]"), int(port)


def tracker_summary(host: str, port: int, timeout: float = TRACKER_TIMEOUT_S) -> dict:
    """The tracker's summary (``queue_info``, ``server_info``), or a UserError within about ``timeout`` seconds.

    TVM's own client retries for 60 s before it gives up; this speaks the tracker protocol directly with a
    socket timeout, so a wrong address or a stopped tracker is reported at once.
    """
    from tvm.rpc import base

    # the tracker binds the first free port in [--port, --port-end), and --port-end defaults to 9199
    hint = f"start it with `python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port} --port-end {port + 1}`"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise UserError(f"cannot reach the RPC tracker at {host}:{port} ({reason}); {hint}") from None
    try:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        if magic != base.RPC_TRACKER_MAGIC:
            raise UserError(f"{host}:{port} answers, but it is not a TVM RPC tracker")
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        reply = base.recvjson(sock)
    except (OSError, struct.error, ValueError, RuntimeError) as e:
        raise UserError(f"the RPC tracker at {host}:{port} did not answer within {timeout:.0f} s ({e}); "
                        f"is it a TVM RPC tracker? {hint}") from None
    finally:
        sock.close()
    if not (isinstance(reply, list) and reply and reply[0] == base.TrackerCode.SUCCESS):
        raise UserError(f"the RPC tracker at {host}:{port} gave an unexpected answer: {reply!r}")
    return reply[1]


def servers_for_key(summary: dict, key: str) -> int:
    n = 0
    for item in summary.get("server_info", []):
        k = str(item.get("key", ""))
        if k.split(":", 1)[-1] == key:
            n += 1
    return n


def check_tracker(tracker: str, key: str, timeout: float = TRACKER_TIMEOUT_S, wait: float = 0.0) -> int:
    """How many RPC servers are registered under ``key`` (at least 1, else UserError)."""
    host, port = parse_tracker(tracker)
    deadline = time.monotonic() + wait
    while True:
        summary = tracker_summary(host, port, timeout)
        n = servers_for_key(summary, key)
        if n or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not n:
        keys = sorted({str(i.get("key", "")).split(":", 1)[-1] for i in summary.get("server_info", [])})
        raise UserError(f"no RPC server is registered under key '{key}' at the tracker {host}:{port} "
                        f"(registered keys: {', '.join(keys) or 'none'}); on each board run "
                        f"`python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}`")
    return n


# ---------------------------------------------------------------------------------------------------------------
# builder and runner


def _build_candidate(mod, target, _params, cuda_arch=None):
    """Compile one candidate in a builder worker: MetaSchedule's default_build without its import of
    tvm.s_tir.tensor_intrin (tens of seconds per fresh worker, and counted against the build timeout)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    if cuda_arch is None:
        return tvm_build(mod, target=target)
    from targets.cuda import cuda_compile_callback

    with cuda_compile_callback(cuda_arch):  # the board's sm with NVRTC 11.8, as build does
        return tvm_build(mod, target=target)


def _export_candidate(rt_mod, zig_target=None):
    """Write a candidate for the runner: a tar of objects (the measuring machine links it) for targets this
    machine's compiler links, a shared library cross-linked with zig (targets.export) for aarch64 boards."""
    workdir = tempfile.mkdtemp(prefix="tune-")
    if zig_target is None:
        from tvm.support.tar import tar

        path = os.path.join(workdir, "tvm_tmp_mod." + tar.output_format)
        rt_mod.export_library(path, fcompile=tar)
        return path
    from targets.export import zig_fcompile

    path = os.path.join(workdir, "tvm_tmp_mod.so")
    rt_mod.export_library(path, fcompile=zig_fcompile(zig_target))
    return path


def make_builder(spec, max_workers: int, timeout_sec: float = BUILD_TIMEOUT_S):
    """A MetaSchedule builder with one worker pool for the whole session (LocalBuilder starts a fresh pool for
    every batch). Call ``.close()`` when done."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    f_build = _build_candidate
    if spec.kind == "cuda":
        f_build = functools.partial(_build_candidate, cuda_arch=spec.cuda_arch)
    f_export = _export_candidate
    if spec.cross_compiled:
        f_export = functools.partial(_export_candidate, zig_target=f"{spec.triple}.{spec.glibc}")

    @derived_object
    class SessionBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec,
                                          maximum_process_uses=256, stdout=subprocess.DEVNULL)

        def build(self, build_inputs):
            results = []
            jobs = [(f_build, f_export, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            for r in self.pool.map_with_error_catching(lambda x: _worker_func(*x), jobs):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"builder: timeout, killed after {timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, f"builder: an exception occurred\n{r.value}"))
            return results

        def close(self):
            self.pool.shutdown(wait=False)

    return SessionBuilder()


def make_runner(tracker: str | None, key: str | None, servers: int, timeout_sec: float):
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100, enable_cpu_cache_flush=False)
    if tracker is None:
        return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=evaluator)
    host, port = parse_tracker(tracker)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_priority=1, session_timeout_sec=int(max(1, timeout_sec)))
    # one worker per registered server: several boards under one key measure in parallel
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=max(1, servers))


def _close(obj) -> None:
    with contextlib.suppress(Exception):
        if hasattr(obj, "close"):
            obj.close()
        elif hasattr(obj, "pool"):
            obj.pool.shutdown(wait=False)


# ---------------------------------------------------------------------------------------------------------------
# progress


class _Progress:
    """Counts trials per task, keeps the best latency, drives a tqdm bar and keeps meta.json current."""

    def __init__(self, names: list[str], total: int, on_update, show: bool = True):
        self.names = names
        self.trials = [0] * len(names)
        self.errors = [0] * len(names)
        self.best = [None] * len(names)  # seconds
        self.bar = console.progress(total=total, desc="tune", unit="trial", leave=False,
                                    disable=None if show else True)
        self.on_update = on_update
        self._last_save = 0.0
        self._last_line = time.monotonic()
        self.stop_requested = False
        self.servers_alive = None  # RPC: a callable, False when no server is registered under the key any more
        self.server_lost = None  # then: what happened, in words

    def measured(self, task_id: int, builder_results, runner_results) -> None:
        for b, r in zip(builder_results, runner_results):
            self.trials[task_id] += 1
            secs = list(r.run_secs) if (b.error_msg is None and r.error_msg is None and r.run_secs) else None
            if secs:
                mean = sum(float(s) for s in secs) / len(secs)
                if mean < tuning._FAILED_SECS and (self.best[task_id] is None or mean < self.best[task_id]):
                    self.best[task_id] = mean
            else:
                self.errors[task_id] += 1
        self.bar.update(len(runner_results))
        failed = [r.error_msg for b, r in zip(builder_results, runner_results)
                  if b.error_msg is None and r.error_msg is not None]
        if failed and len(failed) == len(runner_results) and self.servers_alive and not self.servers_alive():
            # every run of the batch failed and the key's servers left the tracker: stop, rather than wait for
            # the runner's timeout once per candidate
            self.server_lost = f"{len(failed)} measurement(s) failed ({failed[-1].strip().splitlines()[0][:120]})"
        best = self.best[task_id]
        status = (f"task {task_id + 1}/{len(self.names)} {self.names[task_id]}: "
                  + (f"best {best * 1e3:.4g} ms" if best is not None else "no valid run yet"))
        self.bar.set_postfix_str(status)
        now = time.monotonic()
        if self.bar.disable and now - self._last_line > 30.0:  # no terminal (a log file): a line now and then
            self._last_line = now
            print(f"tune: {sum(self.trials)}/{self.bar.total} trials, {status}", file=sys.stderr, flush=True)
        if now - self._last_save > 5.0:
            self._last_save = now
            self.on_update()

    def close(self) -> None:
        self.bar.close()


class _Stop(Exception):
    """Raised from the measure callback to end tuning at a batch boundary after Ctrl-C."""


@contextlib.contextmanager
def _stop_on_interrupt(progress: _Progress):
    """The first Ctrl-C asks tuning to stop after the batch in flight (its records are then in the database);
    a second one interrupts at once. An exception thrown from a signal handler into MetaSchedule's C++ threads,
    xgboost or the FFI can crash the process (seen here: SIGSEGV), hence the flag."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if progress.stop_requested:
            raise KeyboardInterrupt
        progress.stop_requested = True
        progress.bar.write("interrupt: stopping after the measurements in flight (Ctrl-C again to stop now)",
                           file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress_callback(progress: _Progress):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            try:
                progress.measured(int(task_id), builder_results, runner_results)
            except Exception:  # noqa: BLE001 - progress must never stop tuning
                pass
            if progress.stop_requested or progress.server_lost:
                raise _Stop("interrupted")  # unwinds TaskScheduler.tune; this batch is already in the database

    return ProgressCallback()


def space_for(prec: str, target):
    """The design space generator (:meth:`targets.pipeline.Pipeline.space`): int8 on an x86 CPU with int8 dot
    products tries candidates tensorized with its intrinsics (VNNI vpdpbusd; AVX-512 / AVX2 vpmaddubsw) for the
    packed int8 conv2d kernels (TVM 0.27's LLVM defaults have no such rule); every other case MetaSchedule's
    default for the target. build applies such a database the same way (the intrinsics are registered before
    MetaScheduleApplyDatabase replays the traces: compiler.tuning.open_database)."""
    from targets.pipeline import Pipeline

    return Pipeline(None, prec).space(target)


def _preload_tensor_intrinsics(spec) -> None:
    """Register only the CPU tensor intrinsics before MetaSchedule's TuneContext imports them all.

    ``import tvm.s_tir.tensor_intrin`` registers every backend's intrinsics; its CUDA, ROCm and Hexagon halves
    take ~50 of its ~60 s here (measured with -X importtime) and a CPU target's schedule rules never use them.
    For CPU targets the package is entered into sys.modules as a bare package holding the x86 and Arm
    intrinsics, so TuneContext's import is a no-op; any later ``import tvm.s_tir.tensor_intrin.cuda`` still
    loads that submodule normally. CUDA targets get the full import. Failing that, TVM does its own import.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if spec.kind != "cpu" or name in sys.modules:
        return
    try:
        found = importlib.util.find_spec(name)
        pkg = types.ModuleType(name, "Intrinsics for tensorization (CPU subset, see compiler.tune)")
        pkg.__path__ = list(found.submodule_search_locations)
        pkg.__package__ = name
        pkg.__spec__ = found
        sys.modules[name] = pkg
        importlib.import_module(name + ".x86")
        importlib.import_module(name + ".arm_cpu")
    except Exception:  # noqa: BLE001 - fall back to TVM's full import
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


@contextlib.contextmanager
def _quiet_metaschedule():
    """MetaSchedule logs every round to stdout; keep that in work_dir/logs and only warnings on the console."""
    import logging

    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    old = lg.level
    # MetaSchedule's logger set-up (logging.create_loggers) re-lists this logger's handlers by name through
    # str.format: a handler without a name (pytest's capture handler, a user's own) or with braces in it breaks
    # it with "'NoneType' object has no attribute 'format'". Such handlers are set aside while tuning runs.
    foreign = [h for h in lg.handlers if h.get_name() is None or "{" in h.get_name() or "}" in h.get_name()]
    for h in foreign:
        lg.removeHandler(h)
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(old)
        for h in foreign:
            lg.addHandler(h)


def _is_log_dir(directory: Path) -> bool:
    """A tuning-log folder of this project: its meta file, or a MetaSchedule database (checked by check_meta)."""
    names = (tuning.META_FILE, tuning.WORKLOAD_FILE, tuning.RECORD_FILE, tuning.LOCK_FILE)
    return any((directory / f).is_file() for f in names)


def check_log_dir(directory: Path, *inputs) -> None:
    """The log folder is new, empty, or a tuning log of this project; never someone else's folder."""
    fileio.check_output(directory, is_ours=_is_log_dir, inputs=inputs, field="log_dir",
                        what="tuning log of this project")


@contextlib.contextmanager
def _lock(directory: Path):
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / tuning.LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another tune is writing {directory} right now; wait for it or use another "
                            "--log-dir") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------
# tuning


def tune_module(mod, spec, model_name: str, prec: str, batch: int, trials: int, *, directory=None, root=None,
                tracker: str | None = None, key: str | None = None, timeout: float = 30.0,
                trials_per_iter: int | None = None, num_cores: int | None = None, seed: int | None = None,
                population: int | None = None, show_progress: bool = True) -> dict:
    """Tune ``mod`` (the module build compiles: ``compiler.build.lower(...).module``) for ``spec``.

    Returns ``log_dir``, ``variant``, ``tasks`` (per-task rows: name, weight, trials and errors of this session,
    best_ms over the whole database), ``trials`` (this session), ``trials_total`` (records in the database), ``seconds`` (this session), ``tasks_in_db``.
    """
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks, extracted_tasks_to_tune_contexts
    from tvm.s_tir.meta_schedule.tune import tune_tasks

    from targets.pipeline import pipeline

    if trials <= 0:
        raise SettingError("trials", "must be positive")
    if population is not None and population < 2:
        raise SettingError("population", "must be at least 2")
    if (tracker is None) != (key is None):
        raise SettingError("tracker", "and key go together")
    if tracker is None and not _runs_here(spec):
        raise UserError(f"{spec.name} code cannot run on this machine: measure it on the board through a TVM RPC "
                        "tracker with --tracker HOST:PORT --key KEY (see tuning_logs/README.md)")
    servers = check_tracker(tracker, key) if tracker is not None else 0
    emulated = _emulated_server(tracker, key) if tracker is not None else None
    if emulated:
        console.warn(f"the RPC server under key '{key}' is on an {emulated['note']}; this run checks the remote "
                     "path, not the board's kernels")

    variant = tuning.variant_of(mod, prec)
    directory = Path(directory) if directory is not None else tuning.log_dir(spec.name, model_name, variant, root)
    check_log_dir(directory)
    target = tuning.tune_target(spec, num_cores)
    meta = tuning.read_meta(directory)
    has_db = (directory / tuning.WORKLOAD_FILE).exists() or (directory / tuning.RECORD_FILE).exists()
    if meta is not None or has_db:
        tuning.check_meta(meta, directory, spec, model_name, variant)  # refuse another target / model / variant

    passes = pipeline(spec, prec)  # the passes build runs: the kernels tuned are the kernels built
    legal = passes.legalize(target)(mod)
    extracted = [t for t in extract_tasks(legal, target) if not _prescheduled(t)]
    if not extracted:
        raise UserError("the module has no kernels to tune")

    t0 = time.perf_counter()
    _preload_tensor_intrinsics(spec)
    with _lock(directory), _quiet_metaschedule():
        strategy = "evolutionary" if population is None else ms.search_strategy.EvolutionarySearch(
            population_size=population, init_min_unmeasured=min(50, population))
        contexts, weights = extracted_tasks_to_tune_contexts(extracted, work_dir=str(directory), strategy=strategy,
                                                             seed=seed, space=passes.space(target))
        names = [c.task_name for c in contexts]
        if meta is None:
            meta = tuning.new_meta(spec, target, model_name, variant, prec, batch, tuning.shape_signature(mod),
                                   [{"name": t.task_name, "weight": int(t.weight)} for t in extracted])
        session = {"started": tuning._now(), "trials": 0, "seconds": 0.0,
                   "runner": (f"rpc {tracker} key {key} ({servers} server(s))" + (" [emulated board]" if emulated
                                                                                  else "")) if tracker else "local",
                   "target": tuning._target_dict(target), "completed": False,
                   "measured_on": None if tracker else _this_cpu()}
        meta["sessions"] = [*meta.get("sessions", []), session]
        if emulated:
            session["timing_note"] = meta["timing_note"] = emulated["note"]
        base_seconds = float(meta.get("seconds", 0.0))
        database = tuning.open_database(directory, create=True, writer=True)

        def save(completed: bool = False) -> None:
            counts = tuning.summarize(directory)
            session["trials"] = sum(progress.trials)
            session["seconds"] = round(time.perf_counter() - t0, 1)
            session["completed"] = completed
            meta["trials"] = counts["records"]
            meta["seconds"] = round(base_seconds + session["seconds"], 1)
            meta["tasks_in_db"] = counts["tasks_in_db"]
            meta["updated"] = tuning._now()
            tuning.write_meta(directory, meta)

        progress = _Progress(names, trials, save, show_progress)
        if tracker is not None:
            progress.servers_alive = functools.partial(_servers_alive, tracker, key)
        save()
        per_iter = trials_per_iter or max(1, min(MAX_TRIALS_PER_ITER, trials // max(1, len(contexts))))
        builder = make_builder(spec, max_workers=_local_cores())
        runner = make_runner(tracker, key, servers, timeout)
        completed = False
        watchdog = (_server_watchdog(progress, runner, tracker, key, grace=2 * max(timeout, 5.0))
                    if tracker is not None else contextlib.nullcontext())
        try:
            with _stop_on_interrupt(progress), watchdog:
                tune_tasks(
                    tasks=contexts, task_weights=weights, work_dir=str(directory),
                    max_trials_global=trials, num_trials_per_iter=per_iter,
                    builder=builder, runner=runner, database=database, cost_model="xgb",
                    # AddToDatabase (first of the defaults) has committed a batch before ours sees it
                    measure_callbacks=[*ms.MeasureCallback.create("default"), _progress_callback(progress)],
                    task_scheduler="gradient",
                )
            completed = True
        except BaseException:
            if progress.server_lost:
                counts = tuning.summarize(directory)
                progress.close()
                raise UserError(
                    f"the RPC server under key '{key}' at {tracker} stopped serving during tuning "
                    f"({progress.server_lost}); after {sum(progress.trials)} trials of this session {directory} "
                    f"keeps all {counts['records']} records: restart the server and run the same command again "
                    "to continue") from None
            if progress.stop_requested:
                counts = tuning.summarize(directory)
                progress.close()
                print(
                    f"interrupted after {sum(progress.trials)} trials of this session; {directory} keeps all "
                    f"{counts['records']} records: run the same command again to continue", file=sys.stderr)
                raise KeyboardInterrupt from None
            raise
        finally:
            progress.close()
            _close(builder)
            _close(runner)
            save(completed=completed)

    counts = tuning.summarize(directory)
    rows = []
    for i, ctx in enumerate(contexts):
        best = _database_best(database, ctx.mod)  # over every session, not just this one
        rows.append({"task": names[i], "weight": int(weights[i]), "trials": progress.trials[i],
                     "errors": progress.errors[i], "best_ms": None if best is None else round(best * 1e3, 5)})
    return {
        "log_dir": str(directory),
        "variant": variant,
        "target": spec.name,
        "model": model_name,
        "precision": prec,
        "tasks": rows,
        "trials": sum(progress.trials),
        "trials_total": counts["records"],
        "tasks_in_db": counts["tasks_in_db"],
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_total": meta["seconds"],
        "runner": session["runner"],
        "timing_note": session.get("timing_note"),
    }


def _prescheduled(task) -> bool:
    """A kernel the pipeline already scheduled (passes.schedule_layout): nothing to tune."""
    for mod in (task.mod, *task.dispatched):
        for _gv, func in mod.functions_items():
            attrs = func.attrs or {}
            if "tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"]) == 1:
                return True
    return False


def _runs_here(spec) -> bool:
    """Whether this machine can measure ``spec``'s code itself (LocalRunner)."""
    if spec.cross_compiled:
        return False
    if spec.kind == "cpu":
        import targets

        return targets.runs_here(spec)  # an x86 class above this CPU's cannot be measured here
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - no CUDA runtime
        return False


def _database_best(database, mod) -> float | None:
    """Mean run time (s) of the best valid record for the kernel ``mod``, None when it has none."""
    try:
        if not database.has_workload(mod):
            return None
        top = database.get_top_k(database.commit_workload(mod), 1)  # known workload: commits nothing new
        secs = [float(s) for s in top[0].run_secs] if top else []
    except Exception:  # noqa: BLE001 - a summary row is not worth failing the run
        return None
    return sum(secs) / len(secs) if secs else None


def _servers_alive(tracker: str, key: str) -> bool:
    try:
        return servers_for_key(tracker_summary(*parse_tracker(tracker)), key) > 0
    except UserError:
        return False  # the tracker itself is gone


@contextlib.contextmanager
def _server_watchdog(progress: _Progress, runner, tracker: str, key: str, grace: float):
    """Stop tuning when no server is registered under ``key`` for ``grace`` seconds.

    MetaSchedule's RPCRunner asks the tracker for a session without a time limit: with every server gone (killed,
    or TVM's Python server that stopped serving after a session worker died) a tune would wait for ever. A server
    that comes back within ``grace`` (a supervisor restarting it) is simply used again. Otherwise the runner's
    waiting workers are stopped, the measurement in flight fails, and the measure callback ends the tuning with
    its records in the database."""
    import threading

    done = threading.Event()

    def watch():
        lost_since = None
        while not done.wait(3.0):
            if _servers_alive(tracker, key):
                lost_since = None
                continue
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since >= grace:
                progress.server_lost = f"no server was registered under the key for {grace:.0f} s"
                # kill the waiting worker processes; PopenWorker.kill() would close the pipe another thread is
                # reading from and block on its lock: the reader gets EOF instead and the measurement fails
                from tvm.support.popen_pool import kill_child_processes

                pool = getattr(runner, "pool", None)
                for worker in list(getattr(pool, "_worker_map", {}).values()):
                    proc = getattr(worker, "_proc", None)
                    if proc is not None:
                        with contextlib.suppress(Exception):
                            kill_child_processes(proc.pid)
                            proc.kill()
                return

    thread = threading.Thread(target=watch, name="rpc-server-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def _emulated_server(tracker: str, key: str) -> dict | None:
    """The record of the emulated board's RPC server behind ``tracker``/``key`` (targets.board_rpc), if it is one."""
    try:
        from targets.board_rpc import emulated_server

        return emulated_server(tracker, key)
    except Exception:  # noqa: BLE001 - no emulated board: a real one
        return None


def _this_cpu() -> str:
    """Where a local runner measures: this CPU's model, LLVM name and x86 class (a class target may be tuned on a
    CPU of a higher class: AVX2 code runs on an AVX-512 CPU)."""
    import targets

    host = targets.get("host")
    cls = targets.host_class()
    return f"{console.cpu_name()} (-mcpu={host.device.get('mcpu')}{', ' + cls if cls else ''})"


def _local_cores() -> int:
    return tuning._physical_cores()


def load_model(model: str | None, checkpoint: str | None, normalize: str | None = None):
    """The checkpoint as build loads it (shipped default, else untrained weights with a warning)."""
    import torch

    try:
        return zoo.load(model, checkpoint, normalize), None
    except UserError:
        if checkpoint is not None:
            raise
        from compiler.checkpoint import Checkpoint
        from compiler.models import build_model

        name = model or zoo.DEFAULT_MODEL
        torch.manual_seed(0)
        note = (f"no trained {name} is shipped yet: tuning an untrained {name} (kernel shapes do not depend on "
                "weights; a pruned checkpoint strips to other shapes, so tune that one with --checkpoint)")
        print(f"warning: {note}", file=sys.stderr)
        return Checkpoint(name, build_model(name).eval(), normalize or data.DEFAULT_NORMALIZATION), note


@dataclass(frozen=True)
class TuneSettings:
    """What ``tune`` measures and where; the lowering settings are build's, so the module tuned is the one built."""

    target: str
    trials: int
    precision: str = "auto"
    batch: int = 1
    data: str | Path | None = None
    quant: QuantSettings = QuantSettings()
    log_dir: str | Path | None = None  # default tuning_logs/<target>/<model>-<variant>/
    tracker: str | None = None  # HOST:PORT of a TVM RPC tracker (default: measure on this machine)
    key: str | None = None
    timeout: float = 30.0
    trials_per_iter: int | None = None
    num_cores: int | None = None
    population: int | None = None
    seed: int | None = None

    def __post_init__(self):
        BuildSettings(target=self.target, precision=self.precision, batch=self.batch)  # the same checks
        if self.trials <= 0:
            raise SettingError("trials", "must be positive")
        if (self.tracker is None) != (self.key is None):
            raise SettingError("tracker", "and key go together")


def tune(ckpt, settings: TuneSettings, *, untrained_note: str | None = None, progress: bool = True) -> dict:
    """Lower ``ckpt`` exactly as build does and tune its kernels (see :func:`tune_module` for the result)."""
    import targets

    from compiler.build import lower

    spec = targets.get(settings.target)
    prec, _why = precision.choose(settings.precision, spec)
    q = settings.quant
    lowered = lower(ckpt.model, settings.batch, prec, spec, data_dir=settings.data, normalize=ckpt.normalize,
                    calib_images=q.calib_images, calibration=q.calibration, keep=q.keep_fp32,
                    untrained=untrained_note is not None)  # exactly as build calls it
    return tune_module(lowered.module, spec, ckpt.model_name, prec, settings.batch, settings.trials,
                       directory=settings.log_dir, tracker=settings.tracker, key=settings.key,
                       timeout=settings.timeout, trials_per_iter=settings.trials_per_iter,
                       num_cores=settings.num_cores, seed=settings.seed, population=settings.population,
                       show_progress=progress)


def run(args) -> dict:
    from compiler.build import quant_from

    settings = TuneSettings(target=args.target, trials=args.trials, precision=args.precision, batch=args.batch,
                            data=args.data, quant=quant_from(args), log_dir=args.log_dir, tracker=args.tracker,
                            key=args.key, timeout=args.timeout, trials_per_iter=args.trials_per_iter,
                            num_cores=args.num_cores, population=args.population, seed=args.seed)
    if args.log_dir is not None:
        check_log_dir(Path(args.log_dir), args.checkpoint, args.data)  # before the model is loaded and lowered
    if args.tracker is not None:
        check_tracker(args.tracker, args.key)  # fail fast, before the model is loaded
    ckpt, note = load_model(args.model, args.checkpoint, args.normalize)
    result = tune(ckpt, settings, untrained_note=note)
    render(result)
    out = {k: result[k] for k in ("log_dir", "variant", "trials", "seconds", "target", "model", "precision",
                                  "trials_total", "tasks_in_db")}
    out["tasks"] = len(result["tasks"])
    if result.get("timing_note"):
        out["timing_note"] = result["timing_note"]
        print(f"note: measured on an {result['timing_note']}")
    out["task_rows"] = result["tasks"]
    if note:
        out["note"] = note
    return out


def render(result: dict) -> None:
    """The per-task table and the database summary."""
    rows = [dict(r) for r in result["tasks"]]
    measured = [r for r in rows if r["best_ms"] is not None]
    # every kernel measured: the weighted sum of the best kernel times estimates the model's latency
    estimate = sum(r["weight"] * r["best_ms"] for r in measured) if len(measured) == len(rows) else None
    rows.append({"task": "total (weighted)", "weight": None, "trials": result["trials"],
                 "errors": sum(r["errors"] for r in rows), "best_ms": estimate})
    print(console.table(rows, ["task", "weight", "trials", "errors", "best_ms"],
                        title=f"tune {result['model']} for {result['target']} ({result['variant']}), "
                              f"{result['runner']}"))
    print(f"{result['trials']} trials in {result['seconds']:.0f} s; the database now holds "
          f"{result['trials_total']} records for {result['tasks_in_db']} of {len(result['tasks'])} tasks "
          f"({result['seconds_total']:.0f} s of tuning in all): {result['log_dir']}")
