"""Reading and running artifact folders written by ``build`` (model.so + manifest.json)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import torch

from compiler import console, data
from compiler.build import ARTIFACT_FORMAT, LIBRARY, MANIFEST, run_module
from compiler.errors import SettingError, UserError
from compiler.fileio import sha256_file


_STR = {"type": "string", "minLength": 1}
# what eval, bench, compare and report read from a manifest; build writes more (see compiler/build.py)
MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["format", "model", "target", "precision", "input", "artifact", "checkpoint"],
    "properties": {
        "format": {"const": ARTIFACT_FORMAT},
        "model": _STR,
        "precision": _STR,
        "target": {"type": "object", "required": ["name", "kind", "cross_compiled"],
                   "properties": {"name": _STR, "kind": _STR, "cross_compiled": {"type": "boolean"},
                                  "cpu_features": {"type": ["array", "null"], "items": _STR}}},
        "input": {"type": "object", "required": ["shape", "normalize"],
                  "properties": {"shape": {"type": "array", "minItems": 4, "maxItems": 4,
                                           "prefixItems": [{"type": "integer", "minimum": 1},
                                                           {"const": 3}, {"const": 32}, {"const": 32}],
                                           "items": {"type": "integer", "minimum": 1}},
                                 "normalize": {"enum": sorted(data.NORMALIZATIONS)}}},
        "artifact": {"type": "object", "required": ["file", "sha256"],
                     "properties": {"file": _STR, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                    "bytes": {"type": "integer", "minimum": 1}}},
        "checkpoint": {"type": "object",
                       "properties": {"sha256": {"type": ["string", "null"]}, "pruning": {"type": "boolean"}}},
        "tuning": {"type": ["object", "null"]},
    },
}


def _schema_error(error) -> str:
    """One line naming the field: ``input.shape[0]: 0 is less than the minimum of 1``."""
    where = ""
    for part in error.absolute_path:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    message = error.message
    if error.validator == "required":  # "'input' is a required property": name it with its parent
        missing = message.split("'")[1] if message.count("'") >= 2 else message
        return f"field {where + '.' if where else ''}{missing} is missing"
    if error.validator == "const" and where == "format":
        return f"format {error.instance!r} is not {ARTIFACT_FORMAT!r}"
    return f"field {where or '(top level)'} is wrong: {message}"


def validate_manifest(manifest, path: str | Path) -> dict:
    """``manifest`` against :data:`MANIFEST_SCHEMA`; UserError naming the first wrong field."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        if not isinstance(manifest, dict):
            raise UserError(f"{path} is not a manifest of this project: it holds a JSON "
                            f"{type(manifest).__name__.replace('dict', 'object')}, not a JSON object")
        if error.validator == "const" and list(error.absolute_path) == ["format"]:
            raise UserError(f"{path} is not a manifest of this project ({_schema_error(error)})")
        raise UserError(f"{path}: {_schema_error(error)}; the artifact is damaged, rebuild it")
    return manifest


def is_artifact(folder: str | Path) -> bool:
    """Whether ``folder`` is an artifact folder this project wrote (its manifest names our format): what build may
    replace. Read loosely on purpose: an older or damaged artifact of ours may still be rebuilt in place."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == ARTIFACT_FORMAT


def read_manifest(folder: str | Path) -> dict:
    """The one place manifests are read: parsed and validated (see :data:`MANIFEST_SCHEMA`)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not an artifact folder")
    if not folder.exists():
        raise UserError(f"artifact folder {folder} does not exist")
    if not path.is_file():
        raise UserError(f"{folder} is not an artifact folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    return validate_manifest(manifest, path)


def check_library(lib: Path, manifest: dict) -> None:
    """Before the library is loaded: present, its size as recorded, the sha256 as recorded, and an ELF file whose
    headers and segments fit in the file (a truncated .so would crash the process with SIGBUS when mapped)."""
    from targets import elf

    if not lib.is_file():
        raise UserError(f"{lib} is missing; rebuild the artifact")
    size = lib.stat().st_size
    want = manifest["artifact"].get("bytes")
    if want is not None and size != want:
        raise UserError(f"{lib} has {size} bytes, its manifest records {want}: the file is damaged; rebuild it")
    if sha256_file(lib) != manifest["artifact"]["sha256"]:
        raise UserError(f"{lib} does not match the sha256 in its manifest")
    try:
        need = elf.required_size(lib)
    except (ValueError, struct.error, IndexError) as e:
        raise UserError(f"{lib} is not a loadable shared library ({e}); rebuild the artifact") from None
    if need > size:
        raise UserError(f"{lib} is truncated: its ELF headers need {need} bytes, the file has {size}; "
                        "rebuild the artifact")


def check_runs_here(folder: str | Path, manifest: dict) -> None:
    """A clear error unless the artifact was built for this machine's CPU: a CPU target, and (x86) every CPU
    feature its code needs in this CPU's /proc/cpuinfo flags (an x86-64-v4 artifact on an AVX2-only CPU is refused
    here, before its code could stop the process with SIGILL)."""
    from targets import x86

    target = manifest["target"]
    if target["cross_compiled"] or target["kind"] != "cpu":
        raise UserError(f"{folder} was built for {target['name']}, which this machine cannot run; "
                        "run it on the board (see deploy/README.md) or build with --target host")
    missing = x86.missing_features(target.get("cpu_features") or [])
    if missing:
        raise UserError(f"{folder} was built for {target['name']}, whose code needs CPU features this CPU lacks: "
                        f"{', '.join(missing)} (not in /proc/cpuinfo); build it for this CPU's class "
                        f"(--target host or `python -m compiler targets`)")


def load_local(folder: str | Path):
    """(executable, manifest) of an artifact that runs on this machine; checks the library's sha256 and sets TVM to
    the thread count the build measured fastest (``manifest["runtime"]``; a user's TVM_NUM_THREADS wins)."""
    from compiler import threads

    threads.prepare_tvm()  # before `import tvm` can start a pool of the wrong size
    import tvm

    folder = Path(folder)
    manifest = read_manifest(folder)
    check_runs_here(folder, manifest)
    lib = folder / LIBRARY
    check_library(lib, manifest)
    with console.filter_native_stderr():
        executable = tvm.runtime.load_module(str(lib))
    manifest["runtime_applied"] = threads.apply_recorded(manifest)
    return executable, manifest


def evaluate(folder: str | Path, data_dir=None, *, limit: int | None = None, batch_size: int = 500,
             download: bool = False, progress: bool = True) -> dict:
    """Top-1 (%) of the artifact in ``folder`` on the first ``limit`` CIFAR-10 test images (all by default)."""
    if limit is not None and limit <= 0:
        raise SettingError("limit", "must be a positive number of images")
    if batch_size <= 0:
        raise SettingError("batch_size", "must be positive")
    art = Artifact.load(folder)
    art.executable  # loaded before the data: an artifact for another machine is refused first
    split = data.load_split(data_dir, "test", download=download).head(limit)
    chunk = max(art.batch, (batch_size // art.batch) * art.batch)
    t0 = time.perf_counter()
    correct = 0
    for i in console.progress(range(0, len(split), chunk), desc="eval artifact", unit="chunk",
                              disable=not progress or None):
        logits = art.run(split.images[i:i + chunk])
        correct += int((logits.argmax(1) == split.labels[i:i + chunk].numpy()).sum())
    return {
        "model": art.manifest["model"],
        "artifact": str(folder),
        "target": art.manifest["target"]["name"],
        "precision": art.manifest["precision"],
        "top1": round(100.0 * correct / max(len(split), 1), 2),
        "n": len(split),
        "seconds": round(time.perf_counter() - t0, 2),
    }


class Artifact:
    """A compiled artifact folder: its validated ``manifest`` and, for one built for this machine, ``run``."""

    def __init__(self, folder: str | Path, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        self._executable = None

    @classmethod
    def load(cls, folder: str | Path) -> "Artifact":
        """Read and validate the manifest (the library is loaded on the first :meth:`run`)."""
        return cls(folder, read_manifest(folder))

    @property
    def batch(self) -> int:
        return self.manifest["input"]["shape"][0]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def executable(self):
        """The loaded module (sha256 checked, TVM set to the recorded thread count); only for this machine."""
        if self._executable is None:
            self._executable, self.manifest = load_local(self.folder)
        return self._executable

    def preprocess(self, images) -> np.ndarray:
        """uint8 images (N, 3, 32, 32) or (N, 32, 32, 3) -> the normalized float32 NCHW input the module takes;
        float images are taken as already normalized NCHW."""
        x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        if x.dtype != torch.uint8:
            return np.ascontiguousarray(x.numpy(), dtype=np.float32)
        if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        return np.ascontiguousarray(data.normalize(x, self.manifest["input"]["normalize"]).numpy())

    def run(self, images) -> np.ndarray:
        """Logits (N, 10) of ``images`` (any N: run in chunks of the compiled batch)."""
        return run_module(self.executable, self.preprocess(images), self.batch)

    def __repr__(self) -> str:
        m = self.manifest
        return f"Artifact({str(self.folder)!r}, {m['model']}, {m['target']['name']}, {m['precision']}, batch {self.batch})"
