"""``report``: the paper's table per model - baseline, pruned, pruned + int8 - measured on compiled artifacts.

For every model with a baseline checkpoint (``--checkpoint``, else the one shipped in compiler/zoo), three stages
are built with ``build`` for ``--target`` (default ``host``, this machine): the baseline in fp32, the pruned model
in fp32 and in int8. The pruned checkpoint is ``--pruned``; without one the baseline is pruned here one-shot
(``prune --flops-reduction R --finetune-epochs 0``: no fine-tuning, said loudly in the table).

Per stage: top-1 on the CIFAR-10 test set measured on a compiled artifact (the faster per image of the two built;
the same number ``eval --artifact`` prints for it), MACs and parameters (counted on the compiled Relax IR, from the
manifest), file size (model.so) and weight bytes, batch-1 latency and batch-64 throughput (the TVM engine of
:mod:`compiler.engines`). Written to ``--out``: report.md, report.json, accuracy_vs_flops.png,
latency_per_stage.png (:mod:`compiler.render`), and the artifacts (``artifacts/``) and any one-shot pruned
checkpoint they came from.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler import console, data, fileio, precision, render
from compiler.build import BuildSettings, QuantSettings
from compiler.engines import Timing
from compiler.errors import SettingError, UserError

STAGES = (  # (stage, which checkpoint, precision)
    ("baseline", "dense", "fp32"),
    ("pruned", "pruned", "fp32"),
    ("pruned + int8", "pruned", "int8"),
)
FILES = ("report.md", "report.json", "accuracy_vs_flops.png", "latency_per_stage.png")
REPORT_FORMAT = "cifar-hybrid-compiler/report"


@dataclass(frozen=True)
class ReportSettings:
    """What report builds and measures; validated when made."""

    out: str | Path
    models: tuple[str, ...] = ()  # default: those shipped in compiler/zoo, else resnet56
    checkpoints: tuple[str | Path, ...] = ()  # one per model, in order (default: the shipped one)
    pruned: tuple[str | Path, ...] = ()  # one per model, in order (default: prune the baseline one-shot here)
    normalize: str | None = None
    data: str | Path | None = None
    download: bool = False
    target: str = "host"
    limit_test: int | None = None
    flops_reduction: float = 0.5
    timing: Timing = Timing()  # batch-1 latency
    throughput: Timing = Timing(repeat=3, number=1, warmup=1)  # warmup: at most 1 at the throughput batch
    throughput_batch: int = 64
    threads: int | None = None
    quant: QuantSettings = QuantSettings()
    command: str | None = None  # what report.json records as the command

    def __post_init__(self):
        from compiler import models

        object.__setattr__(self, "models", tuple(models.check_name(n) for n in (self.models or _default_models())))
        BuildSettings(target=self.target, batch=1)
        from compiler.build import check_batch

        check_batch(self.throughput_batch, "throughput_batch")
        if self.limit_test is not None and self.limit_test <= 0:
            raise SettingError("limit_test", "must be a positive number of images")
        if not 0.0 < self.flops_reduction < 1.0:
            raise SettingError("flops_reduction", f"must be a fraction in (0, 1), got {self.flops_reduction}")
        if self.threads is not None and self.threads <= 0:
            raise SettingError("threads", "must be positive")
        for name in ("checkpoints", "pruned"):
            given = tuple(getattr(self, name) or ())
            object.__setattr__(self, name, given)
            if len(given) > len(self.models):
                raise SettingError(name.rstrip("s"), f"lists {len(given)} for {len(self.models)} model(s): give one per model")
        import targets

        spec = targets.get(self.target)
        if spec.kind != "cpu" or spec.cross_compiled:
            raise SettingError("target", f"{self.target} does not run here, and report measures on this machine "
                                         "(use host)")


def is_report_dir(folder: Path) -> bool:
    """A folder `report` wrote (its report.json), or one holding only what report writes (an interrupted run)."""
    try:
        info = json.loads((folder / "report.json").read_text())
        if isinstance(info, dict) and (info.get("format") == REPORT_FORMAT or "rows" in info and
                                       str(info.get("command", "")).startswith("python -m compiler report")):
            return True
    except (OSError, ValueError):
        pass
    return all(p.name.startswith(".") or p.name in FILES or p.name == "artifacts" or
               p.name.endswith("-pruned-oneshot.pt") for p in folder.iterdir())


def _default_models() -> list[str]:
    from compiler import zoo

    return [c["model"] for c in zoo.shipped()] or [zoo.DEFAULT_MODEL]


def _slug(stage: str) -> str:
    return stage.replace(" + ", "-").replace(" ", "-")


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def prune_one_shot(base, s: ReportSettings, out: Path) -> str:
    """A one-shot prune of ``base`` (l1, BN re-estimation, no fine-tuning) into ``out``; its path."""
    from compiler.prune.job import PruneSettings, prune

    settings = PruneSettings(flops_reduction=s.flops_reduction, out=out, finetune_epochs=0, data=s.data,
                             limit_test=s.limit_test)
    if out.exists():  # our own file from an earlier report: prune afresh (the baseline may have changed)
        out.unlink()
    prune(base, settings, progress=False)
    return str(out)


def resolve(s: ReportSettings) -> list[dict]:
    """Per model: name, baseline Checkpoint, pruned Checkpoint (or None: prune here); models without a baseline
    are skipped with a warning."""
    from compiler import zoo
    from compiler.pair import check_dense, pruned_for

    plans, errors = [], []
    for i, name in enumerate(s.models):
        ck_path = s.checkpoints[i] if i < len(s.checkpoints) else None
        pr_path = s.pruned[i] if i < len(s.pruned) else None
        try:
            base = zoo.load(name, ck_path, s.normalize, quiet=True)
        except UserError as e:
            if ck_path is not None:
                raise
            errors.append(f"{name}: {e}")
            continue
        check_dense(base)
        plans.append({"model": base.model_name, "baseline": base,
                      "pruned": pruned_for(base, pr_path, s.normalize, quiet=True)})
    if not plans:
        raise UserError("no model has a baseline checkpoint (" + "; ".join(errors) + ")")
    for e in errors:
        console.warn(f"skipped {e}")
    return plans


# ---------------------------------------------------------------------------------------------------------------
# measuring


def _kernels(manifest: dict) -> str:
    t = manifest.get("tuning") or {}
    return f"tuned {t.get('tasks_applied')}/{t.get('tasks')}" if t.get("database") or t.get("library") else "untuned"


def build_stage(plan: dict, stage: str, kind: str, prec: str, s: ReportSettings, out: Path) -> dict:
    """The stage's artifacts at batch 1 and at the throughput batch: ``{batch: folder}``."""
    from compiler.compare import build_artifact

    ck = plan["baseline"] if kind == "dense" else plan["pruned"]
    folders = {}
    for batch in sorted({1, s.throughput_batch}):
        folder = out / "artifacts" / f"{plan['model']}-{_slug(stage)}-b{batch}"
        build_artifact(ck, prec, batch, folder, data_dir=s.data, quant=s.quant, target=s.target)
        folders[batch] = folder
    return folders


def time_stage(folders: dict, s: ReportSettings, x: np.ndarray) -> tuple[dict, dict, dict, dict]:
    """Batch-1 latency and throughput-batch stats, and the two manifests."""
    from compiler.engines.tvm import TVM

    tb = s.throughput_batch
    lat_engine = TVM(folders[1])  # at the thread count its build recorded, unless threads are given
    lat_engine.prepare(s.threads or 0)
    lat = lat_engine.time(x[:1], s.timing)
    thr_engine = TVM(folders[tb])
    thr_engine.prepare(s.threads or 0)
    thr = thr_engine.time(x[np.resize(np.arange(len(x)), tb)], s.throughput)
    return lat, thr, lat_engine.manifest, thr_engine.manifest


def measure_stage(plan: dict, stage: str, kind: str, prec: str, s: ReportSettings, out: Path, first_images) -> dict:
    from compiler import artifact
    from compiler.compare import normalized
    from compiler.engines.tvm import tuning_note

    ck = plan["baseline"] if kind == "dense" else plan["pruned"]
    folders = build_stage(plan, stage, kind, prec, s, out)
    lat, thr, m1, m_t = time_stage(folders, s, normalized(first_images, ck.normalize))
    tb = s.throughput_batch
    per_image = {1: lat["median_ms"], tb: thr["median_ms"] / tb}
    acc_batch = min(per_image, key=lambda b: (per_image[b], b))
    acc = artifact.evaluate(folders[acc_batch], s.data, limit=s.limit_test, progress=False)
    return {
        "model": plan["model"],
        "stage": stage,
        "precision": m1["precision"],
        "top1": acc["top1"],
        "n_test": acc["n"],
        "macs": m1["flops"]["compiled"],
        "macs_dense": m1["flops"]["dense"],
        "params": m1["params"]["compiled"],
        "so_bytes": (folders[1] / m1["artifact"]["file"]).stat().st_size,
        "weight_bytes": m1["weight_bytes"]["compiled"],
        "latency_ms": lat["median_ms"],
        "latency_p90_ms": lat["p90_ms"],
        "throughput_batch": tb,
        "throughput_ips": round(1e3 * tb / thr["median_ms"], 1),
        "throughput_call_ms": thr["median_ms"],
        "tuning_b1": tuning_note(m1),
        "tuning_throughput": tuning_note(m_t),
        "kernels_b1": _kernels(m1),
        "kernels_throughput": _kernels(m_t),
        "accuracy_artifact": str(folders[acc_batch]),
        "accuracy_seconds": acc["seconds"],
        "artifacts": {str(b): str(f) for b, f in folders.items()},
        "checkpoint": str(ck.path),
        "max_abs_diff_vs_pytorch": m1["verification"]["max_abs_diff"],
    }


def peer_rows(plan: dict, s: ReportSettings, counts: list[int]) -> list[dict]:
    """compare's CPU peers at batch 1 on the plan's dense and pruned models: PyTorch eager (fp32), ONNX Runtime
    and OpenVINO (fp32, and the pruned model's static int8 QDQ), each at its fastest thread count."""
    import tempfile

    from compiler.compare import CompareSettings, bench_for, onnx_engine_rows, onnx_files, pytorch_rows

    cs = CompareSettings(data=s.data, batch=1, timing=s.timing, threads=s.threads, quant=s.quant)
    b = bench_for(plan["baseline"], plan["pruned"], cs, 1, counts)
    with tempfile.TemporaryDirectory(prefix="report-onnx-") as work:
        b.work = Path(work)
        rows = pytorch_rows(b) + onnx_files(b, plan["model"], s.data, s.quant)
        rows += onnx_engine_rows(b, "onnxruntime") + onnx_engine_rows(b, "openvino")
    return rows


def with_peer(row: dict, peers: list[dict], kind: str) -> dict:
    """``row`` with the fastest CPU peer on the same model (any engine, any precision) and TVM's speed-up on it."""
    got = [p for p in peers if p["available"] and p["model"] == kind]
    best = min(got, key=lambda p: p["median_ms"]) if got else None
    return {**row, "peers_b1_ms": {f"{p['engine']} {p['precision']}": p["median_ms"] for p in got},
            "best_peer": f"{best['engine']} {best['precision']}" if best else None,
            "best_peer_ms": best["median_ms"] if best else None,
            "vs_best_peer": round(best["median_ms"] / row["latency_ms"], 2) if best else None}


# ---------------------------------------------------------------------------------------------------------------
# the orchestration


def _pruned_here(plan: dict, s: ReportSettings, out: Path) -> str:
    """Prune the plan's baseline one-shot (its pruned checkpoint becomes the plan's); the note saying so."""
    from compiler import checkpoint

    name, base = plan["model"], plan["baseline"]
    path = prune_one_shot(base, s, out / f"{name}-pruned-oneshot.pt")
    plan["pruned"] = checkpoint.load_checkpoint(path, name, s.normalize)
    return (f"{name}: no --pruned given, so the pruned stages are the baseline pruned here ONE-SHOT "
            f"(l1, {s.flops_reduction:.0%} of the FLOPs, BN re-estimated, NO fine-tuning): their "
            f"accuracy is not what fine-tuning reaches ({path})")


def stage_notes(rows: list[dict], s: ReportSettings, n_test: int) -> list[str]:
    notes = []
    for r in rows:  # a tuned batch-1 build beside an untuned batch-N one: say why batching looks slower
        if r["throughput_ips"] < 1e3 / r["latency_ms"] and r["kernels_b1"] != r["kernels_throughput"]:
            notes.append(f"{r['model']} {r['stage']}: batch-{r['throughput_batch']} throughput "
                         f"({r['throughput_ips']:g} img/s) is below the batch-1 rate "
                         f"({1e3 / r['latency_ms']:.1f} img/s = 1000 / {r['latency_ms']:g} ms): the batch-1 build is "
                         f"{r['kernels_b1']}, the batch-{r['throughput_batch']} build {r['kernels_throughput']}")
    if s.limit_test:
        notes.append(f"top-1 on the first {s.limit_test:,} test images only (--limit-test), not all {n_test:,}")
    return notes


def report(s: ReportSettings, *, progress: bool = True) -> dict:
    """Build and measure every stage of every model; report.md, report.json and the plots written into
    ``s.out``; the result (``rows``, ``notes``, what it ran on)."""
    import torch
    import tvm

    from compiler.compare import machine, thread_counts

    counts = thread_counts(s.threads)  # sizes TVM's pool before anything runs
    t_start, start_machine = time.perf_counter(), machine()
    out = Path(s.out).expanduser().resolve()
    fileio.check_output(out, is_ours=is_report_dir, what="report of this project (with its report.json)",
                        inputs=(*s.checkpoints, *s.pruned, s.data))
    plans = resolve(s)
    test = data.load_split(s.data, "test", download=s.download)  # fail early without data
    first_images = test.images[:max(1, min(len(test), s.throughput_batch))]
    precision.calibration_images(s.data, plans[0]["baseline"].normalize, 1)  # int8 needs training images
    out.mkdir(parents=True, exist_ok=True)
    notes, rows = [], []
    steps = console.progress(total=len(plans) * len(STAGES), desc="report", unit="stage", leave=False,
                             disable=not progress or None)
    for plan in plans:
        one_shot = plan["pruned"] is None
        if one_shot:
            steps.set_postfix_str(f"{plan['model']}: one-shot prune")
            notes.append(_pruned_here(plan, s, out))
            console.warn(notes[-1])
        steps.set_postfix_str(f"{plan['model']}: CPU peers")
        peers = peer_rows(plan, s, counts)  # before this model's TVM runs (its threads keep spinning)
        notes += [f"{plan['model']}: {p['engine']} {p['reason']}" for p in peers if not p["available"]]
        for stage, kind, prec in STAGES:
            steps.set_postfix_str(f"{plan['model']}: {stage}")
            row = {**measure_stage(plan, stage, kind, prec, s, out, first_images),
                   "one_shot": one_shot and kind == "pruned"}
            rows.append(with_peer(row, peers, kind))
            steps.update()
    steps.close()
    notes += stage_notes(rows, s, len(test))
    result = {
        "format": REPORT_FORMAT,
        "out": str(out),
        "target": s.target,
        "command": s.command or "python -m compiler report (called in-process)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "limit_test": s.limit_test,
        "timing": {"repeat": s.timing.repeat, "number": s.timing.number, "warmup": s.timing.warmup,
                   "throughput_batch": s.throughput_batch, "throughput_repeat": s.throughput.repeat,
                   "throughput_number": s.throughput.number},
        "calibration": {"images": s.quant.calib_images, "method": s.quant.calibration,
                        "keep_fp32": ",".join(s.quant.keep_fp32)},
        "flops_unit": "multiply-accumulates per image, counted on the compiled Relax IR",
        "versions": {"tvm": tvm.__version__, "torch": torch.__version__},
        "machine": start_machine,
        "notes": notes,
        "rows": rows,
        "files": [str(out / f) for f in FILES],
    }
    write_files(result, out, t_start)
    return result


def write_files(result: dict, out: Path, t_start: float) -> None:
    """The plots, report.md and report.json (``machine_at_end`` and ``seconds`` are added to ``result``)."""
    from compiler.compare import machine

    rows = result["rows"]
    render.plot_accuracy_vs_flops(rows, out / "accuracy_vs_flops.png")
    render.plot_latency(rows, out / "latency_per_stage.png")
    result["machine_at_end"] = machine()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    fileio.write_text(out / "report.md", render.report_markdown(result, render.report_rows(rows)))
    fileio.write_json(out / "report.json", result)
