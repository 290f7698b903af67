"""Atomic writes: a file is written under a temporary name in its final folder, then renamed into place.

An interrupted run therefore never leaves a half-written artifact, checkpoint or tuning database behind, and
never clobbers what the user had with something incomplete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from compiler.errors import SettingError, UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_writable(path: str | os.PathLike, field: str = "out") -> Path:
    """Pre-flight before the work starts: ``path`` (a file or folder, existing or not) can be created or replaced.

    The nearest existing folder at or above ``path`` must take a new file (tried, not guessed from mode bits).
    A refusal is a :class:`SettingError` on ``field``, the setting that named ``path``.
    """
    path = Path(path).expanduser()
    probe = path.absolute() if path.is_dir() else path.absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SettingError(field, f"{path}: cannot write there, {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".write-test."):
            pass
    except OSError as e:
        raise SettingError(field, f"{path}: cannot write there, {probe} is not writable ({e.strerror or e})") from None
    return path


def check_output(path: str | os.PathLike, *, kind: str = "folder", is_ours: Callable[[Path], bool] | None = None,
                 what: str = "output of this project", inputs: Iterable = (), field: str = "out") -> Path:
    """The one rule for everything a verb writes: never replace what this project did not write.

    Refused: the working folder or one of its parents, a path that is or holds one of ``inputs`` (the checkpoint
    ...), a file where a folder is wanted (and the reverse), and an existing non-empty folder (``kind="folder"``)
    or existing file (``kind="file"``) unless ``is_ours(path)`` recognises it as this project's earlier output.
    An empty folder may be used. Then :func:`check_writable`. Nothing is changed here. A refusal is a
    :class:`SettingError` on ``field``, the setting that named ``path`` (the CLI names its flag).
    """
    path = Path(path).expanduser()
    real = path.resolve()
    cwd = Path.cwd().resolve()
    keep = f"choose another {kind} (nothing was changed)"

    def refuse(problem: str):
        return SettingError(field, f"{path} {problem}; {keep}")

    if _within(cwd, real):
        raise refuse("is the working folder or one of its parents")
    for item in inputs:
        if item is not None and _within(Path(item).expanduser().resolve(), real):
            raise refuse(f"is or holds the input {item}")
    if path.exists() or path.is_symlink():
        if kind == "folder":
            if not path.is_dir():
                raise refuse("exists and is not a folder")
            try:
                used = any(path.iterdir())
            except OSError as e:
                raise refuse(f"cannot be read ({e.strerror or e})") from None
            if used and not (is_ours is not None and is_ours(path)):
                raise refuse(f"is a folder that is neither empty nor an earlier {what}")
        else:
            if path.is_dir():
                raise refuse("is a folder, not a file")
            if not (is_ours is not None and is_ours(path)):
                raise refuse(f"exists and is not an earlier {what}")
    return check_writable(path, field)


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace_if: Callable[[Path], bool] | None = None):
    """Yield a temporary folder beside ``path``; it replaces ``path`` only when the block succeeds.

    An existing folder at ``path`` is replaced only when it is empty or ``replace_if(path)`` holds (this
    project's earlier output; see :func:`check_output`), else UserError before anything is written. It is moved
    aside first and removed only after the new one is in place.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not (
            is_empty_dir(path) or (path.is_dir() and not path.is_symlink() and replace_if and replace_if(path))):
        raise UserError(f"{path} exists and is not an earlier output of this project; nothing was changed")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "prev")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
