"""x86 int8 kernels without VNNI: the AVX2 (and AVX-512BW) ``vpmaddubsw`` + ``vpmaddwd`` tensor intrinsics against a
numpy reference, their int16 saturation (why the weights of those targets are 7-bit), and the ISA-class targets
(x86-64-v3 / v4 / v4-vnni): which int8 kernels each gets, the features an artifact records and the refusal on a CPU
below its class. Runs on any x86 CPU with AVX2 (skipped elsewhere, with the reason)."""

from __future__ import annotations

import platform
import subprocess

import numpy as np
import pytest
import tvm
from tvm import te

import targets
from passes import vnni
from targets import x86


def _flags() -> frozenset:
    return x86.cpu_flags() or frozenset()


needs_avx2 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or "avx2" not in _flags(),
                                reason="needs an x86 CPU with AVX2 (runs the ymm vpmaddubsw kernel)")


def _dot_kernel(lanes: int, blocks: int, intrin: str, mcpu: str):
    """C[i] = sum_k A[k] * B[k // 4, i, k % 4] (A uint8, B int8, C int32, K = 4 * blocks), the inner lanes x 4
    tensorized with ``intrin``, built for ``mcpu``."""
    from tvm import s_tir

    a = te.placeholder((4 * blocks,), "uint8", name="A")
    b = te.placeholder((blocks, lanes, 4), "int8", name="B")
    ko = te.reduce_axis((0, blocks), name="ko")
    ki = te.reduce_axis((0, 4), name="ki")
    c = te.compute((lanes,), lambda i: te.sum(a[ko * 4 + ki].astype("int32") * b[ko, i, ki].astype("int32"),
                                              axis=[ko, ki]), name="C")
    sch = s_tir.Schedule(te.create_prim_func([a, b, c]))
    block = sch.get_sblock("C")
    i, k_outer, k_inner = sch.get_loops(block)
    sch.reorder(k_outer, i, k_inner)
    sch.decompose_reduction(block, k_outer)
    vnni.register()
    sch.tensorize(i, intrin)
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    return tvm.compile(sch.mod, target=target)


def _run(lib, a: np.ndarray, b: np.ndarray, lanes: int) -> np.ndarray:
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(lanes, "int32"), dev)
    lib(tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev), out)
    return out.numpy()


def _reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    blocks, lanes, _ = b.shape
    return np.einsum("kl,kil->i", a.reshape(blocks, 4).astype(np.int64), b.astype(np.int64))


@needs_avx2
def test_avx2_intrinsic_matches_numpy_and_emits_vpmaddubsw(tmp_path):
    lib = _dot_kernel(8, 16, vnni.AVX2_NAME, "x86-64-v3")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 256, 64).astype(np.uint8)
        b = rng.integers(-64, 65, (16, 8, 4)).astype(np.int8)
        np.testing.assert_array_equal(_run(lib, a, b, 8), _reference(a, b))
    path = tmp_path / "k.so"
    lib.export_library(str(path))
    asm = subprocess.run(["objdump", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm and "zmm" not in asm  # AVX2 only: runs on any v3 CPU


@needs_avx2
def test_avx2_intrinsic_worst_case_and_saturation():
    """Worst case of the 7-bit weights: every activation 255 and every weight -64 (or +64): each vpmaddubsw pair is
    2 * 255 * 64 = 32640, inside int16, so the sums are exact. With 8-bit weights (-128) a pair is -65280: int16
    saturates at -32768 and the kernel is wrong - which is why targets using it quantize weights to 7 bits."""
    lib = _dot_kernel(8, 16, vnni.AVX2_NAME, "x86-64-v3")
    a = np.full(64, 255, np.uint8)
    for w in (-vnni.MADDUBS_WEIGHT_MAX, vnni.MADDUBS_WEIGHT_MAX):
        b = np.full((16, 8, 4), w, np.int8)
        np.testing.assert_array_equal(_run(lib, a, b, 8), _reference(a, b))
    b = np.full((16, 8, 4), -128, np.int8)
    got, want = _run(lib, a, b, 8), _reference(a, b)
    assert (got == 16 * 2 * -32768).all() and (want == 16 * 4 * 255 * -128).all()  # saturated, not exact


@pytest.mark.skipif("avx512bw" not in _flags(), reason="needs AVX-512BW (runs the zmm vpmaddubsw kernel)")
def test_avx512_intrinsic_matches_numpy():
    lib = _dot_kernel(16, 8, vnni.AVX512_NAME, "x86-64-v4")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, 32).astype(np.uint8)
    b = rng.integers(-64, 65, (8, 16, 4)).astype(np.int8)
    np.testing.assert_array_equal(_run(lib, a, b, 16), _reference(a, b))


def test_class_targets_pick_their_int8_kernels():
    from passes import quantize as q

    got = {n: (vnni.target_int8_isa(targets.get(n)), q.config_for(targets.get(n)).weight_max)
           for n in ("x86-64-v3", "x86-64-v4", "x86-64-v4-vnni")}
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the int8 layout of x86 classes is chosen on x86 build machines")
    assert got == {"x86-64-v3": ("avx2", 63), "x86-64-v4": ("avx512", 63), "x86-64-v4-vnni": ("vnni", 127)}
    assert targets.get("x86-64-v3").required_cpu_features() == ["abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma",
                                                                 "movbe"]
    assert "avx512_vnni" in targets.get("x86-64-v4-vnni").required_cpu_features()
    assert "avx512_vnni" not in targets.get("x86-64-v4").required_cpu_features()


def test_missing_features_names_what_an_avx2_cpu_lacks():
    zen3 = frozenset("fpu sse2 avx avx2 fma f16c bmi1 bmi2 abm movbe".split())
    need = targets.get("x86-64-v4").required_cpu_features()
    assert x86.missing_features(need, zen3) == ["avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl"]
    assert x86.missing_features(targets.get("x86-64-v3").required_cpu_features(), zen3) == []


ZEN3_FLAGS = frozenset("fpu sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 abm movbe".split())


def _manifest_only_artifact(folder, target_name: str):
    """An artifact folder whose manifest says what build records for ``target_name`` (no library: the CPU check
    comes before the library is opened)."""
    import json

    from compiler.build import ARTIFACT_FORMAT, MANIFEST

    spec = targets.get(target_name)
    folder.mkdir()
    manifest = {"format": ARTIFACT_FORMAT, "version": 1, "model": "resnet56", "precision": "int8",
                "target": {"name": spec.name, "tvm": spec.target_json(), "kind": "cpu", "cross_compiled": False,
                           "cpu_features": spec.required_cpu_features()},
                "input": {"shape": [1, 3, 32, 32], "normalize": "cifar"},
                "artifact": {"file": "model.so", "sha256": "0" * 64}, "checkpoint": {"sha256": None}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_an_x86_64_v4_artifact_is_refused_on_an_avx2_cpu_with_one_line(tmp_path, monkeypatch, capsys):
    """On a CPU below the artifact's class (the flags of an AVX2-only Zen 3 here), every verb that loads it stops
    with one error line naming the missing features, before the library is mapped (no SIGILL)."""
    from helpers import assert_user_error, run_cli

    art = _manifest_only_artifact(tmp_path / "v4", "x86-64-v4")
    monkeypatch.setattr(x86, "cpu_flags", lambda: ZEN3_FLAGS)
    assert_user_error(run_cli(capsys, "bench", "--artifact", art), "avx512bw, avx512cd, avx512dq, avx512f, avx512vl")
    v3 = _manifest_only_artifact(tmp_path / "v3", "x86-64-v3")
    rc, _, err = run_cli(capsys, "bench", "--artifact", v3)
    assert rc == 2 and "CPU features" not in err  # v3 passes the CPU check (then the missing library stops it)


def test_building_for_a_class_above_this_cpu_never_runs_its_code(tmp_path, monkeypatch, capsys):
    """Regression (seen on an AVX2-only Zen 3: `build --target x86-64-v4` died of SIGILL while timing thread
    counts): with the flags of a Zen 3, a v4 build verifies through a host build, records no thread count, and its
    artifact is then refused with one line instead of run."""
    import json

    from helpers import assert_user_error, run_cli, saved_resnet8

    _, ckpt = saved_resnet8(tmp_path)
    monkeypatch.setattr(x86, "cpu_flags", lambda: ZEN3_FLAGS)
    out = tmp_path / "v4"
    rc, _, err = run_cli(capsys, "build", "--target", "x86-64-v4", "--model", "resnet8", "--checkpoint", str(ckpt),
                         "--precision", "fp32", "--out", str(out))
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime"]["threads"] is None and "lacks" in manifest["runtime"]["how"]
    assert manifest["verification"]["run_on"].startswith("host")
    assert_user_error(run_cli(capsys, "bench", "--artifact", str(out)), "avx512")


def _fake_log(directory, spec, variant: str):
    import tvm

    from compiler.tuning import database

    directory.mkdir(parents=True)
    database.write_meta(directory, database.new_meta(spec, tvm.target.Target(spec.target_json()), "resnet56", variant,
                                                 "int8", 1, [], []))
    (directory / database.WORKLOAD_FILE).write_text("")
    (directory / database.RECORD_FILE).write_text("")
    return directory


def test_records_of_a_class_serve_host_and_the_class_target(tmp_path):
    """Records tuned for x86-64-v3 (on any CPU) apply to `host` on every v3 CPU (a Zen 3 here: host as LLVM sees
    it there), and host records tuned on a Zen 4 apply to the x86-64-v4-vnni target; another class is skipped."""
    import dataclasses

    from compiler.tuning import database

    root = tmp_path / "logs"
    v3 = targets.get("x86-64-v3")
    _fake_log(database.log_dir("x86-64-v3", "resnet56", "int8-0", root), v3, "int8-0")
    host = targets.get("host")
    zen3_host = dataclasses.replace(host, device={"kind": "llvm", "mcpu": "znver3"})
    how, why = database.target_match(database.read_meta(database.log_dir("x86-64-v3", "resnet56", "int8-0", root)),
                                   zen3_host)
    assert why is None and how.startswith("same ISA class x86-64-v3: tuned as x86-64-v3"), how
    assert database.target_match(database.read_meta(database.log_dir("x86-64-v3", "resnet56", "int8-0", root)),
                               dataclasses.replace(host, device={"kind": "llvm", "mcpu": "znver4"}))[0] is None
    zen4_host = dataclasses.replace(host, device={"kind": "llvm", "mcpu": "znver4"})
    _fake_log(database.log_dir("host", "resnet56", "int8-1", root), zen4_host, "int8-1")
    db, info = database.find_database(targets.get("x86-64-v4-vnni"), "resnet56", "int8-1", root=root)
    assert db is not None and "tuned as host on -mcpu=znver4" in info["match"], info
    db, info = database.find_database(targets.get("x86-64-v4"), "resnet56", "int8-1", root=root)
    assert db is None and "untuned" in info["note"]


def test_auto_precision_follows_the_measured_numbers(tmp_path, monkeypatch):
    import json

    got, why = x86.auto_precision("x86-64-v3")  # the committed measurements
    row = x86.measured("x86-64-v3")
    assert row is not None and got == ("int8" if row["int8_ms"] <= row["fp32_ms"] else "fp32")
    assert f"int8 {row['int8_ms']:.3g} ms" in why and f"fp32 {row['fp32_ms']:.3g} ms" in why
    measured = tmp_path / "x86_precision.json"
    measured.write_text(json.dumps({"format": x86.MEASURED_FORMAT, "model": "m", "batch": 1, "classes": {
        "x86-64-v4": {"fp32_ms": 1.0, "int8_ms": 2.0, "where": "a Skylake-SP"}}}))
    monkeypatch.setattr(x86, "MEASURED", measured)
    got, why = x86.auto_precision("x86-64-v4")
    assert got == "fp32" and "int8 2 ms vs fp32 1 ms, so fp32" in why  # slower int8 is not picked
    got, why = x86.auto_precision("x86-64-v3")
    assert got == "int8" and "not measured" in why
    assert x86.auto_precision(None)[0] == "fp32"
