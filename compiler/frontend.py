"""PyTorch -> Relax: ``torch.export`` the eval-mode model, import it with weights as constants, fold BatchNorm.

The module's ``main`` takes one float32 NCHW tensor (already normalized) and returns the logits tensor.
The batch dimension is static (``batch``) or symbolic (``batch=None``: one compiled module serves every batch).
"""

from __future__ import annotations

import torch
import tvm
from tvm.relax.frontend.torch import from_exported_program

from compiler.models import INPUT_SHAPE


def fuse_conv_bn(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the eval-mode model with every conv2d -> BatchNorm pair folded into the conv's weight and bias.

    torch.fx's fuser handles convs with a bias of their own (GoogLeNet) as well as bias-free ones; Relax's
    FoldBatchnormToConv2D only matches a BatchNorm directly on a conv2d, so folding happens here, before export.
    """
    from torch.fx.experimental.optimization import fuse

    return fuse(model.eval(), inplace=False)


def export(model: torch.nn.Module, batch: int | None = 1) -> torch.export.ExportedProgram:
    model = fuse_conv_bn(model)
    example = torch.zeros(batch or 2, *INPUT_SHAPE)
    dynamic_shapes = None
    if batch is None:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)


def import_model(model: torch.nn.Module, batch: int | None = 1) -> tvm.IRModule:
    """Fold BatchNorm into conv2d, export and import ``model``: conv2d (constant weight) + bias add per layer."""
    ep = export(model, batch)
    mod = from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    return fold_batchnorm(mod)


def fold_batchnorm(mod: tvm.IRModule) -> tvm.IRModule:
    """Safety net for a BatchNorm the fuser did not see: :class:`passes.fold_batchnorm.FoldBatchnorm`."""
    from passes.fold_batchnorm import FoldBatchnorm

    return FoldBatchnorm()(mod)
