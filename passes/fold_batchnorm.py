"""FoldBatchnorm: BatchNorm folded into the conv2d before it, any other BatchNorm lowered to arithmetic, constants
folded.

``compiler.frontend`` already folds conv2d -> BatchNorm pairs in PyTorch before export (torch.fx's fuser also
handles convs with a bias of their own, which Relax's ``FoldBatchnormToConv2D`` does not match); this pass is the
safety net in Relax for a BatchNorm the fuser did not see, and the constant folding every later pass expects
(one constant weight per conv2d). On an already folded module it changes nothing.
"""

from __future__ import annotations

import tvm
from tvm import relax

from passes.fold_constant_layout import FoldConstantLayout

__all__ = ["FoldBatchnorm"]


@tvm.transform.module_pass(opt_level=0, name="FoldBatchnorm")
class FoldBatchnorm:
    """``FoldBatchnormToConv2D`` -> ``DecomposeOpsForInference`` -> :class:`FoldConstantLayout` (the importer's
    reshaped biases and transposed weights, in numpy) -> ``FoldConstant`` (the rest)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        seq = tvm.transform.Sequential([
            relax.transform.FoldBatchnormToConv2D(),
            relax.transform.DecomposeOpsForInference(),  # a BatchNorm no conv2d precedes becomes plain arithmetic
            FoldConstantLayout(),
            relax.transform.FoldConstant(),
        ])
        return seq(mod)
