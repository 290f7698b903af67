"""Small helpers several test files share (imported as ``from helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tvm import relax

F32 = "float32"


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so folding and stripping are really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def relax_module(x_shape, body):
    """``main(x)`` in one dataflow block: ``body(bb, x)`` emits the bindings and returns the output."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.emit_output(body(bb, x))
        bb.emit_func_output(gv)
    return bb.get()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``python -m compiler ...`` in this process, no second interpreter start-up (argparse's own errors exit
    through SystemExit): (exit code, stdout, stderr)."""
    from compiler.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(result, pattern):
    """``result`` (from :func:`run_cli`) is the CLI contract's bad-input answer: exit 2, one ``error:`` line on
    stderr that contains ``pattern``."""
    rc, _, err = result
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert pattern in lines[0], lines[0]


@dataclass
class CliResult:
    """What ``subprocess.run(..., capture_output=True, text=True)`` would give, from an in-process run."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args, cwd=None) -> CliResult:
    """``python -m compiler ARGS`` in this process, stdout and stderr captured: the interpreter, torch and TVM start
    once for the whole suite instead of once per call (tests/test_cli.py keeps one real ``python -m compiler``
    smoke test). An exception other than the CLI's own exits is a bug and propagates with its traceback."""
    import contextlib
    import io
    import os

    from compiler.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help (0) and usage errors (2)
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(here)
    return CliResult(rc, out.getvalue(), err.getvalue())


def saved_resnet8(directory) -> tuple[torch.nn.Module, object]:
    """A seeded ResNet8 with non-trivial BatchNorm, saved as ``directory/r8.pt``: ``(model, path)``."""
    from compiler.checkpoint import save_checkpoint
    from compiler.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet8").eval()
    randomize_bn(model)
    path = directory / "r8.pt"
    save_checkpoint(path, "resnet8", model, "cifar")
    return model, path


_KERNELS: dict = {}


def scheduled_kernels(target_name: str) -> dict:
    """{name: PrimFunc} of the shipped pruned ResNet56 in int8 for ``target_name``, scheduled by the committed
    records and the CPU fallback (the kernels the x86 int8 passes after them receive in build's pipeline); cached."""
    if target_name not in _KERNELS:
        import tvm
        from tvm import tirx

        import targets
        from compiler import zoo
        from compiler.build import lower
        from compiler.tuning import database as tdb
        from targets.pipeline import _cpu_fallback, apply_database_passes, legalize_passes

        spec = targets.get(target_name)
        ckpt = zoo.load("resnet56", None, None, quiet=True)
        lowered = lower(ckpt.model, 1, "int8", spec, data_dir=None, normalize=ckpt.normalize, untrained=False,
                        shipped=zoo.calibration(ckpt, 512))
        database, _ = tdb.find_database(spec, ckpt.model_name, tdb.variant_of(lowered.module, "int8"))
        target = spec.tvm_target()
        with target, database:
            mod = tvm.transform.Sequential(legalize_passes(target) + apply_database_passes(database)
                                           + [_cpu_fallback()])(lowered.module)
        _KERNELS[target_name] = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    return _KERNELS[target_name]


def skip_unless_this_cpu_runs(target_name: str) -> None:
    """Skip the calling test where this CPU lacks a feature ``target_name``'s code needs (or they cannot be read)."""
    import pytest

    import targets
    from targets import x86

    missing = x86.missing_features(targets.get(target_name).required_cpu_features())
    if missing is None or missing:
        pytest.skip(f"this CPU cannot run {target_name} code (missing: {', '.join(missing or ['unknown'])})")


def run_quantize_kernels(func, libs) -> list:
    """The outputs of ``libs`` (each ``func`` compiled as ``"k"``: a shipped conv2d kernel ending in a quantize) on
    the same random inputs - uint8 activations, int8 weights, a plausible rescale and bias, activation scale 0.37 -
    at one thread, in order (put a rewritten kernel first: it must not read a workspace the original left)."""
    import numpy as np
    import tvm

    from compiler import threads

    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    inputs, per_channel = [], iter([(0.0005, 0.002), (-2.0, 2.0)])  # the int32 sum's rescale, then the bias
    for param in func.params[:-1]:
        shape, dtype = [int(d) for d in param.shape], str(param.dtype)
        if shape == [1]:  # the activation scale
            a = np.array([0.37], dtype)
        elif dtype == "uint8":
            a = rng.integers(0, 128, shape).astype(dtype)
        elif dtype == "int8":
            a = rng.integers(-63, 64, shape).astype(dtype)
        else:
            a = rng.uniform(*next(per_channel), shape).astype(dtype)
        inputs.append(tvm.runtime.tensor(a, dev))
    out = func.params[-1]
    threads.set_tvm(1)
    results = []
    for lib in libs:
        y = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], str(out.dtype)), dev)
        lib["k"](*inputs, y)
        results.append(y.numpy())
    return results


def shipped_lowered(target_name: str, precision: str, outline: bool = True):
    """What ``build`` lowers for ``target_name`` (compiled nowhere, so on any CPU): the shipped pruned ResNet56 with
    the committed records ``build`` would apply; ``outline=False``: without ``targets.pipeline._outline_launches``
    (every kernel's code inside the merged launch, as MergeParallelLaunches leaves it)."""
    from compiler import zoo
    from compiler.build import lower
    from compiler.tuning import database as tdb
    from targets import get, pipeline
    from targets.build import relax_pipeline
    from targets.pipeline import compile_target

    spec = get(target_name)
    ckpt = zoo.load("resnet56", None, None, quiet=True)
    lowered = lower(ckpt.model, 1, precision, spec, data_dir=None, normalize=ckpt.normalize, untrained=False,
                    shipped=zoo.calibration(ckpt, 512) if precision == "int8" else None)
    database, _ = tdb.find_database(spec, ckpt.model_name, tdb.variant_of(lowered.module, precision))
    library, _ = tdb.find_library(spec, precision, 1)
    step = pipeline._outline_launches
    if not outline:
        pipeline._outline_launches = lambda target: []
    try:
        with compile_target(spec):
            return relax_pipeline(spec, tdb.combine(database, library))(lowered.module)
    finally:
        pipeline._outline_launches = step


def elementwise_kernel(fn, arity: int, shape, parallel: bool = True):
    """An elementwise float32 kernel of ``arity`` inputs of ``shape``, scheduled (marked so): its rows on the thread
    pool, or serial; its columns vectorized by 16."""
    from tvm import s_tir, te

    ins = [te.placeholder(shape, "float32", name=f"a{i}") for i in range(arity)]
    out = te.compute(shape, lambda i, j: fn(*[a[i, j] for a in ins]), name="out")
    sch = s_tir.Schedule(te.create_prim_func(ins + [out]))
    i, j = sch.get_loops(sch.get_sblock("out"))
    sch.vectorize(sch.split(j, [None, 16])[1])
    if parallel:
        sch.parallel(i)
    return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
