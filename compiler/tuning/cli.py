"""``tune``: the verb. Flags -> :class:`compiler.tuning.session.TuneSettings`, one
:func:`compiler.tuning.session.tune`, and its table (see :mod:`compiler.tuning.session` for what a session does)."""

from __future__ import annotations

import sys

from compiler import cli, console, data, precision, zoo
from compiler.errors import UserError
from compiler.tuning import database
from compiler.tuning.session import TuneSettings, tune
from compiler.tuning.tracker import check_tracker


def configure(p) -> None:
    p.add_argument("--target", required=True, help="named target (see `python -m compiler targets`)")
    cli.add_model_args(p)
    p.add_argument("--library", action="store_true",
                   help="tune the kernel library instead of one model: every conv2d a CIFAR ResNet pruned by "
                        "`prune` can contain (tuning_logs/<target>/kernels-<precision>-b<batch>/); build applies "
                        "it to any model, under the model's own database")
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
    p.add_argument("--keep-best", type=int, default=None, metavar="N",
                   help="after the session, keep only each kernel's N best records (what build applies does not "
                        "change; a continued tune seeds its search from them): a database small enough to "
                        "commit. With --trials 0 it only trims")
    from compiler.build_cli import add_quantization_args

    add_quantization_args(p)  # int8: the same calibration options as build, so the same module is tuned
    cli.add_json_arg(p)


def settings_from(args) -> TuneSettings:
    from compiler.build_cli import quant_from

    return TuneSettings(target=args.target, trials=args.trials, precision=args.precision, batch=args.batch,
                        data=args.data, quant=quant_from(args), log_dir=args.log_dir, tracker=args.tracker,
                        key=args.key, timeout=args.timeout, trials_per_iter=args.trials_per_iter,
                        num_cores=args.num_cores, population=args.population, seed=args.seed,
                        library=args.library, keep_best=args.keep_best)


def run(args) -> dict:
    settings = settings_from(args)
    if args.log_dir is not None:
        database.check_log_dir(args.log_dir, args.checkpoint, args.data)  # before the model is loaded and lowered
    if args.tracker is not None:
        check_tracker(args.tracker, args.key)  # fail fast, before the model is loaded
    if args.library:
        if args.model is not None or args.checkpoint is not None:
            raise UserError("--library tunes the kernels of every pruned CIFAR ResNet; it takes no --model or "
                            "--checkpoint")
        result, note = tune(None, settings), None
    else:
        ckpt, note = load_model(args.model, args.checkpoint, args.normalize)
        result = tune(ckpt, settings, untrained_note=note)
    render(result)
    out = {k: result[k] for k in ("log_dir", "variant", "trials", "seconds", "target", "model", "precision",
                                  "trials_total", "tasks_in_db")}
    out["tasks"] = len(result["tasks"])
    if result.get("kept"):
        out["kept"] = result["kept"]
    if result.get("timing_note"):
        out["timing_note"] = result["timing_note"]
        print(f"note: measured on an {result['timing_note']}")
    out["task_rows"] = result["tasks"]
    if note:
        out["note"] = note
    return out


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
    kept = result.get("kept")
    if kept:
        print(f"kept the best {kept['keep_best']} records of each kernel: {kept['records_after']} of "
              f"{kept['records_before']} records")
