"""Issue 19: bad inputs and faults, each answered with one ``error:`` line (exit 2) that names the problem, and
nothing the user had is changed. One test per case of the issue, in its order; in-process and on resnet8."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from compiler import checkpoint, fileio
from compiler.checkpoint import save_checkpoint
from compiler.errors import UserError
from compiler.models import build_model
from helpers import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


def refused(capsys, pattern, *args):
    """Run the CLI in-process; assert exit 2 with exactly one ``error:`` line holding ``pattern`` and no
    warning raised on the way (pytest would otherwise swallow it, where a user sees it on stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli(capsys, *args)
    assert_user_error(result, pattern)
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert not shown, [str(w.message) for w in shown]
    return result


def tree(path: Path) -> dict:
    """Everything under ``path`` (names and bytes), to show it is unchanged."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def write_npz(folder: Path, split: str, x, y) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"cifar10_{split}.npz", x=x, y=y)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A folder with tiny train/test npz files and checkpoints: r8.pt (random resnet8), done.pt (a finished
    `train` run as the zoo takes it)."""
    d = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("test", 16)):
        write_npz(d, split, rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))
    torch.manual_seed(0)
    m = build_model("resnet8").eval()
    save_checkpoint(d / "r8.pt", "resnet8", m, "cifar")
    save_checkpoint(d / "done.pt", "resnet8", m, "cifar",
                    metrics={"history": [{"epoch": 1, "seconds": 1.0}], "epochs": 1, "top1": 10.0},
                    train_state={"epoch": 1, "epochs": 1, "optimizer": None})
    return d


@pytest.fixture(scope="module")
def built(small, tmp_path_factory) -> Path:
    """A real host fp32 artifact of resnet8 (about 10 s)."""
    out = tmp_path_factory.mktemp("built") / "art"
    from compiler.cli import main

    assert main(["build", "--target", "host", "--precision", "fp32", "--checkpoint", str(small / "r8.pt"),
                 "--data", str(small), "--out", str(out)]) == 0
    return out


@pytest.fixture
def unwritable(tmp_path):
    """A folder nobody may create files in (root may write anywhere but /proc)."""
    if os.geteuid() == 0:
        yield Path("/proc/no-such-folder")
        return
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o500)
    yield d
    d.chmod(0o700)


def save_obj(path: Path, **changes) -> Path:
    """A project-format checkpoint of a random resnet8 with some fields replaced."""
    obj = {"format": checkpoint.FORMAT, "version": 1, "model": "resnet8", "normalize": "cifar",
           "state_dict": build_model("resnet8").state_dict(), "pruning": None, "metrics": {}}
    obj.update(changes)
    torch.save(obj, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# 1. data loss: only an earlier output of this project is replaced


@pytest.mark.parametrize("case", ["file", "user-folder", "the-checkpoint", "folder-holding-checkpoint", "cwd",
                                  "parent-of-cwd"])
def test_build_out_never_replaces_what_is_not_ours(capsys, small, tmp_path, monkeypatch, case):
    ck = tmp_path / "models" / "c.pt"
    ck.parent.mkdir()
    shutil.copy(small / "r8.pt", ck)
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.txt").write_text("x")
    monkeypatch.chdir(work)
    out, pattern = {
        "file": (work / "thesis.txt", "not a folder"),
        "user-folder": (work, "neither empty nor an earlier artifact"),
        "the-checkpoint": (ck, "holds the input"),
        "folder-holding-checkpoint": (ck.parent, "holds the input"),
        "cwd": (Path("."), "working folder"),
        "parent-of-cwd": (Path(".."), "working folder"),
    }[case]
    if case == "user-folder":
        out = tmp_path / "d"
        out.mkdir()
        (out / "thesis.txt").write_text("my thesis")
    before = tree(tmp_path)
    refused(capsys, pattern, "build", "--target", "host", "--precision", "fp32", "--checkpoint", ck, "--out", out)
    assert tree(tmp_path) == before


def test_atomic_dir_replaces_only_its_own_output(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "manifest.json").write_text('{"format": "mine"}')
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "a.txt").write_text("keep")
    empty = tmp_path / "empty"
    empty.mkdir()
    is_ours = lambda p: (p / "manifest.json").is_file()  # noqa: E731
    for folder in (ours, empty):
        with fileio.atomic_dir(folder, replace_if=is_ours) as tmp:
            (tmp / "new.txt").write_text("new")
        assert [p.name for p in folder.iterdir()] == ["new.txt"]
    with pytest.raises(UserError, match="not an earlier output"), fileio.atomic_dir(theirs, replace_if=is_ours):
        pass
    assert (theirs / "a.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "ours", "theirs"]  # no temporary left


def test_every_writer_refuses_a_user_folder(capsys, small, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.txt").write_text("x")
    zoo = tmp_path / "zoo"
    (zoo / "resnet8.pt").mkdir(parents=True)  # a folder where --force would put the shipped file
    before = tree(tmp_path)
    ck, d = small / "r8.pt", small
    refused(capsys, "neither empty nor an earlier report", "report", "--models", "resnet8", "--checkpoint", ck,
            "--data", d, "--out", user)
    refused(capsys, f"--keep {user} is a folder that is neither empty nor an earlier keep folder of compare",
            "compare", "--checkpoint", ck, "--data", d, "--keep", user)
    refused(capsys, "is a folder, not a file", "zoo", "--add", small / "done.pt", "--data", d, "--zoo-dir", zoo,
            "--force")
    refused(capsys, "neither empty nor an earlier tuning log", "tune", "--target", "host", "--model", "resnet8",
            "--trials", 1, "--log-dir", user)
    refused(capsys, "is a folder, not a file", "train", "--model", "resnet8", "--data", d, "--epochs", 1,
            "--out", user)
    refused(capsys, "is a folder, not a file", "prune", "--checkpoint", ck, "--data", d, "--flops-reduction", 0.5,
            "--finetune-epochs", 0, "--out", user)
    refused(capsys, "working folder", "train", "--model", "resnet8", "--data", d, "--epochs", 1, "--out", ".")
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# 2. tracebacks where a line belongs


@pytest.mark.parametrize("verb", ["build", "report", "compare", "zoo", "tune", "train", "prune"])
def test_unwritable_output_is_refused_before_the_work(capsys, small, unwritable, verb):
    ck, d, out = small / "r8.pt", small, unwritable / "out"
    args = {
        "build": ["build", "--target", "host", "--checkpoint", ck, "--out", out],
        "report": ["report", "--models", "resnet8", "--checkpoint", ck, "--data", d, "--out", out],
        "compare": ["compare", "--checkpoint", ck, "--data", d, "--keep", out],
        "zoo": ["zoo", "--add", small / "done.pt", "--data", d, "--zoo-dir", out],
        "tune": ["tune", "--target", "host", "--model", "resnet8", "--trials", 1, "--log-dir", out],
        "train": ["train", "--model", "resnet8", "--data", d, "--epochs", 1, "--out", out],
        "prune": ["prune", "--checkpoint", ck, "--data", d, "--flops-reduction", 0.5, "--finetune-epochs", 0,
                  "--out", out],
    }[verb]
    t0 = time.perf_counter()
    refused(capsys, "cannot write", *args)
    assert time.perf_counter() - t0 < 30  # before the work (train: before an epoch)


def test_compare_keep_an_existing_file(capsys, small, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    refused(capsys, "exists and is not a folder", "compare", "--checkpoint", small / "r8.pt", "--data", small,
            "--keep", f)
    assert f.read_text() == "mine"


@pytest.mark.parametrize("via", ["--data", "CIFAR10_DIR"])
def test_corrupted_npz(capsys, small, tmp_path, monkeypatch, via):
    (tmp_path / "cifar10_test.npz").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a zip header, then nothing
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))
    data_args = ["--data", tmp_path] if via == "--data" else []
    refused(capsys, "not a CIFAR-10 npz", "eval", "--checkpoint", small / "r8.pt", *data_args)


def test_train_labels_outside_0_to_9(capsys, tmp_path):
    rng = np.random.default_rng(0)
    write_npz(tmp_path, "train", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), np.full(8, 10))
    write_npz(tmp_path, "test", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), np.zeros(8, np.int64))
    refused(capsys, "0..9, found 10", "train", "--model", "resnet8", "--data", tmp_path, "--epochs", 1,
            "--out", tmp_path / "t.pt")
    assert not (tmp_path / "t.pt").exists()


MANIFEST_DAMAGE = {
    "no-input": (lambda m: m.pop("input"), "field input is missing"),
    "no-target": (lambda m: m.pop("target"), "field target is missing"),
    "no-artifact": (lambda m: m.pop("artifact"), "field artifact is missing"),
    "no-input-shape": (lambda m: m["input"].pop("shape"), "field input.shape is missing"),
    "batch-0": (lambda m: m["input"]["shape"].__setitem__(0, 0), "input.shape[0]"),
    "shape-string": (lambda m: m["input"].__setitem__("shape", "1x3x32x32"), "input.shape"),
    "target-kind-int": (lambda m: m["target"].__setitem__("kind", 3), "target.kind"),
    "sha-not-hex": (lambda m: m["artifact"].__setitem__("sha256", "abc"), "artifact.sha256"),
    "list": (lambda m: [m], "holds a JSON list, not a JSON object"),
}


@pytest.mark.parametrize("verb", ["eval", "bench", "compare"])
@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_damaged_manifest_names_the_field(capsys, small, built, tmp_path, verb, damage):
    art = tmp_path / "art"
    shutil.copytree(built, art)
    change, pattern = MANIFEST_DAMAGE[damage]
    m = json.loads((art / "manifest.json").read_text())
    m = change(m) if damage == "list" else (change(m), m)[1]
    (art / "manifest.json").write_text(json.dumps(m))
    args = {"eval": ["eval", "--artifact", art, "--data", small],
            "bench": ["bench", "--artifact", art, "--repeat", 1],
            "compare": ["compare", "--checkpoint", small / "r8.pt", "--data", small, "--artifact", art]}[verb]
    refused(capsys, pattern, *args)


@pytest.mark.parametrize("field,value", [("model", 5), ("metrics", "good"), ("pruning", "yes"),
                                         ("train_state", "epoch 3")])
@pytest.mark.parametrize("verb", ["eval", "compare", "train"])
def test_checkpoint_fields_of_the_wrong_type(capsys, small, tmp_path, field, value, verb):
    bad = save_obj(tmp_path / "bad.pt", **{field: value})
    before = bad.read_bytes()
    args = {"eval": ["eval", "--checkpoint", bad, "--data", small],
            "compare": ["compare", "--checkpoint", bad, "--data", small],
            "train": ["train", "--model", "resnet8", "--data", small, "--epochs", 1, "--out", bad]}[verb]
    refused(capsys, f"field '{field}' must be", *args)
    assert bad.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# 3. silently wrong results


@pytest.mark.parametrize("labels,pattern", [
    (np.zeros((16, 1), np.int64), "one-dimensional"),
    (np.full(16, 12), "0..9, found 12"),
    (np.full(16, -1), "0..9, found -1"),
    (np.zeros(16, np.float32), "must be integers"),
], ids=["shape-N-1", "label-12", "label-minus-1", "float"])
def test_eval_refuses_bad_labels(capsys, small, tmp_path, labels, pattern):
    write_npz(tmp_path, "test", np.zeros((16, 32, 32, 3), np.uint8), labels)
    refused(capsys, pattern, "eval", "--checkpoint", small / "r8.pt", "--data", tmp_path)


def test_eval_refuses_zero_images(capsys, small, tmp_path):
    write_npz(tmp_path, "test", np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))
    refused(capsys, "holds no images", "eval", "--checkpoint", small / "r8.pt", "--data", tmp_path)


@pytest.mark.parametrize("kind", ["nan", "int"])
@pytest.mark.parametrize("verb", ["eval", "prune"])
def test_nan_or_integer_weights_are_refused(capsys, small, tmp_path, kind, verb):
    sd = build_model("resnet8").state_dict()
    if kind == "nan":
        sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    else:
        sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"].long()
    bad = save_obj(tmp_path / "bad.pt", state_dict=sd)
    out = tmp_path / "pruned.pt"
    args = {"eval": ["eval", "--checkpoint", bad, "--data", small],
            "prune": ["prune", "--checkpoint", bad, "--data", small, "--flops-reduction", 0.5,
                      "--finetune-epochs", 0, "--out", out]}[verb]
    refused(capsys, "NaN or infinite" if kind == "nan" else "expected floating-point", *args)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. bounds


def test_build_batch_limit(capsys, small, tmp_path):
    refused(capsys, "between 1 and 1024", "build", "--target", "host", "--checkpoint", small / "r8.pt",
            "--batch", 100000, "--out", tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("verb", ["eval", "build"])
def test_model_depth_limit(capsys, small, tmp_path, verb):
    t0 = time.perf_counter()
    args = {"eval": ["eval", "--model", "resnet6000002", "--checkpoint", small / "r8.pt", "--data", small],
            "build": ["build", "--target", "host", "--model", "resnet6000002", "--out", tmp_path / "a"]}[verb]
    refused(capsys, "the limit is resnet1202", *args)
    assert time.perf_counter() - t0 < 10


# ---------------------------------------------------------------------------------------------------------------
# 5. messages that name the right problem


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_pickle_says_it_would_run_code(capsys, small, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": build_model("resnet8").state_dict(), "x": RunsCode()}, evil)
    _, out, _ = refused(capsys, "the file would run code", "eval", "--checkpoint", evil, "--data", small)
    assert "pwned" not in out


def test_folder_where_a_file_is_expected(capsys, small, tmp_path):
    refused(capsys, "is a folder, not a checkpoint file", "eval", "--checkpoint", tmp_path, "--data", small)
    (tmp_path / "cifar10_test.npz").mkdir()
    refused(capsys, "is a folder, not an npz file", "eval", "--checkpoint", small / "r8.pt", "--data", tmp_path)
    refused(capsys, "is a file, not a folder", "eval", "--checkpoint", small / "r8.pt", "--data", small / "r8.pt")


def test_build_of_a_nan_model_names_nan(capsys, tmp_path):
    m = build_model("resnet8")
    with torch.no_grad():
        m.linear.bias.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pt", "resnet8", m, "cifar")
    refused(capsys, "NaN", "build", "--target", "host", "--precision", "fp32", "--checkpoint", tmp_path / "nan.pt",
            "--out", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_zoo_dir_that_is_a_file(capsys, small):
    refused(capsys, "is a file, not a folder", "zoo", "--zoo-dir", small / "r8.pt")


def test_eval_checkpoint_with_artifact_is_refused(capsys, small, built):
    refused(capsys, "--checkpoint cannot be used with --artifact", "eval", "--artifact", built,
            "--checkpoint", small / "r8.pt", "--data", small)


def test_truncated_library_with_matching_sha256(capsys, small, built, tmp_path):
    """Loading it would die of SIGBUS: the recorded size catches it (in-process: it is checked before any load);
    without a recorded size the ELF headers do (in a child process, in case they did not)."""
    art = tmp_path / "art"
    shutil.copytree(built, art)
    lib = art / "model.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    m = json.loads((art / "manifest.json").read_text())
    m["artifact"]["sha256"] = hashlib.sha256(lib.read_bytes()).hexdigest()
    (art / "manifest.json").write_text(json.dumps(m))
    refused(capsys, "bytes, its manifest records", "eval", "--artifact", art, "--data", small)
    m["artifact"].pop("bytes")
    (art / "manifest.json").write_text(json.dumps(m))
    r = subprocess.run([sys.executable, "-m", "compiler", "eval", "--artifact", str(art), "--data", str(small)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and "is truncated" in r.stderr, r.stderr


def test_tracker_hint_works_for_ports_above_9199():
    import re
    import socket

    from compiler.tuning.tracker import tracker_summary

    with socket.socket() as s:  # a free port, above TVM's default --port-end
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert port > 9199
    with pytest.raises(UserError) as e:
        tracker_summary("127.0.0.1", port, timeout=2)
    cmd = re.search(r"`(python -m tvm\.exec\.rpc_tracker [^`]*)`", str(e.value)).group(1).split()
    start, end = int(cmd[cmd.index("--port") + 1]), int(cmd[cmd.index("--port-end") + 1])
    assert start == port and end > port  # the tracker binds the first free port in [port, port-end)


def test_progress_without_a_terminal_writes_a_plain_line_now_and_then(monkeypatch):
    """Long work shows progress in a log file too: no terminal -> a line of its own every LOG_LINE_SECONDS, also
    while one step runs for minutes (compare's TVM builds at batch 64 ran 36 min without a word), no redraws, and
    nothing after close."""
    import io
    import time

    from compiler import console

    monkeypatch.setattr(console, "LOG_LINE_SECONDS", 0.05)
    log = io.StringIO()
    bar = console.progress(total=6, desc="compare", unit="step", file=log)
    bar.set_postfix_str("tvm")
    time.sleep(0.4)  # a long step: nothing calls update
    bar.update()
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 3, text
    assert all(line.startswith("compare: ") and " steps [" in line and line.endswith(", tvm") for line in lines)
    assert lines[0].startswith("compare: 0/6 steps [")
    time.sleep(0.2)
    assert log.getvalue() == text  # closed: silent
    assert list(console.progress(range(3), desc="x", file=io.StringIO())) == [0, 1, 2]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert not isinstance(console.progress(total=1, file=Terminal()), console.LogLines)  # a terminal: tqdm's bar
    assert console.progress(total=1, file=io.StringIO(), disable=True).disable  # asked for none: none


def test_an_unclosed_progress_stops_writing_once_dropped(monkeypatch):
    """A bar an exception left unclosed (a build that failed midway, caught by a library user) goes quiet when it
    is dropped: its line thread holds it weakly."""
    import gc
    import io
    import time

    from compiler import console

    monkeypatch.setattr(console, "LOG_LINE_SECONDS", 0.05)
    log = io.StringIO()

    def fails_midway():
        bar = console.progress(total=5, desc="build", unit="step", file=log)
        bar.update()
        time.sleep(0.2)
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError):
        fails_midway()
    gc.collect()
    written = log.getvalue()
    assert written.startswith("build: 1/5 steps [")
    time.sleep(0.3)
    assert log.getvalue() == written
