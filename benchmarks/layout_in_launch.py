"""The layout kernels' parallel threshold inside one thread-pool launch (passes/schedule_layout.py), side by side.

    python benchmarks/layout_in_launch.py --target x86-64-v3 --rounds 15 [--data ../shared/data]

The shipped pruned int8 ResNet56 built as ``build`` builds it, once with the layout kernels (quantize + repack,
pack, unpack) parallel from :data:`passes.schedule_layout.LAUNCH_PARALLEL_MIN_ELEMENTS` output elements (the
default on targets that merge their kernels into one launch: :func:`targets.pipeline._layout_parallel_min`) and once
from :data:`~passes.schedule_layout.PARALLEL_MIN_ELEMENTS` (the threshold of a kernel launched on its own, which
every target used before); latency at 1 and 2 threads (median of interleaved rounds), max |logit difference| and,
with ``--data``, top-1 (``benchmarks/build_variants.py``). Results: ``benchmarks/layout_in_launch.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_variants import main_with, swapped  # noqa: E402


def main(argv=None) -> int:
    from passes import schedule_layout
    from targets import pipeline

    launch, alone = schedule_layout.LAUNCH_PARALLEL_MIN_ELEMENTS, schedule_layout.PARALLEL_MIN_ELEMENTS
    variants = {f"parallel from {launch} (default)": lambda: swapped(pipeline, "_layout_parallel_min",
                                                                    pipeline._layout_parallel_min),
                f"parallel from {alone}": lambda: swapped(pipeline, "_layout_parallel_min", lambda target: alone)}
    return main_with(__doc__, variants, f"parallel from {alone}", argv)


if __name__ == "__main__":
    sys.exit(main())
