"""The emulated aarch64 board (targets/emulate.py): a Debian arm64 userland with TVM 0.27's aarch64 runtime wheel,
run through qemu-user. No mocks: artifacts built here run inside it, TVM's RPC server runs inside it.

The board is set up once into the user's cache (~130 MB the first time, seconds afterwards). These tests skip,
with the reason, only where it cannot be set up: no qemu-aarch64 (Debian package qemu-user), no apt-get, or the
package registries out of reach.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_cli, saved_resnet8


@pytest.fixture(scope="session")
def board():
    from compiler.errors import UserError
    from targets import emulate

    problem = emulate.missing_host_tools()
    if problem:
        pytest.skip(f"no emulated board here: {problem}")
    try:
        return emulate.setup()
    except UserError as e:
        pytest.skip(f"the emulated board cannot be set up here: {e}")


@pytest.fixture(scope="module")
def resnet8(tmp_path_factory):
    return saved_resnet8(tmp_path_factory.mktemp("ck"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A CIFAR-10-shaped folder with a few random test images (the comparison is against PyTorch, not labels)."""
    folder = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 12)):
        np.savez(folder / f"cifar10_{split}.npz", x=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, size=(n,), dtype=np.int64))
    return folder


def _build(capsys, resnet8, images, tmp_path_factory, target: str, precision: str = "fp32") -> Path:
    out = tmp_path_factory.mktemp("art") / target
    rc, _, err = run_cli(capsys, "build", "--target", target, "--checkpoint", resnet8[1], "--precision", precision,
                         "--data", images, "--out", out)
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def aarch64_artifact(resnet8, images, tmp_path_factory):
    from compiler.cli import main

    out = tmp_path_factory.mktemp("art") / "aarch64-cpu"
    assert main(["build", "--target", "aarch64-cpu", "--checkpoint", str(resnet8[1]), "--precision", "fp32",
                 "--data", str(images), "--out", str(out)]) == 0
    return out


def test_setup_is_cached_and_reported(board, capsys):
    from targets import emulate

    assert board["machine"] == "aarch64" and board["tvm"].startswith("0.27") and board["python"].startswith("3.11")
    t0 = time.perf_counter()
    assert emulate.setup() == board  # cached: no download, no guest start
    assert time.perf_counter() - t0 < 2
    assert not (emulate.site_packages() / "tvm" / "lib" / "libtvm_compiler.so").exists()  # runtime only
    assert not (emulate.site_packages() / "ml_dtypes").exists()  # ~13 s of every guest start, used by no artifact
    assert "unset PYTHONHOME PYTHONDONTWRITEBYTECODE" in (emulate.board_dir() / "bin" / "python3").read_text()
    rc, out, err = run_cli(capsys, "board", "--emulate", "status", "--json")
    assert rc == 0, err
    status = json.loads(out.strip().splitlines()[-1])
    assert status["ready"] and status["board"] == str(emulate.board_dir())
    assert "say nothing about a real board" in out
    rc, _, err = run_cli(capsys, "board", "status")
    assert rc == 2 and err.strip().startswith("error:") and "--emulate" in err


def test_a_board_set_up_by_an_earlier_version_is_brought_up_to_date(tmp_path, monkeypatch):
    """No qemu needed: a cached board's wrapper is rewritten and the packages the board no longer has are removed
    (both the setup's own output); the rest of the folder stays as it was."""
    from targets import emulate

    folder = tmp_path / "board"
    packages = emulate.site_packages(folder)
    for name in ("ml_dtypes", "ml_dtypes-0.7.0.dist-info", "numpy"):
        (packages / name).mkdir(parents=True)
        (packages / name / "__init__.py").write_text("")
    (folder / "bin").mkdir()
    old = "#!/bin/sh\nexec qemu python3.11 \"$@\"\n"
    (folder / "bin" / "python3").write_text(old)
    record = {"format": emulate.FORMAT, "qemu": "/usr/bin/qemu-aarch64", "machine": "aarch64",
              "wheels": ["ml_dtypes-0.7.0-cp311.whl", "numpy-2.4.6-cp311.whl"]}
    (folder / "board.json").write_text(json.dumps(record))
    monkeypatch.setenv("CIFAR_BOARD_DIR", str(folder))
    got = emulate.setup()
    assert got["wheels"] == ["numpy-2.4.6-cp311.whl"] == json.loads((folder / "board.json").read_text())["wheels"]
    assert sorted(p.name for p in packages.iterdir()) == ["numpy"]
    wrapper = (folder / "bin" / "python3").read_text()
    assert wrapper == emulate.WRAPPER.format(py=emulate.GUEST_PYTHON, qemu="/usr/bin/qemu-aarch64")
    assert (folder / "bin" / "python3").stat().st_mode & 0o111


def test_aarch64_artifact_runs_in_the_board_and_matches_pytorch(board, aarch64_artifact, images, capsys):
    rc, out, err = run_cli(capsys, "eval", "--artifact", aarch64_artifact, "--emulate", "--data", images, "--json")
    assert rc == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r["n"] == 12 and r["target"] == "aarch64-cpu"
    assert "emulated aarch64" in r["ran_on"] and "0.27" in r["ran_on"]
    assert r["max_abs_diff"] is not None and r["max_abs_diff"] <= r["tolerance"], r
    assert r["within_tolerance"] and r["argmax_agreement"] == 1.0 and r["top1"] == r["pytorch_top1"]
    assert "say nothing about a real board" in out and "say nothing about a real board" in r["timing_note"]


def test_emulate_refuses_what_is_not_an_aarch64_artifact(board, aarch64_artifact, images, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "eval", "--emulate", "--data", images)
    assert rc == 2 and "--artifact" in err
    # the same folder with a manifest that says x86: refused before anything runs
    fake = tmp_path / "host-like"
    fake.mkdir()
    manifest = json.loads((aarch64_artifact / "manifest.json").read_text())
    manifest["target"].update(name="host", tvm={"kind": "llvm", "mcpu": "znver4"}, cross_compiled=False)
    (fake / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = run_cli(capsys, "eval", "--artifact", fake, "--emulate", "--data", images)
    assert rc == 2 and "not for an aarch64 board" in err and "Traceback" not in err
    # a model.so that does not match its manifest
    (fake / "manifest.json").write_text((aarch64_artifact / "manifest.json").read_text())
    (fake / "model.so").write_bytes(b"not a library")
    rc, _, err = run_cli(capsys, "eval", "--artifact", fake, "--emulate", "--data", images)
    assert rc == 2 and "the file is damaged" in err  # its size is not the recorded one
    size = (aarch64_artifact / "model.so").stat().st_size
    (fake / "model.so").write_bytes(b"\0" * size)  # the recorded size, other bytes
    rc, _, err = run_cli(capsys, "eval", "--artifact", fake, "--emulate", "--data", images)
    assert rc == 2 and "sha256" in err


def test_jetson_tx2_artifact_loads_and_stops_at_the_missing_cuda_device(board, resnet8, images, tmp_path_factory,
                                                                        capsys):
    """The board artifact's aarch64 host code loads in the board's runtime (every symbol resolved against
    glibc/libstdc++ and the TVM runtime); what stops it is the GPU, said in one error line."""
    out = _build(capsys, resnet8, images, tmp_path_factory, "jetson-tx2", "fp32")
    for name in ("RUNTIME.md", "run_model.py", "board_runner.cc"):  # the board side ships with the artifact
        assert (out / "deploy" / name).is_file(), name
    rc, _, err = run_cli(capsys, "eval", "--artifact", out, "--emulate", "--data", images)
    assert rc == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "no CUDA device" in errors[0] and "loaded" in errors[0], errors[0]
    assert "Traceback" not in err and "undefined symbol" not in err


# ---------------------------------------------------------------------------------------------------------------
# tuning through TVM's RPC server running inside the emulated board

KEY = "emulated-board-test"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulated_farm(board, tmp_path_factory):
    """A TVM RPC tracker on 127.0.0.1 (host Python) and the emulated board's RPC server registered under KEY."""
    import os
    import signal
    import subprocess
    import sys

    from compiler.errors import UserError
    from compiler.tuning.tracker import tracker_summary
    from targets.board_rpc import EmulatedServer

    port = _free_port()
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                                str(port), "--port-end", str(port + 1)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    logs = tmp_path_factory.mktemp("rpc")
    servers = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                tracker_summary("127.0.0.1", port, timeout=2)
                break
            except UserError:
                if time.monotonic() > deadline or tracker.poll() is not None:
                    pytest.fail("rpc_tracker did not come up")
                time.sleep(0.5)
        address = f"127.0.0.1:{port}"

        def start(wait: bool = True) -> EmulatedServer:
            server = EmulatedServer(address, KEY, port=_free_port(), log_path=logs / f"server{len(servers)}.log")
            servers.append(server)
            server.start()
            if wait:
                server.wait_registered()
            return server

        start()
        yield address, start, servers
    finally:
        for s in servers:
            s.stop()
        if tracker.poll() is None:
            os.killpg(tracker.pid, signal.SIGTERM)
            tracker.wait(timeout=10)


def _records(directory: Path) -> int:
    from compiler.tuning import database

    path = directory / database.RECORD_FILE
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_tune_through_the_emulated_server_survives_a_drop_and_build_applies_it(
        emulated_farm, resnet8, images, tmp_path, capsys):
    """tune --target aarch64-cpu --tracker --key: candidates cross-compiled here, uploaded to and run in the
    emulated board. The server is killed mid-tuning: the records are kept, tune stops with one clear error line,
    and the same command resumes once a server is back; build --tuning-log applies the database."""
    import subprocess
    import sys

    from compiler.tuning import database
    from targets.board_rpc import emulated_server

    address, start, servers = emulated_farm
    assert emulated_server(address, KEY)["note"].startswith("emulated aarch64 board")
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "compiler", "tune", "--target", "aarch64-cpu", "--checkpoint", str(resnet8[1]),
           "--precision", "fp32", "--trials", "16", "--trials-per-iter", "1", "--population", "8", "--seed", "0",
           "--tracker", address, "--key", KEY, "--log-dir", str(db), "--timeout", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 300
    # the kill comes once a few records are on disk (MetaSchedule's first round measures each of ResNet8's 12
    # tasks in turn: waiting for all of them tests nothing more)
    while _records(db) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    servers[-1].kill()  # the server and its session worker, without warning (and no supervisor restarts it)
    try:
        out, err = proc.communicate(timeout=240)  # tune notices within 2 x --timeout
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the RPC server under key") and "stopped serving" in last, err
    kept = _records(db)
    assert kept >= 3 and f"keeps all {kept} records" in last and "run the same command again" in last
    meta = json.loads((db / database.META_FILE).read_text())
    assert meta["trials"] == kept and not meta["sessions"][-1]["completed"]
    assert "say nothing about a real board" in meta["timing_note"]

    start()  # a server is back: the same command continues the same database
    done = subprocess.run(cmd[:cmd.index("--trials") + 1] + ["1"] + cmd[cmd.index("--trials") + 2:] + ["--json"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["trials"] == 1 and result["trials_total"] == kept + 1
    assert "[emulated board]" in json.loads((db / database.META_FILE).read_text())["sessions"][-1]["runner"]
    assert "say nothing about a real board" in done.stdout + done.stderr

    out_dir = tmp_path / "tuned"
    rc, _, err = run_cli(capsys, "build", "--target", "aarch64-cpu", "--checkpoint", resnet8[1], "--precision",
                         "fp32", "--data", images, "--out", out_dir, "--tuning-log", db)
    assert rc == 0, err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["tuning"]["database"] == str(db) and manifest["tuning"]["tasks_applied"] > 0


def test_cpp_runner_without_python_agrees_with_pytorch(board, aarch64_artifact, resnet8, tmp_path):
    """board_runner.cc, cross-built for aarch64 with zig against the board's TVM runtime, loads model.so and
    runs it in the emulated board with no Python at all."""
    from targets import emulate

    runner = emulate.build_runner()
    assert runner.read_bytes()[:4] == b"\x7fELF" and int.from_bytes(runner.read_bytes()[18:20], "little") == 183
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = emulate.run_runner(runner, [aarch64_artifact / "model.so", tmp_path / "x.npy", "--logits",
                                       tmp_path / "y.npy"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    with torch.inference_mode():
        ref = resnet8[0](torch.from_numpy(x)).numpy()
    got = np.load(tmp_path / "y.npy")
    assert got.shape == (3, 10) and np.abs(got - ref).max() < 1e-4
    lines = proc.stdout.strip().splitlines()
    assert [int(ln.split()[2]) for ln in lines] == ref.argmax(1).tolist()
    # a file that is not a model: one error line, no crash
    (tmp_path / "bad.so").write_bytes(b"not a library")
    bad = emulate.run_runner(runner, [tmp_path / "bad.so", tmp_path / "x.npy"], timeout=120)
    assert bad.returncode == 3 and bad.stderr.strip().startswith("error: loading"), bad.stderr
