"""The compiler as one pipeline of ``tvm.transform`` passes per target and precision.

:func:`pipeline` is the one place that says which passes a build runs; ``build`` (compiler.build.lower and
targets.compile_module), ``tune`` (the kernels it extracts) and the check of which kernels a tuning database
covers (compiler.tuning.database.tasks_applied) all take their passes from it, so what is tuned is what is
built::

    graph (Relax -> Relax, target-aware)        FoldBatchnorm -> StripZeroChannels -> precision:
                                                  fp16          ToMixedPrecision -> FoldConstant
                                                  int8-weights  ToMixedPrecision -> FoldConstant -> QuantizeWeights
                                                  int8          Quantize (calibrated) [-> Int8Layout(x86 int8 ISA)]
    legalize (the kernels MetaSchedule tunes)   library dispatch -> LegalizeOps -> AnnotateTIROpPattern
                                                  -> FoldConstant -> FuseOps -> FuseTIR
                                                  [-> ScheduleLayoutKernels (CPU): int8 layout kernels, not tuned]
    lowering (to the target)                    legalize -> MetaScheduleApplyDatabase -> ApplyByAnchor (a database)
                                                  -> DLight
                                                  (CUDA: GPU rules; CPU: ParallelFallback, the untuned kernels'
                                                  spatial loops on the thread pool; x86 int8:
                                                  RowsFirstConv2d, ComputeEpilogueAtConv2d,
                                                  FusePadIntoProducer, InverseScaleQuantize,
                                                  RoundByConversion, MergeParallelLaunches,
                                                  OutlineLaunchLoops) -> TVM's dataflow lowering
                                                  and finalization (x86 int8: compile_target's LLVM options)

int8 needs a calibration (:func:`passes.quantize.calibrate`, run on the fp32 module :meth:`Pipeline.fp32` makes)
before :meth:`Pipeline.graph` can be built. Reports (channels stripped, layers quantized) travel as module
attributes (:mod:`passes.reports`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import tvm
from tvm import relax

from targets import TargetSpec

__all__ = ["Pipeline", "pipeline", "legalize_passes", "apply_database_passes", "kernel_passes", "compile_target",
           "LLVM_OPTIONS"]

PRECISIONS = ("fp32", "fp16", "int8", "int8-weights")


def legalize_passes(target) -> list:
    """The target's library dispatch, then legalize and fuse: the PrimFuncs after these are the tuning tasks."""
    backend = "cuda" if target.kind.name == "cuda" else "cpu_generic"
    stages = _stages(backend)
    fixed = []
    if target.kind.name == "llvm":  # the packed int8 layout kernels get a fixed schedule, not tuning trials
        from passes.schedule_layout import ScheduleLayoutKernels

        fixed = [ScheduleLayoutKernels(_layout_parallel_min(target))]
        from passes import amx

        if amx.is_amx_target(target):  # the packed conv2d kernels on AMX tiles: a fixed schedule as well
            fixed = [amx.ScheduleAmxConv2d()] + fixed
    return stages.library_dispatch_passes(target) + [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ] + fixed


def apply_database_passes(database) -> list:
    """The records of ``database`` (a MetaSchedule database that lists its records) applied to the legalized
    kernels, under ``with target, database:``: MetaScheduleApplyDatabase for the kernels tuned as they are, then
    :class:`passes.apply_by_anchor.ApplyByAnchor` for those whose conv2d was tuned inside another epilogue."""
    from passes.apply_by_anchor import ApplyByAnchor, by_anchor_block

    return [relax.transform.MetaScheduleApplyDatabase(enable_warning=False), ApplyByAnchor(by_anchor_block(database))]


def kernel_passes(target, database=None) -> list:
    """The lowering's passes up to the scheduled kernels, run under ``with target, database:``: legalize, the
    records of ``database`` (a MetaSchedule database, or None), then DLight's GPU rules (CUDA) or the CPU's
    fallback, pad fusion and launch merging; :meth:`Pipeline.lowering` follows them with TVM's dataflow lowering."""
    tuned = apply_database_passes(database) if database is not None else []
    schedule = [_gpu_rules()] if target.kind.name == "cuda" else (
        [_cpu_fallback()] + _rows_first(target) + _epilogues(target) + _fuse_pads(target) + _inverse_scale(target)
        + _round_by_conversion(target) + _merge_launches(target) + _outline_launches(target))
    return legalize_passes(target) + tuned + schedule


def _layout_parallel_min(target) -> int:
    """The output size from which a layout kernel runs parallel (:mod:`passes.schedule_layout`): on the targets whose
    int8 kernels run in one thread-pool launch (:func:`_merge_launches`) a parallel loop costs a barrier, not waking
    the pool, so the smaller threshold."""
    from passes import schedule_layout

    return (schedule_layout.LAUNCH_PARALLEL_MIN_ELEMENTS if _merge_launches(target)
            else schedule_layout.PARALLEL_MIN_ELEMENTS)


def _stages(backend: str):
    """TVM's per-backend stage lists (the pipeline modules themselves: TVM 0.27's dispatchers in
    tvm.relax.pipeline reach for ``backend.cuda.dataflow_lower_passes``, which the package does not export)."""
    import importlib

    return importlib.import_module(f"tvm.relax.backend.{backend}.pipeline")


def _cpu_fallback():
    """What no tuning record scheduled runs on every core (:mod:`passes.parallel_fallback`)."""
    from passes.parallel_fallback import ParallelFallback

    return ParallelFallback()


def _rows_first(target):
    """On x86 the packed int8 conv2d kernels with small weights run their parallel loop output rows first, so each
    thread reads the rows it wrote (:mod:`passes.rows_first`); before the epilogue pass, which follows that loop."""
    from passes import vnni
    from passes.rows_first import RowsFirstConv2d

    return [RowsFirstConv2d()] if vnni.target_int8_isa(target) is not None else []


def _epilogues(target):
    """On x86 each tuned packed int8 conv2d computes its epilogue tile by tile inside its own parallel loop
    (:mod:`passes.epilogue_at_conv`); it runs on scheduled kernels, before pad fusion."""
    from passes import vnni
    from passes.epilogue_at_conv import ComputeEpilogueAtConv2d

    return [ComputeEpilogueAtConv2d()] if vnni.target_int8_isa(target) is not None else []


def _fuse_pads(target):
    """On x86 the packed int8 conv2d kernels write the next conv's zero-padded input themselves
    (:mod:`passes.fuse_pad`); it runs on scheduled kernels, so every record and fixed schedule applies as before."""
    from passes import vnni
    from passes.fuse_pad import FusePadIntoProducer

    return [FusePadIntoProducer()] if vnni.target_int8_isa(target) is not None else []


def _inverse_scale(target):
    """On x86 int8 targets the scheduled kernels quantize by the inverse of the activation scale, one hoisted
    division instead of one a vector (:mod:`passes.inverse_scale`)."""
    from passes import vnni
    from passes.inverse_scale import InverseScaleQuantize

    return [InverseScaleQuantize()] if vnni.target_int8_isa(target) is not None else []


def _round_by_conversion(target):
    """On x86 int8 targets the quantizes round, clip and narrow to bytes with one ``vcvtps2dq`` and saturating packs
    (:mod:`passes.round_by_conversion`); the same bytes."""
    from passes import vnni
    from passes.round_by_conversion import RoundByConversion

    return [RoundByConversion()] if vnni.target_int8_isa(target) is not None else []


def _outline_launches(target):
    """Where launches were merged: each parallel loop's body in a function of its own, one per kernel
    (:mod:`passes.outline_launch`: one copy of each kernel's code; the launch calls it)."""
    from passes.outline_launch import OutlineLaunchLoops

    return [OutlineLaunchLoops()] if _merge_launches(target) else []


def _internal_loops(target):
    """After Relax's AttachGlobalSymbol: the functions :mod:`passes.outline_launch` made stay internal (called
    directly, not through the packed-function API)."""
    from passes.outline_launch import KeepLoopsInternal

    return [KeepLoopsInternal()] if _outline_launches(target) else []


def _merge_launches(target):
    """On x86 int8 targets (AMX, VNNI, AVX-512, AVX2), the runs of kernels with a packed int8 conv2d in them in one
    thread-pool launch each (:mod:`passes.parallel_launch`; compiled with :data:`LLVM_OPTIONS`, see
    :func:`compile_target`). Shipped model, batch 1, best of 1 and 2 threads (``benchmarks/parallel_launch.md``):
    AMX 0.25 -> 0.19 ms, VNNI 0.48 -> 0.40, AVX2 0.87 -> 0.77. Not for fp32 modules: their tuned kernels ran no faster
    in one launch. The lowering pipeline does not know the module's precision; the int8 conv2d kernels say it."""
    from passes import vnni
    from passes.parallel_launch import MergeParallelLaunches

    return [MergeParallelLaunches(int8_only=True)] if vnni.target_int8_isa(target) is not None else []


# LLVM's loop-invariant code motion keeps a loop's memory values in registers only when the loop has at most 250
# memory accesses (-licm-mssa-max-acc-promotion, 250 by default). In a launch body that merges a whole int8 model
# the tuned VNNI and AVX2 conv2d kernels then kept their accumulators and the dot-product intrinsics' scratch values
# in memory, a store and a load around every vpdpbusd / vpmaddubsw, and ran at about half speed (x86-64-v4-vnni,
# shipped model, one thread: 0.43 ms as separate kernels, 0.82 in one launch, 0.43 with this). The separate kernels
# compile to the same code with it or without it. Since passes.epilogue_at_conv moved each epilogue into its conv2d's
# loop the shipped model runs as fast without it (3 rounds, ms at 1 / 2 threads: AVX2 0.961 / 0.652 without,
# 0.957 / 0.654 with; VNNI 0.438 / 0.331, 0.444 / 0.338); it stays for the kernels that pass leaves as they are.
LLVM_OPTIONS = ("-licm-mssa-max-acc-promotion:uint=100000",)


def compile_target(spec: TargetSpec):
    """The TVM target a module for ``spec`` is compiled with: :meth:`TargetSpec.tvm_target`, plus
    :data:`LLVM_OPTIONS` where the lowering merges launches (:func:`_merge_launches`)."""
    target = spec.tvm_target()
    if target.kind.name != "llvm" or not _merge_launches(target):
        return target
    target_json = dict(spec.target_json())
    target_json["cl-opt"] = list(target_json.get("cl-opt", [])) + list(LLVM_OPTIONS)
    return tvm.target.Target(target_json)


def _gpu_rules():
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(
        dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback(),
    )


@dataclass(frozen=True)
class Pipeline:
    """The passes for one target and precision (see the module docstring). ``quant``: the
    :class:`passes.quantize.QuantConfig` int8 uses (from :func:`passes.quantize.config_for` for the target)."""

    spec: TargetSpec | None
    precision: str
    quant: object = None

    @property
    def int8_isa(self) -> str | None:
        """The x86 int8 instruction set the int8 conv2d layers are packed and tensorized for, None for NCHW."""
        if self.precision != "int8" or self.quant is None or not self.quant.vnni_layout:
            return None
        return self.quant.int8_isa

    def fp32(self) -> tvm.transform.Pass:
        """BatchNorm folded, zeroed channels stripped: what MACs are counted on and int8 is calibrated on."""
        from passes.fold_batchnorm import FoldBatchnorm
        from passes.strip_zero_channels import StripZeroChannels

        return tvm.transform.Sequential([FoldBatchnorm(), StripZeroChannels()], name="fp32")

    def precision_passes(self, calibration=None) -> tvm.transform.Pass:
        """fp32 -> the precision (int8: ``calibration`` from :func:`passes.quantize.calibrate` is required)."""
        passes: list = []
        if self.precision in ("fp16", "int8-weights"):
            # fp16 storage and arithmetic (the TX2's fast path); inputs and logits stay float32 at the boundary;
            # FoldConstant turns the casts of constant weights into fp16 constants: half the bytes in the module
            passes = [relax.transform.ToMixedPrecision(out_dtype="float16"), relax.transform.FoldConstant()]
        if self.precision == "int8-weights":
            from passes.quantize_weights import QuantizeWeights

            passes.append(QuantizeWeights("float16"))
        elif self.precision == "int8":
            from passes.int8_layout import Int8Layout
            from passes.quantize import Quantize

            if calibration is None:
                raise ValueError("int8 needs a calibration (passes.quantize.calibrate on the fp32 module)")
            passes.append(Quantize(calibration, self.quant))
            if self.int8_isa is not None:
                passes.append(Int8Layout(self.int8_isa, calibration.func_name, self.quant.fuse_quantize,
                                         self.quant.uint8_residual))
        return tvm.transform.Sequential(passes, name=f"precision.{self.precision}")

    def graph(self, calibration=None) -> tvm.transform.Pass:
        """The whole Relax -> Relax part: :meth:`fp32` then :meth:`precision_passes`."""
        return tvm.transform.Sequential([self.fp32(), self.precision_passes(calibration)], name="graph")

    def legalize(self, target=None) -> tvm.transform.Pass:
        """:func:`legalize_passes` under ``target`` (default the spec's; tune passes its own, with num-cores)."""
        target = target if target is not None else self.spec.tvm_target()
        target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)

        @tvm.transform.module_pass(opt_level=0, name="legalize")
        def _legalize(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
            with target:
                return tvm.transform.Sequential(legalize_passes(target))(mod)

        return _legalize

    def lowering(self, database=None) -> tvm.transform.Pass:
        """The target's Relax pipeline, with the schedules of ``database`` (a MetaSchedule Database or a
        tuning-log folder) applied after :meth:`legalize`. CUDA: DLight's default GPU rules ending in ``Fallback``
        so that *every* PrimFunc gets thread bindings; CPU: TVM's default pipeline for the CPU plus
        :class:`passes.schedule_layout.ScheduleLayoutKernels`, and :func:`passes.parallel_fallback.ParallelFallback`
        for what no record scheduled (all of it without a database)."""
        from compiler.tuning.database import open_database

        spec = self.spec
        target = compile_target(spec)
        db = open_database(database) if database is not None else None
        stages = _stages("cuda" if spec.kind == "cuda" else "cpu_generic")

        @tvm.transform.module_pass(opt_level=0, name=f"targets.pipeline.{spec.name}")
        def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            scope = db if db is not None else contextlib.nullcontext()
            with target, scope:
                seq = tvm.transform.Sequential(
                    kernel_passes(target, db) + stages.dataflow_lower_passes(target) + stages.finalize_passes(target)
                    + _internal_loops(target)
                )
                return seq(mod)

        return _pipeline

    def space(self, target=None):
        """MetaSchedule's design space generator: for packed int8 the rules that tensorize with the ISA's
        intrinsics (:func:`passes.vnni.space_generator`), else MetaSchedule's default for the target."""
        isa = self.int8_isa
        if isa is None and self.precision == "int8" and target is not None:
            from passes import vnni

            isa = vnni.target_int8_isa(target)
        if isa is not None:
            from passes import vnni

            return vnni.space_generator(isa)
        return "post-order-apply"


def pipeline(spec: TargetSpec | None, precision: str = "fp32", **quant) -> Pipeline:
    """The pipeline for ``spec`` (a :class:`targets.TargetSpec`; None: no target facts, NCHW int8) and
    ``precision``; ``quant``: :class:`passes.quantize.QuantConfig` overrides (method, keep, percentile)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}': one of {', '.join(PRECISIONS)}")
    config = None
    if precision == "int8":
        from passes import quantize as q

        config = q.config_for(spec, **quant) if spec is not None else q.QuantConfig(**quant)
    return Pipeline(spec, precision, config)
