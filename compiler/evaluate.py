"""``eval``: top-1 accuracy on the CIFAR-10 test set, of a PyTorch checkpoint or of a compiled artifact."""

from __future__ import annotations

import time

import torch

from compiler import console, data
from compiler.errors import SettingError


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


def evaluate(ckpt, data_dir=None, *, limit: int | None = None, batch_size: int = 500, download: bool = False,
             progress: bool = True) -> dict:
    """Top-1 (%) of a loaded checkpoint (PyTorch) on the first ``limit`` CIFAR-10 test images (all by default).
    A pruned checkpoint runs as its physically shrunk copy (:func:`compiler.pair.shrunk`: the removed channels
    deleted, the same function at the MACs the pruning kept), not as the dense network with zeroed filters."""
    if limit is not None and limit <= 0:
        raise SettingError("limit", "must be a positive number of images")
    split = data.load_split(data_dir, "test", download=download).head(limit)
    t0 = time.perf_counter()
    from compiler.prune import pruner

    model = ckpt.model
    if ckpt.pruning:
        from compiler import pair

        model = pair.shrunk(ckpt)
    macs, _ = pruner.count(model)
    acc = top1(model, split, ckpt.normalize, batch_size, progress=progress)
    return {
        "model": ckpt.model_name,
        "checkpoint": ckpt.path,
        "normalize": ckpt.normalize,
        "top1": round(acc, 2),
        "n": len(split),
        "macs": macs,  # of the network that ran: a pruned checkpoint's shrunk copy
        "seconds": round(time.perf_counter() - t0, 2),
    }
