"""Safe checkpoint loading and atomic saving.

Loading never executes a pickle (``torch.load(..., weights_only=True)``). Accepted layouts: a bare state dict,
``{"state_dict": ...}`` (as the common public CIFAR checkpoints are saved), keys with ``module.`` prefixes
(DataParallel), and the project's own format, which also records the architecture, input normalization, the
pruning record and metrics::

    {"format": "cifar-hybrid-compiler/checkpoint", "version": 1, "model": "resnet56", "normalize": "cifar",
     "state_dict": {...}, "pruning": {...} | None, "metrics": {...}, "train_state": {...} (train/prune resume)}
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compiler import models
from compiler.data import DEFAULT_NORMALIZATION, check_normalization
from compiler.errors import UserError
from compiler.fileio import atomic_path, sha256_file

FORMAT = "cifar-hybrid-compiler/checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model with its weights, and what the file recorded about it."""

    model_name: str
    model: nn.Module
    normalize: str
    path: str | None = None
    sha256: str | None = None
    pruning: dict | None = None
    metrics: dict = field(default_factory=dict)
    train_state: dict | None = None


def _read(path: Path) -> object:
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        # torch words it "Unsupported global: GLOBAL x.y was not an allowed global" or "unsupported GLOBAL x.y
        # whose module x is blocked", depending on the version and on what the pickle calls
        unsafe = re.search(r"unsupported\s+global\W*(?:global\s+)?([\w.]+)", text, re.IGNORECASE)
        if unsafe:
            raise UserError(
                f"refused to load {path}: the file would run code when unpickled (it calls {unsafe.group(1)}); "
                "checkpoints are loaded with weights_only=True"
            ) from None
        detail = next((ln.strip() for ln in text.splitlines() if "unsupported" in ln.lower()), "")
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({detail or 'unpickling failed'})") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file fails in many ways (struct.error, EOFError, zip errors...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({msg})") from None


# the project format's fields besides state_dict: name -> (accepted types, what it must be)
_FIELDS = {
    "model": ((str,), "a model name"),
    "normalize": ((str, type(None)), "a normalization name"),
    "pruning": ((dict, type(None)), "an object or null"),
    "metrics": ((dict, type(None)), "an object or null"),
    "train_state": ((dict, type(None)), "an object or null"),
}


def _check_fields(obj: dict, path: Path) -> None:
    """A project-format checkpoint's fields have the types the verbs rely on (else one line naming the field)."""
    for key, (types, what) in _FIELDS.items():
        if key in obj and not isinstance(obj[key], types):
            raise UserError(f"{path}: field '{key}' must be {what}, not {type(obj[key]).__name__}; "
                            "the checkpoint is damaged")


def _state_dict_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict (expected a dict of tensors, or one under 'state_dict')")
    out = {}
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def infer_model_name(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Guess the architecture from the keys: googlenet, or a CIFAR ResNet whose depth follows from its blocks."""
    if "pre_layers.0.weight" in state_dict and "a3.b1.0.weight" in state_dict:
        return "googlenet"
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("layer1.") and k.endswith("conv1.weight")}
    if "conv1.weight" in state_dict and blocks:
        return f"resnet{6 * len(blocks) + 2}"
    return None


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], model_name: str, path: Path | str) -> None:
    """Load strictly; a mismatch names the expected architecture and the first missing or unexpected key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        what = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        guess = infer_model_name(state_dict)
        hint = f"; it looks like a {guess} checkpoint" if guess and guess != model_name else ""
        raise UserError(
            f"{path} does not fit {model_name}: {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected){hint}"
        )
    for k, v in state_dict.items():
        if v.shape != expected[k].shape:
            raise UserError(
                f"{path} does not fit {model_name}: '{k}' has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
        if expected[k].is_floating_point() and not v.is_floating_point():
            raise UserError(f"{path}: '{k}' holds {v.dtype} values, expected floating-point weights")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise UserError(f"{path}: '{k}' holds NaN or infinite values ({bad} of {v.numel()}); "
                            "the weights are broken (a diverged training run?)")
    model.load_state_dict(state_dict, strict=False)


def load_checkpoint(path: str | os.PathLike, model_name: str | None = None, normalize: str | None = None) -> Checkpoint:
    """Load a checkpoint of any accepted layout into a fresh model of ``model_name`` (inferred if omitted)."""
    path = Path(path).expanduser()
    obj = _read(path)
    state_dict = _state_dict_of(obj, path)
    ours = isinstance(obj, dict) and obj.get("format") == FORMAT
    if ours:
        _check_fields(obj, path)
    recorded = obj.get("model") if ours else None
    if model_name is not None:
        model_name = models.check_name(model_name)
        if recorded and recorded != model_name:
            raise UserError(f"{path} is a {recorded} checkpoint, not {model_name}")
    else:
        model_name = recorded or infer_model_name(state_dict)
        if model_name is None:
            raise UserError(f"cannot tell the architecture of {path}: name the model")
    model = models.build_model(model_name)
    load_into(model, state_dict, model_name, path)
    model.eval()
    if normalize is None:
        normalize = (obj.get("normalize") if ours else None) or DEFAULT_NORMALIZATION
    return Checkpoint(
        model_name=model_name,
        model=model,
        normalize=check_normalization(normalize),
        path=str(path),
        sha256=sha256_file(path),
        pruning=obj.get("pruning") if ours else None,
        metrics=dict(obj.get("metrics") or {}) if ours else {},
        train_state=obj.get("train_state") if ours else None,
    )


def save_checkpoint(
    path: str | os.PathLike,
    model_name: str,
    model: nn.Module,
    normalize: str,
    pruning: dict | None = None,
    metrics: dict | None = None,
    train_state: dict | None = None,
    half: bool = False,
) -> None:
    """Write the project's checkpoint format atomically. ``half`` stores float tensors as fp16 (compact zoo files)."""
    state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if half:
        state_dict = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name,
        "normalize": normalize,
        "state_dict": state_dict,
        "pruning": pruning,
        "metrics": metrics or {},
    }
    if train_state is not None:
        obj["train_state"] = train_state
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
