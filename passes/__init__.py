"""Relax IR passes of the compiler, one a file, each a ``tvm.transform`` module pass; reports travel as module
attributes (:mod:`passes.reports`). ``targets.pipeline`` composes them per target and precision.

    FoldBatchnorm      passes/fold_batchnorm.py       BatchNorm into conv2d, constants folded
    FoldConstantLayout passes/fold_constant_layout.py reshape / transpose of constants folded in numpy
    StripZeroChannels  passes/strip_zero_channels.py  physical removal of pruned (provably zero) channels
    Quantize           passes/quantize.py             calibrated int8 compute (NCHW)
    QuantizeWeights    passes/quantize_weights.py     int8-stored weights, fp16 compute
    Int8Layout         passes/int8_layout.py          int8 conv2d in the packed layout of x86 int8 dot products
    ScheduleLayoutKernels passes/schedule_layout.py   a fixed vectorized schedule for that layout's data movers
    ScheduleAmxConv2d  passes/amx.py                  the packed int8 conv2d kernels on Intel AMX tiles (fixed)
    RowsFirstConv2d    passes/rows_first.py           small-weight packed conv2d kernels: parallel loop rows first
    ComputeEpilogueAtConv2d passes/epilogue_at_conv.py a packed conv2d's epilogue tile by tile in its own loop
    FusePadIntoProducer passes/fuse_pad.py            a packed conv2d writes the next one's zero-padded input
    InverseScaleQuantize passes/inverse_scale.py      quantize by the inverse scale: one hoisted division
    RoundByConversion  passes/round_by_conversion.py  quantize's round + clip + narrow: one vcvtps2dq and packs
    MergeParallelLaunches passes/parallel_launch.py  x86 int8 kernels in one thread-pool launch, barriers between
    OutlineLaunchLoops passes/outline_launch.py       that launch's loops call one function per kernel (its code once)
    ParallelFallback   passes/parallel_fallback.py    untuned CPU kernels: their spatial loops on the thread pool
    ApplyByAnchor      passes/apply_by_anchor.py      tuning records of a conv2d applied under another epilogue

and cost counting on the IR (passes/analysis.py).
"""

from passes.analysis import count_flops
from passes.fold_batchnorm import FoldBatchnorm
from passes.strip_zero_channels import StripZeroChannels, report_totals, strip_zero_channels

__all__ = ["FoldBatchnorm", "StripZeroChannels", "count_flops", "report_totals", "strip_zero_channels"]

# int8 quantization (issue 6): calibration, int8 compute, int8-stored weights
# (the functions quantize and quantize_weights are not re-exported: they would shadow their submodules)
from passes.quantize import Quantize, QuantConfig, calibrate, config_for, constant_bytes  # noqa: E402
from passes.quantize_weights import QuantizeWeights  # noqa: E402
from passes.int8_layout import Int8Layout  # noqa: E402

__all__ += ["Int8Layout", "Quantize", "QuantConfig", "QuantizeWeights", "calibrate", "config_for",
            "constant_bytes"]
