"""``report``: the verb. Flags -> :class:`compiler.report.ReportSettings`, one :func:`compiler.report.report`, and
its table (see :mod:`compiler.report` for what is built and measured)."""

from __future__ import annotations

from compiler import cli, console, render
from compiler.engines import Timing
from compiler.errors import SettingError
from compiler.report import ReportSettings, report


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
    from compiler.build_cli import add_quantization_args

    cli.add_threads_arg(p)
    add_quantization_args(p)
    cli.add_json_arg(p)


def throughput_timing(args) -> Timing:
    try:
        return Timing(args.throughput_repeat, args.throughput_number, min(args.warmup, 1))
    except SettingError as e:  # its flags are --throughput-repeat and --throughput-number
        raise SettingError(f"throughput_{e.field}", e.problem) from None


def run(args) -> dict:
    result = report(settings_from(args))
    render_result(result)
    return result


def settings_from(args) -> ReportSettings:
    from compiler.build_cli import quant_from

    return ReportSettings(
        out=args.out, models=tuple(args.models or ()), checkpoints=tuple(args.checkpoint or ()),
        pruned=tuple(args.pruned or ()), normalize=args.normalize, data=args.data, download=args.download,
        target=args.target, limit_test=args.limit_test, flops_reduction=args.flops_reduction,
        timing=Timing(args.repeat, args.number, args.warmup),
        throughput=throughput_timing(args),
        throughput_batch=args.throughput_batch, threads=args.threads, quant=quant_from(args),
        command=getattr(args, "_command", None))


def render_result(result: dict) -> None:
    print(console.table(render.report_rows(result["rows"]), title="report: top-1 on the compiled artifacts; "
                        "MACs/params counted on the compiled IR; TVM on this machine"))
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"wrote {', '.join(result['files'])}")
