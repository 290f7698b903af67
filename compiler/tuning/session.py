"""A tuning session: MetaSchedule (XGBoost cost model) on exactly the module ``build`` compiles, locally or over
TVM RPC.

    checkpoint -> compiler.build.lower (import, strip zeroed channels, precision) -> legalize + fuse (the build
    pipeline's front half) -> MetaSchedule tasks -> builder (cross-compiles for the target) -> runner (this
    machine, or the boards behind a TVM RPC tracker) -> tuning_logs/<target>/<model>-<variant>/

The database is MetaSchedule's JSON database: each measured trial is appended as it finishes, so Ctrl-C or a
crash keeps every finished record, and the same command run again continues the same database. ``build`` finds
it by target, model and variant (see :mod:`compiler.tuning.database`).

Several RPC servers registered under one key measure in parallel (one runner worker per server): that is how
tuning grows from one board to a farm.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from compiler import console, precision, threads, zoo
from compiler.build import BuildSettings, QuantSettings
from compiler.errors import SettingError, UserError
from compiler.tuning import database, tvm_compat
from compiler.tuning import tracker as tracker_mod
from compiler.tuning.tracker import parse_tracker

MAX_TRIALS_PER_ITER = 64


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
    library: bool = False  # tune the kernel library (compiler.tuning.library) instead of a model
    keep_best: int | None = None  # then keep only each kernel's best N records (database.keep_best)

    def __post_init__(self):
        BuildSettings(target=self.target, precision=self.precision, batch=self.batch)  # the same checks
        if self.keep_best is not None and self.keep_best < 1:
            raise SettingError("keep_best", "must be at least 1")
        if self.trials < 0 or self.trials == 0 and self.keep_best is None:
            raise SettingError("trials", "must be positive (0 only with --keep-best: trim without measuring)")
        if (self.tracker is None) != (self.key is None):
            raise SettingError("tracker", "and key go together")


def tune(ckpt, settings: TuneSettings, *, untrained_note: str | None = None, progress: bool = True) -> dict:
    """Lower ``ckpt`` exactly as build does and tune its kernels (see :func:`tune_module` for the result); with
    ``settings.library`` the kernel library's instead (``ckpt`` is not used)."""
    import targets

    if settings.library:
        from compiler.tuning.library import tune_library

        return tune_library(settings, progress=progress)

    from compiler.build import lower

    spec = targets.get(settings.target)
    prec, _why = precision.choose(settings.precision, spec)
    q = settings.quant
    lowered = lower(ckpt.model, settings.batch, prec, spec, data_dir=settings.data, normalize=ckpt.normalize,
                    calib_images=q.calib_images, calibration=q.calibration, keep=q.keep_fp32,
                    untrained=untrained_note is not None,
                    shipped=zoo.calibration(ckpt, q.calib_images))  # exactly as build calls it
    return tune_module(lowered.module, spec, ckpt.model_name, prec, settings.batch, settings.trials,
                       directory=settings.log_dir, tracker=settings.tracker, key=settings.key,
                       timeout=settings.timeout, trials_per_iter=settings.trials_per_iter,
                       num_cores=settings.num_cores, seed=settings.seed, population=settings.population,
                       keep_best=settings.keep_best, show_progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# builder and runner


def make_runner(tracker: str | None, key: str | None, servers: int, timeout_sec: float):
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100, enable_cpu_cache_flush=False)
    if tracker is None:
        return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=evaluator,
                                     initializer=threads.init_measurement_worker)
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
        self.stop_requested = False
        self.servers_alive = None  # RPC: a callable, False when no server is registered under the key any more
        self.server_lost = None  # then: what happened, in words

    def measured(self, task_id: int, builder_results, runner_results) -> None:
        for b, r in zip(builder_results, runner_results):
            self.trials[task_id] += 1
            secs = list(r.run_secs) if (b.error_msg is None and r.error_msg is None and r.run_secs) else None
            if secs:
                mean = sum(float(s) for s in secs) / len(secs)
                if mean < database.FAILED_SECS and (self.best[task_id] is None or mean < self.best[task_id]):
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
        self.bar.set_postfix_str(status, refresh=False)  # without a terminal, console writes a line now and then
        now = time.monotonic()
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
    MetaScheduleApplyDatabase replays the traces: compiler.tuning.database.open_database)."""
    from targets.pipeline import Pipeline

    return Pipeline(None, prec).space(target)


@contextlib.contextmanager
def _lock(directory: Path):
    """The folder's lock for this session: one tune writes a database at a time."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / database.LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SettingError("log_dir", f"{directory} is being written by another tune right now; wait for it or "
                                          "choose another folder") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------
# tuning


def tune_module(mod, spec, model_name: str, prec: str, batch: int, trials: int, *, directory=None, root=None,
                tracker: str | None = None, key: str | None = None, timeout: float = 30.0,
                trials_per_iter: int | None = None, num_cores: int | None = None, seed: int | None = None,
                population: int | None = None, keep_best: int | None = None, show_progress: bool = True,
                shapes=None) -> dict:
    """Tune ``mod`` (the module build compiles: ``compiler.build.lower(...).module``) for ``spec``. ``shapes``:
    what meta.json records as the module's shapes (default: every conv2d / matmul signature). ``keep_best``:
    after the session (``trials`` may then be 0: trim only), keep each kernel's best N records
    (:func:`database.keep_best`; meta.json's ``trials`` still counts every trial measured).

    Returns ``log_dir``, ``variant``, ``tasks`` (per-task rows: name, weight, trials and errors of this session,
    best_ms over the whole database), ``trials`` (this session), ``trials_total`` (records in the database),
    ``seconds`` (this session), ``tasks_in_db``.
    """
    from targets.pipeline import pipeline

    if trials < 0 or trials == 0 and keep_best is None:
        raise SettingError("trials", "must be positive (0 only with --keep-best: trim without measuring)")
    measure = _measurement(spec, trials, population, tracker, key, timeout)
    variant = database.variant_of(mod, prec)
    directory = (Path(directory) if directory is not None
                 else database.tune_dir(spec, database.log_dir(spec.name, model_name, variant, root)))
    database.check_log_dir(directory)
    target = database.tune_target(spec, num_cores)
    if tracker is None:  # measure at the thread count the target is tuned for (its parallel loops split that way)
        measure.threads = threads.for_measurement(int(target.attrs.get("num-cores", 1)))
    meta = _existing_meta(directory, spec, model_name, variant)
    if trials == 0 and meta is None:
        raise UserError(f"nothing to trim: {directory} holds no tuning database of this module")
    passes = pipeline(spec, prec)  # the passes build runs: the kernels tuned are the kernels built
    extracted = _extract_tasks(passes.legalize(target)(mod), target)

    t0 = time.perf_counter()
    tvm_compat.preload_cpu_tensor_intrinsics(spec)
    with _lock(directory), tvm_compat.quiet_metaschedule():
        contexts, weights = _tune_contexts(extracted, directory, passes.space(target), seed, population)
        if meta is None:
            meta = database.new_meta(spec, target, model_name, variant, prec, batch,
                                     database.shape_signature(mod) if shapes is None else shapes,
                                     [{"name": t.task_name, "weight": int(t.weight)} for t in extracted])
        journal = _Journal(directory, meta, measure.session_record(target), t0)
        db = database.open_database(directory, create=True, writer=True)
        progress = _Progress([c.task_name for c in contexts], trials, journal.save, show_progress)
        journal.progress = progress
        if tracker is not None:
            progress.servers_alive = functools.partial(tracker_mod.servers_alive, tracker, key)
        journal.save()
        per_iter = trials_per_iter or max(1, min(MAX_TRIALS_PER_ITER, trials // max(1, len(contexts))))
        if trials > 0:
            _run_tasks(contexts, weights, db, directory, trials, per_iter, spec, measure, progress, journal)
        else:
            progress.close()
        if keep_best is not None:
            kept = database.keep_best(directory, keep_best)
            meta["keep_best"] = keep_best
            journal.session["kept"] = kept
            journal.save(completed=True)

    rows = _task_rows(contexts, weights, db, progress)
    return _result(rows, directory, variant, spec, model_name, prec, progress, meta, journal.session, t0)


@dataclass
class _Measurement:
    """Where candidates are measured: this machine, or the RPC servers under ``key`` at ``tracker``."""

    tracker: str | None
    key: str | None
    timeout: float
    servers: int = 0
    emulated: dict | None = None  # the emulated board's record, when the servers run in it
    threads: int | None = None  # threads the kernels run on when measured on this machine

    def runner(self):
        return make_runner(self.tracker, self.key, self.servers, self.timeout)

    def session_record(self, target) -> dict:
        """This session's entry in meta.json's ``sessions``."""
        if self.tracker:
            runner = (f"rpc {self.tracker} key {self.key} ({self.servers} server(s))"
                      + (" [emulated board]" if self.emulated else ""))
        else:
            runner = "local"
        session = {"started": database.utc_now(), "trials": 0, "seconds": 0.0, "runner": runner,
                   "target": database.target_dict(target), "completed": False,
                   "measured_on": None if self.tracker else _this_cpu()}
        if self.threads:
            session["threads"] = self.threads
        if self.emulated:
            session["timing_note"] = self.emulated["note"]
        return session


def _measurement(spec, trials: int, population: int | None, tracker: str | None, key: str | None,
                 timeout: float) -> _Measurement:
    """The settings checked and the RPC servers counted, before anything is lowered or written (``trials`` 0:
    nothing will be measured, so no runner is needed)."""
    if population is not None and population < 2:
        raise SettingError("population", "must be at least 2")
    if (tracker is None) != (key is None):
        raise SettingError("tracker", "and key go together")
    if trials > 0 and tracker is None and not _runs_here(spec):
        raise SettingError("tracker", f"is needed: {spec.name} code cannot run on this machine; measure it on the "
                                      "board through a TVM RPC tracker with its key (see tuning_logs/README.md)")
    measure = _Measurement(tracker, key, timeout)
    if tracker is not None and trials > 0:
        measure.servers = tracker_mod.check_tracker(tracker, key)
        measure.emulated = tracker_mod.emulated_server(tracker, key)
    if measure.emulated:
        console.warn(f"the RPC server under key '{key}' is on an {measure.emulated['note']}; this run checks the "
                     "remote path, not the board's kernels")
    return measure


def _existing_meta(directory: Path, spec, model_name: str, variant: str) -> dict | None:
    """The folder's meta.json (None for a new folder); a database for another target, model or variant is
    refused before any tuning starts."""
    meta = database.read_meta(directory)
    has_db = (directory / database.WORKLOAD_FILE).exists() or (directory / database.RECORD_FILE).exists()
    if meta is not None or has_db:
        database.check_meta(meta, directory, spec, model_name, variant)
    return meta


def _extract_tasks(legal, target) -> list:
    """MetaSchedule's tasks of the legalized module, less the kernels the pipeline already scheduled."""
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks

    extracted = [t for t in extract_tasks(legal, target) if not _prescheduled(t)]
    if not extracted:
        raise UserError("the module has no kernels to tune")
    return extracted


def _tune_contexts(extracted, directory: Path, space, seed: int | None, population: int | None):
    """``(contexts, weights)``: one TuneContext per task, with the evolutionary search (of ``population``)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    strategy = "evolutionary" if population is None else ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population))
    return extracted_tasks_to_tune_contexts(extracted, work_dir=str(directory), strategy=strategy, seed=seed,
                                            space=space)


class _Journal:
    """Keeps meta.json current: this session's trials and seconds, the database's counts (``save``)."""

    def __init__(self, directory: Path, meta: dict, session: dict, t0: float):
        self.directory, self.meta, self.session, self.t0 = directory, meta, session, t0
        meta["sessions"] = [*meta.get("sessions", []), session]
        if "timing_note" in session:
            meta["timing_note"] = session["timing_note"]
        self.base_seconds = float(meta.get("seconds", 0.0))
        self.base_trials = int(meta.get("trials", 0))  # measured before this session (records may have been trimmed)
        self.progress = None  # the session's _Progress, once there is one

    def save(self, completed: bool = False) -> None:
        counts = database.summarize(self.directory)
        self.session["trials"] = sum(self.progress.trials)
        self.session["seconds"] = round(time.perf_counter() - self.t0, 1)
        self.session["completed"] = completed
        # every trial measured: the records, unless a session trimmed them (keep_best), then what meta counted
        self.meta["trials"] = max(counts["records"], self.base_trials + self.session["trials"])
        self.meta["seconds"] = round(self.base_seconds + self.session["seconds"], 1)
        self.meta["tasks_in_db"] = counts["tasks_in_db"]
        self.meta["updated"] = database.utc_now()
        database.write_meta(self.directory, self.meta)


def _run_tasks(contexts, weights, db, directory: Path, trials: int, per_iter: int, spec,
               measure: _Measurement, progress: _Progress, journal: _Journal) -> None:
    """MetaSchedule's task scheduler over every task; every measured batch is in the database as it finishes.
    Ctrl-C (KeyboardInterrupt) and servers that stopped serving (UserError) end it with a message."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.tune import tune_tasks

    builder = tvm_compat.make_builder(spec, max_workers=database.physical_cores())
    runner = measure.runner()
    completed = False
    watchdog = (tracker_mod.server_watchdog(progress, runner, measure.tracker, measure.key,
                                            grace=2 * max(measure.timeout, 5.0))
                if measure.tracker is not None else contextlib.nullcontext())
    try:
        with _stop_on_interrupt(progress), watchdog:
            tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(directory),
                max_trials_global=trials, num_trials_per_iter=per_iter,
                builder=builder, runner=runner, database=db, cost_model="xgb",
                # AddToDatabase (first of the defaults) has committed a batch before ours sees it
                measure_callbacks=[*ms.MeasureCallback.create("default"), _progress_callback(progress)],
                task_scheduler="gradient",
            )
        completed = True
    except BaseException:
        stopped = _stopped(progress, directory, measure)
        if stopped is not None:
            raise stopped from None
        raise
    finally:
        progress.close()
        _close(builder)
        _close(runner)
        journal.save(completed=completed)


def _stopped(progress: _Progress, directory: Path, measure: _Measurement) -> BaseException | None:
    """What to raise when tuning ended early on purpose (the servers left, or Ctrl-C); None for any other error."""
    if progress.server_lost:
        counts = database.summarize(directory)
        progress.close()
        return UserError(
            f"the RPC server under key '{measure.key}' at {measure.tracker} stopped serving during tuning "
            f"({progress.server_lost}); after {sum(progress.trials)} trials of this session {directory} "
            f"keeps all {counts['records']} records: restart the server and run the same command again "
            "to continue")
    if progress.stop_requested:
        counts = database.summarize(directory)
        progress.close()
        print(f"interrupted after {sum(progress.trials)} trials of this session; {directory} keeps all "
              f"{counts['records']} records: run the same command again to continue", file=sys.stderr)
        return KeyboardInterrupt()
    return None


def _task_rows(contexts, weights, db, progress: _Progress) -> list[dict]:
    """Per task: name, weight, this session's trials and errors, the best time over every session."""
    rows = []
    for i, ctx in enumerate(contexts):
        best = _database_best(db, ctx.mod)  # over every session, not just this one
        rows.append({"task": progress.names[i], "weight": int(weights[i]), "trials": progress.trials[i],
                     "errors": progress.errors[i], "best_ms": None if best is None else round(best * 1e3, 5)})
    return rows


def _result(rows, directory: Path, variant: str, spec, model_name: str, prec: str, progress: _Progress,
            meta: dict, session: dict, t0: float) -> dict:
    counts = database.summarize(directory)
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
        "kept": session.get("kept"),  # keep_best: records before and after the trim
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


def _database_best(db, mod) -> float | None:
    """Mean run time (s) of the best valid record for the kernel ``mod``, None when it has none."""
    try:
        if not db.has_workload(mod):
            return None
        top = db.get_top_k(db.commit_workload(mod), 1)  # known workload: commits nothing new
        secs = [float(s) for s in top[0].run_secs] if top else []
    except Exception:  # noqa: BLE001 - a summary row is not worth failing the run
        return None
    return sum(secs) / len(secs) if secs else None


def _this_cpu() -> str:
    """Where a local runner measures: this CPU's model, LLVM name and x86 class (a class target may be tuned on a
    CPU of a higher class: AVX2 code runs on an AVX-512 CPU)."""
    import targets

    host = targets.get("host")
    cls = targets.host_class()
    return f"{console.cpu_name()} (-mcpu={host.device.get('mcpu')}{', ' + cls if cls else ''})"
