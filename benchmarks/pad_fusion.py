"""The padding kernels of the packed int8 conv2d written by the producing conv2d instead (issue 18 item 3,
``passes/fuse_pad.py``), measured: the pruned int8 ResNet56 built as ``build`` builds it for ``--target``, with the
same records, with and without :class:`passes.fuse_pad.FusePadIntoProducer`; on an AMX target also the AMX layout
as it was before this change (16-channel output blocks for the 8-channel conv2d layers too), and where the layout has
them (AVX2: 8-channel blocks out, 16 in) the pads that read two blocks into one as kernels (before session 22).

    python benchmarks/pad_fusion.py [--target host] [--batch 1] [--rounds 7] [--data DIR] [--json OUT]

Prints the kernel calls per batch, the latency at 1 and 2 threads (TVM's time_evaluator on the Relax VM as
``build`` times it; median of ``--rounds`` rounds interleaved between the builds), max |logit difference| against
the default build and, with ``--data``, top-1 on the CIFAR-10 test images. Exits 1 if the build with pads as kernels
(same layout) does not equal the default bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_variants import add_arguments, compare  # noqa: E402

DEFAULT = "pads written by the producer (default)"
KERNELS = "pads as kernels"
AMX_16 = "pads as kernels, AMX 16-channel blocks for 8 channels (before)"
SPLIT = "split-block pads as kernels (before)"


@contextlib.contextmanager
def _variant(name: str):
    """The pipeline as the variant ``name`` builds it (module attributes swapped for the build, then restored)."""
    from passes import vnni
    from targets import pipeline

    from passes import fuse_pad

    fuse, oc_block, view_of = pipeline._fuse_pads, vnni.oc_block, fuse_pad.view_of
    if name in (KERNELS, AMX_16):
        pipeline._fuse_pads = lambda target: []
    if name == SPLIT:
        fuse_pad.view_of = lambda *a: (lambda v: None if v is not None and v.split > 1 else v)(view_of(*a))
    if name == AMX_16:
        vnni.oc_block = lambda oc, isa="vnni": 16 if isa == "amx" else oc_block(oc, isa)
    try:
        yield
    finally:
        pipeline._fuse_pads, vnni.oc_block, fuse_pad.view_of = fuse, oc_block, view_of


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    from passes import vnni

    variants = {name: (lambda name=name: _variant(name)) for name in (DEFAULT, KERNELS, AMX_16, SPLIT)}
    isa = {AMX_16: ("amx",), SPLIT: ("avx2",)}
    return compare(args, variants, KERNELS,
                   available=lambda name, target: name not in isa or vnni.target_int8_isa(target) in isa[name])


if __name__ == "__main__":
    sys.exit(main())
