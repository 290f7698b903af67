"""``eval``: top-1 accuracy on the CIFAR-10 test set, of a PyTorch checkpoint or of a compiled artifact."""

from __future__ import annotations

import time

import torch

from compiler import cli, console, data
from compiler.errors import SettingError, UserError


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


@torch.inference_mode()
def top1(model: torch.nn.Module, split: data.Split, normalize: str, batch_size: int = 500,
         desc: str = "eval", progress: bool = True) -> float:
    """Top-1 accuracy in percent of a PyTorch model on a split."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in console.progress(range(0, len(split), batch_size), desc=desc, unit="batch",
                              disable=not progress or None):
        x = data.normalize(split.images[i:i + batch_size].to(device), normalize)
        correct += (model(x).argmax(1).cpu() == split.labels[i:i + batch_size]).sum().item()
    return 100.0 * correct / max(len(split), 1)


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
    print(console.table([result], ["model", "top1", "n", "normalize", "seconds", "checkpoint"]))
    return result


def evaluate(ckpt, data_dir=None, *, limit: int | None = None, batch_size: int = 500, download: bool = False,
             progress: bool = True) -> dict:
    """Top-1 (%) of a loaded checkpoint (PyTorch) on the first ``limit`` CIFAR-10 test images (all by default)."""
    if limit is not None and limit <= 0:
        raise SettingError("limit", "must be a positive number of images")
    split = data.load_split(data_dir, "test", download=download).head(limit)
    t0 = time.perf_counter()
    acc = top1(ckpt.model, split, ckpt.normalize, batch_size, progress=progress)
    return {
        "model": ckpt.model_name,
        "checkpoint": ckpt.path,
        "normalize": ckpt.normalize,
        "top1": round(acc, 2),
        "n": len(split),
        "seconds": round(time.perf_counter() - t0, 2),
    }
