"""int8 quantization: calibration statistics, exact IR rewrites, the quantized math against a float64 reference,
int8-stored weights that survive the build pipelines, precision per target, and ResNet20 end to end."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax

import targets
from compiler import precision
from compiler.errors import UserError
from passes import calibration as calib
from passes import quantize as q
from passes import quantize_weights as qw
from helpers import relax_module as _module

F32 = "float32"
op = relax.op


# ---------------------------------------------------------------- helpers


def _c(array, dtype=F32):
    return relax.const(np.ascontiguousarray(array, dtype=dtype), dtype)


def _run(mod, x):
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu() or "generic"})
    ex = tvm.compile(mod, target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype=F32))).numpy()


def _chain_weights(seed=0, cin=3, c1=8, c2=8, classes=5):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (c1, cin, 3, 3)).astype(F32)
    b1 = rng.normal(0, 0.1, (1, c1, 1, 1)).astype(F32)
    w2 = rng.normal(0, 0.2, (c2, c1, 3, 3)).astype(F32)
    w2[3] *= 0.01  # a channel with a much smaller range: per-channel scales matter
    b2 = rng.normal(0, 0.1, (1, c2, 1, 1)).astype(F32)
    w3 = rng.normal(0, 0.2, (c2, classes)).astype(F32)  # matmul weight, (K, M)
    b3 = rng.normal(0, 0.1, (1, classes)).astype(F32)
    return w1, b1, w2, b2, w3, b3


def _chain(weights, n=2, hw=8):
    """conv-bias-relu, conv-bias-relu, mean, reshape, matmul-bias: the frontend's shape of a CIFAR net."""
    w1, b1, w2, b2, w3, b3 = weights

    def body(bb, x):
        y = bb.emit(op.nn.conv2d(x, _c(w1), padding=1))
        y = bb.emit(op.nn.relu(bb.emit(op.add(y, _c(b1)))))
        y = bb.emit(op.nn.conv2d(y, _c(w2), padding=1))
        y = bb.emit(op.nn.relu(bb.emit(op.add(y, _c(b2)))))
        y = bb.emit(op.mean(y, axis=[-1, -2], keepdims=True))
        y = bb.emit(op.reshape(y, (n, w2.shape[0])))
        y = bb.emit(op.matmul(y, _c(w3), out_dtype=F32))
        return bb.emit(op.add(_c(b3), y))

    return _module((n, w1.shape[1], hw, hw), body)


def _conv_nchw(x, w, pad=1):
    """Plain float64 cross-correlation (NCHW, OIHW, stride 1)."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, hp, wp = x.shape
    o, _, kh, kw = w.shape
    h, wd = hp - kh + 1, wp - kw + 1
    out = np.zeros((n, o, h, wd))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", x[:, :, i:i + h, j:j + wd], np.asarray(w[:, :, i, j], np.float64))
    return out


def _quant(x, s, lo, hi):
    """The activation quantizer: clip(round(x / s), lo, hi), division in float32 as the kernel does it."""
    return np.clip(np.round((np.asarray(x, F32) / np.float32(s)).astype(np.float64)), lo, hi)


def _calibration_for(mod, images):
    return q.calibrate(mod, images)


# ---------------------------------------------------------------- weights


def test_weight_quantization_is_symmetric_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4, 3, 3)).astype(F32)
    w[1] *= 100.0
    w[4] = 0.0
    wq, s = q.quantize_weight(w, axis=0)
    assert wq.dtype == np.int8 and s.dtype == np.float32 and s.shape == (6,)
    assert wq.min() >= -127 and wq.max() <= 127
    assert s[4] == 1.0 and not wq[4].any()  # an all-zero channel: exact zeros
    for c in (0, 1, 2, 3, 5):
        assert np.isclose(s[c], np.abs(w[c]).max() / 127, rtol=1e-6)
        assert np.abs(wq[c]).max() == 127  # the largest weight of each channel maps to +-127
        assert np.abs(wq[c] * s[c] - w[c]).max() <= s[c] / 2 + 1e-6
    # matmul weights (K, M): channels along axis 1
    wm = rng.normal(size=(16, 3)).astype(F32) * np.array([1.0, 10.0, 0.1], F32)
    wq, s = q.quantize_weight(wm, axis=1)
    np.testing.assert_allclose(s, np.abs(wm).max(0) / 127, rtol=1e-6)


# ---------------------------------------------------------------- calibration statistics


def test_histogram_grows_its_range_exactly_and_tracks_min_max():
    rng = np.random.default_rng(0)
    h = calib.Histogram(bins=64)
    parts = [rng.uniform(0, 1, 1000), rng.uniform(-3, 3, 1000), rng.uniform(0, 17, 1000)]
    for p in parts:
        h.add(p.astype(F32))
    allv = np.abs(np.concatenate(parts).astype(F32))
    assert h.counts.sum() == 3000 and h.count == 3000
    assert h.min == pytest.approx(float(np.concatenate(parts).astype(F32).min()))
    assert h.max == pytest.approx(float(np.concatenate(parts).astype(F32).max()))
    assert h.hi > allv.max()
    # merging bin pairs is exact: the grown histogram equals one made at the final range from all the data
    ref = np.bincount(np.minimum((allv * (64 / h.hi)).astype(np.int64), 63), minlength=64)
    # values of the first batch were binned at a finer width and merged: same bins, up to float edge rounding
    assert np.abs(h.counts - ref).sum() <= 4


def test_thresholds_minmax_percentile_entropy():
    rng = np.random.default_rng(1)
    body = np.abs(rng.normal(0, 1, 200_000))
    data = np.concatenate([body, [60.0, 80.0]]).astype(F32)  # two huge outliers
    h = calib.Histogram()
    h.add(data)
    t_max = h.threshold("minmax", 256)
    t_pct = h.threshold("percentile", 256, 99.0)
    t_kl = h.threshold("entropy", 256)
    assert t_max == pytest.approx(80.0)
    assert t_pct == pytest.approx(np.percentile(data, 99.0), abs=h.hi / h.bins)
    assert 2.0 < t_kl < 20.0  # entropy clips the outliers but keeps the body of the distribution
    # a rectified normal (half exact zeros, like every post-ReLU tensor): the zero spike must not drag the
    # entropy threshold down (with bin 0 in the KL it chose 1.8 sigma and cost ResNet56 1.2 pt top-1)
    r = calib.Histogram()
    r.add(np.maximum(rng.normal(0, 1, 1_000_000), 0).astype(F32))
    assert r.threshold("entropy", 256) > 3.5
    # a uniform distribution has nothing to clip: entropy keeps (nearly) the whole range
    u = calib.Histogram()
    u.add(rng.uniform(0, 5, 200_000).astype(F32))
    assert u.threshold("entropy", 256) > 0.9 * 5
    with pytest.raises(ValueError):
        u.threshold("mse", 256)


def test_calibration_runs_the_fp32_module_and_sees_each_layer_input():
    weights = _chain_weights()
    mod = _chain(weights, n=2)
    rng = np.random.default_rng(2)
    images = rng.normal(size=(5, 3, 8, 8)).astype(F32)  # 5 images on a batch-2 module: a padded last chunk
    cal = q.calibrate(mod, images)
    assert cal.layer_names == ["conv2d0", "conv2d1", "matmul0"] and cal.images == 5 and cal.batch == 2
    w1, b1, w2, b2, _, _ = weights
    a1 = np.maximum(_conv_nchw(images, w1) + b1, 0)
    a2 = np.maximum(_conv_nchw(a1, w2) + b2, 0).mean(axis=(2, 3))
    for name, ref in (("conv2d0", images), ("conv2d1", a1), ("matmul0", a2)):
        h = cal.histograms[name]
        assert h.count == ref.size  # the zero padding of the last chunk is not counted
        assert h.min == pytest.approx(ref.min(), rel=1e-4, abs=1e-5)
        assert h.max == pytest.approx(ref.max(), rel=1e-4)


def test_calibration_saved_and_loaded_gives_the_same_module(tmp_path):
    """A Calibration written to npz and read back quantizes to the same module; a file that is not one is refused."""
    weights = _chain_weights()
    mod = _chain(weights, n=2)
    cal = q.calibrate(mod, np.random.default_rng(3).normal(size=(6, 3, 8, 8)).astype(F32))
    cal.save(tmp_path / "c.npz")
    back = q.Calibration.load(tmp_path / "c.npz")
    assert back.layer_names == cal.layer_names and (back.images, back.batch) == (6, 2)
    for name, h in cal.histograms.items():
        g = back.histograms[name]
        assert np.array_equal(g.counts, h.counts) and (g.hi, g.min, g.max, g.count) == (h.hi, h.min, h.max, h.count)
        for method in calib.METHODS:
            assert g.threshold(method, 256) == h.threshold(method, 256)
    tvm.ir.assert_structural_equal(q.quantize(mod, back)[0], q.quantize(mod, cal)[0])
    # not a calibration: random bytes, an npz without the tables, counts that do not add up
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with np.load(tmp_path / "c.npz") as z:
        bad = dict(z)
    bad["counts0"] = bad["counts0"] + 1
    np.savez(tmp_path / "bad.npz", **bad)
    for name in ("junk.npz", "other.npz", "bad.npz"):
        with pytest.raises(ValueError, match="not a calibration file|disagree"):
            q.Calibration.load(tmp_path / name)


# ---------------------------------------------------------------- the rewrite: Before / Expected


def _fixed_calibration(layers_abs_max: dict, names):
    """A Calibration whose histograms have the given |x| maxima (for exact, hand-written Expected modules)."""
    hists = {}
    for n in names:
        h = calib.Histogram()
        h.add(np.array([0.0, layers_abs_max[n]], F32))
        hists[n] = h
    return q.Calibration("main", list(names), hists, images=1, batch=2)


def _expected_chain(weights, s1, s2, unsigned, keep_first):
    """The chain after quantize(): conv2d1 and matmul0 in int8 (conv2d0 too unless kept), written out by hand."""
    w1, b1, w2, b2, w3, b3 = weights
    n = 2

    def int8_layer(bb, x, w, s_x, act_dtype, is_conv):
        xq = bb.emit(op.quantize(x, relax.const(np.float32(s_x), F32), relax.const(0, act_dtype), axis=1,
                                 out_dtype=act_dtype))
        wq, sw = q.quantize_weight(w, 0 if is_conv else 1)
        if is_conv:
            acc = bb.emit(op.nn.conv2d(xq, _c(wq, "int8"), padding=1, out_dtype="int32"))
            shape = (1, -1, 1, 1)
        else:
            acc = bb.emit(op.matmul(xq, _c(wq, "int8"), out_dtype="int32"))
            shape = (1, -1)
        real = bb.emit(op.astype(acc, F32))
        return bb.emit(op.multiply(real, _c((np.float64(s_x) * sw.astype(np.float64)).astype(F32).reshape(shape))))

    act = "uint8" if unsigned else "int8"

    def body(bb, x):
        if keep_first:
            y = bb.emit(op.nn.conv2d(x, _c(w1), padding=1))
        else:
            y = int8_layer(bb, x, w1, s1["conv2d0"], "int8", True)  # the image is signed: int8 whatever the target
        y = bb.emit(op.nn.relu(bb.emit(op.add(y, _c(b1)))))
        y = int8_layer(bb, y, w2, s2["conv2d1"], act, True)
        y = bb.emit(op.nn.relu(bb.emit(op.add(y, _c(b2)))))
        y = bb.emit(op.mean(y, axis=[-1, -2], keepdims=True))
        y = bb.emit(op.reshape(y, (n, w2.shape[0])))
        y = int8_layer(bb, y, w3, s2["matmul0"], act, False)
        return bb.emit(op.add(_c(b3), y))

    return _module((n, w1.shape[1], 8, 8), body)


@pytest.mark.parametrize("unsigned,keep_first", [(True, True), (False, False)])
def test_rewrite_before_expected(unsigned, keep_first):
    weights = _chain_weights()
    before = _chain(weights)
    snapshot = tvm_ffi.structural_hash(before)
    amax = {"conv2d0": 2.5, "conv2d1": 3.0, "matmul0": 1.5}
    cal = _fixed_calibration(amax, ["conv2d0", "conv2d1", "matmul0"])
    config = q.QuantConfig(method="minmax", unsigned_activations=unsigned, keep=("first",) if keep_first else ())
    after, report = q.quantize(before, cal, config)
    assert tvm_ffi.structural_hash(before) == snapshot, "the input module was modified"
    relax.analysis.well_formed(after)
    qmax = 255 if unsigned else 127
    scales = {"conv2d0": np.float32(2.5 / 127), "conv2d1": np.float32(3.0 / qmax), "matmul0": np.float32(1.5 / qmax)}
    expected = _expected_chain(weights, scales, scales, unsigned, keep_first)
    tvm.ir.assert_structural_equal(after, expected)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["conv2d0"]["precision"] == ("fp32" if keep_first else "int8")
    assert rows["conv2d1"]["activation_dtype"] == ("uint8" if unsigned else "int8")
    assert rows["conv2d1"]["scale"] == pytest.approx(scales["conv2d1"])
    assert [k["layer"] for k in report["kept"]] == (["conv2d0"] if keep_first else [])


def test_shared_input_is_quantized_once_and_signed_inputs_stay_int8():
    rng = np.random.default_rng(3)
    wa, wb = rng.normal(size=(4, 3, 1, 1)).astype(F32), rng.normal(size=(2, 3, 1, 1)).astype(F32)

    def body(bb, x):
        t = bb.emit(op.subtract(x, _c(np.full((1, 3, 1, 1), 0.5, F32))))  # signed: not provably >= 0
        a = bb.emit(op.nn.conv2d(t, _c(wa), padding=0))
        b = bb.emit(op.nn.conv2d(t, _c(wb), padding=0))
        return bb.emit(op.concat([a, b], axis=1))

    mod = _module((1, 3, 4, 4), body)
    cal = q.calibrate(mod, rng.normal(size=(3, 3, 4, 4)).astype(F32))
    after, report = q.quantize(mod, cal, q.QuantConfig(keep=()))
    text = after.script(show_meta=False)
    assert text.count("R.quantize(") == 1
    assert [r["activation_dtype"] for r in report["layers"]] == ["int8", "int8"]


def test_keep_options():
    weights = _chain_weights()
    mod = _chain(weights)
    cal = _fixed_calibration({"conv2d0": 1.0, "conv2d1": 1.0, "matmul0": 1.0}, ["conv2d0", "conv2d1", "matmul0"])
    _, rep = q.quantize(mod, cal, q.QuantConfig(keep=("first", "last")))
    assert [r["precision"] for r in rep["layers"]] == ["fp32", "int8", "fp32"]
    assert "first layer" in rep["kept"][0]["reason"] and "last layer" in rep["kept"][1]["reason"]
    _, rep = q.quantize(mod, cal, q.QuantConfig(keep=("conv2d1",)))
    assert [r["precision"] for r in rep["layers"]] == ["int8", "fp32", "int8"]
    with pytest.raises(ValueError):
        q.quantize(mod, cal, q.QuantConfig(keep=("conv2d9",)))
    with pytest.raises(ValueError):  # a calibration of a module with other layers is refused
        q.quantize(_module((2, 3, 8, 8), lambda bb, x: bb.emit(op.nn.relu(x))), cal)


# ---------------------------------------------------------------- the quantized math against float64


def test_int8_chain_matches_float64_reference_of_the_same_math():
    weights = _chain_weights(seed=4)
    w1, b1, w2, b2, w3, b3 = weights
    mod = _chain(weights)
    rng = np.random.default_rng(5)
    cal = q.calibrate(mod, rng.normal(size=(8, 3, 8, 8)).astype(F32))
    config = q.QuantConfig(method="percentile", percentile=99.0, unsigned_activations=True, keep=())
    qmod, report = q.quantize(mod, cal, config)
    s = {r["name"]: r["scale"] for r in report["layers"]}
    x = rng.normal(size=(2, 3, 8, 8)).astype(F32)
    got = _run(qmod, x)

    def layer(a, w, s_x, lo, hi, conv):
        wq, sw = q.quantize_weight(w, 0 if conv else 1)
        aq = _quant(a, s_x, lo, hi)
        acc = _conv_nchw(aq, wq.astype(np.float64)) if conv else aq @ wq.astype(np.float64)
        requant = (np.float64(np.float32(s_x)) * sw.astype(np.float64)).astype(F32).astype(np.float64)
        return acc * (requant.reshape(1, -1, 1, 1) if conv else requant.reshape(1, -1))

    a1 = np.maximum(layer(x, w1, s["conv2d0"], -128, 127, True) + b1, 0)
    a2 = np.maximum(layer(a1, w2, s["conv2d1"], 0, 255, True) + b2, 0)
    ref = layer(a2.mean(axis=(2, 3)), w3, s["matmul0"], 0, 255, False) + b3
    fp32 = _run(mod, x)
    scale = np.abs(ref).max()
    # same math: float32 rounding (and at most a rare 1-LSB flip of a quantized activation) apart
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3 * scale)
    assert np.median(np.abs(got - ref)) < 1e-4 * scale
    # and it really is quantized: further from the float model than from the quantized reference
    assert np.abs(got - fp32).max() > 10 * max(np.abs(got - ref).max(), 1e-6 * scale)
    assert report["int8_layers"] == 3


# ---------------------------------------------------------------- int8-weights (fp16 compute)


def _weights_module():
    weights = _chain_weights(seed=6)
    mod = precision.apply(_chain(weights), "fp16")
    return weights, mod


def test_int8_weights_store_int8_and_survive_the_target_pipelines():
    weights, fp16 = _weights_module()
    mod, report = qw.quantize_weights(fp16)
    relax.analysis.well_formed(mod)
    by = report["constant_bytes"]["after"]["by_dtype"]
    assert by["int8"] == sum(w.size for w in weights[0::2])  # every conv/matmul weight is int8
    assert report["constant_bytes"]["after"]["total"] < 0.6 * report["constant_bytes"]["before"]["total"]
    # each layer is one Primitive function: int8 weight in, astype + multiply (dequantize) feeding the fp16 conv
    prims = [f for _, f in mod.functions_items() if isinstance(f, relax.Function) and f.attrs
             and "Primitive" in f.attrs]
    assert len(prims) == 3
    text = prims[0].script(show_meta=False)
    assert 'R.astype(w, dtype="float16")' in text and "R.multiply(" in text and "R.nn.conv2d(" in text
    # the build pipelines must not fold the dequantize back into fp16 constants
    from targets.build import relax_pipeline

    for name in ("host", "jetson-tx2"):
        spec = targets.get(name)
        with spec.tvm_target():
            lowered = relax_pipeline(spec)(mod)
        assert q.constant_bytes(lowered)["by_dtype"].get("int8", 0) == by["int8"], name


def test_int8_weights_numerics_match_dequantized_reference():
    weights, fp16 = _weights_module()
    mod, _ = qw.quantize_weights(fp16)
    w1, b1, w2, b2, w3, b3 = weights
    x = np.random.default_rng(7).normal(size=(2, 3, 8, 8)).astype(F32)
    got = _run(mod, x)

    def dq(w, axis):
        wq, s = q.quantize_weight(w.astype(np.float16).astype(F32), axis)
        shape = [1] * w.ndim
        shape[axis] = -1
        return wq.astype(np.float64) * s.astype(np.float16).astype(np.float64).reshape(shape)

    a = np.maximum(_conv_nchw(x, dq(w1, 0)) + b1, 0)
    a = np.maximum(_conv_nchw(a, dq(w2, 0)) + b2, 0)
    ref = a.mean(axis=(2, 3)) @ dq(w3, 1) + b3
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-2 * np.abs(ref).max())  # fp16 arithmetic


# ---------------------------------------------------------------- precision per target


def test_precision_per_target():
    host, tx2 = targets.get("host"), targets.get("jetson-tx2")
    assert precision.choose("auto", tx2)[0] == "int8-weights"
    assert "int8" in precision.choose("auto", tx2)[1]
    assert precision.choose("auto", host)[0] == host.default_precision
    for p in ("fp32", "fp16", "int8", "int8-weights"):
        assert precision.choose(p, tx2) == (p, "requested with --precision")
    with pytest.raises(UserError):
        precision.choose("int4", host)
    with pytest.raises(UserError):
        precision.apply(_chain(_chain_weights()), "int8")  # int8 without calibration images
    assert q.config_for(host).unsigned_activations == (platform.machine() in ("x86_64", "AMD64"))  # VNNI: u8 x s8
    assert not q.config_for(targets.get("jetson-orin")).unsigned_activations  # dp4a: int8 x int8


def test_calibration_images_come_from_the_training_split(tiny_cifar):
    x, desc = precision.calibration_images(tiny_cifar, "cifar", 16)
    assert x.shape == (16, 3, 32, 32) and x.dtype == np.float32 and "training" in desc
    x2, _ = precision.calibration_images(tiny_cifar, "cifar", 16)
    np.testing.assert_array_equal(x, x2)  # fixed seed: reproducible builds
    with pytest.raises(UserError):
        precision.calibration_images(tiny_cifar / "nothing-here", "cifar", 16)
    r, desc = precision.calibration_images(tiny_cifar / "nothing-here", "cifar", 4, allow_random=True)
    assert r.shape == (4, 3, 32, 32) and "random" in desc


# ---------------------------------------------------------------- end to end: ResNet20


def test_resnet20_int8_end_to_end(tiny_cifar):
    from compiler import data, frontend
    from compiler.models import build_model
    from compiler.build import run_module

    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    # give the random network BatchNorm statistics of real-looking activations, so its logits are not all ties
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 3, 32, 32))
    model.eval()
    batch = 8
    mod = frontend.import_model(model, batch)
    spec = targets.get("host")
    calx, _ = precision.calibration_images(tiny_cifar, "cifar", 32)
    qmod, report = precision.apply_with_report(mod, "int8", calib_images=calx, spec=spec)
    assert report["int8_layers"] == len(report["layers"]) - 1  # all but the first conv
    assert [k["layer"] for k in report["kept"]] == ["conv2d0"]
    before, after = report["constant_bytes"]["before"]["total"], report["constant_bytes"]["after"]["total"]
    assert before / after > 3.5
    x = data.normalize(data.load_split(tiny_cifar, "test").images[:16], "cifar").numpy()
    with torch.inference_mode():
        ref = model(torch.tensor(x)).numpy()
    got = run_module(targets.compile_module(qmod, spec), x, batch)
    rel = np.abs(got - ref).max() / max(1.0, np.abs(ref).max())
    assert rel < 0.05  # measured 0.020 (minmax calibration); a broken scale or rounding is far above
    assert (got.argmax(1) == ref.argmax(1)).mean() >= precision.VERIFY_ARGMAX["int8"]


# ---------------------------------------------------------------- x86 VNNI intrinsic (LLVM 22 operand types)


@pytest.mark.parametrize("lanes,register", [(16, "zmm"), (8, "ymm")])
def test_vnni_intrinsic_builds_and_emits_vpdpbusd(lanes, register):
    spec = _vnni_spec()
    if spec is None:
        pytest.skip("this CPU has no avx512vnni")
    from tvm import s_tir
    from tvm.script import tirx as T

    from passes import vnni

    vnni.register()
    name = vnni.OC_BLOCKS[lanes]
    M, N, K = 16, 32, 32

    @T.prim_func(s_tir=True)
    def dense(A: T.Buffer((M, K), "uint8"), B: T.Buffer((N // lanes, K // 4, lanes, 4), "int8"),
              C: T.Buffer((M, N), "int32")):
        for i, j, k in T.grid(M, N, K):
            with T.sblock("C"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    C[vi, vj] = 0
                C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * T.cast(
                    B[vj // lanes, vk // 4, vj % lanes, vk % 4], "int32")

    sch = s_tir.Schedule(dense)
    blk = sch.get_sblock("C")
    i, j, k = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, lanes])
    ko, ki = sch.split(k, [None, 4])
    sch.reorder(i, jo, ko, ji, ki)
    sch.decompose_reduction(blk, ko)
    sch.tensorize(ji, name)
    lib = tvm.tirx.build(sch.mod, target=spec.tvm_target())
    asm = lib.inspect_source("asm")
    assert sum(line.count(register) for line in asm.splitlines() if "vpdpbusd" in line) >= 1
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (M, K)).astype(np.uint8)
    w = rng.integers(-128, 128, (N, K)).astype(np.int8)
    packed = np.ascontiguousarray(w.reshape(N // lanes, lanes, K // 4, 4).transpose(0, 2, 1, 3))
    c = tvm.runtime.tensor(np.zeros((M, N), np.int32))
    lib(tvm.runtime.tensor(a), tvm.runtime.tensor(packed), c)
    np.testing.assert_array_equal(c.numpy(), a.astype(np.int64) @ w.astype(np.int64).T)


# ---------------------------------------------------------------- x86 VNNI: the packed int8 conv2d layout


def _has_avx512vnni() -> bool:
    from passes import vnni

    return vnni.target_has_vnni(targets.get("host"))


def _vnni_spec():
    """The x86-64-v4-vnni class target where this CPU runs its code (an AMX CPU too, whose ``host`` packs for AMX
    tiles instead), else None."""
    from targets import x86

    spec = targets.get("x86-64-v4-vnni")
    return spec if x86.missing_features(spec.required_cpu_features()) == [] else None


def test_vnni_layout_rewrite_before_expected():
    """On AVX-512 VNNI a uint8 conv2d becomes pack_float -> quantize_repack -> conv2d_nchwc_int8 (+ requant); the
    bias add and ReLU after it run on the packed tensor, and what is not elementwise (the mean) reads an unpack of
    it. Signed inputs and the kept fp32 layers stay as they were. oc 24 is three 8-channel blocks (16-blocks would pad it to
    32), ic 8 is one block."""
    from passes import vnni

    weights = _chain_weights(c1=8, c2=24)
    before = _chain(weights)
    amax = {"conv2d0": 2.5, "conv2d1": 3.0, "matmul0": 1.5}
    cal = _fixed_calibration(amax, ["conv2d0", "conv2d1", "matmul0"])
    config = q.QuantConfig(keep=("first",), vnni_layout=True)
    after, report = q.quantize(before, cal, config)
    relax.analysis.well_formed(after)
    w1, b1, w2, b2, w3, b3 = weights
    s1, s2 = np.float32(3.0 / 255), np.float32(1.5 / 255)

    def body(bb, x):
        y = bb.emit(op.nn.conv2d(x, _c(w1), padding=1))
        y = bb.emit(op.nn.relu(bb.emit(op.add(y, _c(b1)))))
        wq, sw = q.quantize_weight(w2, 0)
        xf = bb.emit_te(vnni.pack_float, y, primfunc_name_hint=vnni.FLOAT_PACK_NAME)
        xp = bb.emit_te(vnni.quantize_repack, xf, _c([s1]), 8, 8, [1, 1, 1, 1], primfunc_name_hint=vnni.REPACK_NAME)
        acc = bb.emit_te(vnni.conv2d_nchwc_int8, xp, _c(vnni.pack_weight(wq), "int8"), [1, 1], [1, 1],
                         primfunc_name_hint=vnni.CONV_NAME)
        real = bb.emit(op.astype(acc, F32))
        requant = (np.float64(s1) * sw.astype(np.float64)).astype(F32)
        y = bb.emit(op.multiply(real, _c(vnni.pack_channels(requant))))
        y = bb.emit(op.nn.relu(bb.emit(op.add(y, _c(vnni.pack_channels(b2.reshape(-1)))))))
        y = bb.emit_te(vnni.unpack, y, 24, primfunc_name_hint=vnni.UNPACK_NAME)
        y = bb.emit(op.mean(y, axis=[-1, -2], keepdims=True))
        y = bb.emit(op.reshape(y, (2, 24)))
        xq = bb.emit(op.quantize(y, relax.const(s2, F32), relax.const(0, "uint8"), axis=1, out_dtype="uint8"))
        wq3, sw3 = q.quantize_weight(w3, 1)
        acc = bb.emit(op.matmul(xq, _c(wq3, "int8"), out_dtype="int32"))
        real = bb.emit(op.astype(acc, F32))
        y = bb.emit(op.multiply(real, _c((np.float64(s2) * sw3.astype(np.float64)).astype(F32).reshape(1, -1))))
        return bb.emit(op.add(_c(b3), y))

    tvm.ir.assert_structural_equal(after, _module((2, 3, 8, 8), body))
    xp_ty = [b.var.ty for b in after["main"].body.blocks[0].bindings
             if isinstance(b.value, relax.Call) and "conv2d_nchwc_int8" in str(b.value.args[0])][0]
    assert [int(d) for d in xp_ty.shape.values] == [2, 3, 8, 8, 8]  # 24 channels -> 3 blocks of 8, no padding
    rows = {r["name"]: r for r in report["layers"]}
    assert "VNNI" in rows["conv2d1"]["layout"] and rows["matmul0"]["layout"] == "NCHW/OIHW"
    assert report["vnni_layout"] is True
    # a conv reading a signed tensor keeps NCHW (vpdpbusd multiplies uint8 activations)
    signed, rep = q.quantize(before, cal, q.QuantConfig(keep=(), vnni_layout=True))
    assert [r["layout"] for r in rep["layers"]][:2] == ["NCHW/OIHW", "NCHW[x]c/OIHW[x/4]i8o4i (VNNI)"]
    assert (q.config_for(targets.get("host")).int8_isa == "vnni") == _has_avx512vnni()
    assert not q.config_for(targets.get("jetson-orin")).vnni_layout


def _int32_conv_pair(n, ic, oc, hw, k, stride, pad):
    """Two modules from uint8-valued float input: NCHW R.nn.conv2d(int32) and the packed VNNI kernels."""
    from passes import vnni

    rng = np.random.default_rng(ic * 100 + oc)
    wq = rng.integers(-127, 128, (oc, ic, k, k)).astype(np.int8)
    one = np.float32(1.0)

    def nchw(bb, x):
        xq = bb.emit(op.quantize(x, relax.const(one, F32), relax.const(0, "uint8"), axis=1, out_dtype="uint8"))
        return bb.emit(op.nn.conv2d(xq, _c(wq, "int8"), strides=stride, padding=pad, out_dtype="int32"))

    def packed(bb, x):
        _, bn = vnni.ic_block(ic)
        xp = bb.emit_te(vnni.quantize_repack, bb.emit_te(vnni.pack_float, x), _c([one]), ic, bn, [pad] * 4)
        acc = bb.emit_te(vnni.conv2d_nchwc_int8, xp, _c(vnni.pack_weight(wq), "int8"), [stride] * 2, [1, 1])
        return bb.emit(bb.call_te(vnni.unpack, acc, oc))

    shape = (n, ic, hw, hw)
    return _module(shape, nchw), _module(shape, packed), rng.integers(0, 256, shape).astype(F32)


@pytest.mark.parametrize("ic,oc,k,stride,pad", [(16, 16, 3, 1, 1), (8, 24, 3, 1, 1), (24, 40, 3, 2, 1),
                                                (6, 16, 1, 1, 0), (16, 20, 3, 1, 1), (16, 12, 3, 1, 1)])
def test_packed_conv_is_bit_identical_to_nchw(ic, oc, k, stride, pad):
    """int32 accumulators of the packed conv equal the NCHW conv2d's exactly, in 16-blocks and 8-blocks (oc 24 /
    40: 8-blocks, no padding), where channels are padded (oc 20 -> three 8-blocks, oc 12 -> one 16-block,
    ic 24 -> 12-blocks, ic 6 -> 8) and with stride 2."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu() or "generic"})
    a, b, x = _int32_conv_pair(2, ic, oc, 8, k, stride, pad)
    outs = []
    for mod in (a, b):
        ex = tvm.compile(mod, target, relax_pipeline=relax.get_default_pipeline(target))
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy())
    assert outs[1].dtype == np.int32 and outs[1].shape == outs[0].shape
    np.testing.assert_array_equal(outs[1], outs[0])
    assert np.abs(outs[0]).max() > 2 ** 16  # the sums are large: no silent narrowing anywhere


def test_vnni_layout_chain_is_bit_identical_to_nchw_int8():
    """The whole int8 chain (quantize rounding, requantize, bias, ReLU) gives the same float32 bits in either
    layout: the layout is a schedule choice, not a numerics change."""
    weights = _chain_weights(seed=8, c1=8, c2=24)
    mod = _chain(weights)
    rng = np.random.default_rng(9)
    cal = q.calibrate(mod, rng.normal(size=(4, 3, 8, 8)).astype(F32))
    x = rng.normal(size=(2, 3, 8, 8)).astype(F32)
    plain, _ = q.quantize(mod, cal, q.QuantConfig(keep=("first",)))
    packed, _ = q.quantize(mod, cal, q.QuantConfig(keep=("first",), vnni_layout=True))
    np.testing.assert_array_equal(_run(packed, x), _run(plain, x))


def test_vnni_layout_residual_blocks_stay_packed_and_bit_identical():
    """Two ResNet basic blocks, the second with the option-A shortcut (stride-2 slice + zero channel pad): the
    activations stay NCHW16c from conv to conv (one unpack for the slice, one for the final mean), with the
    same float32 bits as the NCHW int8 module."""
    rng = np.random.default_rng(11)
    ws = [rng.normal(0, 0.2, shape).astype(F32) for shape in
          [(16, 16, 3, 3), (16, 16, 3, 3), (24, 16, 3, 3), (24, 24, 3, 3)]]
    bs = [rng.normal(0, 0.1, (1, w.shape[0], 1, 1)).astype(F32) for w in ws]

    def conv(bb, y, i, stride=1):
        y = bb.emit(op.nn.conv2d(y, _c(ws[i]), strides=stride, padding=1))
        return bb.emit(op.add(y, _c(bs[i])))

    def body(bb, x):
        x = bb.emit(op.nn.relu(x))
        y = bb.emit(op.nn.relu(conv(bb, x, 0)))
        x = bb.emit(op.nn.relu(bb.emit(op.add(conv(bb, y, 1), x))))
        y = bb.emit(op.nn.relu(conv(bb, x, 2, stride=2)))
        s = bb.emit(op.strided_slice(x, axes=[2, 3], begin=[0, 0], end=[8, 8], strides=[2, 2]))
        s = bb.emit(op.nn.pad(s, pad_width=[0, 0, 4, 4, 0, 0, 0, 0]))
        x = bb.emit(op.nn.relu(bb.emit(op.add(conv(bb, y, 3), s))))
        return bb.emit(op.mean(x, axis=[-1, -2], keepdims=False))

    mod = _module((1, 16, 8, 8), body)
    cal = q.calibrate(mod, rng.normal(size=(4, 16, 8, 8)).astype(F32))
    plain, _ = q.quantize(mod, cal, q.QuantConfig(keep=()))
    packed, rep = q.quantize(mod, cal, q.QuantConfig(keep=(), vnni_layout=True))
    assert all("VNNI" in r["layout"] for r in rep["layers"])
    text = packed.script(show_meta=False)
    assert text.count("R.call_tir(cls.vnni_unpack") == 2 and "R.nn.conv2d(" not in text
    x = rng.normal(size=(1, 16, 8, 8)).astype(F32)
    np.testing.assert_array_equal(_run(packed, x), _run(plain, x))


def test_tuned_packed_conv_is_tensorized_with_vpdpbusd(tmp_path):
    """A short MetaSchedule run (the tune verb's tune_module: VNNI design space) on two small int8 convs, 16 -> 8
    (an 8-channel output block: ymm) and 8 -> 16 (zmm); the build applies the database (replaying the tensorize)
    and the library holds vpdpbusd on both register widths."""
    spec = _vnni_spec()
    if spec is None:
        pytest.skip("this CPU has no avx512vnni: nothing to tensorize with vpdpbusd")
    from compiler.tuning import database
    from compiler.tuning.session import space_for, tune_module

    assert space_for("int8", database.tune_target(spec)) != "post-order-apply"
    assert space_for("fp32", database.tune_target(spec)) == "post-order-apply"
    rng = np.random.default_rng(10)
    w1 = rng.normal(0, 0.2, (8, 16, 3, 3)).astype(F32)
    w2 = rng.normal(0, 0.2, (16, 8, 3, 3)).astype(F32)

    def body(bb, x):
        y = bb.emit(op.nn.relu(x))
        y = bb.emit(op.nn.relu(bb.emit(op.nn.conv2d(y, _c(w1), padding=1))))
        return bb.emit(op.nn.conv2d(y, _c(w2), padding=1))

    mod = _module((1, 16, 8, 8), body)
    cal = _fixed_calibration({"conv2d0": 3.0, "conv2d1": 2.0}, ["conv2d0", "conv2d1"])
    qmod, _ = q.quantize(mod, cal, q.config_for(spec, keep=()))
    assert "conv2d_nchwc_int8" in qmod.script(show_meta=False)
    # the variant hash names the packed conv's shapes (the module has no relax.nn.conv2d left)
    sig = database.shape_signature(qmod)
    assert [s[0] for s in sig if "conv2d" in s[0]] == ["call_tir:conv2d_nchwc_int8"] * 2
    weights = [s[1][1] for s in sig if "conv2d" in s[0]]
    # 16 -> 8: one 8-channel output block (ymm); 8 -> 16: ic 8 is one input block of 2 x 4, oc one 16-block (zmm)
    assert weights == [[[1, 1, 3, 3, 4, 8, 4], "int8"], [[1, 1, 3, 3, 2, 16, 4], "int8"]]
    result = tune_module(qmod, spec, "tiny", "int8", 1, 8, directory=tmp_path / "db", trials_per_iter=2,
                         population=8, seed=0, show_progress=False)
    conv = [r for r in result["tasks"] if "conv2d_nchwc_int8" in r["task"]]
    assert len(conv) == 2 and all(r["best_ms"] is not None for r in conv), result["tasks"]
    db = database.open_database(tmp_path / "db")
    assert database.tasks_applied(qmod, spec, db)["applied"] >= 2
    ex = targets.compile_module(qmod, spec, database=db)
    lib = tmp_path / "m.so"
    ex.export_library(str(lib))
    import subprocess

    asm = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    dots = [line for line in asm.splitlines() if "vpdpbusd" in line]
    assert any("ymm" in line for line in dots) and any("zmm" in line for line in dots)
    x = rng.uniform(-1, 3, (1, 16, 8, 8)).astype(F32)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, _run(q.quantize(mod, cal, q.QuantConfig(keep=()))[0], x))


def test_nonneg_analysis_sees_through_tuples_max_pool_indices_and_concat():
    """GoogLeNet: torch.export's max_pool2d comes as ``(values, indices)[0]`` and a concat takes a bound tuple; a
    ReLU output through them is still provably >= 0 (so its conv2d gets uint8 and the packed x86 layout); a value
    through the same shapes from a signed input is not."""
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32")):
            with R.dataflow():
                a = R.nn.relu(x)
                p = R.nn.max_pool2d(a, pool_size=[3, 3], padding=[1, 1, 1, 1])
                pair = (p, x)
                got = pair[0]
                signed = pair[1]
                both = (got, a)
                cat = R.concat(both, axis=1)
                mixed = (got, x)
                cat_signed = R.concat(mixed, axis=1)
                R.output(cat, cat_signed, signed)
            return (cat, cat_signed, signed)

    func = Module["main"]
    names = {str(v.name) for v in q._nonneg_vars(func)}
    assert {"a", "p", "got", "cat"} <= names
    assert not names & {"signed", "cat_signed"}
