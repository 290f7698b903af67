"""The small-weight packed int8 conv2d kernels with their parallel loop ordered output rows first
(``passes/rows_first.py``) against the loop as the record leaves it: the shipped pruned int8 ResNet56 built as
``build`` builds it for ``--target`` (same records), the pass off, at its default weight limit, and with larger
limits (the stage-2 kernels too; every kernel).

    python benchmarks/rows_first.py [--target host] [--batch 1] [--rounds 7] [--data DIR] [--json OUT]

Prints the table of ``benchmarks/build_variants.py``; exits 1 if the builds' logits differ from the loop as tuned.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_variants import main_with, swapped  # noqa: E402

OFF = "loop as tuned"


def _limit(max_weight_bytes):
    from passes.rows_first import RowsFirstConv2d
    from targets import pipeline

    step = pipeline._rows_first
    return lambda: swapped(pipeline, "_rows_first",
                           lambda target: [RowsFirstConv2d(max_weight_bytes)] if step(target) else [])


def main(argv=None) -> int:
    from passes.rows_first import MAX_WEIGHT_BYTES
    from targets import pipeline

    variants = {f"rows first, weights <= {MAX_WEIGHT_BYTES} B (default)": _limit(MAX_WEIGHT_BYTES),
                OFF: lambda: swapped(pipeline, "_rows_first", lambda target: []),
                "rows first, weights <= 24 KB": _limit(24 * 1024),
                "rows first, every kernel": _limit(1 << 30)}
    return main_with(__doc__, variants, OFF, argv)


if __name__ == "__main__":
    sys.exit(main())
