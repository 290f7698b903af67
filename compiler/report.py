"""``report``: the paper's table per model - baseline, pruned, pruned + int8 - measured on compiled artifacts.

For every model with a baseline checkpoint (``--checkpoint``, else the one shipped in compiler/zoo), three stages
are built with ``build`` for ``--target`` (default ``host``, this machine): the baseline in fp32, the pruned model
in fp32 and in int8. The pruned checkpoint is ``--pruned``; without one the baseline is pruned here one-shot
(``prune --flops-reduction R --finetune-epochs 0``: no fine-tuning, said loudly in the table).

Per stage: top-1 on the CIFAR-10 test set measured on a compiled artifact (the faster per image of the two built;
the same number ``eval --artifact`` prints for it), MACs and parameters (counted on the compiled Relax IR, from the
manifest), file size (model.so) and weight bytes, batch-1 latency and batch-64 throughput with TVM's
time_evaluator. Written to ``--out``: report.md, report.json, accuracy_vs_flops.png, latency_per_stage.png, and
the artifacts (``artifacts/``) and any one-shot pruned checkpoint they came from.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from compiler import bench, cli, console, data, fileio, precision
from compiler.errors import UserError

STAGES = (  # (stage, which checkpoint, precision)
    ("baseline", "dense", "fp32"),
    ("pruned", "pruned", "fp32"),
    ("pruned + int8", "pruned", "int8"),
)
FILES = ("report.md", "report.json", "accuracy_vs_flops.png", "latency_per_stage.png")
REPORT_FORMAT = "cifar-hybrid-compiler/report"


def configure(p) -> None:
    p.add_argument("--models", nargs="+", metavar="M", default=None,
                   help="models to report (default: those shipped in compiler/zoo, else resnet56)")
    p.add_argument("--checkpoint", action="append", metavar="CKPT", default=None,
                   help="baseline checkpoint, one per --models entry in the same order (default: the shipped one)")
    p.add_argument("--pruned", action="append", metavar="PRUNED", default=None,
                   help="pruned checkpoint (the output of `prune`), one per --models entry in the same order "
                        "(default: prune the baseline one-shot here, without fine-tuning)")
    p.add_argument("--normalize", choices=("cifar", "imagenet"), default=None,
                   help="input mean/std the checkpoints were trained with (default: what they record, else cifar)")
    cli.add_data_args(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for report.md, report.json, the plots and the artifacts")
    p.add_argument("--target", default="host", help="a target this machine runs (default host)")
    p.add_argument("--limit-test", type=int, default=None, metavar="K",
                   help="top-1 on the first K test images only (default: all 10,000)")
    p.add_argument("--flops-reduction", type=float, default=0.5, metavar="R",
                   help="one-shot pruning when a model has no --pruned (default %(default)s)")
    g = p.add_argument_group("timing")
    g.add_argument("--repeat", type=int, default=30, help="batch-1 latency: timed runs (default %(default)s)")
    g.add_argument("--number", type=int, default=3, help="batch-1 latency: calls per timed run")
    g.add_argument("--warmup", type=int, default=3)
    g.add_argument("--throughput-batch", type=int, default=64, metavar="N", help="batch for throughput (64)")
    g.add_argument("--throughput-repeat", type=int, default=3, help="throughput: timed runs (default %(default)s)")
    g.add_argument("--throughput-number", type=int, default=1, help="throughput: calls per timed run")
    from compiler.build import add_quantization_args
    from compiler.compare import add_threads_arg

    add_threads_arg(p)
    add_quantization_args(p)
    cli.add_json_arg(p)


def _check_args(args) -> None:
    for flag in ("repeat", "number", "throughput_batch", "throughput_repeat", "throughput_number"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    from compiler.build import check_batch

    check_batch(args.throughput_batch, "--throughput-batch")
    if args.warmup < 0:
        raise UserError("--warmup must be 0 or more")
    if args.limit_test is not None and args.limit_test <= 0:
        raise UserError("--limit-test must be a positive number of images")
    if not 0.0 < args.flops_reduction < 1.0:
        raise UserError(f"--flops-reduction must be a fraction in (0, 1), got {args.flops_reduction}")
    for flag in ("checkpoint", "pruned"):
        given = getattr(args, flag) or []
        if len(given) > len(args.models):
            raise UserError(f"{len(given)} --{flag} for {len(args.models)} model(s): give one per --models entry")
    import targets

    spec = targets.get(args.target)
    if spec.kind != "cpu" or spec.cross_compiled:
        raise UserError(f"report measures on this machine: --target {args.target} does not run here "
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


def prune_one_shot(name: str, checkpoint: str, normalize: str, args, out: Path) -> str:
    """``prune --flops-reduction R --finetune-epochs 0`` (l1, BN re-estimation) into ``out``; its path."""
    from compiler.prune import cli as prune_cli

    p = cli._Parser(prog="prune")
    prune_cli.configure(p)
    argv = ["--model", name, "--checkpoint", str(checkpoint), "--normalize", normalize,
            "--flops-reduction", str(args.flops_reduction), "--finetune-epochs", "0", "--out", str(out)]
    if args.data:
        argv += ["--data", str(args.data)]
    if args.limit_test:
        argv += ["--limit-test", str(args.limit_test)]
    if out.exists():  # our own file from an earlier report: prune afresh (the baseline may have changed)
        out.unlink()
    with contextlib.redirect_stdout(io.StringIO()):
        prune_cli.run(p.parse_args(argv))
    return str(out)


def resolve(args) -> list[dict]:
    """Per model: name, baseline Checkpoint, pruned checkpoint path (or None: prune here), or a skip note."""
    from compiler import models, zoo
    from compiler.compare import check_dense, pruned_for

    names = [models.check_name(n) for n in args.models]  # an unknown name is a mistake, not a skip
    plans, errors = [], []
    for i, name in enumerate(names):
        ck_path = (args.checkpoint or [])[i] if i < len(args.checkpoint or []) else None
        pr_path = (args.pruned or [])[i] if i < len(args.pruned or []) else None
        try:
            base = zoo.load(name, ck_path, args.normalize)
        except UserError as e:
            if ck_path is not None:
                raise
            errors.append(f"{name}: {e}")
            continue
        check_dense(base)
        pruned = pruned_for(base, pr_path, args.normalize)
        plans.append({"model": base.model_name, "baseline": base, "pruned": pruned})
    if not plans:
        raise UserError("no model has a baseline checkpoint (" + "; ".join(errors) + ")")
    for e in errors:
        console.warn(f"skipped {e}")
    return plans


# ---------------------------------------------------------------------------------------------------------------
# measuring


def _evaluate(folder: Path, args) -> dict:
    """What ``eval --artifact folder --data ... [--limit K]`` computes (the same function, its table muted)."""
    from compiler import artifact

    ns = argparse.Namespace(artifact=str(folder), data=args.data, download=False, limit=args.limit_test,
                            batch_size=500)
    with contextlib.redirect_stdout(io.StringIO()):
        return artifact.evaluate(ns)


def _kernels(manifest: dict) -> str:
    t = manifest.get("tuning") or {}
    return f"tuned {t.get('tasks_applied')}/{t.get('tasks')}" if t.get("database") else "untuned"


def measure_stage(plan: dict, stage: str, kind: str, prec: str, args, out: Path, first_images) -> dict:
    from compiler import artifact, threads
    from compiler.compare import build_artifact, normalized, tuning_note

    ck = plan["baseline"] if kind == "dense" else plan["pruned"]
    name = plan["model"]
    folders = {}
    for batch in sorted({1, args.throughput_batch}):
        folder = out / "artifacts" / f"{name}-{_slug(stage)}-b{batch}"
        with contextlib.redirect_stdout(io.StringIO()):
            build_artifact(plan["pruned_path"] if kind == "pruned" else ck.path, name, prec, batch, folder,
                           data_dir=args.data, normalize=ck.normalize, calib_images=args.calib_images,
                           calibration=args.calibration, keep_fp32=args.keep_fp32, target=args.target)
        folders[batch] = folder
    exe1, m1 = artifact.load_local(folders[1])
    if args.threads:
        threads.set_tvm(args.threads)
    x = normalized(first_images, ck.normalize)
    lat = bench.time_tvm(exe1, 1, args.repeat, args.number, args.warmup, x=x[:1])
    tb = args.throughput_batch
    exe_t, m_t = artifact.load_local(folders[tb])
    if args.threads:
        threads.set_tvm(args.threads)
    xt = x[np.resize(np.arange(len(x)), tb)]
    thr = bench.time_tvm(exe_t, tb, args.throughput_repeat, args.throughput_number, min(args.warmup, 1), x=xt)
    per_image = {1: lat["median_ms"], tb: thr["median_ms"] / tb}
    acc_batch = min(per_image, key=lambda b: (per_image[b], b))
    acc = _evaluate(folders[acc_batch], args)
    so = folders[1] / m1["artifact"]["file"]
    return {
        "model": name,
        "stage": stage,
        "precision": m1["precision"],
        "top1": acc["top1"],
        "n_test": acc["n"],
        "macs": m1["flops"]["compiled"],
        "macs_dense": m1["flops"]["dense"],
        "params": m1["params"]["compiled"],
        "so_bytes": so.stat().st_size,
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
        "checkpoint": str(plan["pruned_path"] if kind == "pruned" else ck.path),
        "max_abs_diff_vs_pytorch": m1["verification"]["max_abs_diff"],
    }


# ---------------------------------------------------------------------------------------------------------------
# output


def table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        out.append({
            "model": r["model"],
            "stage": r["stage"] + (" (one-shot, no fine-tuning)" if r.get("one_shot") else ""),
            "top-1 %": r["top1"],
            "test images": r["n_test"],
            "MMACs": round(r["macs"] / 1e6, 2),
            "params": r["params"],
            "model.so MB": round(r["so_bytes"] / 1e6, 3),
            "weights MB": round(r["weight_bytes"] / 1e6, 3),
            "b1 latency ms": r["latency_ms"],
            f"b{r['throughput_batch']} img/s": r["throughput_ips"],
            f"kernels b1 / b{r['throughput_batch']}": f"{r['kernels_b1']} / {r['kernels_throughput']}",
        })
    return out


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |",
             "| " + " | ".join("---:" if isinstance(rows[0][c], (int, float)) else "---" for c in cols) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(console._fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_flops(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    markers = {"baseline": "o", "pruned": "s", "pruned + int8": "^"}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        ax.plot([r["macs"] / 1e6 for r in mine], [r["top1"] for r in mine], ":", color="grey", lw=1)
        for r in mine:
            ax.scatter(r["macs"] / 1e6, r["top1"], marker=markers.get(r["stage"], "o"), s=60, zorder=3,
                       label=f"{model} {r['stage']}")
            ax.annotate(f"{r['top1']:.2f}", (r["macs"] / 1e6, r["top1"]), textcoords="offset points",
                        xytext=(6, -10 if "int8" in r["stage"] else 4), fontsize=8)
    n = sorted({r["n_test"] for r in rows})
    ax.set_xlabel("MMACs per image (compiled)")
    ax.set_ylabel(f"top-1 % (compiled artifact, {'/'.join(f'{k:,}' for k in n)} test images)")
    ax.set_title("accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_latency(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4.3), dpi=100)
    bars = a1.bar(range(len(rows)), [r["latency_ms"] for r in rows], color="tab:blue")
    a1.bar_label(bars, fmt="%.3g", fontsize=8)
    a1.set_ylabel("batch-1 latency, median ms (lower is better)")
    bars = a2.bar(range(len(rows)), [r["throughput_ips"] for r in rows], color="tab:green")
    a2.bar_label(bars, fmt="%.4g", fontsize=8)
    a2.set_ylabel(f"batch-{rows[0]['throughput_batch']} throughput, images/s (higher is better)")
    for a, kernels in ((a1, "kernels_b1"), (a2, "kernels_throughput")):
        a.set_xticks(range(len(rows)), [f"{r['model']}\n{r['stage']}\n({r[kernels]})" for r in rows], fontsize=8)
        a.grid(axis="y", alpha=0.3)
    fig.suptitle("latency and throughput per stage (TVM, this machine)")
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_markdown(result: dict, shown: list[dict], path: Path) -> None:
    m = result["machine"]
    rows = result["rows"]
    n = sorted({r["n_test"] for r in rows})
    lines = [
        f"# Report: {', '.join(dict.fromkeys(r['model'] for r in rows))} - baseline, pruned, pruned + int8",
        "",
        f"Made by `python -m compiler report` on {result['created']} in {result['seconds']:.0f} s.",
        "",
        "    " + result["command"],
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['platform']}; load average (1/5/15 min) "
        f"{m.get('load_average_1_5_15')} at the start, {result['machine_at_end'].get('load_average_1_5_15')} at "
        f"the end; TVM threads: " + (f"TVM_NUM_THREADS={m['tvm_num_threads_env']} (set by the user)"
                                     if m.get("tvm_num_threads_env") else
                                     "each artifact's recorded fastest count (manifest runtime.threads)") + ". "
        f"TVM {result['versions']['tvm']}, torch {result['versions']['torch']}, target `{result['target']}`.",
        "",
        markdown_table(shown),
        "",
        "- top-1: measured on the compiled artifact (the faster one per image of the batch-1 and the "
        f"batch-{rows[0]['throughput_batch']} build; `accuracy_artifact` in report.json; `eval --artifact` on it "
        "prints the same) on " + (f"the first {'/'.join(f'{k:,}' for k in n)} CIFAR-10 test images (--limit-test: "
                                  "not the full test set)." if result["limit_test"] else
                                  f"all {'/'.join(f'{k:,}' for k in n)} CIFAR-10 test images."),
        "- MMACs: millions of multiply-accumulates per image, counted on the compiled Relax IR (after pruned "
        "channels are stripped); params likewise. int8 changes neither.",
        "- model.so MB: the compiled library's file size; weights MB: bytes of the constants in the compiled IR "
        "(int8 weights take a quarter).",
        f"- b1 latency: median of {result['timing']['repeat']} runs x {result['timing']['number']} calls "
        f"(TVM time_evaluator, {result['timing']['warmup']} warm-up); "
        f"b{rows[0]['throughput_batch']} img/s: batch / median of {result['timing']['throughput_repeat']} runs x "
        f"{result['timing']['throughput_number']} call(s).",
        "- kernels: `tuned a/b` where a MetaSchedule database from tuning_logs/ applied to a of b kernels of that "
        "build (batch 1 / throughput batch), else `untuned` (TVM's default schedules; `python -m compiler tune` "
        "makes them faster). Tuning is per shape, batch included.",
    ]
    for note in result["notes"]:
        lines.append(f"- **{note}**")
    lines += ["", "![accuracy vs FLOPs](accuracy_vs_flops.png)", "",
              "![latency per stage](latency_per_stage.png)", ""]
    fileio.write_text(path, "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# the verb


def run(args) -> dict:
    import torch
    import tvm

    from compiler import checkpoint
    from compiler.compare import machine, thread_counts

    args.models = args.models or _default_models()
    _check_args(args)
    thread_counts(args.threads)  # validates --threads; sizes TVM's pool before anything runs
    t_start = time.perf_counter()
    start_machine = machine()
    out = Path(args.out).expanduser().resolve()
    fileio.check_output(out, is_ours=is_report_dir, what="report of this project (with its report.json)",
                        inputs=(*(args.checkpoint or []), *(args.pruned or []), args.data))
    plans = resolve(args)
    test = data.load_split(args.data, "test", download=args.download)  # fail early without data
    first_images = test.images[:max(1, min(len(test), args.throughput_batch))]
    precision.calibration_images(args.data, plans[0]["baseline"].normalize, 1)  # int8 needs training images
    out.mkdir(parents=True, exist_ok=True)

    notes, rows = [], []
    steps = console.progress(total=len(plans) * len(STAGES), desc="report", unit="stage", leave=False)
    for plan in plans:
        name, base = plan["model"], plan["baseline"]
        one_shot = plan["pruned"] is None
        if one_shot:
            steps.set_postfix_str(f"{name}: one-shot prune")
            plan["pruned_path"] = prune_one_shot(name, base.path, base.normalize, args,
                                                 out / f"{name}-pruned-oneshot.pt")
            note = (f"{name}: no --pruned given, so the pruned stages are the baseline pruned here ONE-SHOT "
                    f"(l1, {args.flops_reduction:.0%} of the FLOPs, BN re-estimated, NO fine-tuning): their "
                    f"accuracy is not what fine-tuning reaches ({plan['pruned_path']})")
            console.warn(note)
            notes.append(note)
            plan["pruned"] = checkpoint.load_checkpoint(plan["pruned_path"], name, args.normalize)
        else:
            plan["pruned_path"] = plan["pruned"].path
        for stage, kind, prec in STAGES:
            steps.set_postfix_str(f"{name}: {stage}")
            row = measure_stage(plan, stage, kind, prec, args, out, first_images)
            row["one_shot"] = one_shot and kind == "pruned"
            rows.append(row)
            steps.update()
    steps.close()

    for r in rows:  # a tuned batch-1 build beside an untuned batch-N one: say why batching looks slower
        if r["throughput_ips"] < 1e3 / r["latency_ms"] and r["kernels_b1"] != r["kernels_throughput"]:
            notes.append(f"{r['model']} {r['stage']}: batch-{r['throughput_batch']} throughput "
                         f"({r['throughput_ips']:g} img/s) is below the batch-1 rate "
                         f"({1e3 / r['latency_ms']:.1f} img/s = 1000 / {r['latency_ms']:g} ms): the batch-1 build is "
                         f"{r['kernels_b1']}, the "
                         f"batch-{r['throughput_batch']} build {r['kernels_throughput']}")
    if args.limit_test:
        notes.append(f"top-1 on the first {args.limit_test:,} test images only (--limit-test), not all "
                     f"{len(test):,}")
    shown = table_rows(rows)
    title = "report: top-1 on the compiled artifacts; MACs/params counted on the compiled IR; TVM on this machine"
    print(console.table(shown, title=title))
    for note in notes:
        print(f"note: {note}")
    result = {
        "format": REPORT_FORMAT,
        "out": str(out),
        "target": args.target,
        "command": "python -m compiler report " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if sys.argv[1:2] == ["report"] else "python -m compiler report (called in-process)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "limit_test": args.limit_test,
        "timing": {"repeat": args.repeat, "number": args.number, "warmup": args.warmup,
                   "throughput_batch": args.throughput_batch, "throughput_repeat": args.throughput_repeat,
                   "throughput_number": args.throughput_number},
        "calibration": {"images": args.calib_images, "method": args.calibration, "keep_fp32": args.keep_fp32},
        "flops_unit": "multiply-accumulates per image, counted on the compiled Relax IR",
        "versions": {"tvm": tvm.__version__, "torch": torch.__version__},
        "machine": start_machine,
        "notes": notes,
        "rows": rows,
        "files": [str(out / f) for f in FILES],
    }
    plot_accuracy_vs_flops(rows, out / "accuracy_vs_flops.png")
    plot_latency(rows, out / "latency_per_stage.png")
    result["machine_at_end"] = machine()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    write_markdown(result, shown, out / "report.md")
    fileio.write_json(out / "report.json", result)
    print(f"wrote {', '.join(str(out / f) for f in FILES)}")
    return result
