"""Checkpoints shipped with the package: ``<model>.pt`` with its model card ``<model>.json``.

Beside a shipped checkpoint may lie ``<model>.verify.npz`` (a few dozen CIFAR-10 test images, uint8 NHWC, their
labels and the shipped model's PyTorch logits: ``build`` verifies on them when no ``--data`` is given) and
``<model>.LICENSE`` (the licence of the weights the model was derived from, which travels with it) and
``<model>.calib.npz`` (the int8 calibration histograms of the shipped model on the default calibration images:
``build`` and ``tune`` quantize the shipped model to int8 from them when no ``--data`` is given, exactly as from
the images).

When ``--checkpoint`` is omitted, the shipped checkpoint of ``--model`` (default resnet56) is used, and the verbs
say so in one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from compiler import checkpoint, models
from compiler.errors import UserError

ZOO_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "resnet56"
VERIFY_SUFFIX = ".verify.npz"
CALIB_SUFFIX = ".calib.npz"


def shipped(zoo_dir: Path = ZOO_DIR) -> list[dict]:
    """The model cards of every shipped checkpoint."""
    cards = []
    for card in sorted(Path(zoo_dir).glob("*.json")):
        info = json.loads(card.read_text())
        info["path"] = str(card.with_suffix(".pt"))
        cards.append(info)
    return cards


def card(model_name: str, zoo_dir: Path = ZOO_DIR) -> dict | None:
    path = Path(zoo_dir) / f"{model_name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def default_checkpoint(model_name: str) -> Path:
    path = ZOO_DIR / f"{model_name}.pt"
    if not path.is_file():
        have = ", ".join(c["model"] for c in shipped()) or "none yet"
        raise UserError(f"no trained {model_name} is shipped with the package (shipped: {have}); give a checkpoint")
    return path


def describe(model_name: str) -> str:
    """One line on the shipped ``model_name``: what it is and its card's top-1."""
    c = card(model_name) or {}
    what = (f"pruned, {c['macs_cut_pct']:.1f}% of the MACs cut" if c.get("macs_cut_pct") is not None
            else "trained")
    return (f"the shipped {model_name} ({what}, top-1 {c.get('top1')} on {c.get('n_test')} test images; "
            f"card compiler/zoo/{model_name}.json)")


def load(model_name: str | None, checkpoint_path: str | None, normalize: str | None = None,
         quiet: bool = False) -> checkpoint.Checkpoint:
    """The user's checkpoint when given, else the shipped one for ``model_name`` (default resnet56), saying so."""
    if checkpoint_path is None:
        model_name = models.check_name(model_name or DEFAULT_MODEL)
        checkpoint_path = default_checkpoint(model_name)
        if not quiet:
            print(f"no --checkpoint: using {describe(model_name)}", file=sys.stderr)
    return checkpoint.load_checkpoint(checkpoint_path, model_name, normalize)


def is_shipped(ckpt: checkpoint.Checkpoint) -> bool:
    c = card(ckpt.model_name)
    return c is not None and c.get("sha256") == ckpt.sha256


def shipped_pruned_for(base: checkpoint.Checkpoint) -> Path | None:
    """The shipped checkpoint of ``base``'s model when it is a pruned copy of exactly ``base`` (same sha256)."""
    c = card(base.model_name)
    if c is None or (c.get("base") or {}).get("sha256") != base.sha256:
        return None
    return ZOO_DIR / f"{base.model_name}.pt"


def verification_set(model_name: str | None = None) -> dict | None:
    """Real test images for verifying a build without ``--data``: ``images`` uint8 (N, 3, 32, 32), ``labels``,
    ``logits`` (of the shipped ``model_name``, float32), ``model``; from the shipped model of ``model_name`` or,
    for any other CIFAR-10 model, from the default model's set (the images are what matters). None if none is
    shipped."""
    for name in dict.fromkeys([model_name or DEFAULT_MODEL, DEFAULT_MODEL]):
        path = ZOO_DIR / f"{name}{VERIFY_SUFFIX}"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return {"images": np.ascontiguousarray(z["x"].transpose(0, 3, 1, 2)), "labels": z["y"],
                        "logits": z["logits"], "indices": z["indices"], "model": name, "path": str(path)}
    return None


def calibration(ckpt: checkpoint.Checkpoint, calib_images: int, zoo_dir: Path = ZOO_DIR) -> tuple | None:
    """(passes.quantize.Calibration, description) shipped for ``ckpt`` when it is the shipped checkpoint and
    ``calib_images`` the number of images asked for when the histograms were made; else None. UserError on a shipped file
    that is not a calibration of this model (a damaged install)."""
    c = card(ckpt.model_name, zoo_dir)
    info = (c or {}).get("calibration") or {}
    path = Path(zoo_dir) / f"{ckpt.model_name}{CALIB_SUFFIX}"
    if c is None or c.get("sha256") != ckpt.sha256 or info.get("requested") != calib_images or not path.is_file():
        return None
    from passes.quantize import Calibration

    try:
        cal = Calibration.load(path)
    except ValueError as e:
        raise UserError(f"{path}: {e}; reinstall the package or give --data") from None
    if cal.images != info.get("images"):
        raise UserError(f"{path} holds {cal.images} images' histograms, its card says {info.get('images')}")
    return cal, f"{info.get('from')}: histograms shipped in compiler/zoo/{path.name} (no --data)"
