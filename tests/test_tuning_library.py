"""The kernel library (compiler/tuning/library.py): the widths the pruner can give, the covering networks, and the
committed library database covering a pruned ResNet no one tuned."""

from __future__ import annotations

import itertools

import pytest
import torch

from compiler.models import build_model
from compiler.prune import dependency, pruner


def _tl():
    from compiler.tuning import library

    return library


@pytest.mark.parametrize("depth,ratio,seed", [(20, 0.3, 0), (32, 0.5, 1), (44, 0.7, 2), (56, 0.6, 3), (110, 0.45, 4)])
def test_every_width_the_pruner_gives_is_an_allowed_width(depth, ratio, seed):
    torch.manual_seed(seed)
    model = build_model(f"resnet{depth}")
    graph = dependency.analyze(model)
    scores = {g.name: torch.rand(g.size) for g in graph.groups}  # any importance: the rule must hold for all
    kept = pruner.allocate(graph, scores, pruner.mac_units(model, graph), ratio)
    for g in graph.groups:
        if g.prunable:
            assert len(kept[g.name]) in _tl().allowed_widths(g.size), (g.name, len(kept[g.name]))


def test_allowed_widths_follow_round_to_and_floor():
    lib = _tl()
    assert lib.allowed_widths(16) == [8, 16]
    assert lib.allowed_widths(64) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert lib.allowed_widths(64, round_to=16) == [16, 32, 48, 64]
    assert lib.allowed_widths(64, floor=0.5) == [32, 40, 48, 56, 64]
    assert lib.allowed_widths(12) == [8, 12]  # not a multiple of round_to: the full width stays allowed


def test_covering_plans_hold_every_width_first_middle_and_last_in_every_stage():
    lib = _tl()
    plans = lib.covering_plans()
    assert len(plans) == 8 and {p.depth for p in plans} == {56}
    for s, channels in enumerate(lib.STAGE_WIDTHS):
        widths = set(lib.allowed_widths(channels))
        assert {p.widths[s][0] for p in plans} == widths
        assert {p.widths[s][-1] for p in plans} == widths
        assert set(itertools.chain.from_iterable(p.widths[s][1:-1] for p in plans)) == widths


def test_a_plan_model_has_exactly_the_planned_widths():
    lib = _tl()
    plan = lib.covering_plans()[3]
    model = lib.plan_model(plan)
    graph = dependency.analyze(model)
    masks = pruner.zeroed_masks(model, graph)
    got = [int(masks[g.members[0].conv].sum()) for g in graph.groups if g.prunable]
    assert got == [w for stage in plan.widths for w in stage]


def test_random_pruned_model_is_a_model_prune_could_have_made():
    lib = _tl()
    model, widths = lib.random_pruned_model(32, seed=5)
    graph = dependency.analyze(model)
    masks = pruner.zeroed_masks(model, graph)
    inner = [g for g in graph.groups if g.prunable]
    assert [int(masks[g.members[0].conv].sum()) for g in inner] == widths
    assert all(w in lib.allowed_widths(g.size) for g, w in zip(inner, widths))
    assert len(set(widths)) > 3  # not a uniform model


@pytest.mark.parametrize("target_name,precision,batch,folder", [
    ("x86-64-v3", "int8", 1, "x86-64-v3/kernels-int8-b1"),  # timed on 2 threads: a 2-core build takes it
    ("x86-64-v4-vnni", "int8", 1, "host/kernels-int8-b1@znver5"),
    ("x86-64-v4-vnni", "int8", 64, "host/kernels-int8-b64"),
    ("x86-64-v4-vnni", "fp32", 1, "host/kernels-fp32-b1"),
    ("x86-64-v4-vnni", "fp32", 64, "host/kernels-fp32-b64"),
])
def test_the_committed_library_covers_every_conv2d_of_a_pruned_resnet_no_one_tuned(target_name, precision, batch,
                                                                                    folder, monkeypatch):
    """A ResNet20 (not a depth the library networks have) pruned to random allowed widths: no database was tuned
    for it, and each committed library of the class (int8 in the AVX2 `vpmaddubsw` or AVX-512 VNNI `vpdpbusd`
    layout, fp32; batch 1 and 64) schedules every one of its conv2d kernels (the coverage check runs the build's
    own legalize passes; the class's kernels are never compiled or run - calibration runs on this CPU's own target - so it runs on any x86 CPU). The
    one kernel it may lack is the classifier's quantize, whose scale is inlined into the kernel (it differs with
    every calibration)."""
    import targets
    from compiler import threads
    from compiler.build import lower
    from compiler.tuning import database

    monkeypatch.setattr(threads, "_user_env", "2")  # a 2-thread build, whatever this machine has
    spec = targets.get(target_name)
    db, info = database.find_library(spec, precision, batch)
    assert db is not None, info["note"]
    assert info["path"].endswith(f"tuning_logs/{folder}"), info  # the class's own library
    model, widths = _tl().random_pruned_model(20, seed=7)
    low = lower(model, batch, precision, spec, calib_images=8, untrained=True)
    own, own_info = database.find_database(spec, "resnet20", database.variant_of(low.module, precision))
    assert own is None, own_info  # no one tuned these shapes
    from tvm.s_tir import meta_schedule as ms

    none = ms.database.MemoryDatabase()  # build's union with a model database that has nothing: all from the library
    applied = database.tasks_applied(low.module, spec, database.combine(none, db), first=none)
    assert applied["first_applied"] == 0, applied
    assert [m for m in applied["missing"] if "conv2d" in m] == [], (widths, applied)
    assert applied["tasks"] - applied["applied"] <= (1 if precision == "int8" else 0), applied  # fp32: every kernel
    assert applied["tasks"] >= 8, applied


def test_the_build_summary_and_manifest_say_what_the_library_scheduled():
    from compiler.build_cli import tuning_line
    from compiler.tuning import database

    lib = {"path": str(database.DEFAULT_ROOT / "host" / "kernels-int8-b1"), "sha256": "ab", "match": "exact",
           "note": "kernel library"}
    alone = database.manifest_entry({"path": None, "note": "untuned: no tuning log"},
                                    {"applied": 11, "tasks": 12, "fixed": 9}, lib)
    assert alone["database"] is None and alone["library"]["tasks_applied"] == 11 and alone["tasks_applied"] == 11
    m = {"tuning": alone, "target": {"kind": "cpu", "cross_compiled": False}}
    assert tuning_line(m) == ("kernel library tuning_logs/host/kernels-int8-b1 for 11 kernels (11/12 kernels "
                              "tuned; 9 layout kernels with a fixed schedule)")
    own = {"path": str(database.DEFAULT_ROOT / "host" / "resnet56-int8-810cd591"), "sha256": "cd", "match": "exact",
           "trials": 10, "seconds": 1.0, "note": "db"}
    both = database.manifest_entry(own, {"applied": 16, "tasks": 16, "fixed": 12, "first_applied": 15}, lib)
    assert both["tasks_applied"] == 16 and both["library"]["tasks_applied"] == 1
    assert tuning_line({"tuning": both, "target": m["target"]}).startswith(
        "tuning_logs/host/resnet56-int8-810cd591, then kernel library tuning_logs/host/kernels-int8-b1 for 1 kernels")
    covered = database.manifest_entry(own, {"applied": 16, "tasks": 16, "fixed": 12, "first_applied": 16}, lib)
    assert tuning_line({"tuning": covered, "target": m["target"]}) == (
        "tuning_logs/host/resnet56-int8-810cd591 (16/16 kernels tuned; 12 layout kernels with a fixed schedule; the "
        "kernel library tuning_logs/host/kernels-int8-b1 had nothing to add)")
    none = database.manifest_entry({"path": None, "note": "untuned: no tuning log"}, None, None)
    assert none["library"] is None and none["tasks_applied"] == 0


def test_the_untuned_summary_gives_a_tune_command_that_runs():
    """Regression: an untrained model (no checkpoint) was told to run `tune ... --checkpoint None`."""
    from compiler.build_cli import tuning_line
    from compiler.tuning import database

    untuned = database.manifest_entry({"path": None, "note": "untuned: no tuning log"}, None, None)
    m = {"tuning": untuned, "target": {"name": "host", "kind": "cpu", "cross_compiled": False}, "model": "resnet20",
         "precision": "fp32", "input": {"shape": [1, 3, 32, 32]},
         "checkpoint": {"path": None, "shipped": False}}
    line = tuning_line(m)
    assert line.startswith("UNTUNED: untuned: no tuning log.") and "None" not in line, line
    assert line.endswith("Fix: python -m compiler tune --target host --model resnet20 --precision fp32 --batch 1 "
                         "--trials 1000, then build again"), line
    m["checkpoint"], m["precision"] = {"path": "ck.pt", "shipped": False}, "int8"
    assert "--model resnet20 --checkpoint ck.pt --data DIR --precision int8" in tuning_line(m)


def test_no_library_note_gives_the_tune_command_for_that_batch(tmp_path):
    import targets
    from compiler.tuning import database

    db, info = database.find_library(targets.get("host"), "int8", 8, root=tmp_path)
    assert db is None and info["path"] is None
    assert "`python -m compiler tune --library --target host --precision int8 --batch 8` makes one" in info["note"]
    _, info1 = database.find_library(targets.get("host"), "fp32", 1, root=tmp_path)
    assert "--precision fp32` makes one" in info1["note"]
