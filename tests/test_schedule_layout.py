"""ScheduleLayoutKernels: the packed int8 layout kernels (quantize + repack, pack, unpack) get a fixed vectorized
schedule that computes exactly what the unscheduled kernel computes; conv2d kernels are left to MetaSchedule, and
tune extracts no layout kernel."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, te
from tvm.relax import op

import targets
from passes import vnni
from passes.int8_layout import Int8Layout
from passes.schedule_layout import ScheduleLayoutKernels, is_layout_kernel, schedule_injective
from targets.pipeline import legalize_passes, pipeline
from tests.helpers import relax_module

F32 = "float32"
TARGET = tvm.target.Target({"kind": "llvm"})  # generic x86-64: the schedule needs nothing of the CPU


def _repack(c: int, hw: int, ob: int, ic_bn: int, pad: int):
    xp = te.placeholder((1, -(-c // ob), hw, hw, ob), F32, name="xp")
    scale = te.placeholder((1,), F32, name="scale")
    out = vnni.quantize_repack(xp, scale, c, ic_bn, (pad, pad, pad, pad))
    return te.create_prim_func([xp, scale, out]).with_attr("global_symbol", "main"), xp, out


def _call(func, *arrays):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("c,hw,ob,ic_bn,pad,parallel_min", [
    (16, 32, 8, 16, 1, 1 << 30),  # two 8-blocks into one 16-block, serial
    (24, 16, 8, 8, 1, 1),         # parallel
    (40, 8, 8, 8, 0, 1 << 30),    # no padding
    (20, 8, 16, 12, 1, 1),        # channels padded up to whole blocks, a 12-channel block
])
def test_scheduled_repack_is_bit_identical_and_vectorized(c, hw, ob, ic_bn, pad, parallel_min):
    func, xp, out = _repack(c, hw, ob, ic_bn, pad)
    scheduled = schedule_injective(func, parallel_min)
    assert scheduled is not None and bool(scheduled.attrs["tirx.is_scheduled"])
    text = scheduled.script()
    assert "T.vectorized" in text and ("T.parallel" in text) == (parallel_min == 1)
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 3.0, [int(d) for d in xp.shape]).astype(F32)
    x[..., :] *= rng.integers(0, 2, x.shape[-1])  # some exact zeros, some values that clip at 255
    scale = np.array([0.011], F32)
    empty = np.full([int(d) for d in out.shape], 7, "uint8")  # every element must be written
    np.testing.assert_array_equal(_call(scheduled, x, scale, empty.copy()), _call(func, x, scale, empty.copy()))


def _packed_module():
    """One packed AVX2 int8 conv2d (what Int8Layout makes of Quantize's NCHW chain), legalized for the CPU."""
    rng = np.random.default_rng(1)
    ic, oc = 8, 16
    wq = rng.integers(-63, 64, (oc, ic, 3, 3)).astype(np.int8)
    requant = rng.uniform(0.001, 0.01, oc).astype(F32)

    def body(bb, x):
        y = bb.emit(op.nn.relu(x))
        xq = bb.emit(op.quantize(y, relax.const(np.float32(0.02), F32), relax.const(0, "uint8"), axis=1,
                                 out_dtype="uint8"))
        acc = bb.emit(op.nn.conv2d(xq, relax.const(wq, "int8"), padding=1, out_dtype="int32"))
        y = bb.emit(op.multiply(bb.emit(op.astype(acc, F32)), relax.const(requant.reshape(1, oc, 1, 1), F32)))
        return bb.emit(op.nn.relu(y))

    return Int8Layout("avx2")(relax_module((1, ic, 8, 8), body)), rng


def test_pass_schedules_exactly_the_layout_kernels_and_the_build_is_unchanged():
    packed, rng = _packed_module()
    with TARGET:
        legal = tvm.transform.Sequential(legalize_passes(TARGET)[:-1])(packed)  # without ScheduleLayoutKernels
        after = ScheduleLayoutKernels()(legal)
    layout = {gv.name_hint for gv, f in legal.functions_items() if is_layout_kernel(gv.name_hint, f)}
    for kernel in (vnni.REPACK_NAME, vnni.UNPACK_NAME):  # alone or fused with the ReLU around them
        assert any(kernel in name for name in layout), (kernel, layout)
    for gv, func in after.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        scheduled = func.attrs is not None and "tirx.is_scheduled" in func.attrs
        assert scheduled == (gv.name_hint in layout), gv.name_hint
        if not scheduled:  # the conv2d (and anything else) is left exactly as it was for MetaSchedule
            tvm.ir.assert_structural_equal(func, legal[gv])
    x = rng.uniform(-1, 3, (1, 8, 8, 8)).astype(F32)
    outs = []
    for mod in (legal, after):
        ex = tvm.compile(mod, TARGET, relax_pipeline=tvm.transform.Sequential(
            _lowering_tail(TARGET)))
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def _lowering_tail(target) -> list:
    from tvm.relax.backend.cpu_generic import pipeline as stages

    return stages.dataflow_lower_passes(target) + stages.finalize_passes(target)


def test_tune_extracts_no_layout_kernel():
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks

    from compiler.tuning.session import _prescheduled

    packed, _ = _packed_module()
    spec = targets.get("x86-64-v3")
    legal = pipeline(spec, "int8").legalize(TARGET)(packed)
    tasks = [t for t in extract_tasks(legal, TARGET) if not _prescheduled(t)]
    names = [t.task_name for t in tasks]
    assert any(vnni.CONV_NAME in n for n in names), names
    assert not any(k in n for n in names for k in (vnni.REPACK_NAME, vnni.FLOAT_PACK_NAME, vnni.UNPACK_NAME)), names


def test_inside_one_launch_layout_kernels_go_parallel_from_fewer_elements():
    """The x86 int8 targets merge their kernels into one thread-pool launch (passes.parallel_launch), where a parallel
    loop costs a barrier instead of waking the pool: their layout kernels go parallel from
    LAUNCH_PARALLEL_MIN_ELEMENTS; a target that merges nothing keeps PARALLEL_MIN_ELEMENTS. The shipped model's
    stage-2 shortcut pack (4 x 16 x 16 x 8 = 8,192 elements) is between the two."""
    from passes import schedule_layout
    from targets import pipeline

    launch, alone = schedule_layout.LAUNCH_PARALLEL_MIN_ELEMENTS, schedule_layout.PARALLEL_MIN_ELEMENTS
    assert launch <= 4 * 16 * 16 * 8 < alone
    for name in ("x86-64-v3", "x86-64-v4-vnni"):
        assert pipeline._layout_parallel_min(pipeline.compile_target(targets.get(name))) == launch, name
    assert pipeline._layout_parallel_min(TARGET) == alone  # generic x86-64: no int8 kernels, nothing merged
    func, _, _ = _repack(32, 16, 8, 8, 0)  # 32 channels at 16 x 16: 8,192 output elements
    assert "T.parallel" in schedule_injective(func, launch).script()
    assert "T.parallel" not in schedule_injective(func, alone).script()
