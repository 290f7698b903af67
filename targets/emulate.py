"""An emulated aarch64 board: an arm64 Debian userland with Python 3.11 and TVM 0.27's aarch64 runtime, run on
this CPU through qemu-user. No GPU: it runs ``aarch64-cpu`` artifacts, the host part of board artifacts, and
TVM's RPC server (so ``tune --tracker`` exercises the remote path a Jetson uses).

    python -m compiler board --emulate setup          # once; cached under ~/.cache/cifar-hybrid-compiler/
    python -m compiler eval --artifact DIR --emulate  # run an aarch64 artifact in it, compare with PyTorch

What the setup fetches (nothing is installed on this machine; everything lands in the cache folder):

- Debian arm64 packages (libc, libstdc++, Python 3.11, ...) through ``apt-get download`` with a private apt
  state (the system's sources, architecture arm64; no ``dpkg --add-architecture``), unpacked with ``dpkg -x``;
- the aarch64 wheels of the exact TVM this project uses (``pip download --platform ..._aarch64``), unpacked into
  ``sysroot/opt/site-packages``; TVM's compiler library is dropped (the board runs the runtime only,
  ``TVM_USE_RUNTIME_LIB=1``);
- ``bin/python3``: a wrapper that runs the guest Python under ``qemu-aarch64 -L sysroot``. It is also the
  guest's ``sys.executable``, so processes the guest starts (TVM's RPC server workers) run under qemu too.

The host needs ``qemu-aarch64`` (Debian package ``qemu-user``), ``apt-get`` + ``dpkg`` and pip. The folder is built
beside its final place and renamed when complete, so an interrupted setup leaves nothing half-made behind.
Emulated timings say nothing about a real board's speed (qemu translates every instruction; ~10x slower).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from compiler import fileio
from compiler.errors import UserError

FORMAT = "cifar-hybrid-compiler/board-aarch64/1"
DEBS = ("libc6 libstdc++6 libgcc-s1 zlib1g libffi8 libexpat1 libbz2-1.0 liblzma5 libssl3 libpython3.11-minimal "
        "libpython3.11-stdlib python3.11-minimal libncursesw6 libtinfo6 libreadline8 libsqlite3-0 libuuid1 libzstd1 "
        "libcrypt1 libdb5.3 libgdbm6 libnsl2 libtirpc3").split()
# no ml_dtypes (a dependency of apache-tvm that TVM and tvm_ffi import only if present, for bfloat16 / float8 arrays,
# which no artifact of this project has): its extension takes ~13 s of the ~19 s import tvm costs under qemu
WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy", "typing_extensions",
          "psutil", "cloudpickle", "tornado")
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64", "manylinux_2_17_aarch64")
GUEST_PYTHON = "3.11"
# TVM's compiler library: not needed on a board (runtime only), 229 MB
DROP = ("tvm/lib/libtvm_compiler.so",)
NOT_ON_BOARD = ("ml_dtypes",)  # packages an earlier setup put on the board, removed when it is next used
TIMING_NOTE = ("emulated aarch64 board (qemu-user on this machine's CPU): the timings say nothing about a real "
               "board's speed")

WRAPPER = r"""#!/bin/sh
# Python {py} of the emulated aarch64 board, run by qemu-user. Made by `python -m compiler board --emulate setup`.
HERE=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
export PYTHONPATH="$HERE/sysroot/opt/site-packages${{BOARD_PYTHONPATH:+:$BOARD_PYTHONPATH}}"
export PYTHONNOUSERSITE=1 TVM_USE_RUNTIME_LIB=1
# the guest's bytecode is cached in this folder even where the caller disables it: every guest Python start
# compiles its imports under qemu otherwise (import tvm: ~26 s instead of ~19 s)
unset PYTHONHOME PYTHONDONTWRITEBYTECODE
exec "${{BOARD_QEMU:-{qemu}}}" -L "$HERE/sysroot" -0 "$HERE/bin/python3" "$HERE/sysroot/usr/bin/python{py}" "$@"
"""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cifar-hybrid-compiler"


def board_dir() -> Path:
    """The emulated board's folder (env CIFAR_BOARD_DIR overrides it)."""
    return Path(os.environ.get("CIFAR_BOARD_DIR") or cache_root() / "board-aarch64")


def _say(msg: str) -> None:
    print(f"board: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# what the host needs


def find_qemu() -> str:
    for name in ("qemu-aarch64", "qemu-aarch64-static"):
        path = shutil.which(name)
        if path:
            return path
    raise UserError("the emulated board needs qemu-aarch64, from the Debian/Ubuntu package qemu-user "
                    "(apt-get install qemu-user); it is not on PATH")


def missing_host_tools() -> str | None:
    """A sentence naming what this machine lacks for the setup, or None."""
    try:
        find_qemu()
    except UserError as e:
        return str(e)
    for tool, package in (("apt-get", "apt"), ("dpkg", "dpkg")):
        if not shutil.which(tool):
            return (f"the emulated board's setup fetches Debian arm64 packages with {tool} (package {package}); "
                    "it is not on PATH (a Debian or Ubuntu machine is needed)")
    return None


# ---------------------------------------------------------------------------------------------------------------
# state


def info(folder: Path | None = None) -> dict | None:
    """The ready board's record (board.json), or None when it is not set up."""
    folder = folder or board_dir()
    try:
        record = json.loads((folder / "board.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("format") != FORMAT or not (folder / "bin" / "python3").is_file():
        return None
    return record


def python(folder: Path | None = None) -> Path:
    return (folder or board_dir()) / "bin" / "python3"


def sysroot(folder: Path | None = None) -> Path:
    return (folder or board_dir()) / "sysroot"


def site_packages(folder: Path | None = None) -> Path:
    return sysroot(folder) / "opt" / "site-packages"


def host_env() -> dict:
    """This process's environment without what would point the guest at the host's Python packages."""
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TVM_LIBRARY_PATH"):
        env.pop(k, None)
    return env


# ---------------------------------------------------------------------------------------------------------------
# set-up


def _run(cmd: list[str], what: str, cwd=None, env=None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        text = (proc.stdout + proc.stderr).strip()
        errors = [ln for ln in text.splitlines() if ln.startswith(("E:", "ERROR:", "error:"))]
        raise UserError(f"{what} failed: {' | '.join(errors[-3:]) or text[-500:]}")
    return proc.stdout


def _apt_options(state: Path) -> list[str]:
    """A private apt state: arm64 package lists of the system's sources, no change to the system's apt."""
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    return ["-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
            "-o", f"Dir::State::status={state / 'status'}", "-o", "APT::Architecture=arm64",
            "-o", "APT::Architectures::=arm64", "-o", "Debug::NoLocking=1",
            *(["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else [])]


def _fetch_debs(work: Path, root: Path) -> list[str]:
    opts = _apt_options(work / "apt")
    debs = work / "debs"
    debs.mkdir()
    _say("apt-get update (arm64 package lists, private state)")
    _run(["apt-get", "-q", *opts, "update"], "apt-get update for arm64")
    _say(f"apt-get download {len(DEBS)} arm64 packages (Python {GUEST_PYTHON}, glibc, libstdc++, ...)")
    try:
        _run(["apt-get", "-q", *opts, "download", *DEBS], "apt-get download", cwd=debs)
    except UserError as e:
        missing = [p for p in DEBS if p in str(e)]
        raise UserError(f"cannot fetch the arm64 package{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing) or '(see below)'} for the emulated board: {e}") from None
    files = sorted(debs.glob("*.deb"))
    for deb in files:
        _run(["dpkg", "-x", str(deb), str(root)], f"dpkg -x {deb.name}")
    return [f.name for f in files]


def _fetch_wheels(work: Path, root: Path) -> list[str]:
    wheels = work / "wheels"
    _say(f"pip download the aarch64 wheels ({', '.join(WHEELS)})")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary", ":all:",
           "--no-deps", "--python-version", GUEST_PYTHON, "-d", str(wheels)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    try:
        _run(cmd + list(WHEELS), "pip download of the aarch64 wheels")
    except UserError as e:
        raise UserError(f"cannot fetch the aarch64 wheels {', '.join(WHEELS)} for the emulated board: {e}") from None
    target = site_packages(root.parent)
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(w.name for w in wheels.glob("*.whl"))
    for name in names:
        with zipfile.ZipFile(wheels / name) as z:
            for member in z.infolist():
                out = z.extract(member, target)
                mode = (member.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(out, mode)
    for rel in DROP:
        (target / rel).unlink(missing_ok=True)
    return names


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def setup(force: bool = False) -> dict:
    """Set the emulated board up (or return the ready one's record). Progress lines go to stderr."""
    folder = board_dir()
    record = info(folder)
    if record and not force:
        _refresh(folder, record)
        return record
    problem = missing_host_tools()
    if problem:
        raise UserError(problem)
    qemu = find_qemu()
    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say(f"setting up the emulated aarch64 board in {folder} (first use: ~130 MB to download, ~175 MB on disk)")
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        new = work / "board"
        root = new / "sysroot"
        root.mkdir(parents=True)
        debs = _fetch_debs(work, root)
        wheels = _fetch_wheels(work, root)
        downloaded = _size(work / "debs") + _size(work / "wheels")
        (new / "bin").mkdir()
        wrapper = new / "bin" / "python3"
        wrapper.write_text(WRAPPER.format(py=GUEST_PYTHON, qemu=qemu))
        wrapper.chmod(0o755)
        _say("checking it: import tvm (runtime only), its RPC server and numpy in the emulated board (~15 s)")
        proc = subprocess.run([str(wrapper), "-c", "import platform, tvm, tvm.exec.rpc_server, numpy; "
                               "print(platform.machine(), platform.python_version(), tvm.__version__, "
                               "numpy.__version__, platform.libc_ver()[1])"],
                              capture_output=True, text=True, env=host_env(), timeout=300)
        if proc.returncode != 0:
            raise UserError(f"the emulated board was unpacked but its Python cannot import tvm: "
                            f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        machine, py, tvm_version, numpy_version, libc = proc.stdout.split()
        record = {"format": FORMAT, "machine": machine, "python": py, "tvm": tvm_version, "numpy": numpy_version,
                  "glibc": libc, "qemu": qemu, "debs": debs, "wheels": wheels, "downloaded_bytes": downloaded,
                  "disk_bytes": _size(new), "setup_seconds": round(time.perf_counter() - t0, 1),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": TIMING_NOTE}
        (new / "board.json").write_text(json.dumps(record, indent=1) + "\n")
        if not force and info(folder):  # another process finished the same set-up meanwhile: use that one
            return info(folder)
        if folder.exists():  # --force: the previous board is moved aside and removed once the new one is in place
            os.replace(folder, work / "previous")
        os.replace(new, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(f"ready in {record['setup_seconds']:.0f} s: {record['machine']} Python {record['python']}, "
         f"TVM {record['tvm']} (runtime only), glibc {record['glibc']}; "
         f"{record['downloaded_bytes'] / 1e6:.0f} MB downloaded, {record['disk_bytes'] / 1e6:.0f} MB on disk")
    return record


def _refresh(folder: Path, record: dict) -> None:
    """A board set up by an earlier version of this module gets the current wrapper and loses the packages it no
    longer has (:data:`NOT_ON_BOARD`): both are this module's own output; everything else in the folder is kept."""
    packages = site_packages(folder)
    for name in NOT_ON_BOARD:
        for path in [packages / name, *packages.glob(f"{name}-*.dist-info")]:
            shutil.rmtree(path, ignore_errors=True)
    wheels = [w for w in record.get("wheels", []) if not w.startswith(tuple(f"{n}-" for n in NOT_ON_BOARD))]
    if wheels != record.get("wheels", []):
        record["wheels"] = wheels
        with contextlib.suppress(OSError):
            fileio.write_text(folder / "board.json", json.dumps(record, indent=1) + "\n")
    wrapper = folder / "bin" / "python3"
    text = WRAPPER.format(py=GUEST_PYTHON, qemu=record.get("qemu") or find_qemu())
    try:
        if wrapper.read_text() == text:
            return
        with fileio.atomic_path(wrapper) as tmp:
            tmp.write_text(text)
            tmp.chmod(0o755)
    except OSError:  # a read-only board folder keeps the wrapper it has
        pass


def ensure() -> dict:
    """The ready board; set up (with progress) on first use."""
    return setup()


def run_guest(args: list[str], timeout: float | None = None, env_extra: dict | None = None,
              **kwargs) -> subprocess.CompletedProcess:
    """Run the guest Python with ``args``."""
    env = host_env()
    env.update(env_extra or {})
    return subprocess.run([str(python()), *args], env=env, timeout=timeout, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# running an artifact

RUN_MODEL = Path(__file__).resolve().parent / "board" / "run_model.py"


def _is_aarch64(manifest: dict) -> bool:
    tvm_target = manifest["target"].get("tvm") or {}
    host = tvm_target.get("host") or tvm_target
    return "aarch64" in str(host.get("mtriple", ""))


def run_artifact(folder: str | Path, images, manifest: dict, timeout: float | None = None) -> tuple:
    """(logits, facts) of ``folder``'s model.so run on ``images`` (normalized float32 N x 3 x 32 x 32) inside the
    emulated board. A problem the board reports (no CUDA device, a missing symbol) is a UserError."""
    import numpy as np

    from compiler.build import LIBRARY

    ensure()
    what = f"{Path(folder).name}/{LIBRARY} ({manifest['target']['name']})"
    with tempfile.TemporaryDirectory(prefix="board-eval-") as tmp:
        x_path, y_path = Path(tmp) / "images.npy", Path(tmp) / "logits.npy"
        np.save(x_path, np.ascontiguousarray(images, dtype=np.float32))
        proc = run_guest([str(RUN_MODEL), str(Path(folder) / LIBRARY), str(x_path), str(y_path),
                          "--batch", str(manifest["input"]["shape"][0]),
                          "--device", "cuda" if manifest["target"]["kind"] == "cuda" else "cpu", "--what", what],
                         timeout=timeout, capture_output=True, text=True)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        if proc.returncode != 0:
            if errors:
                raise UserError(f"on the emulated aarch64 board: {errors[-1][len('error: '):]}")
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise UserError(f"{what} failed on the emulated aarch64 board (exit {proc.returncode}): {tail}")
        facts = json.loads(proc.stdout.strip().splitlines()[-1])
        return np.load(y_path), facts


def evaluate(artifact: str | Path, data_dir=None, *, limit: int | None = None, download: bool = False) -> dict:
    """``eval --artifact DIR --emulate``: top-1 of a board artifact run in the emulated board, and its max |diff|
    against PyTorch (the checkpoint the manifest names) on the same images."""
    import numpy as np
    import torch

    from compiler import console, data
    from compiler.artifact import check_library, read_manifest
    from compiler.build import LIBRARY

    folder = Path(artifact)
    manifest = read_manifest(folder)
    if not _is_aarch64(manifest):
        raise UserError(f"{folder} was built for {manifest['target']['name']}, not for an aarch64 board; "
                        "--emulate runs aarch64 artifacts (targets aarch64-cpu, jetson-*): drop --emulate to run "
                        "it here")
    check_library(folder / LIBRARY, manifest)  # size and sha256, as for a local load
    split = data.load_split(data_dir, "test", download=download).head(limit)
    x = data.normalize(split.images, manifest["input"]["normalize"]).numpy()
    ensure()
    _say(f"running {len(x)} images through {manifest['target']['name']} {LIBRARY} in the emulated board "
         f"(qemu, ~10x slower than this CPU)")
    t0 = time.perf_counter()
    logits, facts = run_artifact(folder, x, manifest)
    seconds = time.perf_counter() - t0
    labels = split.labels.numpy()
    result = {
        "model": manifest["model"], "artifact": str(folder), "target": manifest["target"]["name"],
        "precision": manifest["precision"], "ran_on": f"emulated {facts['machine']} (qemu-user), TVM "
                                                      f"{facts['tvm']} runtime, Python {facts['python']}",
        "top1": round(100.0 * float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0, 2),
        "n": len(split), "seconds": round(seconds, 2), "board": str(board_dir()), "timing_note": TIMING_NOTE,
        "pytorch_top1": None, "max_abs_diff": None, "argmax_agreement": None,
        "tolerance": (manifest.get("verification") or {}).get("tolerance"), "within_tolerance": None,
    }
    ck = manifest.get("checkpoint") or {}
    if ck.get("path") and Path(ck["path"]).is_file() and not ck.get("note"):
        from compiler import zoo

        ckpt = zoo.load(manifest["model"], ck["path"], manifest["input"]["normalize"])
        if ck.get("sha256") and ckpt.sha256 != ck["sha256"]:
            result["pytorch_note"] = f"{ck['path']} changed since the build: no PyTorch comparison"
        else:
            with torch.inference_mode():
                ref = torch.cat([ckpt.model.eval()(torch.from_numpy(x[i:i + 500]))
                                 for i in range(0, len(x), 500)]).numpy()
            diff = float(np.abs(logits - ref).max()) if len(ref) else 0.0
            result.update(pytorch_top1=round(100.0 * float((ref.argmax(1) == labels).mean()), 2),
                          max_abs_diff=diff, argmax_agreement=round(float((ref.argmax(1) == logits.argmax(1)).mean()), 4))
            if result["tolerance"] is not None:
                result["within_tolerance"] = bool(diff <= result["tolerance"])
    else:
        result["pytorch_note"] = "the manifest names no checkpoint found here: no PyTorch comparison"
    cols = ["model", "target", "precision", "top1", "pytorch_top1", "max_abs_diff", "tolerance", "n", "seconds"]
    print(console.table([result], cols))
    print(f"ran on: {result['ran_on']} (its seconds say nothing about a real board's speed)")
    if result.get("pytorch_note"):
        print(f"note: {result['pytorch_note']}")
    elif result["within_tolerance"] is False:
        console.warn(f"max |diff| {result['max_abs_diff']:.3g} exceeds the {manifest['precision']} tolerance "
                     f"{result['tolerance']:.3g}")
    return result


# ---------------------------------------------------------------------------------------------------------------
# the Python-free runner (targets/board/board_runner.cc), built for aarch64 with zig against the board's runtime

RUNNER_SOURCE = Path(__file__).resolve().parent / "board" / "board_runner.cc"


def build_runner(out: str | Path | None = None) -> Path:
    """Cross-compile board_runner.cc for aarch64 glibc 2.27 with zig against the aarch64 wheels' libtvm_ffi.so and
    libtvm_runtime.so (of the emulated board's folder); cached there by source hash unless ``out`` is given.
    The first build compiles zig's libc++ for aarch64 (minutes); later ones take seconds."""
    import hashlib

    from targets import AARCH64_TRIPLE, BOARD_GLIBC
    from targets.export import zig_command

    ensure()
    source = RUNNER_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    target = Path(out) if out else board_dir() / "bin" / f"board_runner-{digest}"
    if target.is_file() and out is None:
        return target
    site = site_packages()
    cc = [*zig_command()[:-1], "c++"]  # python -m ziglang c++
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    cmd = [*cc, "-target", f"{AARCH64_TRIPLE}.{BOARD_GLIBC}", "-O2", "-std=c++17", "-s",
           "-I", str(site / "tvm_ffi" / "include"), str(RUNNER_SOURCE), "-L", str(site / "tvm_ffi" / "lib"),
           "-L", str(site / "tvm" / "lib"), "-Wl,--no-as-needed", "-ltvm_ffi", "-ltvm_runtime", "-o", str(tmp)]
    _say("building board_runner (C++, no Python) for aarch64 with zig (the first build compiles libc++: minutes)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise UserError(f"zig could not build board_runner for aarch64: {(proc.stderr or proc.stdout)[-800:]}")
    os.replace(tmp, target)
    return target


def run_runner(runner: str | Path, args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run the aarch64 ``board_runner`` in the emulated board (qemu-user, the board's libraries, no Python)."""
    record = ensure()
    site = site_packages()
    libs = f"{site / 'tvm' / 'lib'}:{site / 'tvm_ffi' / 'lib'}"
    return subprocess.run([record["qemu"], "-L", str(sysroot()), "-E", f"LD_LIBRARY_PATH={libs}", str(runner),
                           *map(str, args)], capture_output=True, text=True, timeout=timeout, env=host_env())
