"""Least-squares reconstruction of each conv2d's output after pruning (channel-pruning / ThiNet style).

Pruning removes input channels of the layers behind a pruned conv and shifts every later activation. Before any
fine-tuning, each conv2d of the physically shrunk model is refitted, in forward order, so that on a few hundred
training images its output (before BatchNorm) matches the dense model's output at the same layer:

    W* = argmin_W || X W - Y ||^2 + lambda ||W||^2,   X: the shrunk model's input patches (its own, already
    refitted, earlier layers), Y: the dense model's conv output at the kept output channels.

X is ``unfold``-ed at a random subset of output positions per image, so a layer's system has at most
``in_channels * k * k`` (576 for a 64-channel 3x3 conv) unknowns: a CPU solves it in milliseconds. The dense
BatchNorm statistics stay valid because the refitted outputs follow the dense distribution. References: He, Zhang,
Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017 (least-squares reconstruction of the
next layer); Luo, Wu, Lin, "ThiNet", ICCV 2017 (same objective, one layer at a time on the pruned network's inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compiler import console


class _Stop(Exception):
    """Raised in a forward hook once the layer being refitted has seen its input: the rest is not needed."""


@dataclass
class LayerFit:
    conv: str
    rows: int
    unknowns: int
    error_before: float  # relative squared error ||XW - Y||^2 / ||Y||^2 on the fitting rows
    error_after: float


def _positions(n: int, length: int, per_image: int, gen: torch.Generator) -> torch.Tensor:
    """(n, k) output positions sampled per image (all of them where the map is small)."""
    if length <= per_image:
        return torch.arange(length).expand(n, length)
    return torch.stack([torch.randperm(length, generator=gen)[:per_image] for _ in range(n)])


def _gather(cols: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """cols (n, c, L) at positions pos (n, k) -> (n * k, c)."""
    picked = torch.gather(cols, 2, pos.unsqueeze(1).expand(-1, cols.shape[1], -1))
    return picked.permute(0, 2, 1).reshape(-1, cols.shape[1])


def _capture(model: nn.Module, name: str, x: torch.Tensor, what: str) -> torch.Tensor:
    """The input (``what="input"``) or output of submodule ``name`` for the batch x; stops the forward there."""
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, inp, out):
        seen["t"] = inp[0] if what == "input" else out
        raise _Stop

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["t"]


@torch.no_grad()
def reconstruct(small: nn.Module, dense: nn.Module, out_index: dict[str, torch.Tensor], images: torch.Tensor,
                positions_per_image: int = 64, ridge: float = 1e-3, batch: int = 256, seed: int = 0,
                desc: str = "reconstruct", progress: bool = True) -> list[LayerFit]:
    """Refit every conv2d of ``small`` but the first (whose input is the image) in place, in forward order.

    ``out_index[name]``: the dense conv's output channels the shrunk conv kept (all where absent); ``images``:
    normalized inputs (a few hundred training images). Returns one :class:`LayerFit` per refitted conv.
    """
    small.eval()
    dense.eval()
    convs = [n for n, m in small.named_modules() if isinstance(m, nn.Conv2d)]
    gen = torch.Generator().manual_seed(seed)
    fits: list[LayerFit] = []
    for name in console.progress(convs[1:], desc=desc, unit="conv", disable=not progress or None):
        conv = small.get_submodule(name)
        if conv.groups != 1:
            continue
        xs, ys = [], []
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            inp = _capture(small, name, x, "input")
            out = _capture(dense, name, x, "output")
            if name in out_index:
                out = out[:, out_index[name]]
            cols = F.unfold(inp, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
            length = cols.shape[2]
            pos = _positions(len(x), length, positions_per_image, gen)
            xs.append(_gather(cols, pos))
            ys.append(_gather(out.flatten(2), pos))
        X, Y = torch.cat(xs).double(), torch.cat(ys).double()
        if conv.bias is not None:  # the bias is refitted too: a column of ones
            X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
        old = conv.weight.reshape(conv.out_channels, -1).double().T
        if conv.bias is not None:
            old = torch.cat([old, conv.bias.double()[None]], 0)
        gram = X.T @ X
        lam = ridge * gram.diagonal().mean()
        W = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), X.T @ Y)
        norm = Y.pow(2).sum().item()
        before = ((X @ old - Y).pow(2).sum().item()) / norm
        after = ((X @ W - Y).pow(2).sum().item()) / norm
        if after >= before:  # never make a layer worse than plain pruning left it
            fits.append(LayerFit(name, len(X), len(gram), before, before))
            continue
        if conv.bias is not None:
            conv.bias.copy_(W[-1].to(conv.bias.dtype))
            W = W[:-1]
        conv.weight.copy_(W.T.reshape(conv.weight.shape).to(conv.weight.dtype))
        fits.append(LayerFit(name, len(X), len(gram), before, after))
    return fits
