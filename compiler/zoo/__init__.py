"""Checkpoints shipped with the package, each ``<model>.pt`` with a model card ``<model>.json``.

When ``--checkpoint`` is omitted, the shipped checkpoint of ``--model`` (default resnet56) is used.
"""

from __future__ import annotations

import json
from pathlib import Path

from compiler import checkpoint, models
from compiler.errors import UserError

ZOO_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "resnet56"


def shipped(zoo_dir: Path = ZOO_DIR) -> list[dict]:
    """The model cards of every shipped checkpoint."""
    cards = []
    for card in sorted(Path(zoo_dir).glob("*.json")):
        info = json.loads(card.read_text())
        info["path"] = str(card.with_suffix(".pt"))
        cards.append(info)
    return cards


def default_checkpoint(model_name: str) -> Path:
    path = ZOO_DIR / f"{model_name}.pt"
    if not path.is_file():
        have = ", ".join(c["model"] for c in shipped()) or "none yet"
        raise UserError(f"no trained {model_name} is shipped with the package (shipped: {have}); pass --checkpoint PATH")
    return path


def load(model_name: str | None, checkpoint_path: str | None, normalize: str | None = None) -> checkpoint.Checkpoint:
    """The user's checkpoint when given, else the shipped one for ``model_name`` (default resnet56)."""
    if checkpoint_path is None:
        model_name = models.check_name(model_name or DEFAULT_MODEL)
        checkpoint_path = default_checkpoint(model_name)
    return checkpoint.load_checkpoint(checkpoint_path, model_name, normalize)
