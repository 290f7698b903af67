"""Int8Layout's fused quantize (issue 18 item 3): a packed conv2d whose output only the next packed conv2d reads
quantizes in its own epilogue (vnni_quantize_packed, which FuseOps puts into the conv2d's kernel) and a 1-byte pad /
re-block follows, instead of a float activation and a float quantize_repack; ApplyByAnchor gives the fused kernel
the records tuned for the same conv2d with the float epilogue."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import targets
from helpers import relax_module as _module
from passes import calibration as calib
from passes import quantize as q
from passes import vnni

F32 = "float32"
op = relax.op


def _c(array, dtype=F32):
    return relax.const(np.ascontiguousarray(array, dtype=dtype), dtype)


def _weights(c0=8, c1=16, c2=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, 0.3, (co, ci, 3, 3)).astype(F32), rng.normal(0, 0.1, (1, co, 1, 1)).astype(F32))
            for ci, co in ((3, c0), (c0, c1), (c1, c2))]


def _three_convs(weights, n=2, hw=8):
    """conv-bias-relu x 3, then the mean: the first conv stays fp32 (kept), the other two are uint8 conv2d."""

    def body(bb, x):
        y = x
        for w, b in weights:
            y = bb.emit(op.nn.relu(bb.emit(op.add(bb.emit(op.nn.conv2d(y, _c(w), padding=1)), _c(b)))))
        return bb.emit(op.mean(y, axis=[-1, -2], keepdims=True))

    return _module((n, 3, hw, hw), body)


def _calibration(amax: dict):
    hists = {}
    for name, m in amax.items():
        h = calib.Histogram()
        h.add(np.array([0.0, m], F32))
        hists[name] = h
    return q.Calibration("main", list(amax), hists, images=1, batch=2)


AMAX = {"conv2d0": 1.0, "conv2d1": 2.5, "conv2d2": 3.0}


def _quantized(fuse: bool, weights=None):
    from passes.int8_layout import Int8Layout

    weights = weights or _weights()
    config = q.QuantConfig(keep=("first",), vnni_layout=False)
    nchw, _ = q.quantize(_three_convs(weights), _calibration(AMAX), config)
    return Int8Layout("vnni", fuse_quantize=fuse)(nchw)


def test_fused_quantize_before_expected():
    """conv2d2 reads only conv2d1's ReLU: that ReLU is quantized on the packed tensor (uint8 NCHW[16]c) and padded /
    re-blocked at 1 byte an element; conv2d1's input (the fp32 conv's output) keeps pack_float + quantize_repack."""
    weights = _weights()
    after = _quantized(fuse=True, weights=weights)
    (w0, b0), (w1, b1), (w2, b2) = weights
    s1, s2 = np.float32(AMAX["conv2d1"] / 255), np.float32(AMAX["conv2d2"] / 255)

    def packed_conv(bb, xp, w, b, s_x):
        wq, sw = q.quantize_weight(w, 0)
        acc = bb.emit_te(vnni.conv2d_nchwc_int8, xp, _c(vnni.pack_weight(wq), "int8"), [1, 1], [1, 1],
                         primfunc_name_hint=vnni.CONV_NAME)
        real = bb.emit(op.astype(acc, F32))
        requant = (np.float64(s_x) * sw.astype(np.float64)).astype(F32)
        y = bb.emit(op.multiply(real, _c(vnni.pack_channels(requant))))
        return bb.emit(op.nn.relu(bb.emit(op.add(y, _c(vnni.pack_channels(b.reshape(-1)))))))

    def body(bb, x):
        y = bb.emit(op.nn.relu(bb.emit(op.add(bb.emit(op.nn.conv2d(x, _c(w0), padding=1)), _c(b0)))))
        xf = bb.emit_te(vnni.pack_float, y, primfunc_name_hint=vnni.FLOAT_PACK_NAME)
        xp = bb.emit_te(vnni.quantize_repack, xf, _c([s1]), 8, 8, [1, 1, 1, 1], primfunc_name_hint=vnni.REPACK_NAME)
        y1 = packed_conv(bb, xp, w1, b1, s1)  # 16 channels: one 16-block
        bb.emit_te(vnni.unpack, y1, 16, primfunc_name_hint=vnni.UNPACK_NAME)  # conv2d1's NCHW value: no reader
        qy = bb.emit_te(vnni.quantize_packed, y1, _c([s2]), primfunc_name_hint=vnni.QUANTIZE_NAME)
        xp = bb.emit_te(vnni.pad_repack, qy, 16, 16, [1, 1, 1, 1], primfunc_name_hint=vnni.PAD_NAME,
                        primfunc_attrs={"vnni_pad": [1, 1, 1, 1, 16]})
        y2 = packed_conv(bb, xp, w2, b2, s2)  # 8 channels: one 8-block
        y2 = bb.emit_te(vnni.unpack, y2, 8, primfunc_name_hint=vnni.UNPACK_NAME)
        return bb.emit(op.mean(y2, axis=[-1, -2], keepdims=True))

    expected = relax.transform.DeadCodeElimination(["main"])(_module((2, 3, 8, 8), body))
    tvm.ir.assert_structural_equal(after, expected)


def _residual_block(weights):
    """conv2d0 (fp32, kept) -> conv2d1 -> conv2d2 -> + conv2d1's ReLU (a residual) -> ReLU -> mean."""
    (w0, b0), (w1, b1), (w2, b2) = weights

    def body(bb, x):
        y0 = bb.emit(op.nn.relu(bb.emit(op.add(bb.emit(op.nn.conv2d(x, _c(w0), padding=1)), _c(b0)))))
        y1 = bb.emit(op.nn.relu(bb.emit(op.add(bb.emit(op.nn.conv2d(y0, _c(w1), padding=1)), _c(b1)))))
        y2 = bb.emit(op.add(bb.emit(op.add(bb.emit(op.nn.conv2d(y1, _c(w2), padding=1)), _c(b2))), y1))
        return bb.emit(op.mean(bb.emit(op.nn.relu(y2)), axis=[-1, -2], keepdims=True))

    return _module((2, 3, 8, 8), body)


def _kernels(mod):
    return [str(b.value.args[0].name_hint) for b in mod["main"].body.blocks[0].bindings
            if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"]


def test_a_float_read_by_a_residual_add():
    """conv2d1's ReLU is read by conv2d2 and by the residual add after it. Without uint8_residual the float stays
    (quantize_repack reads it, the add reads it); with it (the default) the add reads conv2d2's uint8 input
    dequantized, ``astype(q, f32) * s``, so the float is never written."""
    from passes.int8_layout import Int8Layout

    assert vnni.QUANTIZE_NAME not in _kernels(_quantized(fuse=False))
    weights = _weights(c0=8, c1=8, c2=8)
    nchw, _ = q.quantize(_residual_block(weights), _calibration(AMAX), q.QuantConfig(keep=("first",)))
    kept = Int8Layout("vnni", uint8_residual=False)(nchw)
    assert _kernels(kept).count(vnni.REPACK_NAME) == 2 and vnni.QUANTIZE_NAME not in _kernels(kept)

    packed = Int8Layout("vnni")(nchw)
    assert _kernels(packed).count(vnni.REPACK_NAME) == 1  # conv2d1's input: the fp32 conv's output
    assert _kernels(packed).count(vnni.QUANTIZE_NAME) == 1 and _kernels(packed).count(vnni.PAD_NAME) == 1
    values = {b.var: b.value for b in packed["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)}

    def op_of(var):
        e = values.get(var) if isinstance(var, relax.Var) else None
        return e.op.name if e is not None and isinstance(e.op, tvm.ir.Op) else None

    quantized = [v for v, e in values.items() if op_of(v) == "relax.call_tir"
                 and e.args[0].name_hint == vnni.QUANTIZE_NAME]
    dequantized = [v for v in values if op_of(v) == "relax.multiply" and op_of(values[v].args[0]) == "relax.astype"
                   and values[values[v].args[0]].args[0] == quantized[0]]
    assert len(dequantized) == 1, packed["main"].script()
    residual = [v for v in values if op_of(v) == "relax.add" and dequantized[0] in list(values[v].args)]
    assert len(residual) == 1 and _static(values[residual[0]]) == [2, 1, 8, 8, 8], packed["main"].script()
    np.testing.assert_array_equal(values[dequantized[0]].args[1].value.numpy(), [np.float32(AMAX["conv2d2"] / 255)])
    _, report = q.quantize(_residual_block(weights), _calibration(AMAX), q.QuantConfig(keep=("first",), vnni_layout=True))
    assert (report["fused_quantize"], report["uint8_residuals"]) == (1, 1)  # the quantization report says so


def _static(call):
    return [int(d) for d in call.ty.shape.values]


def _host_isa():
    spec = targets.get("host")
    config = q.config_for(spec)
    if not config.vnni_layout:
        pytest.skip("this CPU has no x86 int8 dot-product ISA (the packed layout is not built here)")
    return spec, config.int8_isa


def test_fused_quantize_is_bit_identical_on_this_cpu():
    """The fused module computes the same integers as the unfused one: equal logits (compiled for this CPU's int8
    ISA, no tuning records; vpmaddubsw ISAs get 7-bit weights as config_for arranges)."""
    from passes.int8_layout import Int8Layout

    import dataclasses

    spec, isa = _host_isa()
    weights = _weights(c0=8, c1=24, c2=16, seed=3)
    config = dataclasses.replace(q.config_for(spec), keep=("first",), vnni_layout=False)
    nchw, _ = q.quantize(_three_convs(weights, hw=16), _calibration(AMAX), config)
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 16, 16)).astype(F32)
    outs = {}
    for fuse in (False, True):
        exe = targets.compile_module(Int8Layout(isa, fuse_quantize=fuse)(nchw), spec)
        vm = relax.VirtualMachine(exe, tvm.cpu())
        outs[fuse] = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert np.abs(outs[False]).max() > 0
    np.testing.assert_array_equal(outs[True], outs[False])


def test_apply_by_anchor_gives_the_fused_kernel_the_float_epilogue_record():
    """A record tuned for conv2d + float epilogue schedules the same conv2d with the quantize in its epilogue: the
    shipped ResNet56's batch-1 int8 database (tuned before the fusion) covers every conv2d kernel of today's module,
    which MetaScheduleApplyDatabase alone does not (the fused kernels are other workloads)."""
    from compiler import zoo
    from compiler.build import lower
    from compiler.tuning import database

    spec, isa = _host_isa()
    if isa == "amx":  # an AMX CPU: its x86-64-v4-vnni class target builds with the VNNI database
        spec, isa = targets.get("x86-64-v4-vnni"), "vnni"
    if isa != "vnni":
        pytest.skip("the committed host database is for the AVX-512 VNNI class")
    ckpt = zoo.load("resnet56", None, None, quiet=True)
    lowered = lower(ckpt.model, 1, "int8", spec, normalize=ckpt.normalize, untrained=True)
    db, info = database.find_database(spec, "resnet56", database.variant_of(lowered.module, "int8"))
    assert db is not None, info["note"]
    applied = database.tasks_applied(lowered.module, spec, db)
    target = spec.tvm_target()
    from targets.pipeline import pipeline

    legal = pipeline(spec).legalize(target)(lowered.module)
    with target, db:
        exact = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(legal)
    fused = [gv.name_hint for gv, f in legal.functions_items() if vnni.QUANTIZE_NAME in gv.name_hint]
    assert fused, "the shipped model has conv2d -> conv2d edges the quantize fuses into"
    unscheduled = [n for n in fused if "tirx.is_scheduled" not in (exact[n].attrs or {})]
    assert unscheduled == fused  # no exact record for a fused kernel
    convs = [gv.name_hint for gv, f in legal.functions_items() if "conv2d" in gv.name_hint]
    assert not set(convs) & set(applied["missing"]), applied


def test_uint8_residual_is_the_quantize_dequantize_of_the_residual_on_this_cpu():
    """The uint8 residual computes what the NCHW int8 module computes when the residual edge is quantized to
    conv2d2's input scale and dequantized (R.quantize -> R.dequantize written into the graph), and not what the
    float residual gives."""
    import dataclasses

    from passes.int8_layout import Int8Layout

    spec, isa = _host_isa()
    weights = _weights(c0=8, c1=16, c2=16, seed=5)
    config = dataclasses.replace(q.config_for(spec), keep=("first",), vnni_layout=False)
    (w0, b0), (w1, b1), (w2, b2) = weights
    s2 = np.float32(AMAX["conv2d2"] / 255)

    def rounded_residual(bb, x):
        y0 = bb.emit(op.nn.relu(bb.emit(op.add(bb.emit(op.nn.conv2d(x, _c(w0), padding=1)), _c(b0)))))
        y1 = bb.emit(op.nn.relu(bb.emit(op.add(bb.emit(op.nn.conv2d(y0, _c(w1), padding=1)), _c(b1)))))
        r = bb.emit(op.quantize(y1, relax.const(s2, F32), relax.const(0, "uint8"), axis=1, out_dtype="uint8"))
        r = bb.emit(op.dequantize(r, relax.const(s2, F32), relax.const(0, "uint8"), axis=1, out_dtype=F32))
        y2 = bb.emit(op.add(bb.emit(op.add(bb.emit(op.nn.conv2d(y1, _c(w2), padding=1)), _c(b2))), r))
        return bb.emit(op.mean(bb.emit(op.nn.relu(y2)), axis=[-1, -2], keepdims=True))

    x = np.random.default_rng(2).normal(0, 1, (2, 3, 8, 8)).astype(F32)

    def run(mod):
        vm = relax.VirtualMachine(targets.compile_module(mod, spec), tvm.cpu())
        return vm["main"](tvm.runtime.tensor(x)).numpy()

    reference = run(q.quantize(_module((2, 3, 8, 8), rounded_residual), _calibration(AMAX), config)[0])
    nchw, _ = q.quantize(_residual_block(weights), _calibration(AMAX), config)
    uint8 = run(Int8Layout(isa)(nchw))
    float_residual = run(Int8Layout(isa, uint8_residual=False)(nchw))
    np.testing.assert_allclose(uint8, reference, rtol=1e-5, atol=1e-6)
    assert not np.allclose(float_residual, reference, rtol=1e-5, atol=1e-6)
