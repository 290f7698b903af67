"""Structured filter pruning (phase one of the hybrid optimization): whole output channels are zeroed.

Modules, kept apart as in Torch-Pruning: :mod:`.dependency` (which channels are coupled), :mod:`.importance`
(criteria), :mod:`.pruner` (global allocation for a FLOPs target, masks, the physically shrunk copy, counting)
and :mod:`.cli` (the ``prune`` verb with fine-tuning).

The pruned checkpoint keeps the dense shapes; its ``pruning`` record (plain python types) is the contract with
the compiler, which strips the zeroed channels::

    {"format": "cifar-hybrid-compiler/pruning", "version": 1,
     "flops_convention": "multiply-accumulates (MACs) of conv + linear layers for one 3x32x32 image",
     "criterion": "taylor" | "l1" | "bn", "flops_reduction_requested": 0.5, "flops_reduction": 0.5018 (achieved),
     "round_to": 8, "floor": 0.1, "prune_stream": False, "source_sha256": "...", "source": "path",
     "bn_batches": 20, "flops_dense": int, "flops_pruned": int, "params_dense": int, "params_pruned": int,
     "layers": {"<conv module name>": {"bn": "<its BatchNorm module name>" | None, "channels": int (dense),
                                       "group": "<dependency group>", "kept": [kept output channel indices]}}}

A removed channel ``c`` of conv ``L`` has ``L.weight[c]``, ``L.bias[c]``, ``bn.weight[c]``, ``bn.bias[c]`` and
``bn.running_mean[c]`` equal to 0 and ``bn.running_var[c]`` equal to 1, so it is exactly 0 after BN and ReLU.
:func:`pruner.masks_from_record` turns the record back into masks.
"""

from compiler.prune.dependency import Graph, Group, Member, analyze
from compiler.prune.importance import CRITERIA, compute as compute_importance
from compiler.prune.pruner import (
    FLOPS_CONVENTION, MaskKeeper, Pruned, apply_masks, count, expand_into, make_record, masks_from_kept,
    masks_from_record, prune, recalibrate_bn, shrink, zeroed_masks,
)

__all__ = [
    "CRITERIA", "FLOPS_CONVENTION", "Graph", "Group", "MaskKeeper", "Member", "Pruned", "analyze", "apply_masks",
    "compute_importance", "count", "expand_into", "make_record", "masks_from_kept", "masks_from_record", "prune",
    "recalibrate_bn", "shrink", "zeroed_masks",
]
