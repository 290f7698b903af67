"""Pass reports as IRModule attributes: a pass that has something to tell (channels removed, layers quantized)
writes it as a JSON string attribute of the module it returns, so the report travels with the IR through any
later pass (Relax passes keep module attributes) and no pass object keeps state.

    mod = StripZeroChannels()(mod)
    reports.get(mod, reports.STRIP)      # -> list of per-layer rows
"""

from __future__ import annotations

import json

import tvm

__all__ = ["STRIP", "QUANTIZE", "attach", "get", "strip_all"]

PREFIX = "cifar_hybrid."
STRIP = PREFIX + "strip_report"  # StripZeroChannels: one row per conv2d / matmul
QUANTIZE = PREFIX + "quantize_report"  # Quantize / QuantizeWeights (+ Int8Layout's layout per layer)


def attach(mod: tvm.IRModule, key: str, value) -> tvm.IRModule:
    """``mod`` with ``value`` (anything JSON can hold) stored under ``key``."""
    return mod.with_attr(key, json.dumps(value))


def get(mod: tvm.IRModule, key: str, default=None):
    """The report stored under ``key``, or ``default``."""
    attrs = mod.attrs
    if attrs is None or key not in attrs:
        return default
    return json.loads(str(attrs[key]))


def strip_all(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` without this project's report attributes (what the target build receives)."""
    attrs = mod.attrs
    if attrs is None:
        return mod
    for key in list(attrs.keys()):
        if str(key).startswith(PREFIX):
            mod = mod.without_attr(str(key))
    return mod
