"""``zoo``: list the checkpoints shipped with the package, or add one with its model card.

``python -m compiler zoo`` prints every shipped checkpoint's card. ``python -m compiler zoo --add CKPT --data DIR``
takes a finished ``train`` or ``prune`` checkpoint, measures its top-1 on the full test set in fp32 and stored as
fp16, keeps the fp16 copy when its top-1 is the same (half the bytes), and writes ``compiler/zoo/<model>.pt``, the
card ``<model>.json`` (top-1, the command that made it, epochs, wall time, where it ran, sha256; for a pruned model
also MACs and parameters dense and pruned and the base checkpoint's provenance), ``<model>.verify.npz`` (the first
few test images with the shipped model's logits: what ``build`` verifies on without ``--data``), ``<model>.calib.npz``
(the int8 calibration histograms of the default calibration images: what ``build`` quantizes with without
``--data``) and, with
``--license FILE``, ``<model>.LICENSE`` (the base weights' licence, which travels with a derived binary).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from compiler import checkpoint, cli, console, data, fileio, zoo
from compiler.errors import SettingError, UserError
from compiler.fileio import atomic_path, sha256_file, write_json

CARD_COLUMNS = ["model", "top1", "macs_cut_pct", "epochs", "train_hours", "trained_on", "storage", "bytes", "sha256"]
VERIFY_IMAGES = 32


def configure(p) -> None:
    p.add_argument("--add", metavar="CKPT",
                   help="ship this finished `train` or `prune` checkpoint as its model's default")
    p.add_argument("--provenance", metavar="TEXT", default=None,
                   help="where the base weights of a pruned checkpoint come from (repository, file, licence)")
    p.add_argument("--license", metavar="FILE", default=None,
                   help="the base weights' licence text, shipped beside the checkpoint as <model>.LICENSE")
    cli.add_data_args(p)
    p.add_argument("--force", action="store_true", help="replace a shipped checkpoint of the same model")
    p.add_argument("--zoo-dir", type=Path, default=zoo.ZOO_DIR, metavar="DIR",
                   help="the zoo folder (default: the package's, which eval/build use when --checkpoint is omitted)")
    cli.add_json_arg(p)


def card_for(ckpt: checkpoint.Checkpoint, top1: float, n_test: int, storage: str, path: Path) -> dict:
    m = ckpt.metrics
    seconds = sum(float(h.get("seconds") or 0) for h in m.get("history") or [])
    card = {
        "model": ckpt.model_name,
        "kind": "pruned" if ckpt.pruning else "trained",
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
    if ckpt.pruning:
        r = ckpt.pruning
        card.update({
            "macs_dense": r["flops_dense"], "macs_compiled": r["flops_pruned"],
            "macs_cut_pct": round(100.0 * (1 - r["flops_pruned"] / r["flops_dense"]), 2),
            "params_dense": r["params_dense"], "params_compiled": r["params_pruned"],
            "macs_convention": r.get("flops_convention"),
            "pruning": {k: r.get(k) for k in ("criterion", "flops_reduction_requested", "round_to", "floor",
                                              "prune_stream", "bn_batches")},
            "top1_before": m.get("top1_before"), "top1_oneshot": m.get("top1_oneshot"),
        })
    return card


def _check_finished(src: checkpoint.Checkpoint, path) -> None:
    if not src.metrics.get("history") and not (src.pruning and src.metrics.get("epochs") == 0):
        raise UserError(f"{path} is not a checkpoint written by `train` or `prune` (no history to put on its card)")
    state = src.train_state or {}
    if state and int(state.get("epoch", 0)) < int(state.get("epochs", 0)):
        verb = state.get("verb", "train")
        raise UserError(f"{path} is unfinished (epoch {state.get('epoch')}/{state.get('epochs')}); "
                        f"let `{verb}` finish it first")


def _write_verification(dest: Path, model: torch.nn.Module, normalize: str, test: data.Split) -> dict:
    """``<model>.verify.npz``: the first VERIFY_IMAGES test images (uint8 NHWC), labels and ``model``'s logits."""
    head = test.head(VERIFY_IMAGES)
    with torch.inference_mode():
        logits = model(data.normalize(head.images, normalize)).numpy().astype(np.float32)
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a name
        np.savez_compressed(f, x=head.images.permute(0, 2, 3, 1).numpy(), y=head.labels.numpy(), logits=logits,
                            indices=np.arange(len(head)))
    return {"file": dest.name, "images": len(head), "from": f"the first {len(head)} CIFAR-10 test images"}


def _write_calibration(dest: Path, model: torch.nn.Module, normalize: str, data_dir) -> dict:
    """``<model>.calib.npz``: the int8 calibration histograms ``build`` makes for ``model`` by default, so that the
    shipped model builds in int8 without CIFAR-10 (``compiler.zoo.calibration``)."""
    from compiler import precision
    from compiler.build import calibrate

    n = precision.DEFAULT_CALIB_IMAGES
    cal, desc = calibrate(model, data_dir, normalize, n)
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        cal.save(f)
    return {"file": dest.name, "requested": n, "images": cal.images, "from": desc}


def add(path: str | Path, data_dir=None, *, zoo_dir: Path = zoo.ZOO_DIR, license: str | Path | None = None,
        provenance: str | None = None, force: bool = False, download: bool = False) -> dict:
    """Ship the finished ``train`` / ``prune`` checkpoint at ``path`` as its model's default in ``zoo_dir``, with
    its card (top-1 measured on the test set of ``data_dir``); ``{"added": card, "shipped": [cards]}``."""
    from compiler.evaluate import top1

    zoo_dir = Path(zoo_dir)
    src = checkpoint.load_checkpoint(path)
    _check_finished(src, path)
    if license is not None and not Path(license).is_file():
        raise SettingError("license", f"{license} is not a file")
    dest = zoo_dir / f"{src.model_name}.pt"
    if dest.exists() and not force:
        raise SettingError("force", f"is off and a {src.model_name} is already shipped ({dest}): set it to replace that")
    for out in (dest, dest.with_suffix(".json"), dest.with_suffix(".md"), dest.with_suffix(".LICENSE"),
                dest.with_name(dest.stem + zoo.VERIFY_SUFFIX), dest.with_name(dest.stem + zoo.CALIB_SUFFIX)):  # force replaces a shipped file, never a folder
        fileio.check_output(out, kind="file", is_ours=Path.is_file, field="zoo_dir", inputs=(path, data_dir),
                            what="shipped checkpoint")
    zoo_dir.mkdir(parents=True, exist_ok=True)
    test = data.load_split(data_dir, "test", download=download)
    acc32 = round(top1(src.model, test, src.normalize, desc="eval fp32"), 2)
    with tempfile.TemporaryDirectory(dir=zoo_dir) as tmp:
        half_path = Path(tmp) / dest.name
        checkpoint.save_checkpoint(half_path, src.model_name, src.model, src.normalize, pruning=src.pruning,
                                   metrics=src.metrics, half=True)
        half = checkpoint.load_checkpoint(half_path)
        acc16 = round(top1(half.model, test, half.normalize, desc="eval fp16"), 2)
        if acc16 == acc32:  # lossless for top-1: ship half the bytes
            os.replace(half_path, dest)
            shipped_model = half.model
        else:
            checkpoint.save_checkpoint(dest, src.model_name, src.model, src.normalize, pruning=src.pruning,
                                       metrics=src.metrics)
            shipped_model = src.model
    card = card_for(src, acc16 if acc16 == acc32 else acc32, len(test), "fp16" if acc16 == acc32 else "fp32", dest)
    card["top1_fp32"] = acc32
    card["verification"] = _write_verification(dest.with_name(dest.stem + zoo.VERIFY_SUFFIX), shipped_model,
                                               src.normalize, test)
    card["calibration"] = _write_calibration(dest.with_name(dest.stem + zoo.CALIB_SUFFIX), shipped_model,
                                             src.normalize, data_dir)
    if src.pruning:
        card["base"] = {"file": Path(str(src.pruning.get("source") or "")).name or None,
                        "sha256": src.pruning.get("source_sha256"), "top1": src.metrics.get("top1_before"),
                        "provenance": provenance}
    if license:
        lic = dest.with_suffix(".LICENSE")
        with atomic_path(lic) as tmp:
            shutil.copyfile(license, tmp)
        card.setdefault("base", {})["license_file"] = lic.name
    write_json(dest.with_suffix(".json"), card)
    fileio.write_text(dest.with_suffix(".md"), model_card_markdown(card))
    return {"added": card, "shipped": zoo.shipped(zoo_dir)}


def model_card_markdown(card: dict) -> str:
    """``<model>.md``: the card for people (the JSON beside it holds the same facts for programs)."""
    lines = [f"# {card['model']} ({card['kind']}) - model card", "",
             "| fact | value |", "| --- | --- |"]
    rows = [("top-1, CIFAR-10 test set", f"{card['top1']} % on {card['n_test']} images "
                                          f"(stored {card['storage']}; fp32 {card.get('top1_fp32')} %)"),
            ("input normalization", card["normalize"])]
    if card["kind"] == "pruned":
        rows += [("MACs per image dense -> compiled", f"{card['macs_dense']:,} -> {card['macs_compiled']:,} "
                                                      f"({card['macs_cut_pct']} % cut)"),
                 ("parameters dense -> compiled", f"{card['params_dense']:,} -> {card['params_compiled']:,}"),
                 ("pruning", ", ".join(f"{k} {v}" for k, v in card["pruning"].items())),
                 ("top-1 before / one-shot", f"{card.get('top1_before')} / {card.get('top1_oneshot')}")]
    if card.get("calibration"):
        rows.append(("int8 calibration", f"{card['calibration']['from']}, histograms in `{card['calibration']['file']}`"))
    rows += [("made by", f"`{card.get('command')}`"),
             ("epochs, wall time", f"{card.get('epochs')}, {card.get('train_hours')} h on {card.get('trained_on')}"),
             ("file", f"{card['bytes']:,} bytes, sha256 {card['sha256']}")]
    lines += [f"| {k} | {v} |" for k, v in rows]
    base = card.get("base")
    if base:
        lines += ["", "## Base weights", "",
                  f"Derived from `{base.get('file')}` (sha256 {base.get('sha256')}, top-1 {base.get('top1')} %)."]
        if base.get("provenance"):
            lines += ["", base["provenance"]]
        if base.get("license_file"):
            lines += ["", f"Its licence, whose copyright notice, conditions and disclaimer travel with this derived "
                          f"model, is in `{base['license_file']}` beside this card."]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    if args.zoo_dir.exists() and not args.zoo_dir.is_dir():
        raise UserError(f"--zoo-dir {args.zoo_dir} is a file, not a folder")
    if not args.add and not args.zoo_dir.exists():
        raise UserError(f"--zoo-dir {args.zoo_dir} does not exist")
    if args.add:
        result = add(args.add, args.data, zoo_dir=args.zoo_dir, license=args.license, provenance=args.provenance,
                     force=args.force, download=args.download)
        print(console.table([result["added"]], CARD_COLUMNS, title="shipped"))
        return result
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
