"""The quantize by the inverse scale (passes/inverse_scale.py) on and off, same records, side by side.

    python benchmarks/inverse_scale.py --target x86-64-v3 --rounds 9 [--data ../shared/data]

The shipped pruned int8 ResNet56 built as ``build`` builds it, once with :class:`passes.inverse_scale
.InverseScaleQuantize` (the default) and once with its step removed (each quantize divides by the scale); latency at
1 and 2 threads (median of interleaved rounds), max |logit difference| between the two and, with ``--data``, top-1
on the 10,000 CIFAR-10 test images (``benchmarks/build_variants.py``). Results: ``benchmarks/inverse_scale.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_variants import main_step_on_off  # noqa: E402


def main(argv=None) -> int:
    return main_step_on_off(__doc__, "_inverse_scale", "multiply by its inverse (default)", "divide by the scale", argv)


if __name__ == "__main__":
    sys.exit(main())
