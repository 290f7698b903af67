"""CIFAR-10 in the two layouts users have, as uint8 tensors, plus the input normalizations.

Layouts, looked for in this order inside ``--data DIR`` (default: env ``CIFAR10_DIR``):
  1. ``cifar10_train.npz`` / ``cifar10_test.npz`` with ``x`` uint8 (N, 32, 32, 3) RGB and ``y`` int64 (N,);
  2. torchvision's ``cifar-10-batches-py/`` (read through ``torchvision.datasets.CIFAR10``, which checks it).
Images come back as uint8 NCHW tensors; normalization happens batch by batch (see :func:`normalize`).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compiler.errors import SettingError, UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# mean, std per RGB channel, for inputs scaled to [0, 1]
NORMALIZATIONS = {
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DEFAULT_NORMALIZATION = "cifar"
NPZ_NAMES = {"train": "cifar10_train.npz", "test": "cifar10_test.npz"}
TORCHVISION_DIR = "cifar-10-batches-py"


@dataclass
class Split:
    """One split of CIFAR-10: ``images`` uint8 (N, 3, 32, 32), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> "Split":
        if n is None or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n], self.source)


def resolve_data_dir(data: str | os.PathLike | None) -> Path:
    if data is None:
        data = os.environ.get("CIFAR10_DIR")
        if not data:
            raise SettingError("data", "is not given and CIFAR10_DIR is not set: name a CIFAR-10 folder")
    path = Path(data).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"data folder {path} is a file, not a folder")
    if not path.is_dir():
        raise UserError(f"data folder {path} does not exist")
    return path


def check_normalization(name: str) -> str:
    if name not in NORMALIZATIONS:
        raise UserError(f"unknown normalization '{name}': choose one of {', '.join(NORMALIZATIONS)}")
    return name


def check_arrays(x: np.ndarray, y: np.ndarray, source: str) -> None:
    """What every split must be, checked where it enters: x uint8 (N, 32, 32, 3) with N > 0, y integer (N,) in
    0..9. Anything else would train or evaluate silently wrong (a (N, 1) y broadcasts into nonsense top-1)."""
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise UserError(f"{source}: images x must be uint8 (N, 32, 32, 3), got {x.dtype} {x.shape}")
    if y.ndim != 1:
        raise UserError(f"{source}: labels y must be one-dimensional (N,), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{source}: labels y must be integers 0..9, got {y.dtype}")
    if len(y) != len(x):
        raise UserError(f"{source}: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise UserError(f"{source} holds no images")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= len(CLASSES):
        bad = low if low < 0 else high
        raise UserError(f"{source}: labels y must be class indices 0..{len(CLASSES) - 1}, found {bad}")


def _from_npz(path: Path) -> Split:
    try:
        with open(path, "rb") as fh:  # closed even when np.load fails
            f = np.load(fh, allow_pickle=False)
            if not hasattr(f, "files"):  # a lone .npy array
                raise ValueError("an .npy array, not an npz archive")
            with f:
                x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path} is not a CIFAR-10 npz file with keys x and y ({type(e).__name__}: {e})") from None
    check_arrays(x, y, str(path))
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return Split(images, torch.from_numpy(y.astype(np.int64)), str(path))


def _from_torchvision(root: Path, train: bool, download: bool) -> Split:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
        raise UserError(f"{root / TORCHVISION_DIR}: {e}") from None
    labels = np.asarray(ds.targets)
    check_arrays(ds.data, labels, str(root / TORCHVISION_DIR))
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return Split(images, torch.from_numpy(labels.astype(np.int64)), str(root / TORCHVISION_DIR))


def load_split(data: str | os.PathLike | None, split: str = "test", download: bool = False) -> Split:
    """Load the ``train`` or ``test`` split from either layout (see module doc)."""
    if split not in NPZ_NAMES:
        raise ValueError(split)
    if download and data is not None:
        Path(data).expanduser().mkdir(parents=True, exist_ok=True)
    root = resolve_data_dir(data)
    npz = root / NPZ_NAMES[split]
    if npz.is_dir():
        raise UserError(f"{npz} is a folder, not an npz file")
    if npz.is_file():
        return _from_npz(npz)
    if (root / TORCHVISION_DIR).is_dir() or download:
        return _from_torchvision(root, split == "train", download)
    raise UserError(
        f"no CIFAR-10 in {root}: expected {NPZ_NAMES['train']} + {NPZ_NAMES['test']} "
        f"or torchvision's {TORCHVISION_DIR}/ (use --download to fetch the latter)"
    )


def normalize(images: torch.Tensor, normalization: str = DEFAULT_NORMALIZATION) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32, scaled to [0, 1], then (x - mean) / std per channel."""
    mean, std = NORMALIZATIONS[check_normalization(normalization)]
    x = images.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def random_crop_flip(images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR augmentation on a uint8 batch: random crop with zero padding, random horizontal flip."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    out = _crop(padded, dy, dx, h, w)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, c, hp, wp = padded.shape
    iy = (dy.view(n, 1, 1) + torch.arange(h).view(1, h, 1)).expand(n, h, w)
    ix = (dx.view(n, 1, 1) + torch.arange(w).view(1, 1, w)).expand(n, h, w)
    flat = (iy * wp + ix).view(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, hp * wp).gather(2, flat).view(n, c, h, w)
