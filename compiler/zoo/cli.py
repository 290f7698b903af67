"""``zoo``: list the checkpoints shipped with the package, or add one with its model card.

``python -m compiler zoo`` prints every shipped checkpoint's card. ``python -m compiler zoo --add CKPT --data DIR``
takes a finished ``train`` checkpoint, measures its top-1 on the full test set in fp32 and stored as fp16, keeps
the fp16 copy when its top-1 is the same (half the bytes), and writes ``compiler/zoo/<model>.pt`` and the card
``<model>.json``: top-1, the training command, epochs, wall time, where it trained, sha256.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from compiler import checkpoint, cli, console, data, fileio, zoo
from compiler.errors import UserError
from compiler.fileio import sha256_file, write_json

CARD_COLUMNS = ["model", "top1", "epochs", "train_hours", "trained_on", "storage", "bytes", "sha256"]


def configure(p) -> None:
    p.add_argument("--add", metavar="CKPT", help="ship this finished `train` checkpoint as its model's default")
    cli.add_data_args(p)
    p.add_argument("--force", action="store_true", help="replace a shipped checkpoint of the same model")
    p.add_argument("--zoo-dir", type=Path, default=zoo.ZOO_DIR, metavar="DIR",
                   help="the zoo folder (default: the package's, which eval/build use when --checkpoint is omitted)")
    cli.add_json_arg(p)


def card_for(ckpt: checkpoint.Checkpoint, top1: float, n_test: int, storage: str, path: Path) -> dict:
    m = ckpt.metrics
    seconds = sum(float(h.get("seconds") or 0) for h in m.get("history") or [])
    return {
        "model": ckpt.model_name,
        "top1": top1,
        "n_test": n_test,
        "normalize": ckpt.normalize,
        "epochs": m.get("epochs"),
        "train_seconds": round(seconds, 1),
        "train_hours": round(seconds / 3600, 2),
        "trained_on": m.get("device"),
        "torch": m.get("torch"),
        "command": m.get("command"),
        "storage": storage,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "params": sum(p.numel() for p in ckpt.model.parameters()),
    }


def add(args) -> dict:
    from compiler.evaluate import top1

    src = checkpoint.load_checkpoint(args.add)
    if src.pruning:
        raise UserError(f"{args.add} is a pruned checkpoint; the zoo ships trained baselines")
    if not src.metrics.get("history"):
        raise UserError(f"{args.add} is not a checkpoint written by `train` (no training history to put on its card)")
    state = src.train_state or {}
    if state and int(state.get("epoch", 0)) < int(state.get("epochs", 0)):
        raise UserError(f"{args.add} is unfinished (epoch {state.get('epoch')}/{state.get('epochs')}); "
                        "let `train` finish it first")
    dest = args.zoo_dir / f"{src.model_name}.pt"
    if dest.exists() and not args.force:
        raise UserError(f"a {src.model_name} is already shipped ({dest}); pass --force to replace it")
    for path in (dest, dest.with_suffix(".json")):  # --force replaces a shipped file, never a folder
        fileio.check_output(path, kind="file", is_ours=Path.is_file, flag="--zoo-dir", inputs=(args.add, args.data),
                            what="shipped checkpoint")
    args.zoo_dir.mkdir(parents=True, exist_ok=True)
    test = data.load_split(args.data, "test", download=args.download)
    acc32 = round(top1(src.model, test, src.normalize, desc="eval fp32"), 2)
    with tempfile.TemporaryDirectory(dir=args.zoo_dir) as tmp:
        half_path = Path(tmp) / dest.name
        checkpoint.save_checkpoint(half_path, src.model_name, src.model, src.normalize, metrics=src.metrics, half=True)
        half = checkpoint.load_checkpoint(half_path)
        acc16 = round(top1(half.model, test, half.normalize, desc="eval fp16"), 2)
        if acc16 == acc32:  # lossless for top-1: ship half the bytes
            os.replace(half_path, dest)
        else:
            checkpoint.save_checkpoint(dest, src.model_name, src.model, src.normalize, metrics=src.metrics)
    card = card_for(src, acc16 if acc16 == acc32 else acc32, len(test), "fp16" if acc16 == acc32 else "fp32", dest)
    card["top1_fp32"] = acc32
    write_json(dest.with_suffix(".json"), card)
    print(console.table([card], CARD_COLUMNS, title="shipped"))
    return {"added": card, "shipped": zoo.shipped(args.zoo_dir)}


def run(args) -> dict:
    if args.zoo_dir.exists() and not args.zoo_dir.is_dir():
        raise UserError(f"--zoo-dir {args.zoo_dir} is a file, not a folder")
    if not args.add and not args.zoo_dir.exists():
        raise UserError(f"--zoo-dir {args.zoo_dir} does not exist")
    if args.add:
        return add(args)
    cards = zoo.shipped(args.zoo_dir)
    if not cards:
        print(f"no checkpoint is shipped yet in {args.zoo_dir}: train one "
              "(`python -m compiler train --model resnet56 --epochs N --out R56.pt --data DIR`), "
              "then `python -m compiler zoo --add R56.pt --data DIR`")
    else:
        print(console.table(cards, CARD_COLUMNS, title="shipped checkpoints"))
        for c in cards:
            print(f"{c['model']}: {c.get('command')}")
    return {"shipped": cards}
