"""The quantize's rounding conversion (passes/round_by_conversion.py) on and off, same records, side by side.

    python benchmarks/round_by_conversion.py --target x86-64-v3 --rounds 9 [--data ../shared/data]

The shipped pruned int8 ResNet56 built as ``build`` builds it, once with :class:`passes.round_by_conversion
.RoundByConversion` (the default: each quantize rounds, clips and narrows with one ``vcvtps2dq`` and saturating
packs) and once with its step removed (``vroundps``, ``vminps``, ``vmaxps``, ``vcvttps2dq``); latency at 1 and 2
threads (median of interleaved rounds), max |logit difference| between the two and, with ``--data``, top-1 on the
10,000 CIFAR-10 test images (``benchmarks/build_variants.py``). Results: ``benchmarks/round_by_conversion.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_variants import main_step_on_off  # noqa: E402


def main(argv=None) -> int:
    return main_step_on_off(__doc__, "_round_by_conversion", "vcvtps2dq and packs (default)", "round, clip, convert",
                            argv)


if __name__ == "__main__":
    sys.exit(main())
