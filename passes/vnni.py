"""x86 VNNI (``vpdpbusd``): a tensor intrinsic that builds with the LLVM inside TVM 0.27 (LLVM 22), the packed int8
conv2d layout it needs, and the MetaSchedule rules that tensorize with it.

TVM's ``dot_16x4_vnni`` (tvm/s_tir/tensor_intrin/x86.py) calls ``llvm.x86.avx512.vpdpbusd.512`` with two
``<16 x i32>`` operands; since LLVM 21 the intrinsic's multiplicands are ``<64 x i8>``, so every tensorized candidate
fails to build and MetaSchedule's VNNI rule (which looks the intrinsic up by that name) yields nothing. The
description is unchanged (``C[16] += sum_k u8 A[k] * s8 B[i, k]``, 16 int32 lanes x 4 bytes); the implementation
broadcasts the 4 activation bytes as one i32 to 16 lanes and reinterprets both multiplicands as ``int8x64``.

:func:`register` registers it as :data:`INTRIN_NAME`. TVM 0.27's MetaSchedule has no x86 VNNI default rule any more
(``ScheduleRule.create`` knows llvm / cuda / hexagon only): :func:`schedule_rules` adds one for this intrinsic.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

INTRIN_NAME = "dot_16x4_vnni_llvm22"
TVM_NAME = "dot_16x4_vnni"
OC_BLOCK = 16  # output channels per vpdpbusd (16 int32 lanes of a zmm register)
K_BLOCK = 4  # input channels per lane (4 bytes of one int32 lane)
# names of the PrimFuncs the packed int8 rewrite (passes.quantize) emits: compiler.tuning names variants by them
PACK_NAME, CONV_NAME, UNPACK_NAME = "vnni_quantize_pack", "conv2d_nchwc_int8", "vnni_unpack"
REPACK_NAME, FLOAT_PACK_NAME = "vnni_quantize_repack", "vnni_pack_float"
KERNEL_NAMES = (PACK_NAME, CONV_NAME, UNPACK_NAME, REPACK_NAME, FLOAT_PACK_NAME)


@T.prim_func(s_tir=True)
def _desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        A_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        A_u8x64 = T.reinterpret(T.broadcast(A_i32, 16), dtype="int8x64")
        B_i8x64 = B.vload([0, 0], dtype="int8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            A_u8x64,
            B_i8x64,
            dtype="int32x16",
        )


_registered = False


def register() -> str:
    """Register the working intrinsic (idempotent); returns :data:`INTRIN_NAME`."""
    global _registered
    if _registered:
        return INTRIN_NAME
    from tvm.s_tir import TensorIntrin

    # only under our own name: importing tvm.s_tir.tensor_intrin (to override TVM's broken one) parses every
    # target's intrinsics (minutes), and a later import of it would refuse a name registered before it
    TensorIntrin.register(INTRIN_NAME, _desc, _impl, override=True)
    _registered = True
    return INTRIN_NAME


def schedule_rules() -> list:
    """MetaSchedule rules for x86 VNNI targets: TVM 0.27 has no VNNI default any more (only ``ScheduleRule.create
    ("llvm")``), so put a MultiLevelTilingWithIntrin for our intrinsic in front of the LLVM defaults (TVM's old
    DefaultVNNI did the same). Use as ``PostOrderApply(sch_rules=schedule_rules())``."""
    from tvm.s_tir import meta_schedule as ms

    register()
    vnni = ms.schedule_rule.MultiLevelTilingWithIntrin(
        INTRIN_NAME,
        structure="SSRSRS",
        tile_binds=None,
        max_innermost_factor=64,
        vector_load_lens=None,
        reuse_read=None,
        reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global"),
    )
    return [vnni] + list(ms.schedule_rule.ScheduleRule.create("llvm"))


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


def space_generator():
    """``PostOrderApply`` with :func:`schedule_rules` and :func:`postprocs`: the design space for int8 on VNNI."""
    from tvm.s_tir import meta_schedule as ms

    return ms.space_generator.PostOrderApply(sch_rules=schedule_rules(), postprocs=postprocs(),
                                             mutator_probs="from-target")


def target_has_vnni(target) -> bool:
    """Whether the LLVM ``target`` (a tvm Target, its JSON dict, or a targets.TargetSpec) is x86 with AVX-512 VNNI:
    the 512-bit ``vpdpbusd`` the intrinsic emits."""
    import tvm
    from tvm.target import codegen

    if hasattr(target, "tvm_target"):  # a targets.TargetSpec
        if getattr(target, "kind", "cpu") != "cpu":
            return False
        target = target.tvm_target()
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686", "i386")):
        return False
    try:
        return "avx512vnni" in set(str(f) for f in codegen.llvm_get_cpu_features(target))
    except Exception:  # noqa: BLE001 - an unknown CPU name
        return False


# ---------------------------------------------------------------- the packed int8 conv2d layout
#
#   data   NCHW[ic_bn]c        (N, IC/ic_bn, H, W, ic_bn) uint8, zero padded spatially and to whole blocks
#   kernel OIHW[ic_bn/4]i16o4i (OC/16, IC/ic_bn, KH, KW, ic_bn/4, 16, 4) int8, zero padded to whole blocks
#   out    NCHW16c             (N, OC/16, OH, OW, 16) int32
#
# The innermost 16 x 4 weight tile and the 4 input channels it multiplies are contiguous: exactly the operands of
# one vpdpbusd (C[16] += sum_k u8 A[k] * s8 B[i, k]), so MultiLevelTilingWithIntrin can tensorize the conv.


def ic_block(ic: int) -> tuple[int, int]:
    """``(ic_padded, ic_bn)``: input channels padded to a multiple of 4 and the channel block (a multiple of 4, at
    most 16, dividing ``ic_padded``)."""
    icp = -(-int(ic) // K_BLOCK) * K_BLOCK
    for bn in (16, 12, 8, 4):
        if icp % bn == 0:
            return icp, bn
    raise AssertionError("unreachable: icp is a multiple of 4")


def oc_padded(oc: int) -> int:
    return -(-int(oc) // OC_BLOCK) * OC_BLOCK


def pack_weight(wq: np.ndarray) -> np.ndarray:
    """OIHW int8 -> OIHW[ic_bn/4]i16o4i (``(OC/16, IC/ic_bn, KH, KW, ic_bn/4, 16, 4)``), zero channels padded in."""
    oc, ic, kh, kw = wq.shape
    icp, bn = ic_block(ic)
    ocp = oc_padded(oc)
    w = np.zeros((ocp, icp, kh, kw), dtype=wq.dtype)
    w[:oc, :ic] = wq
    w = w.reshape(ocp // OC_BLOCK, OC_BLOCK, icp // bn, bn // K_BLOCK, K_BLOCK, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 2, 5, 6, 3, 1, 4))


def pack_channels(v: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """A per-output-channel vector -> ``(1, OC/16, 1, 1, 16)`` (NCHW16c broadcast), padded with ``fill``."""
    v = np.asarray(v).ravel()
    ocp = oc_padded(len(v))
    out = np.full(ocp, fill, dtype=v.dtype)
    out[:len(v)] = v
    return np.ascontiguousarray(out.reshape(1, ocp // OC_BLOCK, 1, 1, OC_BLOCK))


def _quantize_blocks(read, n: int, c: int, h: int, w: int, scale, ic_bn: int, padding, out_dtype: str, name: str):
    """TE: ``clip(round(read(b, ch, y, x) / scale), qmin, qmax)`` laid out NCHW[ic_bn]c with the conv's spatial
    zero padding and zero channels up to whole blocks; ``read`` reads the float input in its own layout."""
    from tvm import te, tirx

    icp = -(-c // ic_bn) * ic_bn
    top, left, bottom, right = (int(p) for p in padding)
    shape = (n, icp // ic_bn, h + top + bottom, w + left + right, ic_bn)
    lo, hi = tirx.min_value(out_dtype), tirx.max_value(out_dtype)

    def f(b, cb, y, xx, ci):
        ch = cb * ic_bn + ci
        yy, xw = y - top, xx - left
        inside = tirx.all(yy >= 0, yy < h, xw >= 0, xw < w, ch < c)
        q = te.max(te.min(te.round(read(b, ch, yy, xw) / scale[0]), hi), lo).astype(out_dtype)
        return tirx.if_then_else(inside, q, tirx.const(0, out_dtype))

    return te.compute(shape, f, name=name)


def quantize_pack(x, scale, ic_bn: int, padding, out_dtype: str = "uint8"):
    """TE: quantize a float NCHW tensor (``clip(round(x / scale), qmin, qmax)``, zero point 0: exactly what
    ``R.quantize`` lowers to) straight into NCHW[ic_bn]c with the conv's spatial zero padding (``padding``: top,
    left, bottom, right) and zero channels up to whole blocks. ``scale``: a ``(1,)`` float32 tensor, so the kernel
    does not depend on the calibration (one tuned kernel serves every checkpoint of the same shapes)."""
    n, c, h, w = (int(d) for d in x.shape)
    return _quantize_blocks(lambda b, ch, y, xw: x[b, ch, y, xw], n, c, h, w, scale, ic_bn, padding, out_dtype,
                            "quantize_pack")


def conv2d_nchwc_int8(data, kernel, strides, dilation):
    """TE: int32 conv2d of packed uint8 ``data`` (already zero padded) and packed int8 ``kernel`` -> NCHW16c.
    The same sum as ``R.nn.conv2d(..., out_dtype="int32")`` in NCHW, reordered: bit-identical results."""
    from tvm import te

    n, icc, ih, iw, icb = (int(d) for d in data.shape)
    occ, icc2, kh, kw, icf, ocb, k4 = (int(d) for d in kernel.shape)
    assert icc == icc2 and icf * k4 == icb and ocb == OC_BLOCK and k4 == K_BLOCK, (data.shape, kernel.shape)
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
    """TE: NCHW16c -> NCHW, dropping the padding channels beyond ``channels``."""
    from tvm import te

    n, _, h, w, ocb = (int(d) for d in y.shape)
    return te.compute((n, int(channels), h, w), lambda b, c, i, j: y[b, c // ocb, i, j, c % ocb], name="unpack")


def quantize_repack(xp, scale, channels: int, ic_bn: int, padding, out_dtype: str = "uint8"):
    """TE: :func:`quantize_pack` of a float tensor that is already NCHW16c (``xp``: ``(N, C/16, H, W, 16)``, the
    first ``channels`` real): reads it in its own layout, so the kernel streams contiguous memory."""
    n, _, h, w, ob = (int(d) for d in xp.shape)
    return _quantize_blocks(lambda b, ch, y, xw: xp[b, ch // ob, y, xw, ch % ob], n, int(channels), h, w, scale,
                            ic_bn, padding, out_dtype, "quantize_repack")


def pack_float(x):
    """TE: a float NCHW tensor -> NCHW16c, zero channels up to a whole block."""
    from tvm import te, tirx

    n, c, h, w = (int(d) for d in x.shape)
    ocp = oc_padded(c)

    def f(b, cb, y, xx, ci):
        ch = cb * OC_BLOCK + ci
        return tirx.if_then_else(ch < c, x[b, ch, y, xx], tirx.const(0, x.dtype))

    return te.compute((n, ocp // OC_BLOCK, h, w, OC_BLOCK), f, name="pack_float")
