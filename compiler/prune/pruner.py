"""Global channel allocation for a FLOPs target, masks, and the physically shrunk copy.

FLOPs here are multiply-accumulates (MACs) of the convolutions and the linear layer for one 3x32x32 image:
``torch.utils.flop_counter.FlopCounterMode`` counts 2 per multiply-accumulate, and :func:`count` halves it
(ResNet56 dense: 125.5 M, as it is usually quoted). BatchNorm, ReLU, pooling and adds are not counted.

The pruned model stays dense-shaped: a removed channel has its conv filter, conv bias, BN weight and BN bias set
to 0 (and BN running mean 0, running var 1), so it is exactly 0 after BN and ReLU in train and eval mode.
:class:`MaskKeeper` re-applies that after every optimizer step. :func:`shrink` builds the physically smaller
copy (real smaller Conv2d / BatchNorm2d / Linear, asymmetric option-A pads) that computes the same function.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compiler.errors import SettingError, UserError
from compiler.models import INPUT_SHAPE
from compiler.prune.dependency import Graph

RECORD_FORMAT = "cifar-hybrid-compiler/pruning"
FLOPS_CONVENTION = "multiply-accumulates (MACs) of conv + linear layers for one 3x32x32 image"

Masks = dict[str, torch.Tensor]  # conv name -> bool (out_channels,), True = kept


# ---------------------------------------------------------------- counting

def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def count(model: nn.Module, input_shape: tuple[int, ...] = INPUT_SHAPE) -> tuple[int, int]:
    """(MACs, parameters) of a model for one input, counted with FlopCounterMode (FLOPs / 2)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, *input_shape, dtype=_dtype(model)))
    finally:
        model.train(was_training)
    return int(fc.get_total_flops()) // 2, sum(p.numel() for p in model.parameters())


def mac_units(model: nn.Module, graph: Graph, input_shape: tuple[int, ...] = INPUT_SHAPE) -> dict[str, int]:
    """Per conv: MACs per (input channel x output channel) = k_h k_w H_out W_out; per linear: its out_features."""
    units: dict[str, int] = {}
    hooks = []
    for name in list(graph.inputs):
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise UserError(f"nothing prunable: grouped convolution {name} is not supported")

            def hook(m, inp, out, name=name):
                units[name] = m.kernel_size[0] * m.kernel_size[1] * out.shape[2] * out.shape[3]
            hooks.append(mod.register_forward_hook(hook))
        elif isinstance(mod, nn.Linear):
            units[name] = mod.out_features
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=_dtype(model)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return units


# ---------------------------------------------------------------- allocation

def _min_keep(n: int, round_to: int, floor: float) -> int:
    need = max(1, math.ceil(floor * n - 1e-9))
    return min(n, math.ceil(need / round_to) * round_to)


def _next_kept(k: int, n: int, round_to: int) -> int:
    """The next smaller allowed kept count of an n-channel segment: a multiple of round_to below k."""
    if k == n and n % round_to:
        return (n // round_to) * round_to
    return k - round_to


def allocate(graph: Graph, scores: dict[str, torch.Tensor], units: dict[str, int], flops_reduction: float,
             round_to: int = 8, floor: float = 0.1, cost_aware: bool = True) -> dict[str, list[int]]:
    """Kept group channels per group, removing the least important channels globally until the MACs drop by
    ``flops_reduction`` (a fraction of the dense MACs; the result removes at least that much).

    The unit of removal is, per rounding segment of a prunable group, its least important still-kept channels,
    down to the next multiple of ``round_to``; a segment keeps at least ``floor`` of its channels (rounded up to
    ``round_to``). With ``cost_aware`` the chunk with the least importance per MAC saved goes first, else the
    least important.
    """
    if not 0.0 < flops_reduction < 1.0:
        raise SettingError("flops_reduction", f"must be a fraction in (0, 1), got {flops_reduction}")
    consumers = graph.consumers()
    kept = {g.name: torch.ones(g.size, dtype=torch.bool) for g in graph.groups}
    outk = {m.conv: m.channels for g in graph.groups for m in g.members}
    for name in units:
        if name not in outk:  # linear: constant outputs, unit already holds out_features
            outk[name] = 1
    ink = {c: _in_channels(graph, outk, c) for c in graph.inputs}
    total = sum(units[c] * ink[c] * outk[c] for c in graph.inputs)
    dense = total
    target = dense * (1.0 - flops_reduction)
    segs = _segments(graph, scores, round_to, floor)

    while total > target:
        best = _cheapest_chunk(segs, units, ink, outk, consumers, round_to, cost_aware)
        if best is None:
            reached = 1.0 - total / dense
            raise UserError(f"cannot remove {flops_reduction:.0%} of the FLOPs: the floor ({floor}) and "
                            f"the rounding to multiples of {round_to} allow at most {reached:.1%}")
        _, si, nxt, chans, saved = best
        seg = segs[si]
        seg["k"] = nxt
        kept[seg["group"].name][chans] = False
        for c in _drop(seg["group"], chans, outk, consumers):
            ink[c] = _in_channels(graph, outk, c)
        total -= saved
    return {name: k.nonzero().flatten().tolist() for name, k in kept.items()}


def _in_channels(graph: Graph, outk: dict[str, int], consumer: str) -> int:
    """Input channels ``consumer`` has now: the kept outputs of its sources (fixed counts for the image)."""
    return sum(n if src is None else outk[src] for src, n in graph.inputs[consumer])


def _segments(graph: Graph, scores: dict[str, torch.Tensor], round_to: int, floor: float) -> list[dict]:
    """The rounding segments of the prunable groups that can lose channels, each with its channels in ascending
    importance (``order``), its size ``n``, kept count ``k`` and least count ``lo``."""
    segs = []
    for g in graph.groups:
        if not g.prunable:
            continue
        s = scores[g.name]
        for seg in g.segments:
            n = len(seg)
            lo = _min_keep(n, round_to, floor)
            if _next_kept(n, n, round_to) < lo:
                continue
            order = sorted(seg, key=lambda c: (float(s[c]), c))
            segs.append({"group": g, "order": order, "n": n, "k": n, "lo": lo, "score": s})
    if not segs:
        raise UserError(f"nothing prunable: every prunable layer is already at its floor "
                        f"(--round-to {round_to}, --floor {floor}); lower them")
    return segs


def _hit(member, chans: list[int]) -> int:
    """How many of the group channels ``chans`` fall in ``member``'s slice of the group."""
    return sum(1 for c in chans if member.offset <= c < member.offset + member.channels)


def _cheapest_chunk(segs: list[dict], units: dict[str, int], ink: dict[str, int], outk: dict[str, int],
                    consumers: dict, round_to: int, cost_aware: bool):
    """``(key, segment index, next kept count, channels, MACs saved)`` of the chunk to remove next: the least
    importance (per MAC saved with ``cost_aware``); None when every segment is at its floor."""
    best = None
    for si, seg in enumerate(segs):
        nxt = _next_kept(seg["k"], seg["n"], round_to)
        if nxt < seg["lo"]:
            continue
        start = seg["n"] - seg["k"]
        chans = seg["order"][start:start + seg["k"] - nxt]
        imp = float(sum(float(seg["score"][c]) for c in chans))
        saved = 0
        for m in seg["group"].members:
            d = _hit(m, chans)
            if not d:
                continue
            saved += units[m.conv] * ink[m.conv] * d
            for c in consumers.get(m.conv, ()):
                saved += units[c] * d * outk[c]
        key = imp / max(saved, 1e-9) if cost_aware else imp
        if best is None or key < best[0]:
            best = (key, si, nxt, chans, saved)
    return best


def _drop(group, chans: list[int], outk: dict[str, int], consumers: dict) -> set[str]:
    """Remove ``chans`` from ``group``'s convs' output counts; the consumers whose input counts changed."""
    touched = set()
    for m in group.members:
        d = _hit(m, chans)
        if d:
            outk[m.conv] -= d
            touched.update(consumers.get(m.conv, ()))
    return touched


def masks_from_kept(graph: Graph, kept: dict[str, list[int]]) -> Masks:
    """Conv name -> bool mask of its output channels, from kept group channels."""
    masks = {}
    for g in graph.groups:
        k = torch.zeros(g.size, dtype=torch.bool)
        k[kept[g.name]] = True
        for m in g.members:
            masks[m.conv] = k[m.offset:m.offset + m.channels].clone()
    return masks


# ---------------------------------------------------------------- masking

@torch.no_grad()
def apply_masks(model: nn.Module, graph: Graph, masks: Masks) -> None:
    """Zero every removed channel: conv filter and bias, BN weight and bias, BN running mean (running var = 1)."""
    for g in graph.groups:
        for m in g.members:
            drop = (~masks[m.conv]).nonzero().flatten()
            if drop.numel() == 0:
                continue
            conv = model.get_submodule(m.conv)
            conv.weight.index_fill_(0, drop, 0.0)
            if conv.bias is not None:
                conv.bias.index_fill_(0, drop, 0.0)
            if m.bn is not None:
                bn = model.get_submodule(m.bn)
                bn.weight.index_fill_(0, drop, 0.0)
                bn.bias.index_fill_(0, drop, 0.0)
                if bn.running_mean is not None:
                    bn.running_mean.index_fill_(0, drop, 0.0)
                    bn.running_var.index_fill_(0, drop, 1.0)


class MaskKeeper:
    """``after_step`` hook for :func:`compiler.train.fit`: re-applies the masks after every optimizer step."""

    def __init__(self, model: nn.Module, graph: Graph, masks: Masks):
        self.model, self.graph, self.masks = model, graph, masks
        apply_masks(model, graph, masks)

    def __call__(self) -> None:
        apply_masks(self.model, self.graph, self.masks)


@torch.no_grad()
def zeroed_masks(model: nn.Module, graph: Graph) -> Masks:
    """Masks read off the weights: a channel is removed when its filter, bias and BN weight and bias are all 0."""
    masks = {}
    for g in graph.groups:
        for m in g.members:
            conv = model.get_submodule(m.conv)
            alive = conv.weight.flatten(1).ne(0).any(1)
            if conv.bias is not None:
                alive |= conv.bias.ne(0)
            if m.bn is not None:
                bn = model.get_submodule(m.bn)
                alive |= bn.weight.ne(0) | bn.bias.ne(0)
            masks[m.conv] = alive.cpu()
    return masks


# ---------------------------------------------------------------- physical shrinking

def input_index(graph: Graph, consumer: str, masks: Masks) -> torch.Tensor:
    """The input channels of a consumer (conv or linear) that carry kept channels."""
    parts, offset = [], 0
    for src, n in graph.inputs[consumer]:
        idx = torch.arange(n) if src is None else masks[src].nonzero().flatten()
        parts.append(idx + offset)
        offset += n
    return torch.cat(parts)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def shrink(model: nn.Module, graph: Graph, masks: Masks) -> nn.Module:
    """A physically smaller copy: removed channels deleted from convs, BNs, the linear layer and the shortcuts."""
    small = copy.deepcopy(model)
    bn_of = {m.conv: m.bn for g in graph.groups for m in g.members}
    for name in graph.inputs:
        mod = model.get_submodule(name)
        inp = input_index(graph, name, masks)
        if isinstance(mod, nn.Linear):
            new = nn.Linear(len(inp), mod.out_features, bias=mod.bias is not None, dtype=mod.weight.dtype)
            new.weight.copy_(mod.weight[:, inp])
            if mod.bias is not None:
                new.bias.copy_(mod.bias)
            _set(small, name, new)
            continue
        out = masks[name].nonzero().flatten()
        new = nn.Conv2d(len(inp), len(out), mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                        bias=mod.bias is not None, padding_mode=mod.padding_mode, dtype=mod.weight.dtype)
        new.weight.copy_(mod.weight[out][:, inp])
        if mod.bias is not None:
            new.bias.copy_(mod.bias[out])
        _set(small, name, new)
        if bn_of.get(name):
            bn = model.get_submodule(bn_of[name])
            nb = nn.BatchNorm2d(len(out), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                dtype=bn.running_mean.dtype if bn.track_running_stats else bn.weight.dtype)
            if bn.affine:
                nb.weight.copy_(bn.weight[out])
                nb.bias.copy_(bn.bias[out])
            if bn.track_running_stats:
                nb.running_mean.copy_(bn.running_mean[out])
                nb.running_var.copy_(bn.running_var[out])
                nb.num_batches_tracked.copy_(bn.num_batches_tracked)
            _set(small, bn_of[name], nb)
    for name, (src, dst) in graph.shortcuts.items():
        sc = small.get_submodule(name)
        cin, cout = masks[src], masks[dst]
        pad = sc.pad
        if not torch.equal(cout[pad:pad + len(cin)], cin):
            raise ValueError(f"{name}: stream channels of two stages are not pruned together")
        sc.pad = int(cout[:pad].sum())
        sc.extra = int(cout[pad + len(cin):].sum())
    for mod in small.modules():  # GoogLeNet bookkeeping attribute
        if hasattr(mod, "out_channels") and hasattr(mod, "b1") and hasattr(mod, "b4"):
            mod.out_channels = sum([c for c in b if isinstance(c, nn.Conv2d)][-1].out_channels
                                   for b in (mod.b1, mod.b2, mod.b3, mod.b4))
    small.train(model.training)
    return small


@torch.no_grad()
def expand_into(dense: nn.Module, small: nn.Module, graph: Graph, masks: Masks) -> None:
    """Write a shrunk model's weights back into the dense-shaped ``dense`` at the kept positions, then re-mask."""
    bn_of = {m.conv: m.bn for g in graph.groups for m in g.members}
    for name in graph.inputs:
        d, s = dense.get_submodule(name), small.get_submodule(name)
        inp = input_index(graph, name, masks)
        if isinstance(d, nn.Linear):
            d.weight[:, inp] = s.weight
            if d.bias is not None:
                d.bias.copy_(s.bias)
            continue
        out = masks[name].nonzero().flatten()
        d.weight[out[:, None], inp[None, :]] = s.weight.contiguous()
        if d.bias is not None:
            d.bias[out] = s.bias
        if bn_of.get(name):
            db, sb = dense.get_submodule(bn_of[name]), small.get_submodule(bn_of[name])
            if db.affine:
                db.weight[out] = sb.weight
                db.bias[out] = sb.bias
            if db.track_running_stats:
                db.running_mean[out] = sb.running_mean
                db.running_var[out] = sb.running_var
                db.num_batches_tracked.copy_(sb.num_batches_tracked)
    apply_masks(dense, graph, masks)


# ---------------------------------------------------------------- the record in the checkpoint

def make_record(graph: Graph, masks: Masks, **info) -> dict:
    """The checkpoint's ``pruning`` record (plain python types; see compiler/prune/__init__.py for the keys)."""
    layers = {}
    for g in graph.groups:
        for m in g.members:
            layers[m.conv] = {"bn": m.bn, "channels": m.channels, "group": g.name,
                              "kept": masks[m.conv].nonzero().flatten().tolist()}
    record = {"format": RECORD_FORMAT, "version": 1, "flops_convention": FLOPS_CONVENTION}
    record.update(info)
    record["layers"] = layers
    return record


def masks_from_record(record: dict) -> Masks:
    """Conv name -> bool mask of kept output channels, from a checkpoint's ``pruning`` record."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise UserError("the checkpoint's pruning record is missing or not this project's format")
    masks = {}
    for conv, info in record["layers"].items():
        m = torch.zeros(int(info["channels"]), dtype=torch.bool)
        m[list(info["kept"])] = True
        masks[conv] = m
    return masks


@dataclass
class Pruned:
    """What :func:`prune` did: the kept group channels, the conv masks, and the counts (MACs, params)."""

    kept: dict[str, list[int]]
    masks: Masks
    flops_dense: int
    flops_pruned: int
    params_dense: int
    params_pruned: int

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.flops_pruned / self.flops_dense


def prune(model: nn.Module, graph: Graph, scores: dict[str, torch.Tensor], flops_reduction: float,
          round_to: int = 8, floor: float = 0.1, cost_aware: bool = True) -> Pruned:
    """Allocate, zero the removed channels of ``model`` in place, and count dense and shrunk FLOPs/params."""
    if round_to < 1:
        raise SettingError("round_to", f"must be at least 1, got {round_to}")
    if not 0.0 <= floor < 1.0:
        raise SettingError("floor", f"must be a fraction in [0, 1), got {floor}")
    flops_dense, params_dense = count(model)
    kept = allocate(graph, scores, mac_units(model, graph), flops_reduction, round_to, floor, cost_aware)
    masks = masks_from_kept(graph, kept)
    apply_masks(model, graph, masks)
    flops_pruned, params_pruned = count(shrink(model, graph, masks))
    return Pruned(kept, masks, flops_dense, flops_pruned, params_dense, params_pruned)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` of inputs (train-mode forward, no update
    of weights): after pruning, the layers behind removed channels see shifted activations. Returns the number of
    batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    model.train()
    n = 0
    try:
        for x in batches:
            model(x)
            n += 1
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        model.train(was_training)
    return n
