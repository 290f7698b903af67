"""StripZeroChannels: exact IR rewrites on small modules, and end to end on the model zoo with random masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from torch import nn
from tvm import relax

from passes.analysis import count_flops
from passes import reports
from passes.strip_zero_channels import StripZeroChannels, report_of, report_totals, strip_zero_channels
from helpers import relax_module as _module

F32 = "float32"
op = relax.op


# ---------------------------------------------------------------- small modules built with the BlockBuilder


def _c(array):
    return relax.const(np.ascontiguousarray(array, dtype=F32))


def _rand(rng, *shape):
    return rng.uniform(0.5, 1.5, size=shape).astype(F32) * rng.choice([-1, 1], size=shape).astype(F32)


def _conv_bias(bb, x, w, b, relu=True, padding=1):
    y = bb.emit(op.nn.conv2d(x, _c(w), padding=padding))
    y = bb.emit(op.add(y, _c(b)))
    return bb.emit(op.nn.relu(y)) if relu else y


def _strip(before):
    snapshot = tvm_ffi.structural_hash(before)
    after, report = strip_zero_channels(before)
    assert tvm_ffi.structural_hash(before) == snapshot, "the input module was modified"
    relax.analysis.well_formed(after)  # raises on a violation
    again, _ = strip_zero_channels(after)
    tvm.ir.assert_structural_equal(again, after)  # idempotent: whatever is left is needed
    return after, report


def _run(mod, x):
    target = tvm.target.Target("llvm")
    ex = tvm.compile(mod, target, relax_pipeline=relax.get_default_pipeline(target))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_conv_relu_conv_strips_zero_filter_and_next_input():
    rng = np.random.default_rng(0)
    w1, b1, w2 = _rand(rng, 4, 3, 3, 3), _rand(rng, 1, 4, 1, 1), _rand(rng, 5, 4, 3, 3)
    w1[1] = 0
    b1[:, 1] = 0
    w2[:, 3] = 0  # a zero input slice does not make a channel removable: the producer decides

    def net(w1, b1, w2):
        return lambda bb, x: bb.emit(op.nn.conv2d(_conv_bias(bb, x, w1, b1), _c(w2), padding=1))

    before = _module((1, 3, 8, 8), net(w1, b1, w2))
    after, report = _strip(before)
    keep = [0, 2, 3]
    expected = _module((1, 3, 8, 8), net(w1[keep], b1[:, keep], w2[:, keep]))
    tvm.ir.assert_structural_equal(after, expected)
    assert [(r["layer"], r["index"], r["out_channels_before"], r["out_channels_after"]) for r in report] == [
        ("lv", 0, 4, 3),
        ("lv3", 1, 5, 5),
    ]
    assert (report[1]["in_channels_before"], report[1]["in_channels_after"]) == (4, 3)
    assert report_totals(report)["conv2d"]["out_channels_removed"] == 1


def test_zero_filter_with_nonzero_bias_is_kept():
    rng = np.random.default_rng(1)
    w1, b1, w2 = _rand(rng, 4, 3, 3, 3), _rand(rng, 1, 4, 1, 1), _rand(rng, 5, 4, 3, 3)
    w1[2] = 0  # relu(0 + b) = relu(b) != 0 for b > 0, and removing it would be wrong for either sign
    before = _module((1, 3, 8, 8), lambda bb, x: bb.emit(op.nn.conv2d(_conv_bias(bb, x, w1, b1), _c(w2))))
    after, report = _strip(before)
    tvm.ir.assert_structural_equal(after, before)
    assert all(r["out_channels_after"] == r["out_channels_before"] for r in report)


def _residual(wa, ba, wb, bb_, w3):
    """relu(conv_a(x) + ba + conv_b(x) + bb) -> conv3, the residual-add pattern."""

    def body(bb, x):
        a = _conv_bias(bb, x, wa, ba, relu=False)
        b = _conv_bias(bb, x, wb, bb_, relu=False)
        s = bb.emit(op.nn.relu(bb.emit(op.add(a, b))))
        return bb.emit(op.nn.conv2d(s, _c(w3), padding=1))

    return body


def test_residual_add_strips_channel_zero_in_both_operands():
    rng = np.random.default_rng(2)
    wa, ba, wb, bb_, w3 = (_rand(rng, 4, 3, 3, 3), _rand(rng, 1, 4, 1, 1), _rand(rng, 4, 3, 3, 3),
                           _rand(rng, 1, 4, 1, 1), _rand(rng, 2, 4, 3, 3))
    for w, b in ((wa, ba), (wb, bb_)):
        w[2] = 0
        b[:, 2] = 0
    before = _module((1, 3, 8, 8), _residual(wa, ba, wb, bb_, w3))
    after, report = _strip(before)
    keep = [0, 1, 3]
    expected = _module((1, 3, 8, 8), _residual(wa[keep], ba[:, keep], wb[keep], bb_[:, keep], w3[:, keep]))
    tvm.ir.assert_structural_equal(after, expected)
    assert [r["out_channels_after"] for r in report] == [3, 3, 2]


def test_residual_add_keeps_channel_zero_in_one_operand_only():
    rng = np.random.default_rng(3)
    wa, ba, wb, bb_, w3 = (_rand(rng, 4, 3, 3, 3), _rand(rng, 1, 4, 1, 1), _rand(rng, 4, 3, 3, 3),
                           _rand(rng, 1, 4, 1, 1), _rand(rng, 2, 4, 3, 3))
    wa[2] = 0
    ba[:, 2] = 0
    before = _module((1, 3, 8, 8), _residual(wa, ba, wb, bb_, w3))
    after, report = _strip(before)
    tvm.ir.assert_structural_equal(after, before)
    assert report_totals(report)["conv2d"]["layers_changed"] == 0


def _inception(w1, b1, w2, b2, w3):
    """concat of two conv branches -> max_pool2d (3x3, pad 1) -> conv."""

    def body(bb, x):
        p = _conv_bias(bb, x, w1, b1, padding=0)
        q = _conv_bias(bb, x, w2, b2)
        cat = bb.emit(op.concat([p, q], axis=1))
        pool = bb.emit(op.nn.max_pool2d(cat, pool_size=3, strides=1, padding=1))
        return bb.emit(op.nn.conv2d(pool, _c(w3), padding=0))

    return body


def test_concat_segments_and_max_pool():
    rng = np.random.default_rng(4)
    w1, b1 = _rand(rng, 3, 4, 1, 1), _rand(rng, 1, 3, 1, 1)
    w2, b2 = _rand(rng, 2, 4, 3, 3), _rand(rng, 1, 2, 1, 1)
    w3 = _rand(rng, 6, 5, 1, 1)
    w1[0], b1[:, 0] = 0, 0
    w2[1], b2[:, 1] = 0, 0  # concat channel 3 + 1 = 4
    before = _module((1, 4, 8, 8), _inception(w1, b1, w2, b2, w3))
    after, report = _strip(before)
    expected = _module((1, 4, 8, 8), _inception(w1[[1, 2]], b1[:, [1, 2]], w2[[0]], b2[:, [0]], w3[:, [1, 2, 3]]))
    tvm.ir.assert_structural_equal(after, expected)
    assert [(r["out_channels_after"], r["in_channels_after"]) for r in report] == [(2, 4), (1, 4), (6, 3)]


def _option_a(w1, b1, w2, b2, fc, fc_b, lo, hi, batch=1):
    """conv(2ch) -> stride-2 slices -> channel pad (lo, hi) + conv(4ch, stride 2) -> relu -> mean -> reshape -> fc."""

    def body(bb, x):
        a = _conv_bias(bb, x, w1, b1)
        s = bb.emit(op.strided_slice(a, axes=[2], begin=[0], end=[2**63 - 1], strides=[2]))
        s = bb.emit(op.strided_slice(s, axes=[3], begin=[0], end=[2**63 - 1], strides=[2]))
        shortcut = bb.emit(op.nn.pad(s, [0, 0, lo, hi, 0, 0, 0, 0]))
        b = bb.emit(op.nn.conv2d(a, _c(w2), strides=2, padding=1))
        b = bb.emit(op.add(b, _c(b2)))
        y = bb.emit(op.nn.relu(bb.emit(op.add(b, shortcut))))
        y = bb.emit(op.mean(y, axis=[-1, -2], keepdims=True))
        y = bb.emit(op.reshape(y, [batch, lo + w1.shape[0] + hi]))
        return bb.emit(op.add(_c(fc_b), bb.emit(op.matmul(y, _c(fc)))))

    return body


def test_option_a_shortcut_slice_and_channel_pad():
    rng = np.random.default_rng(5)
    w1, b1 = _rand(rng, 2, 3, 3, 3), _rand(rng, 1, 2, 1, 1)
    w2, b2 = _rand(rng, 4, 2, 3, 3), _rand(rng, 1, 4, 1, 1)
    fc, fc_b = _rand(rng, 4, 5), _rand(rng, 5)
    # padded channel 0 (the pad makes it zero) and channel 2 = shortcut channel 1: zero in both operands of the add
    w2[[0, 2]], b2[:, [0, 2]] = 0, 0
    w1[1], b1[:, 1] = 0, 0
    before = _module((1, 3, 8, 8), _option_a(w1, b1, w2, b2, fc, fc_b, 1, 1))
    after, report = _strip(before)
    expected = _module(
        (1, 3, 8, 8), _option_a(w1[[0]], b1[:, [0]], w2[[1, 3]][:, [0]], b2[:, [1, 3]], fc[[1, 3]], fc_b, 0, 1)
    )
    tvm.ir.assert_structural_equal(after, expected)
    assert [(r["op"], r["out_channels_after"], r["in_channels_after"]) for r in report] == [
        ("conv2d", 1, 3),
        ("conv2d", 2, 1),
        ("matmul", 5, 2),
    ]
    x = rng.normal(size=(1, 3, 8, 8)).astype(F32)
    np.testing.assert_allclose(_run(after, x), _run(before, x), rtol=1e-5, atol=1e-5)


def test_option_a_keeps_padded_channel_the_residual_branch_fills():
    rng = np.random.default_rng(6)
    w1, b1 = _rand(rng, 2, 3, 3, 3), _rand(rng, 1, 2, 1, 1)
    w2, b2 = _rand(rng, 4, 2, 3, 3), _rand(rng, 1, 4, 1, 1)
    fc, fc_b = _rand(rng, 4, 5), _rand(rng, 5)
    w1[1], b1[:, 1] = 0, 0  # shortcut channel 2 is zero, but the conv branch's channel 2 is not
    before = _module((1, 3, 8, 8), _option_a(w1, b1, w2, b2, fc, fc_b, 1, 1))
    after, _ = _strip(before)
    tvm.ir.assert_structural_equal(after, before)


def test_symbolic_batch():
    rng = np.random.default_rng(7)
    n = tvm.tirx.Var("n", "int64")
    w1, b1 = _rand(rng, 2, 3, 3, 3), _rand(rng, 1, 2, 1, 1)
    w2, b2 = _rand(rng, 4, 2, 3, 3), _rand(rng, 1, 4, 1, 1)
    fc, fc_b = _rand(rng, 4, 5), _rand(rng, 5)
    w2[[0, 3]], b2[:, [0, 3]] = 0, 0
    before = _module((n, 3, 8, 8), _option_a(w1, b1, w2, b2, fc, fc_b, 1, 1, batch=n))
    after, _ = _strip(before)
    expected = _module((n, 3, 8, 8), _option_a(w1, b1, w2[[1, 2]], b2[:, [1, 2]], fc[[1, 2]], fc_b, 0, 0, batch=n))
    tvm.ir.assert_structural_equal(after, expected)
    x = rng.normal(size=(3, 3, 8, 8)).astype(F32)
    np.testing.assert_allclose(_run(after, x), _run(before, x), rtol=1e-5, atol=1e-5)


def test_output_unknown_consumers_and_last_channel_are_kept():
    rng = np.random.default_rng(8)
    w1, b1 = _rand(rng, 3, 3, 3, 3), _rand(rng, 1, 3, 1, 1)
    w2, b2 = _rand(rng, 4, 3, 3, 3), _rand(rng, 1, 4, 1, 1)
    w3, b3 = _rand(rng, 2, 4, 3, 3), np.zeros((1, 2, 1, 1), F32)
    w1[:], b1[:] = 0, 0  # all zero: one channel must stay
    w2[1], b2[:, 1] = 0, 0  # zero, but also read by softmax over channels
    w3[0] = 0  # zero, but it is the function's result

    def net(w1, b1, w2_):
        def body(bb, x):
            h = _conv_bias(bb, x, w1, b1)
            g = _conv_bias(bb, h, w2_, b2)
            sm = bb.emit(op.nn.softmax(g, axis=1))
            y = _conv_bias(bb, g, w3, b3, relu=False)
            return bb.emit(relax.Tuple([y, sm]))

        return body

    before = _module((1, 3, 8, 8), net(w1, b1, w2))
    after, report = _strip(before)
    tvm.ir.assert_structural_equal(after, _module((1, 3, 8, 8), net(w1[[0]], b1[:, [0]], w2[:, [0]])))
    assert [r["out_channels_after"] for r in report] == [1, 4, 2]


def test_channel_slice_and_grouped_conv_pin_their_input():
    rng = np.random.default_rng(12)
    w1, b1 = _rand(rng, 4, 3, 3, 3), _rand(rng, 1, 4, 1, 1)
    w2, b2 = _rand(rng, 4, 3, 3, 3), _rand(rng, 1, 4, 1, 1)
    w3, w4 = _rand(rng, 2, 4, 3, 3), _rand(rng, 2, 2, 3, 3)
    w1[1], b1[:, 1] = 0, 0
    w2[1], b2[:, 1] = 0, 0

    def body(bb, x):
        a = _conv_bias(bb, x, w1, b1)
        # reversing the channels keeps their number but not their order: channel slicing is not understood
        s = bb.emit(op.strided_slice(a, axes=[1], begin=[3], end=[-5], strides=[-1]))
        b = _conv_bias(bb, x, w2, b2)
        g = bb.emit(op.nn.conv2d(b, _c(w4), padding=1, groups=2))  # grouped conv: not understood
        return bb.emit(op.concat([bb.emit(op.nn.conv2d(s, _c(w3), padding=1)), g], axis=1))

    before = _module((1, 3, 8, 8), body)
    after, report = _strip(before)
    tvm.ir.assert_structural_equal(after, before)
    assert all(r["out_channels_after"] == r["out_channels_before"] for r in report)


def test_shared_constants_are_copied_not_mutated():
    rng = np.random.default_rng(9)
    w1, w2, w3 = _rand(rng, 3, 3, 1, 1), _rand(rng, 3, 3, 1, 1), _rand(rng, 2, 3, 1, 1)
    w1[1] = 0
    shared = _c(np.zeros((1, 3, 1, 1)))

    def body(bb, x):
        a = bb.emit(op.nn.relu(bb.emit(op.add(bb.emit(op.nn.conv2d(x, _c(w1))), shared))))
        b = bb.emit(op.nn.relu(bb.emit(op.add(bb.emit(op.nn.conv2d(a, _c(w2))), shared))))
        return bb.emit(op.nn.conv2d(b, _c(w3)))

    before = _module((1, 3, 4, 4), body)
    after, _ = _strip(before)
    add_consts = [
        b.value.args[1]
        for b in after["main"].body.blocks[0].bindings
        if isinstance(b.value, tvm.ir.Call) and b.value.op.name == "relax.add"
    ]
    assert [c.value.numpy().shape for c in add_consts] == [(1, 2, 1, 1), (1, 3, 1, 1)]
    assert add_consts[1].same_as(shared)
    flops = count_flops(before)
    assert (flops["params"], flops["unique_params"]) == (9 + 3 + 9 + 3 + 6, 9 + 9 + 3 + 6)
    assert count_flops(after)["params"] == 6 + 2 + 6 + 3 + 6


def test_module_pass_form():
    rng = np.random.default_rng(10)
    w1, b1, w2 = _rand(rng, 4, 3, 3, 3), _rand(rng, 1, 4, 1, 1), _rand(rng, 5, 4, 3, 3)
    w1[[0, 3]], b1[:, [0, 3]] = 0, 0
    mod = _module((1, 3, 8, 8), lambda bb, x: bb.emit(op.nn.conv2d(_conv_bias(bb, x, w1, b1), _c(w2))))
    p = StripZeroChannels()
    out = p(mod)
    tvm.ir.assert_structural_equal(out.without_attr(reports.STRIP), strip_zero_channels(mod)[0])
    assert p.info.name == "StripZeroChannels"
    assert [r["out_channels_after"] for r in report_of(out)] == [2, 5]  # the report travels with the module
    assert report_of(mod) is None and not hasattr(p, "report")  # no state on the pass, the input untouched
    out = tvm.transform.Sequential([StripZeroChannels(), relax.transform.FoldConstant()])(mod)
    assert out["main"].ret_ty.shape.values[1] == 5


def test_count_flops_small_module():
    rng = np.random.default_rng(11)
    n = tvm.tirx.Var("n", "int64")
    w1, b1 = _rand(rng, 2, 3, 3, 3), _rand(rng, 1, 2, 1, 1)
    w2, b2 = _rand(rng, 4, 2, 3, 3), _rand(rng, 1, 4, 1, 1)
    fc, fc_b = _rand(rng, 4, 5), _rand(rng, 5)
    for batch, x_batch in ((1, 1), (2, 2), (3, n)):
        mod = _module((x_batch, 3, 8, 8), _option_a(w1, b1, w2, b2, fc, fc_b, 1, 1, batch=x_batch))
        flops = count_flops(mod, batch=batch)
        conv1 = 2 * 8 * 8 * 3 * 9
        conv2 = 4 * 4 * 4 * 2 * 9
        assert [r["macs"] for r in flops["layers"]] == [batch * conv1, batch * conv2, batch * 4 * 5]
        assert flops["macs"] == batch * (conv1 + conv2 + 20)
        assert flops["params"] == 2 * 27 + 2 + 4 * 18 + 4 + 20 + 5
        assert flops["unique_params"] == flops["params"]


# ---------------------------------------------------------------- end to end on the model zoo


def _randomize_bn(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 0.6, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)


def _zero(model, conv_name, bn_name, idx):
    """What the pruner does to a removed channel: conv filter (and conv bias), BN weight and BN bias zero."""
    idx = sorted(idx)
    if not idx:
        return
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    with torch.no_grad():
        conv.weight[idx] = 0
        if conv.bias is not None:
            conv.bias[idx] = 0
        bn.weight[idx] = 0
        bn.bias[idx] = 0


def _pick(rng, n, k, exclude=()):
    pool = [c for c in range(n) if c not in set(exclude)]
    return set(rng.choice(pool, size=min(k, len(pool)), replace=False).tolist())


def _resnet_masks(model, rng, inner: bool, stream: bool):
    """Zero channels of a CIFAR ResNet. Returns (removed out channels per conv, kept input count per conv, linear in).

    inner: random channels of each block's conv1 (consumed only by conv2).
    stream: residual-stream channels, consistently across the option-A pads: stage-1 channels S1 in the stem and
    every stage-1 conv2, S1 + 8 plus pad-region channels in every stage-2 conv2, and likewise in stage 3.
    Decoys that must NOT be removed: a channel zero in one block's output only (the stream keeps it), and a zero
    filter whose BN bias is not zero (a constant, non-zero channel).
    """
    widths = [16, 32, 64]
    removed = {name: 0 for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    stream_sets, prev = [], set()
    for s, planes in enumerate(widths):
        if s == 0:
            prev = _pick(rng, planes, 2) if stream else set()
        else:
            pad = (planes - widths[s - 1]) // 2
            mapped = set(range(pad, pad + widths[s - 1]))
            prev = {c + pad for c in prev} | (_pick(rng, planes, 2, mapped) if stream else set())
        stream_sets.append(prev)
    _zero(model, "conv1", "bn1", stream_sets[0])
    removed["conv1"] = len(stream_sets[0])
    in_kept, stream_in = {"conv1": 3}, widths[0] - len(stream_sets[0])
    for s, planes in enumerate(widths):
        for i in range(len(getattr(model, f"layer{s + 1}"))):
            p = f"layer{s + 1}.{i}"
            in_kept[f"{p}.conv1"] = stream_in
            inner_set = _pick(rng, planes, int(rng.integers(1, planes // 4 + 1))) if inner else set()
            _zero(model, f"{p}.conv1", f"{p}.bn1", inner_set)
            removed[f"{p}.conv1"] = len(inner_set)
            in_kept[f"{p}.conv2"] = planes - len(inner_set)
            if p == "layer1.0":  # decoy: zero filter and BN weight, BN bias 0.3 -> the channel is relu(0.3)
                live = sorted(_pick(rng, planes, 1, inner_set))
                with torch.no_grad():
                    model.layer1[0].conv1.weight[live] = 0
                    model.layer1[0].bn1.weight[live] = 0
                    model.layer1[0].bn1.bias[live] = 0.3
            _zero(model, f"{p}.conv2", f"{p}.bn2", stream_sets[s])
            removed[f"{p}.conv2"] = len(stream_sets[s])
            if p == "layer2.0":  # decoy: zero in this block's output only
                _zero(model, f"{p}.conv2", f"{p}.bn2", _pick(rng, planes, 1, stream_sets[s]))
            stream_in = planes - len(stream_sets[s])
    return removed, in_kept, widths[-1] - len(stream_sets[-1])


def _googlenet_masks(model, rng):
    """Random channels of every conv; every one is removable (concat segments, max-pool, 1x1 and 3x3 convs)."""
    removed, in_kept, out_kept = {}, {}, {}

    def zero(name, cin):
        conv = model.get_submodule(name)
        bn_name = name.rsplit(".", 1)[0] + "." + str(int(name.rsplit(".", 1)[1]) + 1)
        idx = _pick(rng, conv.out_channels, int(rng.integers(1, conv.out_channels // 4 + 1)))
        _zero(model, name, bn_name, idx)
        removed[name], in_kept[name], out_kept[name] = len(idx), cin, conv.out_channels - len(idx)

    zero("pre_layers.0", 3)
    block_in = out_kept["pre_layers.0"]
    for blk in ("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5"):
        zero(f"{blk}.b1.0", block_in)
        zero(f"{blk}.b2.0", block_in)
        zero(f"{blk}.b2.3", out_kept[f"{blk}.b2.0"])
        zero(f"{blk}.b3.0", block_in)
        zero(f"{blk}.b3.3", out_kept[f"{blk}.b3.0"])
        zero(f"{blk}.b3.6", out_kept[f"{blk}.b3.3"])
        zero(f"{blk}.b4.1", block_in)
        block_in = sum(out_kept[f"{blk}.{b}"] for b in ("b1.0", "b2.3", "b3.6", "b4.1"))
    return removed, in_kept, block_in


def _torch_forward(model, x):
    """Reference logits, conv output sizes and FlopCounterMode's MACs per image, from one forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    sizes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, o.shape[2:])))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ref = model(x).numpy()
    finally:
        for h in hooks:
            h.remove()
    return ref, sizes, fc.get_total_flops() // 2 // x.shape[0]


def _expected_costs(model, sizes, removed, in_kept, linear_in):
    """MACs and parameters of the physically shrunk model, from the masks and the dense model's feature sizes."""
    macs = params = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            cout = m.out_channels - removed[name]
            k = m.kernel_size[0] * m.kernel_size[1]
            macs += sizes[name][0] * sizes[name][1] * k * in_kept[name] * cout
            params += k * in_kept[name] * cout + cout  # weight + folded bias
    classes = model.linear.out_features
    return macs + linear_in * classes, params + linear_in * classes + classes


def _end_to_end(name, masks, seed, batch=1, run_batch=1):
    """Mask a zoo model like the pruner does, import it, strip it, and check counts, costs and outputs."""
    from compiler.frontend import import_model
    from compiler.models import build_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(name).eval()
    _randomize_bn(model, torch.Generator().manual_seed(seed))
    removed, in_kept, linear_in = masks(model, rng)
    x = torch.randn(run_batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ref, sizes, torch_macs = _torch_forward(model, x)

    before = import_model(model, batch=batch)
    flops_before = count_flops(before)
    assert flops_before["macs"] == torch_macs
    after, report = _strip(before)

    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    rows = [r for r in report if r["op"] == "conv2d"]
    assert len(rows) == len(convs)
    assert {n: r["out_channels_before"] - r["out_channels_after"] for n, r in zip(convs, rows)} == removed
    assert {n: r["in_channels_after"] for n, r in zip(convs, rows)} == in_kept
    matmul = [r for r in report if r["op"] == "matmul"]
    assert [(r["in_channels_after"], r["out_channels_after"]) for r in matmul] == [(linear_in, 10)]
    assert report_totals(report)["conv2d"]["out_channels_removed"] == sum(removed.values()) > 0

    flops_after = count_flops(after)
    assert (flops_after["macs"], flops_after["params"]) == _expected_costs(model, sizes, removed, in_kept, linear_in)
    assert flops_after["macs"] < flops_before["macs"]

    out = _run(after, x.numpy())
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_resnet20_symbolic_batch_inner_and_stream():
    _end_to_end("resnet20", lambda m, rng: _resnet_masks(m, rng, inner=True, stream=True), 20, batch=None,
                run_batch=2)


def test_resnet56_inner_channels():
    _end_to_end("resnet56", lambda m, rng: _resnet_masks(m, rng, inner=True, stream=False), 56)


@pytest.mark.slow
def test_resnet110_residual_stream():
    _end_to_end("resnet110", lambda m, rng: _resnet_masks(m, rng, inner=False, stream=True), 110)


@pytest.mark.slow
def test_googlenet_concat_and_pool():
    _end_to_end("googlenet", _googlenet_masks, 1)
