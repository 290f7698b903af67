"""Executable -> the .so (host code linked for the target's CPU, CUDA cubin embedded) and, for boards, deploy/.

Host targets link with TVM's default (this machine's C compiler). Cross-compiled targets link with zig from pip
(``python -m ziglang cc -target aarch64-linux-gnu.2.27``): glibc 2.27 is JetPack 4.6's, so the .so needs no
newer symbol. CUDA modules are written into the .so's embedded module blob as an sm_XX cubin compiled by
:mod:`targets.cuda` (TVM would otherwise keep the CUDA C and compile it on the board at load time).

For a board, ``deploy/`` next to the .so holds what the board needs: README.md (runtime, loading, RPC, rebuilding
the cubin), kernels.cu (the CUDA C), kernels.ptx, model_cuda_source.so (the same model with the CUDA C instead of
the cubin: loading it compiles with the board's own nvcc through tvm_callback_cuda_compile), load_on_board.py,
and the TVM runtime recipe (build_tvm_runtime.sh + its patch; untested on a board).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from compiler.errors import UserError
from targets import TargetSpec, elf
from targets.cuda import CudaBinary, compile_cuda, portable_source
from targets.library_bin import LibraryBin, CudaPayload, assembly

BOARD_DIR = Path(__file__).resolve().parent / "board"


# ---------------------------------------------------------------------------------------------------------------
# linkers


def zig_command() -> list[str]:
    try:
        import ziglang  # noqa: F401 - only to say what to install
    except ImportError as e:
        raise UserError("cross-linking needs zig from pip: pip install ziglang") from e
    return [sys.executable, "-m", "ziglang", "cc"]


def zig_fcompile(zig_target: str | None):
    """An ``fcompile`` for TVM's export_library: ``zig cc [-target T] -shared -fPIC -o out objects...``."""
    base = zig_command()

    def fcompile(output, objects, options=None, **_kwargs):
        cmd = [*base, *(["-target", zig_target] if zig_target else []), "-shared", "-fPIC", "-O2", "-s",
               "-o", str(output), *map(str, objects if isinstance(objects, list | tuple) else [objects]),
               *(options or [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"zig cc failed:\n{(proc.stdout + proc.stderr)[-4000:]}\ncommand: {' '.join(cmd)}")

    fcompile.zig_target = zig_target
    return fcompile


def _fcompile_for(spec: TargetSpec):
    if spec.cross_compiled:
        return zig_fcompile(f"{spec.triple}.{spec.glibc}")
    from tvm.support import cc

    return None if cc.get_cc() else zig_fcompile(None)  # None: TVM's default (this machine's C compiler)


# ---------------------------------------------------------------------------------------------------------------
# the CUDA part of the module blob


def cuda_modules(executable) -> list:
    root = executable.mod
    return list(root._collect_from_import_tree(lambda m: m.kind == "cuda"))


def _compile_for(spec: TargetSpec, source: str, record) -> tuple[str, bytes, CudaBinary | None]:
    """(fmt, code, binary) to embed for the CUDA C ``source``."""
    if spec.cuda_compiler == "nvrtc-11.8":
        portable = portable_source(source)
        for b in (record.binaries if record is not None else []):
            if b.source == portable:
                return "cubin", b.cubin, b
        b = compile_cuda(source, spec.cuda_arch)
        return "cubin", b.cubin, b
    # "tvm": a GPU newer than CUDA 11.8 knows; the local toolkit through TVM's own helper, else leave the source
    try:
        from tvm.support import nvcc

        fatbin = nvcc.compile_cuda(source, target_format="fatbin", arch=f"sm_{spec.cuda_arch}", compiler="nvcc")
        return "fatbin", bytes(fatbin), None
    except Exception:  # noqa: BLE001 - no local nvcc: TVM compiles the kept source when the .so is loaded
        return "cuda", source.encode(), None


class _Packer:
    """``fpack_imports`` for TVM's export_library: TVM's own blob, with each CUDA module's code replaced.

    mode "binary": code = the compiled cubin; mode "source": code = the portable CUDA C (fmt "cuda"), which the
    loading machine compiles through its ``tvm_callback_cuda_compile``.
    """

    def __init__(self, spec: TargetSpec, executable, mode: str):
        self.spec, self.mode = spec, mode
        self.record = getattr(executable, "targets_cuda", None)
        self.sources = [m.inspect_source("cuda") for m in cuda_modules(executable)]
        self.binaries: list[CudaBinary] = []
        self.formats: list[str] = []

    def __call__(self, mod, is_system_lib, symbol_prefix, workspace_dir):
        import tvm_ffi

        if is_system_lib or symbol_prefix:
            raise NotImplementedError("system-lib export is not supported for targets with device code")
        blob = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        lib = LibraryBin.parse(blob)
        known = [s.encode() for s in self.sources if s]
        if self.record is not None:
            known += [b.cubin for b in self.record.binaries]
        for i, (kind, payload) in enumerate(lib.modules):
            if kind != "cuda":
                continue
            try:
                part = CudaPayload.split(payload, known)
            except ValueError:
                if self.mode == "binary" and payload[8:12] != b"cuda":
                    self.formats.append("compiled-by-tvm")  # TVM's own callback compiled it at build time
                    continue
                raise
            source = self._source_of(part)
            if self.mode == "source":
                part.fmt, part.code = "cuda", portable_source(source).encode()
            elif part.fmt == "cuda":
                part.fmt, part.code, binary = _compile_for(self.spec, source, self.record)
                if binary is not None:
                    self.binaries.append(binary)
            else:  # compiled during the build (CUDA runtime present): by our callback if it is a known cubin
                self.binaries += [b for b in (self.record.binaries if self.record else []) if b.cubin == part.code]
            self.formats.append(part.fmt)
            lib.modules[i] = (kind, part.join())
        out_bin = Path(workspace_dir) / f"devc-{self.mode}.bin"
        out_bin.write_bytes(lib.serialize())
        out_asm = Path(workspace_dir) / f"devc-{self.mode}.S"
        out_asm.write_text(assembly(str(out_bin.resolve())))
        return str(out_asm)

    def _source_of(self, part: CudaPayload) -> str:
        if part.fmt == "cuda":
            return part.code.decode()
        for b in (self.record.binaries if self.record else []):
            if b.cubin == part.code:
                return b.source
        if len(self.sources) == 1 and self.sources[0]:
            return self.sources[0]
        raise RuntimeError("cannot tell which CUDA C this compiled module came from")


def _export(executable, path: Path, spec: TargetSpec, workdir: Path, mode: str) -> _Packer | None:
    workdir.mkdir(parents=True, exist_ok=True)
    kwargs = {"workspace_dir": str(workdir)}
    fcompile = _fcompile_for(spec)
    if fcompile is not None:
        kwargs["fcompile"] = fcompile
    packer = None
    if cuda_modules(executable):
        packer = _Packer(spec, executable, mode)
        kwargs["fpack_imports"] = packer
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.so")
    try:
        executable.export_library(str(tmp), **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return packer


def _check(path: Path, spec: TargetSpec, facts: dict, embedded: bool) -> None:
    want = "aarch64" if spec.triple and spec.triple.startswith("aarch64") else None
    if want and facts["machine"] != want:
        raise RuntimeError(f"{path} is for {facts['machine']}, not {want}")
    if spec.glibc and not elf.glibc_at_most(facts["max_glibc"], spec.glibc):
        raise RuntimeError(f"{path} needs GLIBC_{facts['max_glibc']}, newer than the board's {spec.glibc}")
    if embedded and spec.cuda_compiler == "nvrtc-11.8":
        arches = {c["sm"] for c in facts["cubins"]}
        if arches != {spec.cuda_arch}:
            raise RuntimeError(f"{path} holds cubins for {sorted(arches)}, expected sm_{spec.cuda_arch}")


def export_library(executable, path, spec: TargetSpec, workdir=None) -> dict:
    """Write the deployable .so for ``spec`` at ``path`` (and ``deploy/`` beside it for boards).

    Returns what was written (paths relative to the .so's folder, so the dict can go into a manifest that is
    written before the folder is renamed into place) and the facts read back from the file::

        {"library": "model.so", "target": "jetson-tx2",
         "elf": {"machine", "e_machine", "shared_object", "max_glibc", "cubins": [{"sm", ...}], ...},
         "cuda": {"arch", "format", "cubin_sha256", "kernels", "formats", "embedded", ...} or None,
         "deploy": {"README.md": "deploy/README.md", ...} or {}, "files": ["model.so", "deploy/README.md", ...]}
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="targets-export-")
        workdir = own_tmp.name
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        packer = _export(executable, path, spec, workdir / "binary", "binary")
        facts = elf.describe(path)
        embedded = bool(packer and packer.formats and all(f in ("cubin", "fatbin") for f in packer.formats))
        _check(path, spec, facts, embedded)
        binary = packer.binaries[0] if packer and packer.binaries else None
        result = {
            "library": path.name,
            "target": spec.name,
            "elf": facts,
            "cuda": None,
            "deploy": {},
            "files": [path.name],
        }
        if packer is not None:
            result["cuda"] = {**(binary.summary() if binary else {"arch": spec.arch, "compiler": spec.cuda_compiler}),
                              "formats": packer.formats, "embedded": embedded}
        if spec.is_board:
            deploy = _write_deploy(executable, path, spec, workdir, packer)
            result["deploy"] = deploy
            result["files"] += list(deploy.values())
        return result
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


# ---------------------------------------------------------------------------------------------------------------
# deploy/


def _write_deploy(executable, path: Path, spec: TargetSpec, workdir: Path, packer: _Packer | None) -> dict:
    from targets import deploy as deploy_text

    final = path.parent / "deploy"
    staging = path.parent / f".deploy.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        names = []
        binaries = packer.binaries if packer else []
        for i, b in enumerate(binaries):  # relax.build makes one CUDA module; more get numbered
            stem = "kernels" if i == 0 else f"kernels-{i}"
            (staging / f"{stem}.cu").write_text(b.source)
            (staging / f"{stem}.ptx").write_bytes(b.ptx)
            names += [f"{stem}.cu", f"{stem}.ptx"]
        if binaries:
            source_so = staging / "model_cuda_source.so"
            _export(executable, source_so, spec, workdir / "source", "source")
            names.append(source_so.name)
        (staging / "load_on_board.py").write_text(deploy_text.load_on_board(spec, path.name))
        names.append("load_on_board.py")
        for name in ("build_tvm_runtime.sh", "tvm-0.27-cuda10.patch", "run_model.py", "board_runner.cc"):
            shutil.copy2(BOARD_DIR / name, staging / name)
            names.append(name)
        shutil.copy2(BOARD_DIR / "README.md", staging / "RUNTIME.md")  # which runtime steps are proven where
        names.append("RUNTIME.md")
        (staging / "README.md").write_text(deploy_text.readme(spec, path.name, binaries[0] if binaries else None))
        names.insert(0, "README.md")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: f"{final.name}/{name}" for name in names}
