"""``compare``: the verb. Flags -> :class:`compiler.compare.CompareSettings`, one :func:`compiler.compare.compare`
on the model pair, and its table (see :mod:`compiler.compare` for what is measured)."""

from __future__ import annotations

from compiler import cli, pair, render
from compiler.compare import BASELINE, CHECK_IMAGES, DEFAULT_BATCH, CompareSettings, compare
from compiler.engines import Timing


def configure(p) -> None:
    cli.add_model_args(p)
    p.add_argument("--pruned", metavar="PRUNED",
                   help="pruned checkpoint of the same model (the output of `prune`); its int8 rows replace the "
                        "dense model's")
    cli.add_data_args(p)
    p.add_argument("--batch", type=int, default=None,
                   help=f"input batch for every engine (default: the --artifact folders' batch, else {DEFAULT_BATCH})")
    p.add_argument("--artifact", metavar="DIR", action="append", default=None,
                   help="time this TVM artifact (built for this machine) instead of building them here; repeatable")
    p.add_argument("--repeat", type=int, default=30, help="timed runs (each the mean of --number calls)")
    p.add_argument("--number", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    cli.add_threads_arg(p)
    from compiler.build_cli import add_quantization_args

    add_quantization_args(p)
    p.add_argument("--keep", metavar="DIR", default=None,
                   help="keep the ONNX files and the TVM artifacts built here in DIR (default: a temporary folder)")
    cli.add_json_arg(p)


def run(args) -> dict:
    s = settings_from(args)
    dense, pruned = pair.load(args.model, args.checkpoint, args.pruned, args.normalize)
    result = compare(dense, pruned, s)
    render_result(result)
    return result


def settings_from(args) -> CompareSettings:
    from compiler.build_cli import quant_from

    return CompareSettings(data=args.data, batch=args.batch, artifacts=tuple(args.artifact or ()),
                           timing=Timing(args.repeat, args.number, args.warmup), threads=args.threads,
                           quant=quant_from(args), keep=args.keep)


def render_result(result: dict) -> None:
    rows = result["rows"]
    base = next(r for r in rows if (r["engine"], r["model"], r["precision"]) == BASELINE)
    print(render.compare_table(rows, result["model"], result["batch"], base["median_ms"], CHECK_IMAGES))
    if result["best"].get("tvm_vs_best_peer"):
        print(render.best_line(result["best"], "pruned" if result["pruned"] else "dense"))
