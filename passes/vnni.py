"""An x86 VNNI (``vpdpbusd``) tensor intrinsic that builds with the LLVM inside TVM 0.27 (LLVM 22).

TVM's ``dot_16x4_vnni`` (tvm/s_tir/tensor_intrin/x86.py) calls ``llvm.x86.avx512.vpdpbusd.512`` with two
``<16 x i32>`` operands; since LLVM 21 the intrinsic's multiplicands are ``<64 x i8>``, so every tensorized candidate
fails to build and MetaSchedule's VNNI rule (which looks the intrinsic up by that name) yields nothing. The
description is unchanged (``C[16] += sum_k u8 A[k] * s8 B[i, k]``, 16 int32 lanes x 4 bytes); the implementation
broadcasts the 4 activation bytes as one i32 to 16 lanes and reinterprets both multiplicands as ``int8x64``.

:func:`register` registers it as :data:`INTRIN_NAME`. TVM 0.27's MetaSchedule has no x86 VNNI default rule any more
(``ScheduleRule.create`` knows llvm / cuda / hexagon only): :func:`schedule_rules` adds one for this intrinsic.
"""

from __future__ import annotations

from tvm.script import tirx as T

INTRIN_NAME = "dot_16x4_vnni_llvm22"
TVM_NAME = "dot_16x4_vnni"


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
