"""The compiler as passes: each pass alone (TVMScript / BlockBuilder Before vs Expected), reports as module
attributes, the one pipeline per target and precision, and the committed tuning databases still covering the
modules build makes."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

import targets
from passes import reports
from passes import quantize as q
from passes import vnni
from passes.fold_batchnorm import FoldBatchnorm
from passes.int8_layout import Int8Layout
from targets.pipeline import pipeline
from helpers import relax_module

F32 = "float32"
op = relax.op


def _c(array, dtype=F32):
    return relax.const(np.ascontiguousarray(array, dtype=dtype), dtype)


# ---------------------------------------------------------------- FoldBatchnorm


def test_fold_batchnorm_leaves_a_folded_module_unchanged():
    @tvm.script.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32")):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=1)
                z = R.nn.relu(y)
                R.output(z)
            return z

    tvm.ir.assert_structural_equal(FoldBatchnorm()(Before), Before)


def test_fold_batchnorm_folds_into_the_conv():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(F32)
    gamma, beta = rng.uniform(0.5, 1.5, 4).astype(F32), rng.normal(size=4).astype(F32)
    mean, var = rng.normal(size=4).astype(F32), rng.uniform(0.5, 1.5, 4).astype(F32)

    def body(bb, x):
        y = bb.emit(op.nn.conv2d(x, _c(w), padding=1))
        bn = bb.emit(op.nn.batch_norm(y, _c(gamma), _c(beta), _c(mean), _c(var), axis=1))
        return bb.emit(relax.TupleGetItem(bn, 0))

    before = relax_module((1, 3, 8, 8), body)
    after = FoldBatchnorm()(before)
    text = after.script(show_meta=False)
    assert "batch_norm" not in text and text.count("R.nn.conv2d(") == 1
    scale = gamma / np.sqrt(var + 1e-5)
    folded = relax_module((1, 3, 8, 8), lambda bb, x: bb.emit(op.add(
        bb.emit(op.nn.conv2d(x, _c(w * scale[:, None, None, None]), padding=1)),
        _c((beta - mean * scale).reshape(1, 4, 1, 1)))))
    x = rng.normal(size=(1, 3, 8, 8)).astype(F32)
    np.testing.assert_allclose(_run(after, x), _run(folded, x), rtol=1e-4, atol=1e-4)  # inference statistics


def _run(mod, x):
    target = tvm.target.Target("llvm")
    ex = tvm.compile(mod, target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype=F32))).numpy()


# ---------------------------------------------------------------- Int8Layout alone


def _int8_nchw(wq, s_x, requant, oc):
    """What Quantize emits for one uint8 conv2d after a ReLU, then a bias add."""

    def body(bb, x):
        y = bb.emit(op.nn.relu(x))
        xq = bb.emit(op.quantize(y, relax.const(np.float32(s_x), F32), relax.const(0, "uint8"), axis=1,
                                 out_dtype="uint8"))
        acc = bb.emit(op.nn.conv2d(xq, _c(wq, "int8"), padding=1, out_dtype="int32"))
        real = bb.emit(op.astype(acc, F32))
        y = bb.emit(op.multiply(real, _c(requant.reshape(1, oc, 1, 1))))
        y = bb.emit(op.nn.relu(bb.emit(op.add(y, _c(np.ones((1, oc, 1, 1), F32))))))
        return bb.emit(op.mean(y, axis=[2, 3], keepdims=True))

    return body


@pytest.mark.parametrize("isa,ob", [("avx2", 8), ("vnni", 16), ("avx512", 16)])
def test_int8_layout_before_expected(isa, ob):
    """The NCHW uint8 conv2d chain -> pack_float, quantize_repack, conv2d_nchwc_int8, requantize, the bias add and
    ReLU on the packed tensor, one unpack for the mean; AVX2 has only 8-lane (ymm) intrinsics, so its blocks are 8 channels."""
    rng = np.random.default_rng(1)
    ic, oc = 8, 16
    wq = rng.integers(-63, 64, (oc, ic, 3, 3)).astype(np.int8)
    s_x, requant = np.float32(0.02), rng.uniform(0.001, 0.01, oc).astype(F32)
    before = relax_module((1, ic, 8, 8), _int8_nchw(wq, s_x, requant, oc))
    after = Int8Layout(isa)(before)

    def expected(bb, x):
        y = bb.emit(op.nn.relu(x))
        xf = bb.emit_te(vnni.pack_float, y, isa, primfunc_name_hint=vnni.FLOAT_PACK_NAME)
        xp = bb.emit_te(vnni.quantize_repack, xf, _c([s_x]), ic, 8, [1, 1, 1, 1], primfunc_name_hint=vnni.REPACK_NAME)
        acc = bb.emit_te(vnni.conv2d_nchwc_int8, xp, _c(vnni.pack_weight(wq, isa), "int8"), [1, 1], [1, 1],
                         primfunc_name_hint=vnni.CONV_NAME)
        real = bb.emit(op.astype(acc, F32))
        y = bb.emit(op.multiply(real, _c(vnni.pack_channels(requant, isa=isa))))
        y = bb.emit(op.nn.relu(bb.emit(op.add(y, _c(vnni.pack_channels(np.ones(oc, F32), isa=isa))))))
        y = bb.emit_te(vnni.unpack, y, oc, primfunc_name_hint=vnni.UNPACK_NAME)
        return bb.emit(op.mean(y, axis=[2, 3], keepdims=True))

    tvm.ir.assert_structural_equal(after, relax_module((1, ic, 8, 8), expected))
    assert vnni.pack_weight(wq, isa).shape[-2] == ob
    x = rng.uniform(-1, 3, (1, ic, 8, 8)).astype(F32)
    np.testing.assert_array_equal(_run(after, x), _run(before, x))  # the same integers, reordered


def test_int8_layout_refuses_weights_its_kernels_would_saturate():
    rng = np.random.default_rng(2)
    wq = rng.integers(-127, 128, (8, 8, 3, 3)).astype(np.int8)
    wq[0, 0, 0, 0] = -128 + 1
    before = relax_module((1, 8, 8, 8), _int8_nchw(wq, np.float32(0.02), np.ones(8, F32), 8))
    with pytest.raises(ValueError, match="saturate"):
        Int8Layout("avx2")(before)
    assert "conv2d_nchwc_int8" in Int8Layout("vnni")(before).script(show_meta=False)  # vpdpbusd takes 8 bits


def test_int8_layout_updates_the_report_attribute():
    rng = np.random.default_rng(3)
    wq = rng.integers(-63, 64, (24, 8, 3, 3)).astype(np.int8)
    before = relax_module((1, 8, 8, 8), _int8_nchw(wq, np.float32(0.02), np.ones(24, F32), 24))
    report = {"layers": [{"name": "conv2d0", "layout": "NCHW/OIHW"}], "vnni_layout": False,
              "constant_bytes": {"before": {}, "after": {}}}
    after = Int8Layout("avx2")(reports.attach(before, reports.QUANTIZE, report))
    got = q.report_of(after)
    assert got["layers"][0]["layout"] == "NCHW[x]c/OIHW[x/4]i8o4i (AVX2)"
    assert got["int8_isa"] == "avx2" and got["constant_bytes"]["after"]["by_dtype"]["int8"] == 24 * 8 * 9
    assert q.report_of(before) is None  # the input module is not changed


# ---------------------------------------------------------------- the pipeline


def test_pipeline_per_target_and_precision():
    cal = q.Calibration("main", [], {}, 1, 1)
    host = targets.get("host")
    assert str(pipeline(host, "fp32").fp32().info.name) == "fp32"
    tx2 = pipeline(targets.get("jetson-tx2"), "int8-weights").precision_passes()
    assert [str(p.info.name) for p in tx2.passes] == ["ToMixedPrecision", "FoldConstant", "QuantizeWeights"]
    orin = pipeline(targets.get("jetson-orin"), "int8")
    assert orin.int8_isa is None  # dp4a: int8 x int8 in NCHW
    assert [str(p.info.name) for p in orin.precision_passes(cal).passes] == ["Quantize"]
    cpu = pipeline(host, "int8")
    want = ["Quantize", "Int8Layout"] if cpu.int8_isa else ["Quantize"]
    assert [str(p.info.name) for p in cpu.precision_passes(cal).passes] == want
    with pytest.raises(ValueError, match="calibration"):
        cpu.precision_passes()
    with pytest.raises(ValueError, match="unknown precision"):
        pipeline(host, "int4")


# ---------------------------------------------------------------- committed databases still apply


_LOWERED: dict = {}


@pytest.mark.parametrize("target,prec,folder,least", [("host", "fp32", "resnet56-fp32-7cb8e576", 18),
                                                       ("host", "int8", "resnet56-int8-0d67b7c2", 27),
                                                       ("x86-64-v3", "int8", "resnet56-int8-810cd591", 27),
                                                       ("host", "int8", "resnet56-int8-810cd591", 27)])
def test_committed_database_covers_what_build_makes_of_the_shipped_model(target, prec, folder, least):
    """build's module for the shipped (pruned) ResNet56 finds its committed database and the coverage check (the
    same legalize passes the build runs) finds every kernel tuned but, for int8, the classifier's quantize, whose
    scale is inlined (another calibration: the random one here)."""
    from compiler import zoo
    from compiler.tuning import database
    from compiler.build import lower

    spec = targets.get(target)
    if prec == "int8" and pipeline(spec, prec).int8_isa == "amx":
        # an AMX CPU: host's int8 conv2d kernels run on tiles (passes.amx, another layout, no database); the VNNI
        # database is what the x86-64-v4-vnni class target of this CPU builds with
        spec = targets.get("x86-64-v4-vnni")
    meta = database.read_meta(database.DEFAULT_ROOT / target / folder)
    how, why_not = database.target_match(meta, spec)
    if why_not:
        pytest.skip(f"the committed database is not for this CPU: {why_not}")
    ckpt = zoo.load(None, None, None)
    key = (prec, repr(pipeline(spec, prec).quant))  # host and its class target lower to the same module
    if key not in _LOWERED:
        _LOWERED[key] = lower(ckpt.model, 1, prec, spec, normalize=ckpt.normalize, calib_images=8, untrained=True)
    lowered = _LOWERED[key]
    variant = database.variant_of(lowered.module, prec)
    assert f"{ckpt.model_name}-{variant}" == folder
    db, info = database.find_database(spec, ckpt.model_name, variant)
    assert db is not None, info["note"]
    applied = database.tasks_applied(lowered.module, spec, db)
    # the int8 layout kernels have a fixed schedule (passes.schedule_layout) and are no tuning tasks any more
    assert applied["applied"] >= least - applied["fixed"] and applied["tasks"] <= meta["tasks_in_db"], applied
    assert applied["tasks"] - applied["applied"] <= 1, applied
    library, lib_info = database.find_library(spec, prec, 1)
    if library is not None:  # build's union: the model's database first, the library for what it lacks
        both = database.tasks_applied(lowered.module, spec, database.combine(db, library), first=db)
        assert both["first_applied"] == applied["applied"] and both["tasks"] == applied["tasks"], (both, applied)
        assert applied["applied"] <= both["applied"] <= both["tasks"], both
