"""The merged launch's loop bodies outlined (passes/outline_launch.py) on and off, same records, side by side.

    python benchmarks/outline_launch.py --target x86-64-v3 --rounds 15 [--data ../shared/data]

The shipped pruned int8 ResNet56 built as ``build`` builds it, once with :class:`passes.outline_launch
.OutlineLaunchLoops` (the default: one function per kernel, called from the launch's parallel loops) and once with
its step removed (every kernel call a copy of its code inside the launch); latency at 1 and 2 threads (median of
interleaved rounds), max |logit difference| between the two and, with ``--data``, top-1 on the 10,000 CIFAR-10 test
images (``benchmarks/build_variants.py``). Results: ``benchmarks/outline_launch.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_variants import main_step_on_off  # noqa: E402


def main(argv=None) -> int:
    return main_step_on_off(__doc__, "_outline_launches", "one function per kernel (default)",
                            "kernel copies in the launch", argv)


if __name__ == "__main__":
    sys.exit(main())
