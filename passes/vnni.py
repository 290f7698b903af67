"""x86 int8 dot products: tensor intrinsics that build with the LLVM inside TVM 0.27 (LLVM 22) for AVX-512 VNNI
(``vpdpbusd``) and, on CPUs without VNNI, AVX-512BW and AVX2 (``vpmaddubsw`` + ``vpmaddwd``); the packed int8
conv2d layout they need (:class:`passes.int8_layout.Int8Layout` emits it), and the MetaSchedule rules that
tensorize with them (:data:`ISAS`: which intrinsic computes which output-channel block on each ISA).

TVM's ``dot_16x4_vnni`` (tvm/s_tir/tensor_intrin/x86.py) calls ``llvm.x86.avx512.vpdpbusd.512`` with two
``<16 x i32>`` operands; since LLVM 21 the intrinsic's multiplicands are ``<64 x i8>``, so every tensorized candidate
fails to build and MetaSchedule's VNNI rule (which looks the intrinsic up by that name) yields nothing. The
description is unchanged (``C[16] += sum_k u8 A[k] * s8 B[i, k]``, 16 int32 lanes x 4 bytes); the implementation
broadcasts the 4 activation bytes as one i32 to 16 lanes and reinterprets both multiplicands as ``int8x64``.

:func:`register` registers it as :data:`INTRIN_NAME`. TVM 0.27's MetaSchedule has no x86 VNNI default rule any more
(``ScheduleRule.create`` knows llvm / cuda / hexagon only): :func:`schedule_rules` adds one for these intrinsics.
The ``vpmaddubsw`` ones and their int16 saturation: see :data:`MADDUBS_WEIGHT_MAX`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm.script import tirx as T

INTRIN_NAME = "dot_16x4_vnni_llvm22"  # 16 int32 lanes: vpdpbusd on a zmm register (AVX-512 VNNI)
INTRIN_NAME_8 = "dot_8x4_vnni_llvm22"  # 8 int32 lanes: vpdpbusd on a ymm register (AVX-512 VNNI + VL)
TVM_NAME = "dot_16x4_vnni"
OC_BLOCK = 16  # output channels per zmm vpdpbusd: the block of every conv whose width is a multiple of 16
OC_BLOCKS = {16: INTRIN_NAME, 8: INTRIN_NAME_8}  # output-channel block -> the intrinsic that computes it
K_BLOCK = 4  # input channels per lane (4 bytes of one int32 lane)
# names of the PrimFuncs the packed int8 rewrite (passes.int8_layout) emits: compiler.tuning.database names
# variants by them
CONV_NAME, UNPACK_NAME = "conv2d_nchwc_int8", "vnni_unpack"
REPACK_NAME, FLOAT_PACK_NAME = "vnni_quantize_repack", "vnni_pack_float"
QUANTIZE_NAME, PAD_NAME = "vnni_quantize_packed", "vnni_pad_repack"  # the quantize a conv's epilogue takes in; its pad
KERNEL_NAMES = (CONV_NAME, UNPACK_NAME, REPACK_NAME, FLOAT_PACK_NAME, QUANTIZE_NAME, PAD_NAME)
# a tuned conv2d's tensorized update block (MetaSchedule's blockize, then decompose_reduction, name it so)
CONV_UPDATE_BLOCK = f"{CONV_NAME}_o_update"

# x86 without VNNI: u8 x s8 -> s16 pairs (vpmaddubsw), then s16 pairs -> s32 (vpmaddwd with ones). The description
# is the same as the VNNI intrinsics' (C[lanes] += sum_k u8 A[k] * s8 B[i, k]), so the packed layout is the same.
AVX512_NAME = "dot_16x4_avx512_maddubs"  # 16 int32 lanes, zmm (AVX-512BW): TVM's AVX512_DOT_16x4_INTRIN, our name
AVX2_NAME = "dot_8x4_avx2_maddubs"  # 8 int32 lanes, ymm (AVX2)
# vpmaddubsw adds two u8 x s8 products into a *saturating* int16: 2 * 255 * 128 = 65280 does not fit. As oneDNN does
# on CPUs without VNNI, the weights of those kernels are 7-bit (|w| <= 64: 2 * 255 * 64 = 32640 <= 32767), so every
# pair is exact and the kernels compute the same integers as vpdpbusd (passes.quantize.config_for quantizes the
# weights to [-63, 63] for such targets; passes.int8_layout refuses larger ones). The alternatives cost more:
# widening both operands to int16 and using vpmaddwd alone (FBGEMM's exact path) halves the multiply rate, and
# splitting the weights into high and low parts doubles the instructions; 7-bit weights cost one bit of weight
# precision per output channel (measured: the shipped ResNet56's x86-64-v3 int8 artifact, 7-bit weights, scores
# 92.90 % on the 10,000 test images; fp32 92.89 %, VNNI int8 with 8-bit weights 92.84 %).
MADDUBS_WEIGHT_MAX = 64


@dataclass(frozen=True)
class Isa:
    """An x86 int8 instruction set the packed conv2d can be tensorized with."""

    label: str  # in the layout names of the quantization report
    blocks: dict  # output-channel block -> the intrinsic that computes it (int32 lanes = block)
    weight_max: int  # the largest |int8 weight| its kernels compute exactly
    features: frozenset  # the LLVM CPU features it needs
    instructions: str
    # the layout's blocks and quantize: AMX takes up to 64 input channels a block (a 64-byte tile row), 16 output
    # channels (a C tile row of 16 int32; 8 where a conv has no more), and quantizes by the inverse scale
    # (passes.amx: its epilogue)
    ic_block_max: int = 16
    oc_block_fixed: bool = False
    inverse_scale: bool = False


ISAS = {
    # AMX: the conv2d kernels run on tiles (passes.amx, a fixed schedule); what it cannot run stays on VNNI. Its
    # layout has the widest blocks a tile takes: 16 output channels (64-byte tile rows; 8 for a conv of 8, where
    # a 16-block would be half padding), up to 64 input channels
    "amx": Isa("AMX", {16: INTRIN_NAME, 8: INTRIN_NAME_8}, 127,
               frozenset({"amx-tile", "amx-int8", "avx512vnni", "avx512vl"}),
               "tdpbusd tiles (AMX), vpdpbusd (zmm, ymm) where a tile does not fit",
               ic_block_max=64, oc_block_fixed=True, inverse_scale=True),
    "vnni": Isa("VNNI", {16: INTRIN_NAME, 8: INTRIN_NAME_8}, 127, frozenset({"avx512vnni", "avx512vl"}),
                "vpdpbusd (zmm, ymm)"),
    "avx512": Isa("AVX-512", {16: AVX512_NAME, 8: AVX2_NAME}, MADDUBS_WEIGHT_MAX, frozenset({"avx512bw", "avx2"}),
                  "vpmaddubsw + vpmaddwd (zmm; ymm for 8-channel blocks)"),
    "avx2": Isa("AVX2", {8: AVX2_NAME}, MADDUBS_WEIGHT_MAX, frozenset({"avx2"}), "vpmaddubsw + vpmaddwd (ymm)"),
}
ISA_ORDER = ("amx", "vnni", "avx512", "avx2")  # best first


def _intrinsic(lanes: int):
    """``(desc, impl)`` of ``C[lanes] += sum_k u8 A[k] * s8 B[i, k]`` (k < 4) with the LLVM 22 vpdpbusd of
    ``lanes`` x 32 bits: the 4 activation bytes broadcast as one i32 to every lane, both multiplicands
    reinterpreted as ``int8 x (4 * lanes)``."""
    bytes_type, acc_type = f"int8x{4 * lanes}", f"int32x{lanes}"
    llvm_name = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            A_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            A_bytes = T.reinterpret(T.broadcast(A_i32, lanes), dtype=bytes_type)
            B_bytes = B.vload([0, 0], dtype=bytes_type)
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], dtype=acc_type),
                A_bytes,
                B_bytes,
                dtype=acc_type,
            )

    return desc, impl


def _maddubs_intrinsic(lanes: int):
    """``(desc, impl)`` of the same sum as :func:`_intrinsic` with ``vpmaddubsw`` (u8 x s8 pairs -> s16, saturating)
    and ``vpmaddwd`` by ones (s16 pairs -> s32): 8 lanes on ymm (AVX2), 16 on zmm (AVX-512BW, as TVM's
    ``dot_product_16x4_u8i8i32_avx512``). Exact for weights within +-:data:`MADDUBS_WEIGHT_MAX`."""
    desc, _ = _intrinsic(lanes)
    bytes_type, pairs_type, acc_type = f"int8x{4 * lanes}", f"int16x{2 * lanes}", f"int32x{lanes}"
    maddubs, maddwd = (("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd") if lanes == 8 else
                       ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"))

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            A_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            A_bytes = T.reinterpret(T.broadcast(A_i32, lanes), dtype=bytes_type)
            B_bytes = B.vload([0, 0], dtype=bytes_type)
            pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(maddubs), A_bytes, B_bytes, dtype=pairs_type)
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=acc_type) + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(maddwd), pairs, T.broadcast(T.int16(1), 2 * lanes), dtype=acc_type)

    return desc, impl


_registered = False


def register() -> str:
    """Register the intrinsics of every ISA in :data:`ISAS` (idempotent); returns :data:`INTRIN_NAME`."""
    global _registered
    if _registered:
        return INTRIN_NAME
    from tvm.s_tir import TensorIntrin

    # only under our own names: importing tvm.s_tir.tensor_intrin (to override TVM's broken one) parses every
    # target's intrinsics (minutes), and a later import of it would refuse a name registered before it
    for lanes, name in OC_BLOCKS.items():
        TensorIntrin.register(name, *_intrinsic(lanes), override=True)
    TensorIntrin.register(AVX512_NAME, *_maddubs_intrinsic(16), override=True)
    TensorIntrin.register(AVX2_NAME, *_maddubs_intrinsic(8), override=True)
    _registered = True
    return INTRIN_NAME


def _tiling_with(intrin: str):
    from tvm.s_tir import meta_schedule as ms

    return ms.schedule_rule.MultiLevelTilingWithIntrin(
        intrin,
        structure="SSRSRS",
        tile_binds=None,
        max_innermost_factor=64,
        vector_load_lens=None,
        reuse_read=None,
        reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global"),
    )


def output_block(sch, block_rv) -> int | None:
    """The output-channel block of a packed int8 conv2d block (the last axis of the int32 NCHW[ob]c it writes),
    else None."""
    block = sch.get(block_rv)
    if len(block.writes) != 1:
        return None
    buf = block.writes[0].source  # the buffer written (TVM 0.27: a TensorRegion's source)
    if str(buf.dtype) != "int32" or len(buf.shape) != 5:
        return None
    try:
        ob = int(buf.shape[-1])
    except TypeError:  # a symbolic extent
        return None
    return ob if ob in (16, 8) else None


_rule_classes: dict = {}


def _rule_class(isa: str):
    """A ScheduleRule that tensorizes each packed conv2d with ``isa``'s intrinsic for its output block: the 16-lane
    one would not fit an 8-block, and an 8-lane one would also match (and split) every 16-block, doubling the
    space."""
    if isa in _rule_classes:
        return _rule_classes[isa]
    from tvm.s_tir.meta_schedule.schedule_rule import PyScheduleRule
    from tvm.ir.utils import derived_object

    blocks = ISAS[isa].blocks

    @derived_object
    class Int8TilingByBlock(PyScheduleRule):
        def __init__(self) -> None:
            super().__init__()
            self.rules = {ob: _tiling_with(name) for ob, name in blocks.items()}

        def _initialize_with_tune_context(self, context) -> None:
            for rule in self.rules.values():
                rule._initialize_with_tune_context(context)

        def apply(self, sch, block):
            ob = output_block(sch, block)
            return self.rules[ob].apply(sch, block) if ob in self.rules else [sch]

        def clone(self):
            return Int8TilingByBlock()

    _rule_classes[isa] = Int8TilingByBlock
    return Int8TilingByBlock


def schedule_rules(isa: str = "vnni") -> list:
    """MetaSchedule rules for x86 int8 targets: TVM 0.27 has no VNNI default any more (only ``ScheduleRule.create
    ("llvm")``), so put a MultiLevelTilingWithIntrin for ``isa``'s intrinsics in front of the LLVM defaults (TVM's
    old DefaultVNNI did the same), picking the intrinsic by the conv's output block. Use as
    ``PostOrderApply(sch_rules=schedule_rules(isa))``."""
    from tvm.s_tir import meta_schedule as ms

    register()
    return [_rule_class(isa)()] + list(ms.schedule_rule.ScheduleRule.create("llvm"))


def postprocs() -> list:
    """MetaSchedule postprocessors for :func:`schedule_rules`: the LLVM defaults plus ``RewriteTensorize`` (which
    turns the blocks MultiLevelTilingWithIntrin annotated into the intrinsic), in the order of TVM's former
    DefaultVNNI."""
    from tvm.s_tir import meta_schedule as ms

    return [
        ms.postproc.DisallowDynamicLoop(),
        ms.postproc.RewriteParallelVectorizeUnroll(),
        ms.postproc.RewriteReductionBlock(),
        ms.postproc.RewriteTensorize(vectorize_init_loop=True),
        ms.postproc.RewriteLayout(),
    ]


def space_generator(isa: str = "vnni"):
    """``PostOrderApply`` with :func:`schedule_rules` and :func:`postprocs`: the design space for int8 on ``isa``."""
    from tvm.s_tir import meta_schedule as ms

    return ms.space_generator.PostOrderApply(sch_rules=schedule_rules(isa), postprocs=postprocs(),
                                             mutator_probs="from-target")


def _llvm_x86_features(target) -> frozenset | None:
    """The LLVM CPU features of an x86 LLVM ``target`` (a tvm Target, its JSON dict, or a targets.TargetSpec),
    None for anything else."""
    import tvm
    from tvm.target import codegen

    if hasattr(target, "tvm_target"):  # a targets.TargetSpec
        if getattr(target, "kind", "cpu") != "cpu":
            return None
        target = target.tvm_target()
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686", "i386")):
        return None
    try:
        return frozenset(str(f) for f in codegen.llvm_get_cpu_features(target))
    except Exception:  # noqa: BLE001 - an unknown CPU name
        return None


def target_int8_isa(target) -> str | None:
    """The best key of :data:`ISAS` the x86 LLVM ``target`` has (``vnni``, ``avx512``, ``avx2``), else None."""
    features = _llvm_x86_features(target)
    if features is None:
        return None
    return next((isa for isa in ISA_ORDER if ISAS[isa].features <= features), None)


def target_has_vnni(target) -> bool:
    """Whether the LLVM ``target`` is x86 with AVX-512 VNNI: the 512-bit and 256-bit ``vpdpbusd`` the intrinsics
    emit."""
    return target_int8_isa(target) == "vnni"


# ---------------------------------------------------------------- the packed int8 conv2d layout
#
#   data   NCHW[ic_bn]c        (N, IC/ic_bn, H, W, ic_bn) uint8, zero padded spatially and to whole blocks
#   kernel OIHW[ic_bn/4]i[ob]o4i (OC/ob, IC/ic_bn, KH, KW, ic_bn/4, ob, 4) int8, zero padded to whole blocks
#   out    NCHW[ob]c           (N, OC/ob, OH, OW, ob) int32
#
# ob (:func:`oc_block`) is 16 (zmm) where the conv's width is a multiple of 16 and 8 (ymm) where 8-blocks pad
# less (pruned widths 8, 24, 40, 56: no padded weights, no wasted multiply-adds). The innermost ob x 4 weight tile
# and the 4 input channels it multiplies are contiguous: exactly the operands of one vpdpbusd
# (C[ob] += sum_k u8 A[k] * s8 B[i, k]), so MultiLevelTilingWithIntrin can tensorize the conv.


def ic_block(ic: int, isa: str = "vnni") -> tuple[int, int]:
    """``(ic_padded, ic_bn)``: input channels padded to a multiple of 4 and the channel block (a multiple of 4, at
    most 16 - at most 64 on AMX, a tile row - dividing ``ic_padded``)."""
    icp = -(-int(ic) // K_BLOCK) * K_BLOCK
    for bn in range(ISAS[isa].ic_block_max, 0, -K_BLOCK):
        if icp % bn == 0:
            return icp, bn
    raise AssertionError("unreachable: icp is a multiple of 4")


def _round_up(n: int, block: int) -> int:
    return -(-int(n) // block) * block


def oc_block(oc: int, isa: str = "vnni") -> int:
    """Output channels per block of a conv with ``oc`` outputs: 16 unless 8-blocks need less padding (or ``isa``
    has no 16-lane intrinsic: AVX2 has 8 int32 lanes)."""
    if 16 not in ISAS[isa].blocks:
        return 8
    if ISAS[isa].oc_block_fixed:  # AMX: a C tile row is 16 int32; 8-blocks would halve every tile's work,
        return 8 if oc <= 8 else OC_BLOCK  # unless there are only 8 channels: then half of a 16-block is padding
    return 8 if _round_up(oc, 8) < _round_up(oc, 16) else OC_BLOCK


def oc_padded(oc: int, isa: str = "vnni") -> int:
    return _round_up(oc, oc_block(oc, isa))


def pack_weight(wq: np.ndarray, isa: str = "vnni") -> np.ndarray:
    """OIHW int8 -> OIHW[ic_bn/4]i[ob]o4i (``(OC/ob, IC/ic_bn, KH, KW, ic_bn/4, ob, 4)``), zero channels padded in."""
    oc, ic, kh, kw = wq.shape
    icp, bn = ic_block(ic, isa)
    ob, ocp = oc_block(oc, isa), oc_padded(oc, isa)
    w = np.zeros((ocp, icp, kh, kw), dtype=wq.dtype)
    w[:oc, :ic] = wq
    w = w.reshape(ocp // ob, ob, icp // bn, bn // K_BLOCK, K_BLOCK, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 2, 5, 6, 3, 1, 4))


def pack_channels(v: np.ndarray, fill: float = 0.0, isa: str = "vnni") -> np.ndarray:
    """A per-output-channel vector -> ``(1, OC/ob, 1, 1, ob)`` (NCHW[ob]c broadcast), padded with ``fill``."""
    v = np.asarray(v).ravel()
    ob, ocp = oc_block(len(v), isa), oc_padded(len(v), isa)
    out = np.full(ocp, fill, dtype=v.dtype)
    out[:len(v)] = v
    return np.ascontiguousarray(out.reshape(1, ocp // ob, 1, 1, ob))


def conv2d_nchwc_int8(data, kernel, strides, dilation):
    """TE: int32 conv2d of packed uint8 ``data`` (already zero padded) and packed int8 ``kernel`` -> NCHW[ob]c.
    The same sum as ``R.nn.conv2d(..., out_dtype="int32")`` in NCHW, reordered: bit-identical results."""
    from tvm import te

    n, icc, ih, iw, icb = (int(d) for d in data.shape)
    occ, icc2, kh, kw, icf, ocb, k4 = (int(d) for d in kernel.shape)
    assert icc == icc2 and icf * k4 == icb and ocb in OC_BLOCKS and k4 == K_BLOCK, (data.shape, kernel.shape)
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilation)
    oh = (ih - (kh - 1) * dh - 1) // sh + 1
    ow = (iw - (kw - 1) * dw - 1) // sw + 1
    rc = te.reduce_axis((0, icc), name="ic_outer")
    ry = te.reduce_axis((0, kh), name="kh")
    rx = te.reduce_axis((0, kw), name="kw")
    rf = te.reduce_axis((0, icf), name="ic_f_inner")
    rs = te.reduce_axis((0, k4), name="ic_s_inner")
    return te.compute(
        (n, occ, oh, ow, ocb),
        lambda b, o, y, x, ob: te.sum(
            data[b, rc, y * sh + ry * dh, x * sw + rx * dw, rf * k4 + rs].astype("int32")
            * kernel[o, rc, ry, rx, rf, ob, rs].astype("int32"),
            axis=[ry, rx, rc, rf, rs]),
        name="conv2d_nchwc_int8")


def unpack(y, channels: int):
    """TE: NCHW[ob]c -> NCHW, dropping the padding channels beyond ``channels``."""
    from tvm import te

    n, _, h, w, ocb = (int(d) for d in y.shape)
    return te.compute((n, int(channels), h, w), lambda b, c, i, j: y[b, c // ocb, i, j, c % ocb], name="unpack")


def quantize_repack(xp, scale, channels: int, ic_bn: int, padding, out_dtype: str = "uint8",
                    reciprocal: bool = False):
    """TE: quantize a float tensor that is NCHW[ob]c (``xp``: ``(N, C/ob, H, W, ob)``, the first ``channels``
    real; :func:`pack_float` makes one of an NCHW tensor) to ``clip(round(x / scale), qmin, qmax)``, zero point 0
    (exactly what ``R.quantize`` lowers to), laid out NCHW[ic_bn]c for the next conv, with its spatial zero padding
    (``padding``: top, left, bottom, right) and zero channels up to whole blocks. Reads ``xp`` in its own layout, so
    the kernel streams contiguous memory. ``scale``: a ``(1,)`` float32 tensor, so the kernel does not depend on
    the calibration (one tuned kernel serves every checkpoint of the same shapes)."""
    return _repacked(xp, int(channels), ic_bn, padding, lambda v: _quantized(v, scale, out_dtype, reciprocal),
                     out_dtype,
                     "quantize_repack")


def _repacked(src, channels: int, ic_bn: int, padding, value, out_dtype: str, name: str):
    """TE: ``value`` of each element of ``src`` (NCHW[ob]c, the first ``channels`` real) laid out NCHW[ic_bn]c with
    the spatial zero ``padding`` (top, left, bottom, right) and zero channels up to whole blocks."""
    from tvm import te, tirx

    n, _, h, w, ob = (int(d) for d in src.shape)
    icp = -(-channels // ic_bn) * ic_bn
    top, left, bottom, right = (int(p) for p in padding)
    shape = (n, icp // ic_bn, h + top + bottom, w + left + right, ic_bn)

    def f(b, cb, y, xx, ci):
        ch = cb * ic_bn + ci
        yy, xw = y - top, xx - left
        inside = tirx.all(yy >= 0, yy < h, xw >= 0, xw < w, ch < channels)
        return tirx.if_then_else(inside, value(src[b, ch // ob, yy, xw, ch % ob]), tirx.const(0, out_dtype))

    return te.compute(shape, f, name=name)


def _quantized(x, scale, out_dtype: str, reciprocal: bool = False):
    """``clip(round(x / scale[0]), qmin, qmax)`` as ``out_dtype``: R.quantize with zero point 0. ``reciprocal``:
    ``x * (1 / scale[0])`` instead (LLVM hoists the one division out of the loop), as OpenVINO's and oneDNN's
    quantize multiply by an inverse scale: a 16-lane ``vdivps`` costs ~10 cycles against the multiply's 0.5, and
    in the AMX kernels the division was 28 % of the first stage's conv2d kernel at batch 64 (``benchmarks/amx.md``);
    the result differs from the division's only where ``x / scale`` is within an ulp of a rounding tie."""
    from tvm import te, tirx

    lo, hi = tirx.min_value(out_dtype), tirx.max_value(out_dtype)
    q = x * (tirx.const(1.0, "float32") / scale[0]) if reciprocal else x / scale[0]
    return te.max(te.min(te.round(q), hi), lo).astype(out_dtype)


def quantize_packed(y, scale, out_dtype: str = "uint8", reciprocal: bool = False):
    """TE: the elementwise half of :func:`quantize_repack`, in ``y``'s own NCHW[ob]c layout: the same integers,
    1 byte an element. Elementwise, so FuseOps puts it into the epilogue of the conv2d that produced ``y``; the
    float activation is then never written. ``scale``: a ``(1,)`` float32 tensor (as in quantize_repack)."""
    from tvm import te

    return te.compute(tuple(y.shape), lambda *i: _quantized(y[i], scale, out_dtype, reciprocal),
                      name="quantize_packed")


def pad_repack(q, channels: int, ic_bn: int, padding):
    """TE: the data-movement half of :func:`quantize_repack` on already quantized ``q`` (NCHW[ob]c, the first
    ``channels`` real): NCHW[ic_bn]c with the conv's spatial zero padding and zero channels up to whole blocks.
    ``pad_repack(quantize_packed(x, s), ...)`` equals ``quantize_repack(x, s, ...)`` element for element."""
    return _repacked(q, int(channels), ic_bn, padding, lambda v: v, str(q.dtype), "pad_repack")


def pack_float(x, isa: str = "vnni"):
    """TE: a float NCHW tensor -> NCHW[ob]c (the block a conv with its width produces on ``isa``), zero channels up
    to a whole block."""
    from tvm import te, tirx

    n, c, h, w = (int(d) for d in x.shape)
    ob, ocp = oc_block(c, isa), oc_padded(c, isa)

    def f(b, cb, y, xx, ci):
        ch = cb * ob + ci
        return tirx.if_then_else(ch < c, x[b, ch, y, xx], tirx.const(0, x.dtype))

    return te.compute((n, ocp // ob, h, w, ob), f, name="pack_float")
