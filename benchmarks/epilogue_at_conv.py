"""The tuned packed int8 conv2d kernels with their epilogue computed under the conv2d's parallel loop
(``passes/epilogue_at_conv.py``) against the epilogue as the record leaves it: the shipped pruned int8 ResNet56 built
as ``build`` builds it for ``--target`` (same records), the pass on and off, and on with the epilogue's loops fused
into one as sessions 21-24 built it (session 25 nests them).

    python benchmarks/epilogue_at_conv.py [--target host] [--batch 1] [--rounds 7] [--data DIR] [--json OUT]

Prints the table of ``benchmarks/build_variants.py``; exits 1 if the two builds' logits differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_variants import main_with, swapped  # noqa: E402

ON = "epilogue at conv2d"
FUSED = "epilogue at conv2d, its loops fused"
OFF = "epilogue as tuned"


def main(argv=None) -> int:
    from passes.epilogue_at_conv import ComputeEpilogueAtConv2d
    from targets import pipeline

    step = pipeline._epilogues

    def fused(target):
        return [ComputeEpilogueAtConv2d(fuse=True)] if step(target) else []

    return main_with(__doc__, {ON: lambda: swapped(pipeline, "_epilogues", step),
                               FUSED: lambda: swapped(pipeline, "_epilogues", fused),
                               OFF: lambda: swapped(pipeline, "_epilogues", lambda target: [])}, OFF, argv)


if __name__ == "__main__":
    sys.exit(main())
