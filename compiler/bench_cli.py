"""``bench``: the verb. Flags -> one :func:`compiler.bench.bench` of an artifact (and PyTorch eager beside it), and
its table."""

from __future__ import annotations

from compiler import cli, console
from compiler.bench import bench
from compiler.errors import UserError


def configure(p) -> None:
    p.add_argument("--artifact", required=True, metavar="DIR")
    p.add_argument("--repeat", type=int, default=30, help="timed runs (each the median of --number calls)")
    p.add_argument("--number", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pytorch", metavar="CKPT", nargs="?", const="",
                   help="also time PyTorch eager on this checkpoint, same batch (no CKPT: the shipped model)")
    cli.add_json_arg(p)


def run(args) -> dict:
    if args.repeat <= 0 or args.number <= 0:
        raise UserError("--repeat and --number must be positive")
    result = bench(args.artifact, repeat=args.repeat, number=args.number, warmup=args.warmup, pytorch=args.pytorch)
    print(console.table(result["rows"], ["engine", "model", "precision", "batch", "threads", "median_ms", "p90_ms",
                                         "images_per_s", "threads_from"]))
    return result
