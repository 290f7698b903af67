"""Small helpers several test files share (imported as ``from helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

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
