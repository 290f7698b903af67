"""``eval``: the verb. A checkpoint (:func:`compiler.evaluate.evaluate`), an artifact built for this machine
(:func:`compiler.artifact.evaluate`) or a board artifact in the emulated board (:func:`targets.emulate.evaluate`);
the flags that go together are checked here."""

from __future__ import annotations

from compiler import cli, console
from compiler.errors import UserError
from compiler.evaluate import evaluate


def configure(p) -> None:
    cli.add_model_args(p)
    cli.add_data_args(p)
    p.add_argument("--artifact", metavar="DIR", help="evaluate a compiled artifact folder instead of a checkpoint")
    p.add_argument("--emulate", action="store_true",
                   help="with --artifact: run an aarch64 board artifact in the emulated board (qemu-user; set up on "
                        "first use, see `board --emulate setup`) and compare it with PyTorch")
    p.add_argument("--limit", type=int, default=None, metavar="K", help="only the first K test images")
    p.add_argument("--batch-size", type=int, default=500)
    cli.add_json_arg(p)


def run(args) -> dict:
    if args.limit is not None and args.limit <= 0:
        raise UserError("--limit must be a positive number of images")
    if args.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    if args.emulate:
        if not args.artifact:
            raise UserError("--emulate runs a compiled board artifact: give it with --artifact DIR")
        from targets import emulate

        return emulate.evaluate(args.artifact, args.data, limit=args.limit, download=args.download)
    if args.artifact:
        from compiler import artifact

        given = [f for f, v in (("--checkpoint", args.checkpoint), ("--model", args.model),
                                ("--normalize", args.normalize)) if v is not None]
        if given:
            raise UserError(f"{' and '.join(given)} cannot be used with --artifact: the artifact holds its own "
                            "model, weights and normalization (see its manifest.json); drop "
                            f"{' and '.join(given)}, or drop --artifact to evaluate the checkpoint")

        result = artifact.evaluate(args.artifact, args.data, limit=args.limit, batch_size=args.batch_size,
                                   download=args.download)
        print(console.table([result], ["model", "target", "precision", "top1", "n", "seconds", "artifact"]))
        return result
    from compiler import zoo

    ckpt = zoo.load(args.model, args.checkpoint, args.normalize)
    result = evaluate(ckpt, args.data, limit=args.limit, batch_size=args.batch_size, download=args.download)
    print(console.table([result], ["model", "top1", "n", "macs", "normalize", "seconds", "checkpoint"]))
    return result
