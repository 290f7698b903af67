"""Reading and running artifact folders written by ``build`` (model.so + manifest.json)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from compiler import console, data
from compiler.build import ARTIFACT_FORMAT, LIBRARY, MANIFEST, run_module
from compiler.errors import UserError
from compiler.fileio import sha256_file


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not an artifact folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise UserError(f"{path} is not a manifest of this project (format {manifest.get('format')!r})")
    return manifest


def check_runs_here(folder: str | Path, manifest: dict) -> None:
    """A clear error unless the artifact was built for this machine's CPU."""
    if manifest["target"]["cross_compiled"] or manifest["target"]["kind"] != "cpu":
        raise UserError(f"{folder} was built for {manifest['target']['name']}, which this machine cannot run; "
                        "run it on the board (see deploy/README.md) or build with --target host")


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
    if not lib.is_file() or sha256_file(lib) != manifest["artifact"]["sha256"]:
        raise UserError(f"{lib} is missing or does not match the sha256 in its manifest")
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
