"""Hybrid optimization of CIFAR-10 CNNs: structured pruning, int8 quantization, TVM Relax compilation.

The Python API (see README, "Python"): ``compiler.load``, ``compiler.prune``, ``compiler.build`` -> ``Artifact``,
``compiler.Artifact.load``, ``compiler.tune``, ``compiler.evaluate``, ``compiler.compare``; they live in
:mod:`compiler.api` and are imported on first use, so ``import compiler`` stays light (no torch, no TVM).

Four of the API functions share their names with the modules that implement them (``compiler/build.py``,
``compare.py``, ``evaluate.py``, ``prune/``): on the package the function wins (``compiler.build(...)``), and the
modules are imported by their full names (``from compiler.build import lower``). ``tune`` lives in
``compiler/tuning/``.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

API = ("Artifact", "Checkpoint", "SettingError", "UserError", "build", "compare", "evaluate", "load", "prune",
       "tune")


class _Package(types.ModuleType):
    def __getattr__(self, name: str):
        if name in API:
            return getattr(importlib.import_module("compiler.api"), name)
        raise AttributeError(f"module 'compiler' has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in API and isinstance(value, types.ModuleType):
            return  # the import system binding a submodule of the same name: the verb keeps the name
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(API))


sys.modules[__name__].__class__ = _Package
