"""FusePadIntoProducer (issue 18 item 3): a packed conv2d writes the zero-padded tensor the next conv2d reads, the
padding kernel goes, and every value stays the same."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, te

import targets
from helpers import skip_unless_this_cpu_runs
from passes import fuse_pad, vnni
from passes.fuse_pad import FusePadIntoProducer, view_of, with_view_param

U8 = "uint8"


def test_view_of_the_two_layouts_that_are_strided_views():
    # one block of p holds all of q's blocks side by side (AMX: 16-blocks into a 64-channel tile row)
    v = view_of((1, 4, 8, 8, 16), (1, 1, 10, 10, 64), [1, 1, 1, 1, 64])
    assert v.strides == (6400, 16, 640, 64, 1) and v.offset == (10 + 1) * 64
    # the same blocks (VNNI: 16 in, 16 out)
    v = view_of((2, 2, 8, 8, 16), (2, 2, 10, 10, 16), [1, 1, 1, 1, 32])
    assert v.strides == (3200, 1600, 160, 16, 1) and v.offset == 11 * 16
    assert view_of((1, 1, 32, 32, 16), (1, 1, 35, 34, 16), [2, 1, 1, 1, 16]).offset == (2 * 34 + 1) * 16
    assert [s for s in v.border()] == [(0, 1, 0, 10), (9, 10, 0, 10), (1, 9, 0, 1), (1, 9, 9, 10)]
    # two of q's blocks in each of p's (AVX2: 8-channel blocks out, 16 in): a 6-D view, block o at o // 2, o % 2
    v = view_of((1, 4, 8, 8, 8), (1, 2, 10, 10, 16), [1, 1, 1, 1, 32])
    assert v.split == 2 and v.offset == 11 * 16
    assert v.interior() == ((1, 2, 2, 8, 8, 8), (3200, 1600, 8, 160, 16, 1))


@pytest.mark.parametrize("shape,padded,pad", [
    ((1, 1, 32, 32, 16), (1, 1, 34, 34, 8), [1, 1, 1, 1, 8]),  # p keeps 8 of q's 16 channels
    ((1, 3, 8, 8, 16), (1, 1, 10, 10, 40), [1, 1, 1, 1, 40]),  # 40 of 48
    ((1, 2, 8, 8, 16), (1, 1, 10, 10, 32), [1, 1, 1, 1, 28]),  # p has zero channels q does not
    ((1, 4, 8, 8, 16), (1, 2, 10, 10, 24), [1, 1, 1, 1, 48]),  # a block of p spans parts of two of q's
    ((1, 1, 8, 8, 16), (1, 1, 10, 10, 16), [1, 1, 0, 0, 16]),  # the padding does not add up to the shape
])
def test_view_of_refuses_what_is_not_a_strided_view(shape, padded, pad):
    assert view_of(shape, padded, pad) is None


def _producer(shape):
    a = te.placeholder(shape, U8, name="a")
    return a, te.compute(shape, lambda *i: a[i] + tvm.tirx.const(1, U8), name="q")


def _consumer(shape):
    """Reads q (a residual): int32 q * 3."""
    q = te.placeholder(shape, U8, name="q")
    return q, te.compute(shape, lambda *i: q[i].astype("int32") * 3, name="r")


CASES = [((2, 4, 6, 6, 16), (2, 1, 8, 8, 64), [1, 1, 1, 1, 64]),
         ((1, 2, 5, 7, 8), (1, 2, 7, 9, 8), [1, 1, 1, 1, 16]),
         ((2, 6, 5, 7, 8), (2, 3, 7, 9, 16), [1, 1, 1, 1, 48])]  # split: two 8-blocks in each 16-block


@pytest.mark.parametrize("shape,padded,pad", CASES)
def test_the_producer_writes_what_the_pad_kernel_wrote(shape, padded, pad):
    """Runs the rewritten producer into a buffer full of garbage: interior and zero border equal
    ``pad_repack(producer(a))``, element for element."""
    view = view_of(shape, padded, pad)
    a, q = _producer(shape)
    func = with_view_param(te.create_prim_func([a, q]), 1, view, output=True)
    lib = tvm.compile(func, target="llvm")
    q_in = te.placeholder(shape, U8, name="q_in")
    pad_lib = tvm.compile(te.create_prim_func([q_in, vnni.pad_repack(q_in, pad[4], padded[4], pad[:4])]),
                          target="llvm")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, shape).astype(U8)
    got = tvm.runtime.tensor(np.full(padded, 7, U8))
    lib(tvm.runtime.tensor(x), got)
    want = tvm.runtime.tensor(np.zeros(padded, U8))
    pad_lib(tvm.runtime.tensor(x + 1), want)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert got.numpy().sum() > 0


@pytest.mark.parametrize("shape,padded,pad", CASES)
def test_a_reader_reads_the_same_elements_through_the_view(shape, padded, pad):
    view = view_of(shape, padded, pad)
    q, r = _consumer(shape)
    func = te.create_prim_func([q, r])
    viewed = tvm.compile(with_view_param(func, 0, view, output=False), target="llvm")
    plain = tvm.compile(func, target="llvm")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, shape).astype(U8)
    q_in = te.placeholder(shape, U8, name="q_in")
    pad_lib = tvm.compile(te.create_prim_func([q_in, vnni.pad_repack(q_in, pad[4], padded[4], pad[:4])]),
                          target="llvm")
    p = tvm.runtime.tensor(np.zeros(padded, U8))
    pad_lib(tvm.runtime.tensor(x), p)
    got, want = (tvm.runtime.tensor(np.zeros(shape, "int32")) for _ in range(2))
    viewed(p, got)
    plain(tvm.runtime.tensor(x), want)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def _chain(shape, padded, pad, fused: bool):
    """main(a): q = producer(a); p = pad_repack(q); r = consumer(q) - or, fused, the rewritten pair on p."""
    a_te, q_te = _producer(shape)
    qc, r_te = _consumer(shape)
    # private, as emit_te makes them (a kernel with a global symbol is kept when unused)
    producer = te.create_prim_func([a_te, q_te]).without_attr("global_symbol")
    consumer = te.create_prim_func([qc, r_te]).without_attr("global_symbol")
    view = view_of(shape, padded, pad)
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(shape, U8))
    with bb.function("main", [a]):
        with bb.dataflow():
            if fused:
                prod = bb.add_func(with_view_param(producer, 1, view, output=True), "producer_padded")
                cons = bb.add_func(with_view_param(consumer, 0, view, output=False), "consumer_padded")
                p = bb.emit(relax.call_tir(prod, relax.Tuple([a]), relax.TensorType(padded, U8)))
                r = bb.emit(relax.call_tir(cons, relax.Tuple([p]), relax.TensorType(shape, "int32")))
            else:
                q = bb.emit(relax.call_tir(bb.add_func(producer, "producer"), relax.Tuple([a]),
                                           relax.TensorType(shape, U8)))
                p = bb.emit_te(vnni.pad_repack, q, pad[4], padded[4], pad[:4], primfunc_name_hint=vnni.PAD_NAME,
                               primfunc_attrs={fuse_pad.PAD_ATTR: pad})
                r = bb.emit(relax.call_tir(bb.add_func(consumer, "consumer"), relax.Tuple([q]),
                                           relax.TensorType(shape, "int32")))
            out = bb.emit_output(relax.Tuple([p, r]))
        bb.emit_func_output(out)
    return bb.get()


def test_before_expected():
    shape, padded, pad = CASES[0]
    after = FusePadIntoProducer()(_chain(shape, padded, pad, fused=False))
    tvm.ir.assert_structural_equal(after, _chain(shape, padded, pad, fused=True))


def test_a_pad_that_is_not_a_view_stays():
    shape, padded, pad = (1, 1, 6, 6, 16), (1, 1, 8, 8, 8), [1, 1, 1, 1, 8]
    before = _chain(shape, padded, pad, fused=False)
    tvm.ir.assert_structural_equal(FusePadIntoProducer()(before), before)


def test_x86_int8_targets_get_it_others_do_not():
    from targets.pipeline import _fuse_pads

    for name in ("x86-64-v4-amx", "x86-64-v4-vnni", "x86-64-v4", "x86-64-v3"):
        assert _fuse_pads(targets.get(name).tvm_target()), name
    assert not _fuse_pads(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))


def _flat_vectorized_producer(shape, lanes: int):
    """The producer with its loops fused and vectorized ``lanes`` at a time across pixels, as a tuned epilogue
    can be (x86-64-v3's records: 64 lanes over 8 pixels of 8 channels)."""
    from tvm import s_tir

    a, q = _producer(shape)
    sch = s_tir.Schedule(te.create_prim_func([a, q]))
    fused = sch.fuse(*sch.get_loops(sch.get_sblock("q")))
    _, inner = sch.split(fused, [None, lanes])
    sch.vectorize(inner)
    return sch.mod["main"]


def test_vectors_across_pixels_are_cut_into_channel_blocks():
    """Through the view, a 64-lane vector over 8 pixels would be a scatter: it is cut into 8-lane vectors (one
    channel block each), and the padded tensor still equals what the pad kernel wrote. A vector that is not a
    whole number of blocks keeps the pad."""
    from passes.fuse_pad import _viewable, _wide_loops

    shape, padded, pad = (1, 2, 4, 4, 8), (1, 1, 6, 6, 16), [1, 1, 1, 1, 16]
    func = _flat_vectorized_producer(shape, 64)
    assert _viewable(func, 1, 8)
    rewritten = with_view_param(func, 1, view_of(shape, padded, pad), output=True)
    assert not _wide_loops(rewritten, "q", 8) and "T.vectorized(8)" in rewritten.script()
    lib = tvm.compile(rewritten, target="llvm")
    x = np.random.default_rng(2).integers(0, 200, shape).astype(U8)
    got = tvm.runtime.tensor(np.full(padded, 7, U8))
    lib(tvm.runtime.tensor(x), got)
    want = np.zeros(padded, U8)
    want[0, 0, 1:5, 1:5, :] = (x + 1).transpose(0, 2, 3, 1, 4).reshape(4, 4, 16)
    np.testing.assert_array_equal(got.numpy(), want)
    assert not _viewable(_flat_vectorized_producer((1, 1, 3, 4, 8), 12), 1, 8)


@pytest.mark.parametrize("target,batch,left", [("x86-64-v4-vnni", 32, 0), ("x86-64-v3", 1, 0), ("x86-64-v3", 32, 20)])
def test_the_shipped_model_loses_its_pad_kernels_and_no_value_changes(target, batch, left):
    """The shipped pruned ResNet56 built with and without the pass: bit-identical logits on the 32 shipped test
    images, and the 51 padding kernels gone but ``left`` (VNNI: every one's input is a strided view of its output,
    16-channel blocks, 8 for the 8-channel conv1s; AVX2: 20 of them read two 8-channel blocks into each 16-channel
    one, a split view, fused at batch 1 only: fuse_pad.SPLIT_MAX_BATCH). Launch merging is off in both builds: it
    would take the padding kernels into its launch and hide them from the count."""
    import re

    import torch

    from compiler import data, zoo
    from compiler.build import lower, run_module
    from compiler.tuning import database as tdb
    from targets import pipeline
    from targets.build import relax_pipeline

    spec = targets.get(target)
    skip_unless_this_cpu_runs(target)
    ckpt = zoo.load("resnet56", None, None, quiet=True)
    verify = zoo.verification_set("resnet56")
    x = data.normalize(torch.from_numpy(verify["images"]), ckpt.normalize).numpy()
    lowered = lower(ckpt.model, batch, "int8", spec, data_dir=None, normalize=ckpt.normalize, untrained=False,
                    shipped=zoo.calibration(ckpt, 512))
    library, _ = tdb.find_library(spec, "int8", batch)
    logits, pads = {}, {}
    original, merge = pipeline._fuse_pads, pipeline._merge_launches
    for fused in (False, True):
        pipeline._fuse_pads = original if fused else (lambda target: [])
        pipeline._merge_launches = lambda target: []
        try:
            with spec.tvm_target():
                low = relax_pipeline(spec, library)(lowered.module)
            exe = targets.compile_module(lowered.module, spec, database=library)
        finally:
            pipeline._fuse_pads, pipeline._merge_launches = original, merge
        pads[fused] = len(re.findall(r"\bvnni_pad_repack\d*\(", low["main"].script()))
        logits[fused] = run_module(exe, x, batch)
    np.testing.assert_array_equal(logits[True], logits[False])
    assert (pads[False], pads[True]) == (51, left)
