"""Reading and running artifact folders written by ``build`` (model.so + manifest.json)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path


from compiler import console, data
from compiler.build import ARTIFACT_FORMAT, LIBRARY, MANIFEST, run_module
from compiler.errors import UserError
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


def evaluate(args) -> dict:
    executable, manifest = load_local(args.artifact)
    split = data.load_split(args.data, "test", download=args.download).head(args.limit)
    batch = manifest["input"]["shape"][0]
    chunk = max(batch, (args.batch_size // batch) * batch)
    t0 = time.perf_counter()
    correct = 0
    for i in console.progress(range(0, len(split), chunk), desc="eval artifact", unit="chunk"):
        x = data.normalize(split.images[i:i + chunk], manifest["input"]["normalize"]).numpy()
        logits = run_module(executable, x, batch)
        correct += int((logits.argmax(1) == split.labels[i:i + chunk].numpy()).sum())
    seconds = time.perf_counter() - t0
    result = {
        "model": manifest["model"],
        "artifact": str(args.artifact),
        "target": manifest["target"]["name"],
        "precision": manifest["precision"],
        "top1": round(100.0 * correct / max(len(split), 1), 2),
        "n": len(split),
        "seconds": round(seconds, 2),
    }
    print(console.table([result], ["model", "target", "precision", "top1", "n", "seconds", "artifact"]))
    return result
