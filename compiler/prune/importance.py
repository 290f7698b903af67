"""Channel importance per group: one score per group channel, summed over the group's coupled members.

* ``l1``: L1 norm of each filter (Li et al. 2017, "Pruning Filters for Efficient ConvNets").
* ``bn``: |gamma| of the BatchNorm after each filter (Liu et al. 2017, "network slimming" without the sparsity
  training).
* ``taylor``: first-order Taylor estimate of the loss change when the channel's BN output is zeroed
  (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning"): for a BN output y = gamma x^ + beta,
  gamma dL/dgamma + beta dL/dbeta = sum(dL/dy * y), the first-order change of the loss when y is set to 0. Summed
  over the coupled members, squared per batch, averaged over a few training batches (model in eval mode, so the
  estimate is for the deployed BN statistics).

``l1`` and ``bn`` are scale-dependent per layer, so for a global ranking each group's scores are divided by the
group's mean (as Torch-Pruning's ``normalizer="mean"``); ``taylor`` is a loss change, comparable across layers as
it is.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from compiler.prune.dependency import Graph

CRITERIA = ("l1", "bn", "taylor")


def _mean_normalized(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v / v.mean().clamp_min(1e-12) for k, v in scores.items()}


@torch.no_grad()
def l1_norm(model: nn.Module, graph: Graph, normalize: bool = True) -> dict[str, torch.Tensor]:
    """Group name -> L1 norm of the filters producing each group channel (summed over coupled members)."""
    out = {}
    for g in graph.groups:
        score = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            w = model.get_submodule(m.conv).weight.detach().double()
            score[m.offset:m.offset + m.channels] += w.abs().flatten(1).sum(1)
        out[g.name] = score
    return _mean_normalized(out) if normalize else out


@torch.no_grad()
def bn_scale(model: nn.Module, graph: Graph, normalize: bool = True) -> dict[str, torch.Tensor]:
    """Group name -> |gamma| of the BatchNorm after each producing filter (filter L1 where there is no BN)."""
    out = {}
    for g in graph.groups:
        score = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            if m.bn is not None:
                v = model.get_submodule(m.bn).weight.detach().double().abs()
            else:
                v = model.get_submodule(m.conv).weight.detach().double().abs().flatten(1).sum(1)
            score[m.offset:m.offset + m.channels] += v
        out[g.name] = score
    return _mean_normalized(out) if normalize else out


def taylor(model: nn.Module, graph: Graph, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Group name -> mean over batches of (sum over members of sum(dL/dy * y))^2, y = each member's BN output."""
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    out = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in graph.groups}
    n = 0
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for g in graph.groups:
                    contrib = torch.zeros(g.size, dtype=torch.float64)
                    for m in g.members:
                        if m.bn is not None:
                            bn = model.get_submodule(m.bn)
                            c = bn.weight * bn.weight.grad + bn.bias * bn.bias.grad
                        else:
                            conv = model.get_submodule(m.conv)
                            c = (conv.weight * conv.weight.grad).flatten(1).sum(1)
                            if conv.bias is not None:
                                c = c + conv.bias * conv.bias.grad
                        contrib[m.offset:m.offset + m.channels] += c.double()
                    out[g.name] += contrib.pow(2)
            n += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    if n == 0:
        raise ValueError("taylor importance needs at least one batch")
    return {k: v / n for k, v in out.items()}


def compute(criterion: str, model: nn.Module, graph: Graph,
            batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Importance by criterion name (see :data:`CRITERIA`); ``taylor`` needs ``batches`` of (inputs, labels)."""
    if criterion == "l1":
        return l1_norm(model, graph)
    if criterion == "bn":
        return bn_scale(model, graph)
    if criterion == "taylor":
        if batches is None:
            raise ValueError("taylor importance needs training batches")
        return taylor(model, graph, batches)
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
