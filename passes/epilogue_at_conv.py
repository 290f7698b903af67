"""ComputeEpilogueAtConv2d: a packed int8 conv2d kernel's epilogue computed tile by tile, inside the conv2d's loop.

A tuned packed int8 conv2d kernel (:func:`passes.vnni.conv2d_nchwc_int8`, tensorized with the VNNI, AVX-512 or AVX2
dot product) has two top-level loop nests as its record leaves it: the conv2d, which accumulates the whole int32
output over a ``parallel`` loop of output tiles, and then the epilogue (rescale, bias, residual add, ReLU, quantize to
the next conv2d's uint8 input), a ``parallel`` loop of its own over the flattened output. Two costs follow:

- the int32 output makes a round trip through memory (32 KB - 64 KB per kernel at batch 1: it leaves L1);
- on two threads the two loops split the output differently (the conv2d by output tiles, usually rows; the epilogue
  by the flattened channel-block-major index), so each thread's epilogue reads what the other core's conv2d wrote.
  Traced on the Xeon (``benchmarks/parallel_launch.md``, session 21): the residual epilogues of the AVX2 build took
  4.3 us on one thread and 3.8 / 5.3 us on two.

This pass moves the epilogue under the conv2d's outermost ``parallel`` loop (``reverse_compute_at``): each thread
finishes the tiles it computed while they are in its cache. There the epilogue's own loops stay nested: the innermost,
vectorized, is one vector of output channels, and the one around it (the tile's pixels along a row) is unrolled when
it has at most :data:`UNROLL` steps, so each load and store of a row is at a constant offset. (Sessions 21-24 fused
them into one loop unrolled up to 16 steps: ~20 scalar instructions a vector for the indices. Nested was faster per
kernel but slower in the model while every kernel call was a copy of its code in the launch; with one function per
kernel, :mod:`passes.outline_launch`, it is faster there too: ``benchmarks/outline_launch.md``.) The values are the
same (the same expressions, element by element). It runs after every record is applied and before
:mod:`passes.fuse_pad` (which finds the epilogue's store to the next conv's padded input either way).

Measured (``benchmarks/parallel_launch.md``, shipped pruned ResNet56, batch 1, this pass on / off, 5-7 rounds):
x86-64-v4-vnni 0.431 / 0.394 ms -> 0.435 / 0.322 at 1 / 2 threads; x86-64-v3 (AVX2) 0.980 / 0.688 -> 0.944 /
0.641; AMX unchanged (its conv2d kernels are tile kernels: :mod:`passes.amx`).
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from passes.patterns import is_scheduled, scheduled_like, with_functions

__all__ = ["ComputeEpilogueAtConv2d", "epilogue_at_conv2d", "UNROLL"]

UNROLL = 32  # the most steps of the epilogue's pixel loop that are unrolled


def _conv2d_update(sch):
    """The tensorized conv2d's update block (:data:`passes.vnni.CONV_UPDATE_BLOCK`), or None."""
    from passes import vnni

    try:
        return sch.get_sblock(vnni.CONV_UPDATE_BLOCK)
    except Exception:  # noqa: BLE001 - not a tensorized packed int8 conv2d kernel
        return None


def _extent(sch, loop) -> int:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else UNROLL + 1


def epilogue_at_conv2d(func: tirx.PrimFunc, fuse: bool = False) -> tirx.PrimFunc | None:
    """``func`` (a scheduled packed int8 conv2d kernel) with its epilogue under the conv2d's outermost parallel loop;
    None where ``func`` is not such a kernel or the move is not valid (the schedule checks it). ``fuse``: the
    epilogue's loops fused into one unrolled up to 16 steps, as sessions 21-24 built it (for the benchmark)."""
    if not isinstance(func, tirx.PrimFunc) or not is_scheduled(func):
        return None
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    conv = _conv2d_update(sch)
    if conv is None:
        return None
    loops = sch.get_loops(conv)
    consumers = sch.get_consumers(conv)
    if not loops or sch.get(loops[0]).kind != tirx.ForKind.PARALLEL or len(consumers) != 1:
        return None
    epilogue = consumers[0]
    try:
        sch.reverse_compute_at(epilogue, loops[0], preserve_unit_loops=True)
        own = sch.get_loops(epilogue)[1:]  # under the conv2d's parallel loop
        sch.vectorize(own[-1])
        if fuse and len(own) > 2:
            fused = sch.fuse(*own[:-1])
            sch.annotate(fused, "pragma_auto_unroll_max_step", 16)
            sch.annotate(fused, "pragma_unroll_explicit", 1)
        elif not fuse and len(own) > 1 and _extent(sch, own[-2]) <= UNROLL:
            sch.unroll(own[-2])
    except s_tir.ScheduleError:
        return None
    return scheduled_like(sch.mod["main"], func)


@tvm.transform.module_pass(opt_level=0, name="ComputeEpilogueAtConv2d")
class ComputeEpilogueAtConv2d:
    """:func:`epilogue_at_conv2d` on every PrimFunc of the module it applies to (the others are left as they are)."""

    def __init__(self, fuse: bool = False):
        self.fuse = fuse

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        moved = {gv: epilogue_at_conv2d(func, self.fuse) for gv, func in mod.functions_items()
                 if isinstance(func, tirx.PrimFunc)}
        return with_functions(mod, {gv: func for gv, func in moved.items() if func is not None})
