"""``train``: the verb. Flags -> :class:`compiler.train.TrainSettings`, one :func:`compiler.train.train`, and its
table (see :mod:`compiler.train` for the training loop)."""

from __future__ import annotations

from compiler import cli, console, data
from compiler.train import TrainSettings, train


def configure(p) -> None:
    p.add_argument("--model", required=True, help="resnet20 ... resnet110 (any 6n+2) or googlenet")
    cli.add_data_args(p)
    p.add_argument("--normalize", choices=tuple(data.NORMALIZATIONS), default=data.DEFAULT_NORMALIZATION)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint written after every epoch; "
                   "if it is this project's unfinished checkpoint of the same model, training resumes from it")
    cli.add_speed_args(p)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train (default: a CUDA GPU when torch sees one, else the CPU); "
                        "checkpoints are written as CPU tensors either way")
    cli.add_training_args(p, lr=0.1, lr_help="peak learning rate of the one-cycle schedule")
    cli.add_json_arg(p)


def settings_from(args) -> TrainSettings:
    return TrainSettings(
        model=args.model, epochs=args.epochs, out=args.out, data=args.data, download=args.download,
        normalize=args.normalize, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
        limit_train=args.limit_train, limit_test=args.limit_test, seed=args.seed, bf16=args.bf16,
        channels_last=args.channels_last, compile=args.compile, device=args.device,
        command=getattr(args, "_command", None))


def run(args) -> dict:
    result = train(settings_from(args))
    print(console.table([result], ["model", "epochs", "top1", "seconds", "out"]))
    return result
