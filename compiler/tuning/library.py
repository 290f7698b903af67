"""The kernel library: every conv2d workload a pruned CIFAR ResNet can contain, as a few covering networks.

A CIFAR ResNet (depth 6n+2) pruned by this project (``prune``, without ``--prune-stream``) keeps its residual
stream (16 / 32 / 64 channels in stages 1-3) and prunes each block's inner channels to a width the pruner allows:
a multiple of ``round_to`` from the floor up, or the full width (:func:`allowed_widths`, the pruner's own rule).
Whatever the depth, every block of a stage computes the same thing for a given inner width; what differs is
where a block sits: a stage's first block (stride 2 and the padded shortcut in stages 2 and 3) and a stage's last
block (its output feeds the next stage, or the classifier). So the kernels of every such model are those of a
few ResNet56s (:func:`covering_plans`): each holds, per stage, a first block, then a block of every allowed width,
rotated so that across the networks every width is once the first and once the last block of every stage.

``tune --library`` tunes the union of their kernels into ``tuning_logs/<target>/kernels-<precision>-b<batch>``;
``build`` applies it to any model under the model's own database (which wins where both have a kernel), and the
build summary and manifest say how many kernels each covered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compiler.errors import SettingError

LIBRARY_MODEL = "kernels"  # the model name of a library database (tuning_logs/<target>/kernels-<variant>)
STAGE_WIDTHS = (16, 32, 64)  # a CIFAR ResNet's stream width per stage
ROUND_TO = 8  # the pruner's default rounding (prune --round-to)
FLOOR = 0.1  # the pruner's default floor (prune --floor)


def allowed_widths(channels: int, round_to: int = ROUND_TO, floor: float = FLOOR) -> list[int]:
    """The kept widths the pruner can give an inner group of ``channels`` channels, smallest first: the multiples
    of ``round_to`` from its minimum (``floor`` of the channels, rounded up) below ``channels``, and ``channels``
    (compiler.prune.pruner._min_keep / _next_kept)."""
    from compiler.prune.pruner import _min_keep  # the pruner's own floor rule

    if channels < 1 or round_to < 1 or not 0.0 <= floor < 1.0:
        raise SettingError("channels", f"must be positive (round_to >= 1, floor in [0, 1)), got {channels}")
    low = _min_keep(channels, round_to, floor)
    widths = list(range(low, channels, round_to)) if low < channels else []
    return sorted({*widths, channels})


@dataclass(frozen=True)
class Plan:
    """One covering network: the inner width of every block, per stage (the first entry is the stage's first
    block)."""

    widths: tuple[tuple[int, ...], ...]

    @property
    def blocks_per_stage(self) -> int:
        return len(self.widths[0])

    @property
    def depth(self) -> int:
        return 6 * self.blocks_per_stage + 2


def covering_plans(stage_widths=STAGE_WIDTHS, round_to: int = ROUND_TO, floor: float = FLOOR) -> list[Plan]:
    """The fewest ResNets whose blocks hold every (stage, position, inner width) a pruned CIFAR ResNet can have.

    Network k puts width ``W[k]`` first in every stage (W: that stage's allowed widths, taken cyclically), then
    all of W starting from ``W[k + 1]``, so its last block has width ``W[k]`` too; with as many networks as the
    widest stage has widths, every width is a first, a middle and a last block of every stage.
    """
    per_stage = [allowed_widths(c, round_to, floor) for c in stage_widths]
    count = max(len(w) for w in per_stage)
    n = 1 + count  # a first block, then a block of every width of the widest stage
    plans = []
    for k in range(count):
        stages = []
        for w in per_stage:
            rest = [w[(k + 1 + i) % len(w)] for i in range(n - 1)]
            stages.append((w[k % len(w)], *rest))
        plans.append(Plan(tuple(stages)))
    return plans


def _zeroed_resnet(depth: int, seed: int, width_of):
    """A ResNet of ``depth`` with random weights whose i-th prunable group keeps ``width_of(i, group, generator)``
    random channels, the others zeroed (what ``prune`` leaves behind; build strips them). ``(model, widths)``."""
    import torch

    from compiler.models import build_model
    from compiler.prune import dependency, pruner

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the weights
    model = build_model(f"resnet{depth}").eval()
    graph = dependency.analyze(model)
    kept = {g.name: list(range(g.size)) for g in graph.groups}
    widths = []
    for i, g in enumerate(g for g in graph.groups if g.prunable):
        w = width_of(i, g, gen)
        kept[g.name] = sorted(torch.randperm(g.size, generator=gen)[:w].tolist())
        widths.append(w)
    pruner.apply_masks(model, graph, pruner.masks_from_kept(graph, kept))
    return model, widths


def plan_model(plan: Plan, seed: int = 0):
    """A ResNet of ``plan.depth`` with random weights, its blocks' inner channels zeroed down to the plan's widths."""
    if len({len(stage) for stage in plan.widths}) != 1 or len(plan.widths) != len(STAGE_WIDTHS):
        raise ValueError(f"a plan has a width for every block of every stage, got {plan.widths}")
    widths = [w for stage in plan.widths for w in stage]  # a ResNet of plan.depth: one prunable group per block
    return _zeroed_resnet(plan.depth, seed, lambda i, _g, _gen: widths[i])[0]


def random_pruned_model(depth: int, seed: int, round_to: int = ROUND_TO, floor: float = FLOOR):
    """A ResNet of ``depth`` with random weights, every block pruned to a random allowed width (for tests and
    benchmarks: a pruned model no database was tuned for). Returns ``(model, widths per block)``."""
    import torch

    def width_of(_i, g, gen) -> int:
        choices = allowed_widths(g.size, round_to, floor)
        return choices[int(torch.randint(len(choices), (1,), generator=gen))]

    return _zeroed_resnet(depth, seed, width_of)


def library_model(plans: list[Plan] | None = None, seed: int = 0):
    """One module holding every covering network side by side on the same input (``forward`` returns their
    logits as a tuple): lowered as build lowers a model, its kernels are the library's tuning tasks."""
    import torch

    class Library(torch.nn.Module):
        def __init__(self, nets):
            super().__init__()
            self.nets = torch.nn.ModuleList(nets)

        def forward(self, x):
            return tuple(net(x) for net in self.nets)

    plans = covering_plans() if plans is None else plans
    return Library([plan_model(p, seed + i) for i, p in enumerate(plans)]).eval()


LIBRARY_CALIB_IMAGES = 8  # random inputs: the ranges do not change the kernels, only their constants' values


def describe(plans: list[Plan]) -> dict:
    """What a library database's meta.json records as its shapes: the rule and the covering networks."""
    return {"library": "every conv2d of a CIFAR ResNet pruned by `prune` (inner channels, no --prune-stream)",
            "stage_widths": list(STAGE_WIDTHS), "round_to": ROUND_TO, "floor": FLOOR,
            "networks": [[list(stage) for stage in p.widths] for p in plans]}


def tune_library(settings, *, progress: bool = True) -> dict:
    """``tune --library``: lower the covering networks as build lowers a model (``settings``' target, precision
    and batch; int8 calibrated on random inputs) and tune their kernels into
    ``tuning_logs/<target>/kernels-<precision>-b<batch>`` (or ``settings.log_dir``); a rerun continues it."""
    import targets

    from compiler import precision
    from compiler.build import lower
    from compiler.tuning import database
    from compiler.tuning.session import tune_module

    spec = targets.get(settings.target)
    prec, _why = precision.choose(settings.precision, spec)
    plans = covering_plans()
    lowered = lower(library_model(plans), settings.batch, prec, spec, calib_images=LIBRARY_CALIB_IMAGES,
                    calibration=settings.quant.calibration, keep=settings.quant.keep_fp32, untrained=True)
    directory = settings.log_dir or database.tune_dir(spec, database.library_dir(spec.name, prec, settings.batch))
    return tune_module(lowered.module, spec, LIBRARY_MODEL, prec, settings.batch, settings.trials,
                       directory=directory, tracker=settings.tracker, key=settings.key, timeout=settings.timeout,
                       trials_per_iter=settings.trials_per_iter, num_cores=settings.num_cores, seed=settings.seed,
                       population=settings.population, keep_best=settings.keep_best, show_progress=progress,
                       shapes=describe(plans))
