"""Which output channels must be pruned together: a small explicit dependency analysis of the zoo's models.

A *group* is one index space of channels that are removed together: channel ``i`` of a group is output channel
``i - member.offset`` of every member conv (and its BatchNorm) whose range covers ``i``. Removing a group channel
zeroes all those filters, so every tensor that carries the channel is exactly zero there.

CIFAR ResNet (option-A shortcuts):
  * ``inner`` groups, one per basic block: conv1's outputs (= conv2's inputs). Free: nothing else reads them.
  * one ``stream`` group for the residual stream of all stages. Within a stage, every block output is the sum of
    its conv2/bn2 and the block input, so the stem (conv1/bn1, stage 1 only) and every conv2/bn2 of the stage
    share one channel set. Between stages, the first block's shortcut subsamples the previous stage's stream and
    zero-pads it into the middle of the wider one: channel j of stage s-1 is added to channel j + pad of stage s.
    Those two are pruned together (symmetric coupling), so the physically shrunk shortcut is still a zero pad
    (with pads counted among the kept channels), never a scatter. The group is indexed by the last (widest)
    stage; a stage-s member has ``offset`` = the pads of all later stages. Its rounding *segments* are the
    channels each stage adds (stage 1's 16, then the pads of stage 2, then of stage 3), so rounding each segment
    to a multiple of ``round_to`` rounds every stage's width.
  * the linear layer reads the last stage's stream; conv1 of a block reads its stage's (or the previous one's).

GoogLeNet: every conv is its own group (a branch's last conv feeds the concat; a reduction conv feeds one conv).
A concat of four branches is consumed by the next inception's three 1x1 convs and its maxpool branch (and by the
linear layer after the last one): pruning a concat channel zeroes its producing filter only, and the consumers'
input layout is the concatenation of the four producers' channel sets (maxpool of a zero channel is zero).

The analysis is written out for these two architectures instead of traced: option-A's channel zero-padding
(``F.pad`` on the channel dimension) shifts channel indices between stages, which a generic tracer has to
special-case, and the exact, checkable mapping is the contract with the compiler's channel stripping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compiler.errors import UserError
from compiler.models.googlenet import GoogLeNet, Inception
from compiler.models.resnet import CifarResNet, OptionAShortcut


@dataclass
class Member:
    """A producer of a group's channels: ``conv`` output channel ``c`` is group channel ``c + offset``."""

    conv: str
    bn: str | None
    offset: int
    channels: int

    def covers(self) -> range:
        return range(self.offset, self.offset + self.channels)


@dataclass
class Group:
    name: str
    kind: str  # "inner" | "stream" | "stem" | "branch"
    size: int
    members: list[Member]
    segments: list[list[int]]  # group channel indices; each segment's kept count is rounded separately
    prunable: bool = True


@dataclass
class Graph:
    """Groups, plus each consumer's input channel layout (to shrink it) and the ResNet shortcuts."""

    arch: str  # "resnet" | "googlenet"
    groups: list[Group]
    # consumer (conv or linear) -> its input channels as a concatenation of (producer conv | None = fixed, count)
    inputs: dict[str, list[tuple[str | None, int]]]
    # option-A shortcut module -> (conv producing its input channels, conv producing its output channels)
    shortcuts: dict[str, tuple[str, str]] = field(default_factory=dict)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def convs(self) -> list[str]:
        return [m.conv for g in self.groups for m in g.members]

    def group_of(self) -> dict[str, Group]:
        return {m.conv: g for g in self.groups for m in g.members}

    def consumers(self) -> dict[str, list[str]]:
        """producer conv -> the consumers that read its channels."""
        out: dict[str, list[str]] = {}
        for consumer, layout in self.inputs.items():
            for src, _ in layout:
                if src is not None:
                    out.setdefault(src, []).append(consumer)
        return out


def analyze(model: nn.Module, prune_stream: bool = False) -> Graph:
    """The dependency graph of a zoo model. ``prune_stream`` makes ResNet's residual-stream group prunable."""
    if isinstance(model, CifarResNet):
        return _resnet(model, prune_stream)
    if isinstance(model, GoogLeNet):
        return _googlenet(model)
    raise UserError(f"nothing prunable: no dependency analysis for {type(model).__name__} "
                    "(supported: CIFAR ResNet, GoogLeNet)")


def _resnet(model: CifarResNet, prune_stream: bool) -> Graph:
    stages = [getattr(model, f"layer{s}") for s in (1, 2, 3)]
    widths = [stage[0].conv2.out_channels for stage in stages]
    stem_width = model.conv1.out_channels
    if stem_width != widths[0]:
        raise UserError("nothing prunable: unexpected ResNet layout (stem width differs from stage 1)")
    # offset of each stage's channels inside the last stage's index space
    pads = []
    prev = stem_width
    for s, stage in enumerate(stages):
        sc = stage[0].shortcut
        pads.append(sc.pad if isinstance(sc, OptionAShortcut) else 0)
        if not isinstance(sc, OptionAShortcut) and widths[s] != prev:
            raise UserError("nothing prunable: unexpected ResNet shortcut")
        prev = widths[s]
    offsets = [sum(pads[s + 1:]) for s in range(len(stages))]
    last = widths[-1]

    groups: list[Group] = []
    inputs: dict[str, list[tuple[str | None, int]]] = {"conv1": [(None, model.conv1.in_channels)]}
    shortcuts: dict[str, tuple[str, str]] = {}
    stream = [Member("conv1", "bn1", offsets[0], stem_width)]
    prev_src, prev_width = "conv1", stem_width
    for s, stage in enumerate(stages, start=1):
        for i, block in enumerate(stage):
            p = f"layer{s}.{i}"
            groups.append(Group(f"{p}.inner", "inner", block.conv1.out_channels,
                                [Member(f"{p}.conv1", f"{p}.bn1", 0, block.conv1.out_channels)],
                                [list(range(block.conv1.out_channels))]))
            stream.append(Member(f"{p}.conv2", f"{p}.bn2", offsets[s - 1], block.conv2.out_channels))
            inputs[f"{p}.conv1"] = [(prev_src, prev_width)]
            inputs[f"{p}.conv2"] = [(f"{p}.conv1", block.conv1.out_channels)]
            if isinstance(block.shortcut, OptionAShortcut):
                shortcuts[f"{p}.shortcut"] = (prev_src, f"{p}.conv2")
            prev_src, prev_width = f"{p}.conv2", block.conv2.out_channels
    inputs["linear"] = [(prev_src, prev_width)]
    # rounding segments of the stream: the channels each stage adds to the previous one
    segments, seen = [], set()
    for s in range(len(stages)):
        seg = [c for c in range(offsets[s], offsets[s] + widths[s]) if c not in seen]
        seen.update(seg)
        if seg:
            segments.append(seg)
    groups.insert(0, Group("stream", "stream", last, stream, segments, prunable=prune_stream))
    return Graph("resnet", groups, inputs, shortcuts)


def _conv_bn_pairs(seq: nn.Sequential, prefix: str) -> list[tuple[str, str | None, nn.Conv2d]]:
    mods = list(seq.named_children())
    out = []
    for k, (name, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            bn = None
            if k + 1 < len(mods) and isinstance(mods[k + 1][1], nn.BatchNorm2d):
                bn = f"{prefix}.{mods[k + 1][0]}"
            out.append((f"{prefix}.{name}", bn, m))
    return out


def _googlenet(model: GoogLeNet) -> Graph:
    groups: list[Group] = []
    inputs: dict[str, list[tuple[str | None, int]]] = {}

    def add(conv: str, bn: str | None, m: nn.Conv2d, kind: str) -> None:
        groups.append(Group(conv, kind, m.out_channels, [Member(conv, bn, 0, m.out_channels)],
                            [list(range(m.out_channels))]))

    (stem, stem_bn, stem_conv), = _conv_bn_pairs(model.pre_layers, "pre_layers")
    add(stem, stem_bn, stem_conv, "stem")
    inputs[stem] = [(None, stem_conv.in_channels)]
    layout: list[tuple[str | None, int]] = [(stem, stem_conv.out_channels)]
    for name, block in model.named_children():
        if not isinstance(block, Inception):
            continue
        concat = []
        for b in ("b1", "b2", "b3", "b4"):
            pairs = _conv_bn_pairs(getattr(block, b), f"{name}.{b}")
            src = list(layout)
            for conv, bn, m in pairs:
                inputs[conv] = src
                add(conv, bn, m, "inner")
                src = [(conv, m.out_channels)]
            groups[-1].kind = "branch"
            concat.append(src[0])
        layout = concat
    inputs["linear"] = layout
    return Graph("googlenet", groups, inputs)
