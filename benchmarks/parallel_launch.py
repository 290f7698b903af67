"""One thread-pool launch per run of kernels (issue 18 item 3, ``passes/parallel_launch.py``), measured: the pruned
int8 ResNet56 built as ``build`` builds it for ``--target``, with the same records, with and without
:class:`passes.parallel_launch.MergeParallelLaunches` (``build`` runs it on every x86 int8 target, compiled with
:data:`targets.pipeline.LLVM_OPTIONS`; the separate kernels are compiled without them, as before).

    python benchmarks/parallel_launch.py [--target host] [--batch 1] [--rounds 7] [--data DIR] [--json OUT]

Prints the table of ``benchmarks/build_variants.py`` (kernel calls, latency at 1 and 2 threads, max |logit
difference|); exits 1 if the separate kernels do not equal the one launch bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_variants import main_with, swapped  # noqa: E402

ONE = "one launch per run"
SEPARATE = "separate kernels"


def main(argv=None) -> int:
    """The pipeline with MergeParallelLaunches (on every run, whatever the target) and without it."""
    from passes.parallel_launch import MergeParallelLaunches
    from targets import pipeline

    return main_with(__doc__, {ONE: lambda: swapped(pipeline, "_merge_launches", lambda t: [MergeParallelLaunches()]),
                               SEPARATE: lambda: swapped(pipeline, "_merge_launches", lambda t: [])}, SEPARATE, argv)


if __name__ == "__main__":
    sys.exit(main())
