"""The tuned packed int8 conv2d kernels with their epilogue computed under the conv2d's parallel loop
(``passes/epilogue_at_conv.py``) against the epilogue as the record leaves it: the shipped pruned int8 ResNet56 built
as ``build`` builds it for ``--target`` (same records), the pass on and off.

    python benchmarks/epilogue_at_conv.py [--target host] [--batch 1] [--rounds 7] [--data DIR] [--json OUT]

Prints the table of ``benchmarks/build_variants.py``; exits 1 if the two builds' logits differ.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_variants import add_arguments, compare  # noqa: E402

ON = "epilogue at conv2d"
OFF = "epilogue as tuned"


@contextlib.contextmanager
def _epilogue(on: bool):
    """build's pipeline with ComputeEpilogueAtConv2d (``on``) or without it."""
    from passes.epilogue_at_conv import ComputeEpilogueAtConv2d
    from targets import pipeline

    fuse_pads = pipeline._fuse_pads
    pipeline._fuse_pads = lambda target: [p for p in fuse_pads(target)
                                          if on or not isinstance(p, ComputeEpilogueAtConv2d)]
    try:
        yield
    finally:
        pipeline._fuse_pads = fuse_pads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return compare(args, {ON: lambda: _epilogue(True), OFF: lambda: _epilogue(False)}, OFF)


if __name__ == "__main__":
    sys.exit(main())
