"""Command line: ``python -m compiler VERB ...``.

Each verb has its own CLI module (``build_cli.py``, ``prune/cli.py``, ...) with ``configure(parser)`` and
``run(args) -> dict``: flags -> settings, one library call, its table; the library modules beside them never see
the parsed arguments. This file only parses arguments, dispatches, and turns :class:`~compiler.errors.UserError`
into ``error: ...`` on stderr with exit 2 (a :class:`~compiler.errors.SettingError` names the flag).
With ``--json`` the last line on stdout is one JSON object with the verb's results.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys

from compiler.errors import SettingError, UserError

# verb -> (module, one-line help)
VERBS = {
    "eval": ("compiler.evaluate_cli",
             "top-1 of a checkpoint (PyTorch) or a compiled artifact on the CIFAR-10 test set"),
    "train": ("compiler.train_cli", "train a CIFAR-10 model from scratch (resumable)"),
    "prune": ("compiler.prune.cli", "structured filter pruning with fine-tuning"),
    "targets": ("targets.cli", "list the named build targets"),
    "build": ("compiler.build_cli", "compile a checkpoint for a target into a verified artifact folder"),
    "bench": ("compiler.bench_cli", "latency of a compiled artifact (median, p90), optionally beside PyTorch eager"),
    "zoo": ("compiler.zoo.cli", "list the trained checkpoints shipped with the package, or add one with its card"),
    "tune": ("compiler.tuning.cli", "tune kernels with MetaSchedule (XGBoost), locally or over TVM RPC"),
    "compare": ("compiler.compare_cli", "PyTorch eager, ONNX Runtime, TVM (and TensorRT where present) side by side"),
    "board": ("targets.board_cli", "the emulated aarch64 board (qemu-user): set it up, run TVM's RPC server in it"),
    "report": ("compiler.report_cli", "the paper's table per model: baseline, pruned, pruned + int8, with plots"),
}


def add_model_args(p: argparse.ArgumentParser, checkpoint_required: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="resnet20 ... resnet110 (any depth 6n+2) or googlenet; "
                                   "inferred from the checkpoint when omitted")
    g.add_argument("--checkpoint", required=checkpoint_required, metavar="PATH",
                   help="PyTorch checkpoint (state dict, {'state_dict': ...}, or this project's format)")
    g.add_argument("--normalize", choices=("cifar", "imagenet"), default=None,
                   help="input mean/std the checkpoint was trained with (default: what the checkpoint records, "
                        "else cifar)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", default=None,
                   help="CIFAR-10 folder: cifar10_{train,test}.npz or torchvision's cifar-10-batches-py/ "
                        "(default: env CIFAR10_DIR)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 into --data (online)")


def add_training_args(p: argparse.ArgumentParser, lr: float, lr_help: str) -> None:
    """The SGD loop's flags, shared by train and prune's fine-tuning."""
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=lr, help=lr_help)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--limit-train", type=int, default=None, metavar="K", help="only the first K training images")
    g.add_argument("--limit-test", type=int, default=None, metavar="K", help="only the first K test images")
    g.add_argument("--seed", type=int, default=0)


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """How the training steps run (not what they compute): shared by ``train`` and ``prune``'s fine-tuning."""
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on where the CPU has native bf16, e.g. AVX-512 BF16 / AMX)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (default: on)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (minutes to compile, then faster steps)")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """compare's and report's thread count."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for PyTorch, ONNX Runtime, OpenVINO and TVM alike (default: each engine is timed "
                        "at 1, 2, 4, ... up to this machine's cores and shown at its fastest count)")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object with the results as the last line")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one ``error:`` line with exit code 2 (its own convention too)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the verb named in ``argv`` is configured, so other verbs' imports (torch, TVM) wait."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = _Parser(prog="python -m compiler", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb, (module, help_) in VERBS.items():
        p = sub.add_parser(verb, help=help_, description=help_)
        if verb == chosen:
            importlib.import_module(module).configure(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args._command = "python -m compiler " + shlex.join(argv)  # what model cards record as the command
    if not args.verb:
        parser.print_help()
        return 0
    try:
        result = importlib.import_module(args._module).run(args)
    except SettingError as e:  # a settings field is named as the flag that set it
        print(f"error: {e.as_flag()}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished work was kept", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        sys.stdout.flush()
        print(json.dumps(result if result is not None else {}, default=str))
    return 0


