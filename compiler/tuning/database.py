"""MetaSchedule tuning databases: where they live, which module they fit, which one ``build`` applies, opening one.

Layout (see tuning_logs/README.md)::

    tuning_logs/<target>/<model>-<variant>/database_workload.json       MetaSchedule's JSON database
    tuning_logs/<target>/<model>-<variant>/database_tuning_record.json
    tuning_logs/<target>/<model>-<variant>/meta.json                    what it was tuned for (refused otherwise)
    tuning_logs/<target>/<model>-<variant>/logs/                        MetaSchedule's text logs (not versioned)

``<variant>`` is ``<precision>-<hash>``: the hash covers the shapes, dtypes and attributes of every conv2d and
matmul of the module ``build`` compiles (after strip-zero-channels and precision; the batch size is in the
shapes), so a pruned model finds the database tuned for its own stripped shapes and ``build`` picks it up by
itself.

Crash safety: MetaSchedule's JSONDatabase appends one line per workload / measured record and flushes it
(``std::endl``), so finished records survive Ctrl-C or a crash. The only damage a hard kill can do is a torn
last line (or a last line without its newline, which the next append would glue onto); :func:`repair` drops
or completes that line (atomic rewrite) before a database is opened, so such a database still loads and a
re-run continues it.

Workload keys carry no target: :func:`check_meta` is what stops a database tuned for one target, model or
variant from being applied to another.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

from compiler import fileio
from compiler.errors import UserError

FORMAT = "cifar-hybrid-compiler/tuning-log"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "meta.json"
LOCK_FILE = ".lock"
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "tuning_logs"

# ops whose shapes name the variant (the ones that carry the FLOPs and that pruning / precision change)
VARIANT_OPS = ("relax.nn.conv2d", "relax.nn.conv1d", "relax.nn.conv2d_transpose", "relax.matmul", "relax.nn.dense")
_ATTRS = ("strides", "padding", "dilation", "groups", "data_layout", "kernel_layout", "out_layout", "out_dtype")
# a measured record that failed to build or run has this run time (SortTuningRecordByMeanRunSecs::kMaxMeanTime)
FAILED_SECS = 1e10


# ---------------------------------------------------------------------------------------------------------------
# names


def _safe(name: str, what: str) -> str:
    name = str(name)
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise UserError(f"{what} '{name}' cannot name a folder")
    return name


def log_dir(target_name: str, model_name: str, variant: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<target>/<model>-<variant>``; ``root`` defaults to this project's tuning_logs/."""
    base = Path(root) if root is not None else DEFAULT_ROOT
    return base / _safe(target_name, "target") / f"{_safe(model_name, 'model')}-{_safe(variant, 'variant')}"


def _static(dim):
    try:
        return int(dim)
    except (TypeError, ValueError):
        return str(dim)


def _tensor_sig(expr) -> list:
    from tvm import relax

    ty = expr.ty  # TVM 0.27: what older TVMs called struct_info
    if isinstance(ty, relax.TensorType):
        shape = [_static(d) for d in ty.shape.values] if isinstance(ty.shape, relax.ShapeExpr) else None
        return [shape, str(ty.dtype)]
    return [type(ty).__name__]


def _attr_value(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    try:
        return [_attr_value(x) for x in v]
    except TypeError:
        pass
    try:
        return int(v)
    except (TypeError, ValueError):
        return str(v)


def shape_signature(mod) -> list[list]:
    """``[op, [[shape, dtype] per argument], {attr: value}]`` for every conv2d / matmul binding, in program order."""
    import tvm
    from tvm import relax

    sigs = []
    for gv, func in sorted(mod.functions_items(), key=lambda kv: kv[0].name_hint):
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        bound = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                call = binding.value
                bound[binding.var] = call
                if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)):
                    continue
                if call.op.name == "relax.call_tir":
                    sig = _call_tir_sig(call, bound)
                    if sig is not None:
                        sigs.append(sig)
                    continue
                if call.op.name not in VARIANT_OPS:
                    continue
                attrs = {}
                for name in _ATTRS:
                    if call.attrs is not None and hasattr(call.attrs, name):
                        attrs[name] = _attr_value(getattr(call.attrs, name))
                sigs.append([str(call.op.name), [_tensor_sig(a) for a in call.args], attrs])
    return sigs


def _call_tir_sig(call, bound: dict | None = None) -> list | None:
    """``["call_tir:<kernel>", [[shape, dtype] per argument], {"out": [shape, dtype]}]`` for the kernels our passes
    emit as call_tir (passes.vnni's packed int8 conv2d and its pack / unpack): a module whose int8 conv2d layers
    are packed has no relax.nn.conv2d left to name its shapes.

    A quantize the producing conv2d's epilogue takes in (``vnni_quantize_packed`` then ``vnni_pad_repack``) is
    named as the one ``vnni_quantize_repack`` it stands for (``bound``: var -> value of the bindings before
    ``call``): the variant names the model's shapes, not where the layout pass put a quantize, so the databases
    tuned before that fusion keep their names (their conv2d records apply by anchor block: :func:`combine`)."""
    from passes import vnni

    def kernel_of(c):
        name = getattr(c.args[0], "name_hint", None)
        return next((k for k in vnni.KERNEL_NAMES if name and name.startswith(k)), None)

    def fields(c):
        operands = c.args[1]
        return list(operands.fields) if hasattr(operands, "fields") else [operands]

    kernel = kernel_of(call)
    if kernel is None or kernel == vnni.QUANTIZE_NAME:
        return None
    args = fields(call)
    if kernel == vnni.PAD_NAME:
        q = (bound or {}).get(args[0])
        if q is None or not isinstance(q, type(call)) or kernel_of(q) != vnni.QUANTIZE_NAME:
            return None
        kernel, args = vnni.REPACK_NAME, fields(q)
    return [f"call_tir:{kernel}", [_tensor_sig(a) for a in args], {"out": _tensor_sig(call)}]


def variant_of(mod, precision: str) -> str:
    """``<precision>-<8 hex>``: names the module's conv2d/matmul shapes (stripped, batch included) and precision."""
    payload = json.dumps({"precision": precision, "ops": shape_signature(mod)}, sort_keys=True,
                         separators=(",", ":"))
    return f"{_safe(precision, 'precision')}-{hashlib.sha256(payload.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------------------------
# the TVM target MetaSchedule tunes for (the passes: targets.pipeline, the same as build's)


def tune_target(spec, num_cores: int | None = None):
    """The TVM target MetaSchedule tunes for: ``spec``'s target, plus ``num-cores`` on CPU targets (MetaSchedule
    sizes parallel loops by it; default: this machine's physical cores for ``host``, else 4)."""
    import tvm

    target = spec.target_json()
    if spec.kind == "cpu" and "num-cores" not in target:
        if num_cores is None:
            num_cores = physical_cores() if not spec.cross_compiled else 4
        target = {**target, "num-cores": int(num_cores)}
    return tvm.target.Target(target)


def physical_cores() -> int:
    try:
        from tvm.s_tir.meta_schedule.utils import cpu_count

        return max(1, int(cpu_count(logical=False)))
    except Exception:  # noqa: BLE001
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------------------
# the database files


def _read_lines(path: Path) -> tuple[list[bytes], bool]:
    """(lines without newlines, whether the file ends with a newline)."""
    data = path.read_bytes()
    if not data:
        return [], True
    return data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"), data.endswith(b"\n")


def _clean_lines(path: Path, n_workloads: int | None) -> tuple[list[bytes], dict]:
    """The lines of one database file that load, and what had to change. Only the last line may be damaged
    (torn, blank, or a record of a workload whose line was torn): that is all an interrupted append can do."""
    lines, ends_nl = _read_lines(path)
    fixes = {"dropped_lines": 0, "added_newlines": 0}
    keep = []
    for i, raw in enumerate(lines):
        last = i == len(lines) - 1
        try:
            obj = json.loads(raw)
            ok = n_workloads is None or (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)
                                         and 0 <= obj[0] < n_workloads)
        except ValueError:
            ok = False
        if ok:
            keep.append(raw)
        elif last:
            fixes["dropped_lines"] += 1
        else:
            raise UserError(f"{path} line {i + 1} is damaged (not a torn last line): the database is corrupt; "
                            "restore it from version control or tune into a new folder")
    if not ends_nl and not fixes["dropped_lines"]:
        fixes["added_newlines"] += 1
    return keep, fixes


def repair(directory: str | os.PathLike, dry_run: bool = False) -> dict:
    """Make a database crash-clean: a torn last line (killed mid-append) is dropped, a complete last line
    without its newline gets one (else the next append would glue onto it). Rewrites atomically, only when
    something is wrong; ``dry_run`` only reports. Any other damaged line: UserError. Returns
    ``{"dropped_lines", "added_newlines", "needed"}``. Only ``tune`` (holding the folder's lock) repairs in place."""
    directory = Path(directory)
    total = {"dropped_lines": 0, "added_newlines": 0}
    n_workloads = None
    for name in (WORKLOAD_FILE, RECORD_FILE):
        path = directory / name
        if not path.is_file():
            n_workloads = 0
            continue
        keep, fixes = _clean_lines(path, n_workloads)
        if name == WORKLOAD_FILE:
            n_workloads = len(keep)
        for k, v in fixes.items():
            total[k] += v
        if any(fixes.values()) and not dry_run:
            fileio.write_bytes(path, b"".join(line + b"\n" for line in keep))
    total["needed"] = bool(total["dropped_lines"] or total["added_newlines"])
    return total


def _mean_secs(raw: bytes) -> float | None:
    """A record line's mean run time (s); None when it failed (no run, or every run at FAILED_SECS)."""
    _idx, record = json.loads(raw)
    secs = [float(v) for v in record[1]] if record[1] else []
    if not secs or all(v == FAILED_SECS for v in secs):
        return None
    return sum(secs) / len(secs)


def keep_best(directory: str | os.PathLike, n: int) -> dict:
    """Keep only each workload's ``n`` best measured records (by mean run time, the earliest of equals: the
    order MetaSchedule's JSONDatabase ranks them in) and drop failed ones, in their original order; the
    workload file is left as it is (records point into it by line). What build applies (each workload's best)
    does not change; a continued ``tune`` seeds its search from the records kept. Atomic rewrite, only when
    something goes. Call it holding the folder's lock (``tune --keep-best``). Returns ``{"keep_best",
    "records_before", "records_after"}``."""
    if n < 1:
        raise UserError(f"keep-best must be at least 1, not {n}")
    directory = Path(directory)
    workloads, _ = _clean_lines(directory / WORKLOAD_FILE, None)
    records, _ = _clean_lines(directory / RECORD_FILE, len(workloads))
    ranked: dict[int, list[tuple[float, int]]] = {}
    for pos, raw in enumerate(records):
        mean = _mean_secs(raw)
        if mean is not None:
            ranked.setdefault(json.loads(raw)[0], []).append((mean, pos))
    kept = sorted(pos for entries in ranked.values() for _mean, pos in sorted(entries)[:n])
    if len(kept) < len(records):
        fileio.write_bytes(directory / RECORD_FILE, b"".join(records[pos] + b"\n" for pos in kept))
    return {"keep_best": n, "records_before": len(records), "records_after": len(kept)}


def summarize(directory: str | os.PathLike) -> dict:
    """Counts straight from the files: workloads, records (= trials measured), valid records, and
    ``tasks_in_db``: workloads with at least one valid record (what build can apply)."""
    directory = Path(directory)
    out = {"workloads": 0, "records": 0, "valid_records": 0, "tasks_in_db": 0, "best_secs": {}}
    wl = directory / WORKLOAD_FILE
    rec = directory / RECORD_FILE
    if wl.is_file():
        out["workloads"] = len([line for line in _read_lines(wl)[0] if line.strip()])
    if rec.is_file():
        best: dict[int, float] = {}
        for raw in _read_lines(rec)[0]:
            if not raw.strip():
                continue
            try:
                idx, record = json.loads(raw)
                secs = [float(s) for s in record[1]] if record[1] else []
            except (ValueError, TypeError, IndexError):
                continue
            out["records"] += 1
            if secs and max(secs) < FAILED_SECS:
                out["valid_records"] += 1
                mean = sum(secs) / len(secs)
                best[idx] = min(best.get(idx, mean), mean)
        out["tasks_in_db"] = len(best)
        out["best_secs"] = best
    return out


def open_database(directory, create: bool = False, writer: bool = False):
    """A MetaSchedule database on ``directory`` (a tuning-log folder; a Database object is returned as is): the one
    way this project opens a database. The CPU tensor intrinsics are registered first: int8 records tensorize with
    them, so loading and replaying their traces needs them.

    ``writer`` (tune, holding the folder's lock): a JSONDatabase on the files, repaired in place first; ``create``
    makes them when missing. Readers (build, coverage counts) get :func:`best_records`: never touching the files
    (they may be committed, or a tune may be appending to them: a torn tail is skipped).
    """
    from tvm.s_tir import meta_schedule as ms

    from compiler.tuning.tvm_compat import register_tensor_intrinsics

    register_tensor_intrinsics()
    if isinstance(directory, ms.database.Database):
        return directory
    directory = Path(directory)
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    elif not (directory / WORKLOAD_FILE).is_file() or not (directory / RECORD_FILE).is_file():
        raise UserError(f"{directory} holds no MetaSchedule database ({WORKLOAD_FILE} + {RECORD_FILE})")
    if not writer:
        return best_records(directory)
    repair(directory)
    return ms.database.JSONDatabase(path_workload=str(directory / WORKLOAD_FILE),
                                    path_tuning_record=str(directory / RECORD_FILE), allow_missing=create)


def best_records(directory: str | os.PathLike):
    """An in-memory database with each workload's best record only: what MetaSchedule's ApplyDatabase takes
    from the whole JSONDatabase (its top-1 by mean run time, the earliest of equals; records whose every run
    failed are skipped), loaded in a fraction of the time: the JSONDatabase parses every trial's trace (the
    Zen 1 ResNet56 database: 1,216 traces, 10.5 s; this: 16, 0.5 s)."""
    from tvm.s_tir import meta_schedule as ms

    directory = Path(directory)
    workloads, _ = _clean_lines(directory / WORKLOAD_FILE, None)
    records, _ = _clean_lines(directory / RECORD_FILE, len(workloads))
    best: dict[int, tuple[float, list]] = {}
    for raw in records:
        mean = _mean_secs(raw)
        if mean is None:
            continue
        idx, record = json.loads(raw)
        if idx not in best or mean < best[idx][0]:
            best[idx] = (mean, record)
    db = ms.database.MemoryDatabase()
    for idx in sorted(best):
        workload = db.commit_workload(ms.database.Workload.from_json(json.loads(workloads[idx])).mod)
        db.commit_tuning_record(ms.database.TuningRecord.from_json(best[idx][1], workload))
    return db


def is_log_dir(directory: Path) -> bool:
    """A tuning-log folder of this project: its meta file, or a MetaSchedule database (checked by check_meta)."""
    names = (META_FILE, WORKLOAD_FILE, RECORD_FILE, LOCK_FILE)
    return any((Path(directory) / f).is_file() for f in names)


def check_log_dir(directory: str | os.PathLike, *inputs, field: str = "log_dir") -> None:
    """The log folder is new, empty, or a tuning log of this project; never someone else's folder (a refusal is a
    SettingError on ``field``)."""
    fileio.check_output(Path(directory), is_ours=is_log_dir, inputs=inputs, field=field,
                        what="tuning log of this project")


# ---------------------------------------------------------------------------------------------------------------
# meta.json: what a database was tuned for


def read_meta(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a tuning-log meta file of this project (format {FORMAT})")
    return meta


def new_meta(spec, tuned_target, model_name: str, variant: str, precision: str, batch: int, shapes, tasks) -> dict:
    import tvm

    return {
        "format": FORMAT,
        "version": 1,
        "target": {"name": spec.name, "tvm": spec.target_json(), "tuned_as": target_dict(tuned_target)},
        "model": model_name,
        "variant": variant,
        "precision": precision,
        "batch": batch,
        "shapes": shapes,
        "tasks": tasks,
        "trials": 0,
        "seconds": 0.0,
        "sessions": [],
        "tvm_version": tvm.__version__,
        "created": utc_now(),
    }


def _plain(x):
    """tvm_ffi containers (Map, Array, String, IntImm, Target) -> JSON-able Python values."""
    import tvm

    if isinstance(x, tvm.target.Target):
        return _plain(x.export())
    if isinstance(x, (bool, int, float)) or x is None:
        return x
    if isinstance(x, str):
        return str(x)
    if hasattr(x, "items"):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or hasattr(x, "__len__") and hasattr(x, "__getitem__"):
        return [_plain(v) for v in x]
    if hasattr(x, "value"):
        return _plain(x.value)
    return str(x)


def target_dict(target) -> dict:
    return _plain(target)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_meta(directory: str | os.PathLike, meta: dict) -> None:
    fileio.write_json(Path(directory) / META_FILE, meta)


def _describe(target_json: dict) -> str:
    keys = ("kind", "arch", "mcpu", "mtriple")
    main = " ".join(f"{k}={target_json[k]}" for k in keys if k in target_json)
    host = target_json.get("host")
    return main + (f" (host {_describe(host)})" if isinstance(host, dict) else "")


def _norm_target(target_json: dict) -> dict:
    """Target JSON minus what does not change the generated code's validity (tags, keys, num-cores)."""
    out = {k: v for k, v in target_json.items() if k not in ("tag", "keys", "num-cores", "host")}
    if isinstance(target_json.get("host"), dict):
        out["host"] = _norm_target(target_json["host"])
    return out


def _x86_class(spec_name: str, target_json: dict) -> str | None:
    """The x86-64 class of a CPU target (``host`` or an ``x86-64-v*`` class target) from its TVM target JSON."""
    import targets

    if spec_name != "host" and not spec_name.startswith("x86-64-v"):
        return None
    if target_json.get("kind") != "llvm" or "mtriple" in target_json:
        return None
    mattr = target_json.get("mattr")
    features = None
    if mattr:  # a class target: LLVM's features of -mcpu plus -mattr
        import tvm
        from tvm.target import codegen

        try:
            features = frozenset(str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(target_json)))
        except Exception:  # noqa: BLE001 - an unknown CPU name
            return None
    return targets.record_class(targets.cpu_class(target_json.get("mcpu"), features))


def target_match(meta: dict, spec) -> tuple[str | None, str | None]:
    """``(how, why_not)``: how ``meta``'s target fits ``spec`` (``"exact"``, or ``"same ISA class ..."`` for an x86
    CPU target tuned on another CPU of the same class, :data:`targets.X86_CLASSES` - ``host`` and the class targets
    ``x86-64-v*`` share records of one class), or why it does not."""
    got = meta.get("target", {})
    theirs, ours = _norm_target(got.get("tvm", {})), _norm_target(spec.target_json())
    name = str(got.get("name"))
    if name != spec.name:
        cls = _x86_class(spec.name, ours)
        if cls is None or _x86_class(name, theirs) != cls:
            return None, f"it was tuned for target '{name}', not '{spec.name}'"
        return (f"same ISA class {cls}: tuned as {name} on -mcpu={theirs.get('mcpu')}, this build is {spec.name} "
                f"-mcpu={ours.get('mcpu')} (the schedules apply; the timings were measured there)"), None
    if theirs == ours:
        return "exact", None
    why = (f"it was tuned for {spec.name} as {_describe(got.get('tvm', {}))}, but {spec.name} here is "
           f"{_describe(spec.target_json())}")
    if not _other_cpu(meta, spec):
        return None, why
    cls_theirs, cls_ours = _x86_class(name, theirs), _x86_class(spec.name, ours)
    if cls_ours is None or cls_theirs != cls_ours:
        return None, f"{why} (ISA class {cls_theirs or 'unknown'} vs {cls_ours or 'unknown'})"
    return (f"same ISA class {cls_ours}: tuned on -mcpu={theirs.get('mcpu')}, this CPU is "
            f"-mcpu={ours.get('mcpu')} (the schedules apply; the timings were measured there)"), None


def class_dirs(spec, model_name: str, variant: str, root=None) -> list:
    """Where records of ``spec``'s x86 class may also live: the class target's folder for ``host``
    (``tuning_logs/x86-64-v3/...`` on an AVX2 CPU), ``host``'s folder for a class target."""
    import targets

    if spec.name == "host":
        cls = targets.host_class()
        names = [cls] if cls else []
    elif spec.name.startswith("x86-64-v"):
        names = ["host"]
    else:
        names = []
    return [log_dir(n, model_name, variant, root) for n in names]


def candidate_dirs(spec, model_name: str, variant: str, root=None) -> list:
    """Every folder that may hold records of this model variant for ``spec``, in the order lookup tries them:
    ``tuning_logs/<target>/<model>-<variant>``, its per-CPU siblings ``<model>-<variant>@<mcpu>`` (a database
    holds the measurements of one CPU; a second CPU of the class tunes into its own), then the same under the
    other name of ``spec``'s x86 class (:func:`class_dirs`)."""
    out = []
    for d in [log_dir(spec.name, model_name, variant, root), *class_dirs(spec, model_name, variant, root)]:
        out += [d, *_cpu_siblings(d)]
    return out


def _cpu_siblings(directory: Path) -> list:
    """The per-CPU folders ``<directory>@<mcpu>`` beside ``directory``, by name."""
    return sorted(p for p in directory.parent.glob(f"{directory.name}@*") if p.is_dir())


def measured_threads(meta: dict) -> int:
    """The thread count ``meta``'s records were timed at: the most any tuning session used (a session without the
    field was timed on one thread, TVM's default pool on the 2-vCPU machines those were tuned on)."""
    counts = []
    for session in meta.get("sessions") or [{}]:
        try:
            counts.append(max(1, int(session.get("threads") or 1)))
        except (TypeError, ValueError):
            counts.append(1)
    return max(counts)


def _trials(meta: dict) -> int:
    """The trials ``meta``'s database was tuned with, all sessions (0 where the field is missing or not a number)."""
    try:
        return max(0, int(meta.get("trials") or 0))
    except (TypeError, ValueError):
        return 0


def best_dir(dirs, spec, accept=None, threads: int | None = None):
    """``(directory, how, why_not)``: of ``dirs`` that fit ``spec``, the one whose records were timed nearest
    ``threads`` (default: the threads a build here runs, :func:`compiler.threads.cores` or ``TVM_NUM_THREADS``),
    and of those the first tuned on exactly this target (this CPU), else, of the same x86 class, the one with the
    most trials (a longer search; the first of equals);
    ``(None, None, why)`` with the first reason one was skipped when none fits. ``accept(meta)`` may add a reason
    of its own to skip a folder (None when it fits).

    Threads come first because a schedule timed on one thread was chosen blind to the second: the AVX2 records
    tuned as one core on a Zen 3 ran the shipped model at 1.10 ms on two threads, those tuned on two threads (on
    another CPU of the class) 0.64 ms, the same at one thread (tuning_logs/README.md). Trials decide between
    records of other CPUs: on the Xeon, the AVX2 code of the shipped model ran 0.791 / 0.499 ms (1 / 2 threads) with
    the 2,675-trial ``x86-64-v3`` records and 0.887 / 0.558 with the 1,216-trial Zen 1 ones (``...@znver1``), which a
    2-core Zen 3 took before (both timed on 2 threads, neither on a Zen 3)."""
    if threads is None:
        from compiler import threads as thread_counts

        threads = thread_counts.user_tvm_threads() or thread_counts.cores()
    fitting, why_first = [], None
    for d in dirs:
        if not (d / META_FILE).is_file() or not (d / RECORD_FILE).is_file():
            continue
        meta = read_meta(d)
        how, why = target_match(meta, spec)
        if why is None and accept is not None:
            why = accept(meta)
        if why is not None:
            why_first = why_first or (d, why)
            continue
        fitting.append((abs(measured_threads(meta) - threads), how != "exact", -_trials(meta), len(fitting), d, how))
    if fitting:
        *_, d, how = min(fitting)
        return d, how, None
    return (why_first[0], None, why_first[1]) if why_first else (None, None, None)


def tune_dir(spec, primary: Path) -> Path:
    """Where ``tune`` writes by default: ``primary`` (``tuning_logs/<target>/<model>-<variant>``) when it is free
    or was tuned on this CPU, a sibling ``<primary>@<mcpu>`` already tuned on this CPU, else a new one when
    ``primary`` holds another CPU's measurements, of this CPU's x86 class or of another (records of two CPUs in
    one database would be ranked by timings from different machines; a folder name without a layout hash, such
    as the kernel library's ``kernels-int8-b1``, is shared by the classes, whose lookup keeps them apart)."""
    metas = {d: read_meta(d) for d in [primary, *_cpu_siblings(primary)]}  # None where there is none
    for d, meta in metas.items():
        if meta is not None and target_match(meta, spec)[0] == "exact":
            return d
    meta = metas[primary]
    mcpu = spec.target_json().get("mcpu")
    if meta is None or not mcpu or not _other_cpu(meta, spec):
        return primary  # free, or another target / model altogether: check_meta says why
    return primary.parent / f"{primary.name}@{_safe(mcpu, 'CPU')}"


def _other_cpu(meta: dict, spec) -> bool:
    """Whether ``meta`` was tuned for this very target on another CPU: same target name and TVM target but for
    its ``-mcpu`` and ``-mattr`` (the CPU's features, which the class comparison judges: host adds AMX's where LLVM's
    CPU name lacks them), of this CPU's class or not."""
    got = meta.get("target", {})
    theirs, ours = _norm_target(got.get("tvm", {})), _norm_target(spec.target_json())
    cpu = ("mcpu", "mattr")
    return (str(got.get("name")) == spec.name and ours.get("kind") == "llvm" and "mtriple" not in ours
            and {k: v for k, v in theirs.items() if k not in cpu} == {k: v for k, v in ours.items() if k not in cpu})


def target_mismatch(meta: dict, spec) -> str | None:
    """Why ``meta``'s target does not fit ``spec`` (None when it does, exactly or by ISA class)."""
    return target_match(meta, spec)[1]


def check_meta(meta: dict | None, directory, spec, model_name: str, variant: str) -> None:
    """UserError unless the database in ``directory`` was tuned for this target, model and variant."""
    where = str(directory)
    if meta is None:
        raise UserError(f"{where} has no {META_FILE}: it was not made by `python -m compiler tune`, so it cannot "
                        "be checked against the target and model; tune into it with the tune command or choose "
                        "another tuning log")
    why = target_mismatch(meta, spec)
    if why:
        raise UserError(f"tuning log {where} does not fit: {why}")
    if meta.get("model") != model_name:
        raise UserError(f"tuning log {where} does not fit: it was tuned for model '{meta.get('model')}', "
                        f"not '{model_name}'")
    if meta.get("variant") != variant:
        raise UserError(f"tuning log {where} does not fit: it was tuned for variant {meta.get('variant')} "
                        f"(precision {meta.get('precision')}, batch {meta.get('batch')}), but this build is "
                        f"{variant}: other stripped shapes, precision or batch size")


# ---------------------------------------------------------------------------------------------------------------
# build's side


def find_database(spec, model_name: str, variant: str, explicit_dir: str | os.PathLike | None = None,
                  root: str | os.PathLike | None = None):
    """The tuning database ``build`` should apply: ``(database or None, info)``.

    With ``explicit_dir`` (``build --tuning-log DIR``) that folder must exist and fit (else UserError). Without,
    of ``tuning_logs/<target>/<model>-<variant>/``, its per-CPU siblings ``...@<mcpu>`` and the class folders
    (:func:`candidate_dirs`), the one tuned on this CPU wins, else one of the same x86 class; a log whose target
    differs otherwise (``host`` tuned on a CPU of another class) is skipped with a note rather than failing the
    build; a wrong model or variant in its meta is refused. ``info``: ``path``, ``sha256`` (of the record file), ``tasks_in_db``,
    ``records``, ``trials``, ``seconds``, ``note``.
    """
    explicit = explicit_dir is not None
    directory = Path(explicit_dir) if explicit else log_dir(spec.name, model_name, variant, root)
    info = {"path": None, "sha256": None, "tasks_in_db": 0, "records": 0, "trials": 0, "seconds": 0.0,
            "note": None}
    if not explicit:  # this CPU's records first, then another CPU's of the same x86 class
        found, _, _ = best_dir(candidate_dirs(spec, model_name, variant, root), spec)
        directory = found or directory
    if not directory.is_dir():
        if explicit:
            raise UserError(f"tuning log {directory} does not exist")
        info["note"] = f"untuned: no tuning log at {shown(directory)} (see `python -m compiler tune`)"
        return None, info
    if not (directory / WORKLOAD_FILE).is_file() or not (directory / RECORD_FILE).is_file():
        if explicit:
            raise UserError(f"tuning log {directory} holds no MetaSchedule database ({WORKLOAD_FILE} + {RECORD_FILE})")
        info["note"] = f"untuned: {shown(directory)} holds no database yet (a tune stopped before its first trial?)"
        return None, info
    meta = read_meta(directory)
    how, why_not = target_match(meta, spec) if meta is not None else (None, None)
    if not explicit and why_not:
        info["note"] = f"untuned: {shown(directory)} skipped, {why_not}"
        return None, info
    check_meta(meta, directory, spec, model_name, variant)
    db = open_database(directory)
    counts = summarize(directory)
    info.update(path=str(directory), sha256=fileio.sha256_file(directory / RECORD_FILE),
                tasks_in_db=counts["tasks_in_db"], records=counts["records"],
                trials=int(meta.get("trials", counts["records"])), seconds=float(meta.get("seconds", 0.0)),
                match=how, note=f"MetaSchedule database {shown(directory)} ({how})")
    return db, info


def tasks_applied(mod, spec, database, first=None) -> dict:
    """How many of ``mod``'s kernels ``database`` schedules when built for ``spec``: runs the build's front half
    and MetaScheduleApplyDatabase, then counts the PrimFuncs marked scheduled. ``{"applied", "tasks", "missing",
    "fixed"}`` (distinct kernels; a kernel used twice counts once; ``fixed``: kernels the pipeline schedules
    itself, the int8 layout kernels of passes.schedule_layout, which are not tuning tasks). With ``first`` (the
    database :func:`combine` put first in ``database``), also ``first_applied``: how many ``first`` alone
    schedules, from the same front half."""
    import tvm_ffi
    from tvm import tirx

    from passes.patterns import is_scheduled
    from passes.vnni import CONV_NAME
    from targets.pipeline import pipeline

    target = spec.tvm_target()
    legal = pipeline(spec).legalize(target)(mod)  # the same passes the build runs before applying a database
    applied_mods = [_apply(legal, target, db) for db in (database, first) if db is not None]
    seen: dict[int, tuple[str, list[bool]]] = {}
    fixed, amx = set(), set()
    for gv, func in legal.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        key = tvm_ffi.structural_hash(func.with_attr("global_symbol", "main"))
        if is_scheduled(func):  # scheduled by the pipeline itself (passes.schedule_layout, passes.amx): not a task
            fixed.add(key)
            if CONV_NAME in gv.name_hint:  # a packed conv2d: on AMX tiles
                amx.add(key)
            continue
        name, was = seen.get(key, (gv.name_hint, [False] * len(applied_mods)))
        seen[key] = (name, [w or is_scheduled(m[gv]) for w, m in zip(was, applied_mods)])
    missing = sorted(name for name, ok in seen.values() if not ok[0])
    out = {"applied": len(seen) - len(missing), "tasks": len(seen), "missing": missing, "fixed": len(fixed),
           "fixed_amx": len(amx)}
    if first is not None:
        out["first_applied"] = sum(ok[1] for _, ok in seen.values())
    return out


def _apply(legal, target, database):
    """``legal`` with ``database``'s schedules applied (MetaScheduleApplyDatabase, as the build does)."""
    import tvm

    from targets.pipeline import apply_database_passes

    database = open_database(database)  # registers the tensor intrinsics the traces replay with
    with target, database:
        return tvm.transform.Sequential(apply_database_passes(database))(legal)


def shown(path: str | os.PathLike) -> str:
    """``path`` relative to the project when it lies inside it (tuning_logs/...), else as given."""
    try:
        return str(Path(path).resolve().relative_to(DEFAULT_ROOT.parent))
    except ValueError:
        return str(path)


def manifest_entry(info: dict, applied: dict | None, library: dict | None = None) -> dict:
    """What build's manifest ``tuning`` should say, from :func:`find_database`'s info, :func:`find_library`'s
    (``library``), and :func:`tasks_applied` of what the build applied (the model's database and the library
    together, the model's database ``first``)."""
    lib = None
    if library is not None and library.get("path") is not None:
        lib = {"database": shown(library["path"]), "sha256": library["sha256"], "match": library.get("match"),
               "tasks_applied": applied["applied"] - applied.get("first_applied", 0) if applied else None}
    counts = {"tasks_applied": applied["applied"] if applied else 0, "tasks": applied["tasks"] if applied else None,
              "fixed_schedules": applied.get("fixed", 0) if applied else None,
              "amx_conv2d": applied.get("fixed_amx", 0) if applied else None}
    if info.get("path") is None:
        return {"database": None, "sha256": None, "library": lib, **counts, "trials": 0,
                "note": info.get("note") if lib is None else library.get("note")}
    return {"database": shown(info["path"]), "sha256": info["sha256"], "match": info.get("match"), "library": lib,
            **counts, "trials": info.get("trials"), "tuning_seconds": info.get("seconds"), "note": info.get("note")}


# ---------------------------------------------------------------------------------------------------------------
# the kernel library (compiler.tuning.library): records for every kernel a pruned CIFAR ResNet can contain


def library_dir(target_name: str, precision: str, batch: int, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<target>/kernels-<precision>-b<batch>``: where ``tune --library`` writes and ``build`` looks."""
    from compiler.tuning.library import LIBRARY_MODEL

    return log_dir(target_name, LIBRARY_MODEL, f"{_safe(precision, 'precision')}-b{int(batch)}", root)


def find_library(spec, precision: str, batch: int, root: str | os.PathLike | None = None):
    """The kernel library ``build`` adds under a model's own database: ``(database or None, info)``, from
    ``tuning_logs/<target>/kernels-<precision>-b<batch>`` or the folder of the same x86 class under the other
    name (``host`` / ``x86-64-v*``), when its meta says it was tuned for this target (exactly or by ISA class),
    precision and batch. ``info``: ``path``, ``sha256``, ``match``, ``note``."""
    from compiler.tuning.library import LIBRARY_MODEL

    info = {"path": None, "sha256": None, "match": None, "note": None}
    variant = f"{_safe(precision, 'precision')}-b{int(batch)}"

    def is_library(meta):
        if (meta.get("model"), meta.get("precision"), meta.get("batch")) != (LIBRARY_MODEL, precision, int(batch)):
            return f"it is not a {precision} batch-{batch} kernel library"
        return None

    directory, how, why = best_dir(candidate_dirs(spec, LIBRARY_MODEL, variant, root), spec, is_library)
    if how is not None:
        info.update(path=str(directory), sha256=fileio.sha256_file(directory / RECORD_FILE), match=how,
                    note=f"kernel library {shown(directory)} ({how})")
        return open_database(directory), info
    why = f"{shown(directory)}: {why}" if why else None
    info["note"] = (f"no kernel library for {spec.name} {precision} batch {batch}" + (f" ({why})" if why else "")
                    + f": `python -m compiler tune --library --target {spec.name} --precision {precision}"
                    + (f" --batch {int(batch)}" if int(batch) != 1 else "") + "` makes one")
    return None, info


def combine(database, library):
    """``database`` first, ``library`` for the kernels it lacks (either may be None): what build applies. One
    in-memory database (not a union), so that its records can also be keyed by anchor block
    (:func:`passes.apply_by_anchor.by_anchor_block`)."""
    if database is None or library is None:
        return database if library is None else library
    from tvm.s_tir import meta_schedule as ms

    first, second = open_database(database), open_database(library)
    out = ms.database.MemoryDatabase()
    for db, only_new in ((first, False), (second, True)):
        for record in db.get_all_tuning_records():
            if only_new and first.has_workload(record.workload.mod):
                continue
            workload = out.commit_workload(record.workload.mod)
            out.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, record.run_secs,
                                                              record.target, record.args_info))
    return out
