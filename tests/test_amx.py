"""The packed int8 conv2d on Intel AMX tiles (:mod:`passes.amx`) and the ``x86-64-v4-amx`` class.

Everywhere: the tile configuration bytes, what the schedule emits (tile instructions, the configuration once per
parallel chunk, the tile-state request) and that it compiles for the class; the class's features and the refusal
on a CPU without AMX; the VNNI records an AMX build applies. On a CPU with AMX (and Linux 5.16+; skipped elsewhere,
with the reason): the tile kernels against a numpy reference (worst-case operands included) and against TVM's
untuned build of the same fused kernel, and a whole AMX build against the VNNI build of the same model."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

import targets
from passes import amx, vnni
from targets import x86

needs_amx = pytest.mark.skipif(not targets.host_amx(),
                               reason="needs an x86 CPU with AMX int8 (amx_tile, amx_int8) and Linux 5.16+ "
                                      "(arch_prctl gives the process the tile state)")
AMX_TARGET = {"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni", "+amx-tile", "+amx-int8"]}


def _conv(n, ic, hw, oc, stride=1, k=3, isa="amx", epilogue=True):
    """A fused kernel as FuseTIR makes them: packed conv2d (padding 1 applied to the input), then
    ``quantize(relu(acc * requant + bias), s)`` over NCHW[ob]c (``epilogue``), else the int32 accumulators."""
    icp, bn = vnni.ic_block(ic, isa)
    ob, ocp = vnni.oc_block(oc, isa), vnni.oc_padded(oc, isa)
    pad = k // 2
    data = te.placeholder((n, icp // bn, hw + 2 * pad, hw + 2 * pad, bn), "uint8", name="data")
    kern = te.placeholder((ocp // ob, icp // bn, k, k, bn // 4, ob, 4), "int8", name="kern")
    acc = vnni.conv2d_nchwc_int8(data, kern, (stride, stride), (1, 1))
    if not epilogue:
        return te.create_prim_func([data, kern, acc])
    requant = te.placeholder((1, ocp // ob, 1, 1, ob), "float32", name="requant")
    bias = te.placeholder((1, ocp // ob, 1, 1, ob), "float32", name="bias")
    scale = te.placeholder((1,), "float32", name="scale")
    real = te.compute(acc.shape, lambda b, o, y, x, c: te.max(
        acc[b, o, y, x, c].astype("float32") * requant[0, o, 0, 0, c] + bias[0, o, 0, 0, c], 0.0), name="real")
    out = vnni.quantize_packed(real, scale, reciprocal=isa == "amx")  # as Int8Layout emits it for AMX
    return te.create_prim_func([data, kern, requant, bias, scale, out])


def _reference_acc(data: np.ndarray, kern: np.ndarray, stride: int) -> np.ndarray:
    """int32 NCHW[ob]c of the packed operands, by numpy (int64 sums)."""
    n, icc, h, w, bn = data.shape
    occ, _, kh, kw, _, ob, _ = kern.shape
    x = data.transpose(0, 1, 4, 2, 3).reshape(n, icc * bn, h, w).astype(np.int64)
    wt = kern.transpose(0, 5, 1, 4, 6, 2, 3).reshape(occ * ob, icc * bn, kh, kw).astype(np.int64)
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    y = np.zeros((n, occ * ob, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            y += np.einsum("nchw,oc->nohw", patch, wt[:, :, i, j])
    return y.reshape(n, occ, ob, oh, ow).transpose(0, 1, 3, 4, 2)


def _random_args(func, rng, worst: bool = False) -> list:
    args = []
    for param in func.params:
        shape, dtype = [int(d) for d in param.shape], str(param.dtype)
        if dtype == "uint8":
            a = np.full(shape, 255, np.uint8) if worst else rng.integers(0, 256, shape).astype(np.uint8)
        elif dtype == "int8":
            a = np.full(shape, -128, np.int8) if worst else rng.integers(-128, 128, shape).astype(np.int8)
        elif dtype == "int32":
            a = np.zeros(shape, np.int32)
        else:
            a = (rng.random(shape) * 0.01 + 0.001).astype(dtype)
        args.append(a)
    return args


def _call(lib, args: list) -> np.ndarray:
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def test_tile_config_bytes():
    cfg = amx.tile_config(m=16, k=48, n_bytes=64)
    assert len(cfg) == 64 and cfg[0] == 1  # palette 1
    for c in (0, 1, 2, 3):  # accumulators: 16 rows of 16 int32
        assert (cfg[48 + c], cfg[16 + 2 * c] | cfg[17 + 2 * c] << 8) == (16, 64)
    for a in (4, 5):  # activations: 16 pixels x 48 bytes
        assert (cfg[48 + a], cfg[16 + 2 * a]) == (16, 48)
    for b in (6, 7):  # weights: 48 / 4 rows of 16 x 4 bytes
        assert (cfg[48 + b], cfg[16 + 2 * b]) == (12, 64)


@pytest.mark.parametrize("ic,hw,oc,stride", [(16, 32, 16, 1), (64, 8, 64, 1), (16, 32, 32, 2), (128, 8, 32, 1)])
def test_schedule_emits_tiles_and_compiles_for_the_class(ic, hw, oc, stride):
    func = _conv(1, ic, hw, oc, stride)
    scheduled = amx.schedule_amx_conv2d(func, parallel_min_macs=0)
    assert scheduled is not None and bool(scheduled.attrs["tirx.is_scheduled"])
    text = scheduled.script()
    # configured once at the top of each parallel chunk, the thread's previous configuration saved and put back
    assert text.count("llvm.x86.ldtilecfg") == 2 and text.count("llvm.x86.sttilecfg") == 1
    assert "T.parallel" in text and "llvm.x86.tdpbusd" in text and "llvm.x86.tilestored64" in text
    assert "T.int64(158), T.int64(4131), T.int64(18)" in text  # arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)
    assert "T.vectorized(" in text  # the epilogue over one tile row
    tvm.compile(scheduled, target=tvm.target.Target(AMX_TARGET))  # LLVM builds AMX code on any x86 machine


def _in_one_launch(scheduled):
    """``scheduled``'s root body as :mod:`passes.parallel_launch` runs kernels: under a launch point, the tile
    configuration saved once per thread (:func:`passes.amx.save_once_per_thread`)."""
    from tvm import tirx

    from passes.parallel_launch import LAUNCH_POINT
    from passes.patterns import with_root_body

    def launch(inner):
        return tirx.AttrStmt(tirx.IntImm("int32", 0), LAUNCH_POINT, tirx.IntImm("int32", 1),
                             amx.save_once_per_thread(inner))

    return scheduled.with_body(with_root_body(scheduled.body, launch))


def test_a_launch_saves_the_tile_configuration_once_per_thread():
    scheduled = amx.schedule_amx_conv2d(_conv(1, 16, 32, 16), parallel_min_macs=0)
    launched = _in_one_launch(scheduled)
    text = launched.script()
    # one save and one restore for the whole launch (every thread runs them), the chunk's own load in between
    assert text.count("llvm.x86.sttilecfg") == 1 and text.count("llvm.x86.ldtilecfg") == 2
    assert text.index("llvm.x86.sttilecfg") < text.index("T.parallel") < text.rindex("llvm.x86.ldtilecfg")
    tvm.compile(launched, target=tvm.target.Target(AMX_TARGET))
    a = te.placeholder((4,), "float32", name="a")
    relu = te.compute((4,), lambda i: te.max(a[i], 0.0), name="relu")
    assert amx.save_once_per_thread(te.create_prim_func([a, relu]).body) is None  # no tile chunk in it


@needs_amx
@pytest.mark.parametrize("n_threads", [1, 2])
def test_a_launch_with_the_save_hoisted_equals_the_kernel(n_threads):
    from compiler import threads

    rng = np.random.default_rng(3)
    scheduled = amx.schedule_amx_conv2d(_conv(1, 16, 32, 32), parallel_min_macs=0)
    target = tvm.target.Target(AMX_TARGET)
    args = _random_args(scheduled, rng)
    threads.set_tvm(n_threads)
    try:
        want = _call(tvm.compile(scheduled, target=target), args)
        got = _call(tvm.compile(_in_one_launch(scheduled), target=target), args)
    finally:
        threads.set_tvm(threads.cores())
    np.testing.assert_array_equal(got, want)


def test_kernels_of_another_shape_are_left_alone():
    a = te.placeholder((1, 16, 8, 8), "float32", name="a")
    relu = te.compute(a.shape, lambda *i: te.max(a[i], 0.0), name="relu")
    assert amx.schedule_amx_conv2d(te.create_prim_func([a, relu])) is None
    # a conv2d with dilation 2 does not have contiguous taps
    data = te.placeholder((1, 1, 12, 12, 16), "uint8", name="data")
    kern = te.placeholder((1, 1, 3, 3, 4, 16, 4), "int8", name="kern")
    acc = vnni.conv2d_nchwc_int8(data, kern, (1, 1), (2, 2))
    assert amx.schedule_amx_conv2d(te.create_prim_func([data, kern, acc])) is None


def test_the_amx_layout_has_tile_sized_blocks():
    assert vnni.ic_block(56, "amx") == (56, 56) and vnni.ic_block(128, "amx") == (128, 64)
    assert vnni.ic_block(56, "vnni") == (56, 8)
    assert vnni.oc_block(24, "amx") == 16 and vnni.oc_block(24, "vnni") == 8  # a C tile row is 16 int32
    assert vnni.oc_block(8, "amx") == 8  # ... unless the conv has only 8: a 16-block would be half padding


def test_the_amx_class_and_its_refusal_below_it():
    spec = targets.get("x86-64-v4-amx")
    need = spec.required_cpu_features()
    assert {"amx_tile", "amx_int8", "avx512_vnni"} <= set(need)
    sapphire_without_amx = frozenset(f for f in need if not f.startswith("amx"))
    assert x86.missing_features(need, sapphire_without_amx) == ["amx_int8", "amx_tile"]
    assert vnni.target_int8_isa(spec.tvm_target()) == "amx"
    assert "x86-64-v4-amx" in targets.names()


def test_vnni_records_serve_an_amx_build():
    from compiler.tuning import database

    vnni_target = {"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]}
    meta = {"target": {"name": "x86-64-v4-vnni", "tvm": vnni_target}}
    how, why = database.target_match(meta, targets.get("x86-64-v4-amx"))
    assert why is None and "x86-64-v4-vnni" in how
    below = {"target": {"name": "x86-64-v4", "tvm": {"kind": "llvm", "mcpu": "x86-64-v4"}}}
    assert database.target_match(below, targets.get("x86-64-v4-amx"))[0] is None


@needs_amx
@pytest.mark.parametrize("n,ic,hw,oc,stride", [(2, 16, 32, 16, 1), (1, 8, 32, 16, 1), (2, 64, 8, 64, 1),
                                               (1, 16, 32, 32, 2), (1, 128, 8, 32, 1), (1, 40, 16, 24, 1),
                                               (1, 16, 32, 8, 1)])
def test_amx_conv2d_equals_numpy(n, ic, hw, oc, stride):
    rng = np.random.default_rng(0)
    func = _conv(n, ic, hw, oc, stride, epilogue=False)
    lib = tvm.compile(amx.schedule_amx_conv2d(func, parallel_min_macs=0), target=tvm.target.Target(AMX_TARGET))
    for worst in (False, True):  # worst: every product 255 x -128, the largest sums a conv2d of this size has
        args = _random_args(func, rng, worst)
        np.testing.assert_array_equal(_call(lib, args), _reference_acc(args[0], args[1], stride))


@needs_amx
@pytest.mark.parametrize("n,ic,hw,oc,stride", [(4, 16, 32, 16, 1), (1, 64, 8, 64, 1), (2, 32, 16, 64, 2),
                                               (1, 16, 32, 8, 1)])
def test_fused_amx_kernel_equals_tvms_untuned_build(n, ic, hw, oc, stride):
    from passes.parallel_fallback import ParallelFallback

    rng = np.random.default_rng(1)
    func = _conv(n, ic, hw, oc, stride)
    target = tvm.target.Target(AMX_TARGET)
    lib = tvm.compile(amx.schedule_amx_conv2d(func), target=target)
    with target:
        reference = tvm.compile(ParallelFallback()(tvm.IRModule({"main": func})), target=target)
    args = _random_args(func, rng)
    got, want = _call(lib, args), _call(reference, args)
    assert np.count_nonzero(want) > want.size // 10  # not all clipped to 0
    np.testing.assert_array_equal(got, want)


@needs_amx
def test_an_amx_build_agrees_with_the_vnni_build():
    """The shipped model (its shipped calibration) for x86-64-v4-amx and for x86-64-v4-vnni on the 32 shipped test
    images: the same quantized integers in each conv2d; the float epilogues round differently (the tile kernel's
    vectorized multiply-add), and a requantized activation one step apart propagates, so the logits agree to
    quantization noise, not bit for bit (measured: max |diff| 0.13 on random inputs; the AMX artifact scores 92.86 %
    top-1 on the 10,000 test images, the VNNI one 92.84 %)."""
    import torch

    from compiler import data, zoo
    from compiler.build import lower, run_module

    ckpt = zoo.load("resnet56", None, None, quiet=True)
    verify = zoo.verification_set("resnet56")
    x = data.normalize(torch.from_numpy(verify["images"]), ckpt.normalize).numpy()
    logits = {}
    for name in ("x86-64-v4-amx", "x86-64-v4-vnni"):
        spec = targets.get(name)
        lowered = lower(ckpt.model, 32, "int8", spec, data_dir=None, normalize=ckpt.normalize, untrained=False,
                        shipped=zoo.calibration(ckpt, 512))
        assert lowered.module.attrs is not None
        logits[name] = run_module(targets.compile_module(lowered.module, spec), x, 32)
    amx_logits, vnni_logits = logits["x86-64-v4-amx"], logits["x86-64-v4-vnni"]
    assert np.array_equal(amx_logits.argmax(1), vnni_logits.argmax(1))
    assert np.abs(amx_logits - vnni_logits).max() < 0.5 < np.abs(vnni_logits).max()
