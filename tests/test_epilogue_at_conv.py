"""ComputeEpilogueAtConv2d: a tuned packed int8 conv2d kernel's epilogue moves under the conv2d's parallel loop, and
the kernel computes exactly what it did before (the shipped model's x86-64-v3 kernels, with the committed records)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import s_tir, tirx

from helpers import scheduled_kernels, skip_unless_this_cpu_runs
from passes.epilogue_at_conv import ComputeEpilogueAtConv2d, epilogue_at_conv2d
from passes.parallel_launch import _statements

def _scheduled_kernels() -> dict:
    return scheduled_kernels("x86-64-v3")


def _conv_kernels() -> dict:
    return {name: f for name, f in _scheduled_kernels().items() if name.startswith("fused_conv2d_nchwc_int8")}


def test_every_tuned_conv2d_gets_its_epilogue_under_the_parallel_loop():
    kernels = _conv_kernels()
    assert len(kernels) >= 15, sorted(kernels)
    unrolled = []
    for name, func in kernels.items():
        moved = epilogue_at_conv2d(func)
        assert moved is not None, name
        sch = s_tir.Schedule(tvm.IRModule({"main": moved}))
        conv = sch.get_sblock("conv2d_nchwc_int8_o_update")
        (epilogue,) = sch.get_consumers(conv)
        outer = sch.get(sch.get_loops(conv)[0])
        assert outer.kind == tirx.ForKind.PARALLEL
        assert sch.get(sch.get_loops(epilogue)[0]).same_as(outer), name  # the same loop: computed tile by tile
        assert sch.get(sch.get_loops(epilogue)[-1]).kind == tirx.ForKind.VECTORIZED, name
        # nested, not fused: the loop around the vector (a row's pixels, at most UNROLL of them) is unrolled
        pixels = sch.get(sch.get_loops(epilogue)[-2])
        unrolled.append(pixels.kind == tirx.ForKind.UNROLLED)
        # the kernel's root holds one loop nest now, not two
        assert [type(s) for s in _statements(moved.body.block.body)].count(tirx.For) == 1, name
        assert [type(s) for s in _statements(func.body.block.body)].count(tirx.For) == 2, name
    assert sum(unrolled) >= len(kernels) - 2, unrolled  # all but kernels whose rows pass UNROLL pixels


def test_kernels_that_are_not_tuned_conv2d_are_left_alone():
    others = {name: f for name, f in _scheduled_kernels().items() if name not in _conv_kernels()}
    assert others
    for name, func in others.items():
        assert epilogue_at_conv2d(func) is None, name
    module = tvm.IRModule({"k": next(iter(others.values()))})
    assert ComputeEpilogueAtConv2d()(module).same_as(module)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_the_moved_epilogue_computes_the_same_values(n_threads):
    """Bit for bit, on random inputs, at 1 and 2 threads, for one kernel of each epilogue kind the model has: no
    residual, quantized to the next conv's uint8 input; a residual add, quantized; a residual add, float output (the
    block output the classifier reads) (AVX2 code: runs on any x86-64-v3 CPU)."""
    import targets
    from compiler import threads

    skip_unless_this_cpu_runs("x86-64-v3")
    target = targets.get("x86-64-v3").tvm_target()
    kernels = _conv_kernels()
    kinds = {}  # (residual add, quantized output) -> the first kernel of that kind
    for name in sorted(kernels):
        kinds.setdefault((name.count("_add") >= 2, "quantize_packed" in name), name)
    assert set(kinds) == {(False, True), (True, True), (True, False)}, kinds
    picked = list(kinds.values())
    try:
        threads.set_tvm(n_threads)
        for name in picked:
            outs = []
            # the moved kernel first: the int32 conv2d output is a workspace that the original's run would leave
            # filled with the right values
            for func in (epilogue_at_conv2d(kernels[name]), kernels[name]):
                with tvm.transform.PassContext(opt_level=3):
                    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
                rng = np.random.default_rng(0)
                args = []
                for param in func.params:
                    shape, dtype = [int(s) for s in param.shape], str(param.dtype)
                    # small codes and positive scales: outputs spread over the uint8 range, not clipped to 0
                    values = (rng.integers(0, 8, shape) if dtype == "uint8" else rng.integers(-4, 5, shape)
                              if "int" in dtype else rng.uniform(0.05, 0.5, shape))
                    args.append(tvm.runtime.tensor(values.astype(dtype), tvm.cpu()))
                lib["main"](*args)
                outs.append(args[-1].numpy())
            np.testing.assert_array_equal(outs[0], outs[1], err_msg=name)
            assert len(np.unique(outs[1])) > 8, name  # the output was written, with values of all kinds
    finally:
        threads.set_tvm(threads.cores())
