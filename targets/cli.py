"""``python -m compiler targets``: list the named build targets."""

from __future__ import annotations

import argparse

from compiler.cli import add_json_arg
from compiler.console import table


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default=None, help="show one target in full (default: list them all)")
    add_json_arg(p)


def _row(spec) -> dict:
    return {
        "target": spec.name,
        "device": spec.arch or "cpu",
        "host": (spec.host or spec.device).get("mtriple", "native") + " " + (spec.host or spec.device).get("mcpu", ""),
        "cross": "yes" if spec.cross_compiled else "no",
        "auto precision": spec.default_precision,
        "fast int8": "yes" if spec.fast_int8 else "no",
        "description": spec.description,
    }


def run(args) -> dict:
    import targets

    specs = [targets.get(args.name)] if args.name else targets.all_targets()
    print(table([_row(s) for s in specs]))
    if args.name:
        s = specs[0]
        print(f"\nTVM target: {s.tvm_target()}\ntoolchain: {s.toolchain}\n"
              f"auto precision: {s.default_precision}: {s.precision_reason}\nfast int8: {s.fast_int8_reason}")
        for n in s.notes:
            print(f"note: {n}")
    return {"targets": [s.to_dict() for s in specs]}
