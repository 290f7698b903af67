"""CUDA device code for the boards, made at build time: TVM's CUDA C -> NVRTC 11.8 -> PTX -> ptxas 11.8 -> cubin.

Why CUDA 11.8 from pip: CUDA 13 (this machine's nvcc and NVRTC) dropped sm_5x/sm_6x, so it cannot compile for the
TX2 (sm_62) or the Nano (sm_53). The pip wheels nvidia-cuda-nvrtc-cu11 (libnvrtc.so.11.2, loaded with ctypes),
nvidia-cuda-nvcc-cu11 (ptxas), nvidia-cuda-cccl-cu11 (the cuda/std headers TVM's code includes under NVRTC) and
nvidia-cuda-runtime-cu11 (cuda_fp16.h for fp16 kernels) still can, and need no GPU.

TVM 0.27 calls the global function ``tvm_callback_cuda_compile(code) -> bytes`` to turn CUDA C into a binary
(src/backend/cuda/runtime/cuda_module.cc: JitCompileFromSource; a result starting with '/' is taken as PTX,
anything else as cubin/fatbin and loaded with cuModuleLoadData). When the CUDA runtime is not loaded (no
libcuda.so.1, as on this machine) codegen keeps the CUDA C in a fallback module instead and the callback runs
on the machine that *loads* the .so - so :mod:`targets.export` compiles that source itself and embeds the cubin.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from compiler.errors import UserError

CALLBACK = "tvm_callback_cuda_compile"
NVRTC_STD = "--std=c++17"  # TVM 0.27's CUDA C writes hex float literals (C++17); see portable_source too
PIP_PACKAGES = ("nvidia-cuda-nvrtc-cu11==11.8.89", "nvidia-cuda-nvcc-cu11==11.8.89",
                "nvidia-cuda-cccl-cu11==11.8.89.post1", "nvidia-cuda-runtime-cu11==11.8.89")
MAX_ARCH = 90  # the newest sm NVRTC/ptxas 11.8 know
MIN_ARCH = 35

# Prepended for NVRTC only (not part of the shipped kernels.cu): NVRTC has no host <math.h>.
_NVRTC_PREAMBLE = """#include <cuda/std/limits>
#ifndef INFINITY
#define INFINITY (::cuda::std::numeric_limits<float>::infinity())
#endif
#ifndef NAN
#define NAN (::cuda::std::numeric_limits<float>::quiet_NaN())
#endif
"""


@dataclass(frozen=True)
class Toolchain:
    nvrtc: Path  # libnvrtc.so.11.2
    nvrtc_builtins: Path
    ptxas: Path
    include_dirs: tuple[Path, ...]  # CCCL (cuda/std/...), CUDA runtime headers (cuda_fp16.h, ...)
    version: str = "11.8"


def _nvidia_dirs() -> list[Path]:
    try:
        import nvidia  # namespace package of NVIDIA's pip wheels
    except ImportError:
        return []
    return [Path(p) for p in getattr(nvidia, "__path__", [])]


@functools.lru_cache(maxsize=1)
def find_toolchain() -> Toolchain:
    """The pip CUDA 11.8 pieces, or a UserError naming the pip packages to install."""
    want = {
        "nvrtc": "cuda_nvrtc/lib/libnvrtc.so.11.2",
        "nvrtc_builtins": "cuda_nvrtc/lib/libnvrtc-builtins.so.11.8",
        "ptxas": "cuda_nvcc/bin/ptxas",
        "cccl": "cuda_cccl/include/cuda/std/cstdint",
        "runtime": "cuda_runtime/include/cuda_fp16.h",
    }
    found: dict[str, Path] = {}
    for key, rel in want.items():
        for base in _nvidia_dirs():
            if (base / rel).is_file():
                found[key] = base / rel
                break
    missing = [k for k in want if k not in found]
    if missing:
        raise UserError(f"the CUDA 11.8 toolchain from pip is incomplete (missing {', '.join(missing)}): "
                        f"pip install {' '.join(PIP_PACKAGES)}")
    ptxas = found["ptxas"]
    if not os.access(ptxas, os.X_OK):
        raise UserError(f"{ptxas} is not executable: reinstall nvidia-cuda-nvcc-cu11")
    return Toolchain(
        nvrtc=found["nvrtc"], nvrtc_builtins=found["nvrtc_builtins"], ptxas=ptxas,
        include_dirs=(found["cccl"].parents[2], found["runtime"].parent),
    )


def available() -> tuple[bool, str]:
    """(True, "") when the CUDA 11.8 pip toolchain is installed, else (False, what to install)."""
    try:
        find_toolchain()
    except UserError as e:
        return False, str(e)
    return True, ""


# ---------------------------------------------------------------------------------------------------------------
# NVRTC through ctypes


@functools.lru_cache(maxsize=1)
def _nvrtc() -> ctypes.CDLL:
    tc = find_toolchain()
    # libnvrtc dlopens its builtins by soname; load it first (global) so that lookup finds it
    ctypes.CDLL(str(tc.nvrtc_builtins), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(tc.nvrtc))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p,
                                       ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.nvrtcGetProgramLogSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetProgramLog.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nvrtcGetPTXSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetPTX.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    return lib


def nvrtc_version() -> str:
    lib = _nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def _check_arch(arch: int) -> None:
    if not MIN_ARCH <= int(arch) <= MAX_ARCH:
        raise UserError(f"sm_{arch} is outside what CUDA 11.8 compiles (sm_{MIN_ARCH} .. sm_{MAX_ARCH})")


def nvrtc_compile(source: str, arch: int, options: tuple[str, ...] = (), std: str = NVRTC_STD) -> tuple[bytes, str]:
    """CUDA C -> PTX for compute_<arch>; returns (ptx, log). A compile error is a RuntimeError with the log."""
    _check_arch(arch)
    lib, tc = _nvrtc(), find_toolchain()
    opts = [f"--gpu-architecture=compute_{arch}", std, "-default-device", "--disable-warnings",
            *(f"-I{d}" for d in tc.include_dirs), *options]
    prog = ctypes.c_void_p()
    code = (_NVRTC_PREAMBLE + source).encode()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), code, b"kernels.cu", 0, None, None)
    if rc != 0:
        raise RuntimeError(f"nvrtcCreateProgram failed: {lib.nvrtcGetErrorString(rc).decode()}")
    try:
        argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        rc = lib.nvrtcCompileProgram(prog, len(opts), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value + 1)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if rc != 0:
            raise RuntimeError(f"NVRTC {nvrtc_version()} could not compile the CUDA C for compute_{arch} "
                               f"({lib.nvrtcGetErrorString(rc).decode()}):\n{log[-4000:]}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.raw.rstrip(b"\0"), log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def ptxas(ptx: bytes, arch: int, options: tuple[str, ...] = ()) -> bytes:
    """PTX -> sm_<arch> cubin with the pip ptxas 11.8."""
    _check_arch(arch)
    tc = find_toolchain()
    with tempfile.TemporaryDirectory(prefix="ptxas-") as tmp:
        src, out = Path(tmp) / "kernels.ptx", Path(tmp) / "kernels.cubin"
        src.write_bytes(ptx)
        proc = subprocess.run([str(tc.ptxas), f"-arch=sm_{arch}", "-O3", *options, str(src), "-o", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas 11.8 failed for sm_{arch}:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return out.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# the source we compile and ship

_HEX_FLOAT = re.compile(
    r"\b0[xX](?=[0-9a-fA-F]*\.?[0-9a-fA-F]*[pP])([0-9a-fA-F]*\.?[0-9a-fA-F]*)[pP]([+-]?\d+)([fFlL]?)")


def _decimal(m: re.Match) -> str:
    value = float.fromhex(f"0x{m.group(1)}p{m.group(2)}")
    text = repr(value)  # shortest decimal that reads back as the same double (so also the same float32)
    if "e" not in text and "." not in text and "inf" not in text:
        text += ".0"
    return text + m.group(3)


def portable_source(code: str) -> str:
    """TVM's CUDA C with hex float literals (C++17) written as exact decimals, so C++14 compilers take it too
    (the CUDA 10.2 nvcc on JetPack 4.6 knows C++14 at most). The compiled code is the same."""
    return _HEX_FLOAT.sub(_decimal, code)


@dataclass(frozen=True)
class CudaBinary:
    """One compile: the portable CUDA C, its PTX and the cubin embedded in the .so."""

    arch: int
    source: str
    ptx: bytes
    cubin: bytes
    compiler: str = "nvrtc-11.8"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.cubin).hexdigest()

    def summary(self) -> dict:
        return {"arch": f"sm_{self.arch}", "format": "cubin", "compiler": self.compiler,
                "cubin_bytes": len(self.cubin), "ptx_bytes": len(self.ptx), "cubin_sha256": self.sha256,
                "kernels": len(re.findall(rb"\.entry\s+\w+", self.ptx))}


@functools.lru_cache(maxsize=8)
def _compile_cached(source: str, arch: int) -> CudaBinary:
    ptx, _ = nvrtc_compile(source, arch)
    return CudaBinary(arch=arch, source=source, ptx=ptx, cubin=ptxas(ptx, arch))


def compile_cuda(code: str, arch: int) -> CudaBinary:
    """TVM's CUDA C -> sm_<arch> cubin (+ its PTX), compiled from :func:`portable_source` (memoized)."""
    return _compile_cached(portable_source(code), int(arch))


# ---------------------------------------------------------------------------------------------------------------
# the TVM callback


@dataclass
class CompileRecord:
    """What the callback compiled while it was active: the artifact ships ``binaries[i].source``."""

    arch: int
    binaries: list[CudaBinary] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return [b.source for b in self.binaries]


@contextlib.contextmanager
def cuda_compile_callback(arch: int):
    """Make ``tvm_callback_cuda_compile`` compile for sm_<arch> with NVRTC 11.8 + ptxas 11.8 inside the block.

    Yields a :class:`CompileRecord` that collects every compile (its CUDA C, PTX and cubin). On leaving, the
    previous callback (TVM's own, from tvm.support.nvcc) is put back, so other builds in the process are not
    affected. Not thread-safe: the callback is one process-wide global function.
    """
    import tvm_ffi

    find_toolchain()  # fail now, with the pip hint, rather than inside TVM's C++
    _check_arch(arch)
    record = CompileRecord(arch=int(arch))

    def _callback(code, *_ignored):  # TVM 0.27 passes (code); older ones passed (code, target)
        binary = compile_cuda(str(code), record.arch)
        record.binaries.append(binary)
        return binary.cubin

    previous = tvm_ffi.get_global_func(CALLBACK, allow_missing=True)
    tvm_ffi.register_global_func(CALLBACK, _callback, override=True)
    try:
        yield record
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(CALLBACK, previous, override=True)
        else:
            tvm_ffi.registry.remove_global_func(CALLBACK)
