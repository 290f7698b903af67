"""Named build targets: what TVM compiles for, how device code is made, how the host code is linked.

Each target is a :class:`TargetSpec` - a plain fact sheet: the TVM target JSON (device + host), the CUDA arch,
whether the host code is cross-compiled, the toolchain, and the precision ``auto`` picks with the reason.

    jetson-tx2 / jetson-nano / jetson-xavier / jetson-orin   CUDA sm_62 / sm_53 / sm_72 / sm_87 + aarch64 host
    host                                                      this machine's CPU (LLVM, detected -mcpu; its x86 class)
    x86-64-v3 / x86-64-v4 / x86-64-v4-vnni                    every x86 CPU of a class (AVX2; AVX-512; + VNNI)
    cuda                                                      this machine's GPU (sm from the device; sm_90 if none)
    aarch64-cpu                                               a generic aarch64 Linux CPU (no GPU)

Board targets compile their CUDA C at build time (NVRTC 11.8 + ptxas 11.8 from pip, see :mod:`targets.cuda`)
and cross-link the host code with zig for aarch64 glibc 2.27 (see :mod:`targets.export`).

Build helpers, in the order the pipeline calls them::

    spec = targets.get("jetson-tx2")
    exe = targets.compile_module(mod, spec, database=None)        # tvm.relax Executable
    written = targets.export_library(exe, "out/model.so", spec, workdir)   # dict: what was written
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

from compiler.errors import UserError

# the precisions a target's ``default_precision`` is one of (the same names compiler/precision.py uses)
PRECISIONS = ("fp32", "fp16", "int8", "int8-weights")

# glibc of JetPack 4.6 (Ubuntu 18.04): the oldest board OS we support, so every aarch64 .so targets it
BOARD_GLIBC = "2.27"
AARCH64_TRIPLE = "aarch64-linux-gnu"

# the `cuda` target's arch when this machine has no GPU: the H100/H200 machines this project borrows
DEFAULT_LOCAL_CUDA_ARCH = 90


@dataclass(frozen=True)
class TargetSpec:
    """One named target. ``device`` and ``host`` are TVM target JSON dicts (``host`` None: the device is the host)."""

    name: str
    description: str
    kind: str  # "cpu" or "cuda"
    device: dict
    host: dict | None
    cuda_arch: int | None  # 62 for sm_62; None for CPU targets
    cross_compiled: bool  # host code linked for another machine (aarch64) with zig
    default_precision: str  # what --precision auto picks (one of PRECISIONS)
    precision_reason: str
    fast_int8: bool
    fast_int8_reason: str
    toolchain: str  # how device code is compiled and the host code linked, in words
    cuda_compiler: str | None = None  # "nvrtc-11.8" (pip NVRTC + ptxas, at build time) or "tvm" (TVM's own)
    triple: str | None = None  # host triple for the cross linker
    glibc: str | None = None  # newest glibc symbol version the .so may need (cross-compiled targets)
    board: str | None = None  # the board's software the artifact is meant for, in words
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_board(self) -> bool:
        """A Jetson: cross-compiled CUDA artifact that gets a deploy/ folder."""
        return self.kind == "cuda" and self.cross_compiled

    @property
    def arch(self) -> str | None:
        return f"sm_{self.cuda_arch}" if self.cuda_arch else None

    def target_json(self) -> dict:
        """The full TVM target JSON: the device with its host folded in."""
        out = dict(self.device)
        if self.host is not None:
            out["host"] = dict(self.host)
        return out

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.target_json())

    def required_cpu_features(self) -> list[str] | None:
        """The /proc/cpuinfo flags a CPU needs to run this target's code (x86 CPU targets; else None): recorded in
        the manifest and checked before an artifact is loaded (:mod:`targets.x86`)."""
        if self.kind != "cpu" or self.cross_compiled or "mtriple" in self.device:
            return None
        from targets import x86

        try:
            return x86.required_features(self.device)
        except Exception:  # noqa: BLE001 - not an x86 CPU LLVM knows: nothing to require
            return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        d["target"] = self.target_json()
        return d


def _aarch64_host(mcpu: str) -> dict:
    return {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mcpu": mcpu}


def _cuda_device(arch: int, registers_per_block: int = 65536) -> dict:
    # the same facts as TVM's nvidia/jetson-* tags, written out so a TVM upgrade cannot change them silently
    return {
        "kind": "cuda",
        "arch": f"sm_{arch}",
        "max_num_threads": 1024,
        "max_threads_per_block": 1024,
        "thread_warp_size": 32,
        "max_shared_memory_per_block": 49152,
        "registers_per_block": registers_per_block,
    }


_BOARD_TOOLCHAIN = ("NVRTC 11.8 -> PTX compute_{a}, ptxas 11.8 -> sm_{a} cubin embedded in the .so (pip "
                    "nvidia-cuda-nvrtc-cu11, nvidia-cuda-nvcc-cu11, nvidia-cuda-cccl-cu11, nvidia-cuda-runtime-cu11); "
                    "host code: LLVM aarch64 + zig cc (pip ziglang) for aarch64-linux-gnu glibc " + BOARD_GLIBC)
_NO_DP4A = ("{gpu} ({sm}) has no fast int8 path: no dp4a/int8 tensor cores that TensorRT or TVM use "
            "(TensorRT refuses INT8 on it)")
_FP16_WEIGHTS = ("{sm} has no fast int8 but runs fp16 arithmetic at twice the fp32 rate, so compute in fp16 "
                 "and store weights as int8 (quarter of the fp32 size, dequantized on load)")


def _board(name, arch, gpu, mcpu, board, fast_int8, description, regs=65536, notes=()):
    sm = f"sm_{arch}"
    if fast_int8:
        precision, reason = "int8", f"{sm} has dp4a and int8 tensor cores: int8 is its fastest format"
        i8_reason = f"{gpu} ({sm}) has dp4a and int8 tensor cores"
    else:
        precision, reason = "int8-weights", _FP16_WEIGHTS.format(sm=sm)
        i8_reason = _NO_DP4A.format(gpu=gpu, sm=sm)
    return TargetSpec(
        name=name, description=description, kind="cuda", device=_cuda_device(arch, regs), host=_aarch64_host(mcpu),
        cuda_arch=arch, cross_compiled=True, default_precision=precision, precision_reason=reason,
        fast_int8=fast_int8, fast_int8_reason=i8_reason, toolchain=_BOARD_TOOLCHAIN.format(a=arch),
        cuda_compiler="nvrtc-11.8", triple=AARCH64_TRIPLE, glibc=BOARD_GLIBC, board=board, notes=tuple(notes),
    )


_OLD_DRIVER = ("JetPack 4.6 ships CUDA 10.2: its driver may refuse a cubin made by CUDA 11.8; deploy/ then has the "
               "CUDA C to rebuild with the board's own nvcc")

_STATIC = {
    "jetson-tx2": lambda: _board(
        "jetson-tx2", 62, "Pascal GPU", "cortex-a57", "JetPack 4.6 (L4T R32.6, CUDA 10.2, Ubuntu 18.04)", False,
        "NVIDIA Jetson TX2: Pascal GPU sm_62 + Cortex-A57/Denver2 CPU", regs=32768, notes=(_OLD_DRIVER,)),
    "jetson-nano": lambda: _board(
        "jetson-nano", 53, "Maxwell GPU", "cortex-a57", "JetPack 4.6 (L4T R32.6, CUDA 10.2, Ubuntu 18.04)", False,
        "NVIDIA Jetson Nano: Maxwell GPU sm_53 + Cortex-A57 CPU", regs=32768, notes=(_OLD_DRIVER,)),
    "jetson-xavier": lambda: _board(
        "jetson-xavier", 72, "Volta GPU", "carmel", "JetPack 4.6 (CUDA 10.2) or JetPack 5 (CUDA 11.4)", True,
        "NVIDIA Jetson AGX Xavier / Xavier NX: Volta GPU sm_72 + Carmel CPU", notes=(_OLD_DRIVER,)),
    "jetson-orin": lambda: _board(
        "jetson-orin", 87, "Ampere GPU", "cortex-a78ae", "JetPack 5 (CUDA 11.4) or JetPack 6 (CUDA 12.2)", True,
        "NVIDIA Jetson AGX Orin / Orin NX / Orin Nano: Ampere GPU sm_87 + Cortex-A78AE CPU"),
    "aarch64-cpu": lambda: TargetSpec(
        name="aarch64-cpu", description="generic aarch64 Linux CPU (Armv8-A, NEON), no GPU", kind="cpu",
        device=_aarch64_host("generic"), host=None, cuda_arch=None, cross_compiled=True,
        default_precision="fp32",
        precision_reason="a generic Armv8-A CPU has neither the dot-product (sdot) instructions for fast int8 nor "
                         "fp16 arithmetic, so fp32",
        fast_int8=False, fast_int8_reason="Armv8.0-A has no sdot/udot (those are Armv8.2-A dotprod)",
        toolchain=f"LLVM aarch64 + zig cc (pip ziglang) for aarch64-linux-gnu glibc {BOARD_GLIBC}",
        triple=AARCH64_TRIPLE, glibc=BOARD_GLIBC, board="any aarch64 Linux with glibc >= " + BOARD_GLIBC),
}

NAMES = ("jetson-tx2", "jetson-nano", "jetson-xavier", "jetson-orin", "host", "x86-64-v3", "x86-64-v4",
         "x86-64-v4-vnni", "x86-64-v4-amx", "cuda", "aarch64-cpu")


# ---------------------------------------------------------------------------------------------------------------
# this machine: CPU and GPU detection (lazy, cached: importing tvm takes a second)


@functools.lru_cache(maxsize=1)
def _host_cpu() -> tuple[str, str, frozenset]:
    """(mcpu, arch, LLVM features) of this machine's CPU, as TVM's LLVM sees it."""
    import platform

    from tvm.target import codegen

    mcpu = codegen.llvm_get_system_cpu() or "generic"
    features = cpu_features(mcpu)
    if platform.machine() in ("x86_64", "AMD64") and not _AMX <= features and host_amx():
        features = features | _AMX
    return mcpu, platform.machine(), features


# x86-64 CPU classes, best first: the psABI levels compilers use (v3 = AVX2 + FMA, v4 = AVX-512), v4 split by
# VNNI (the int8 dot product our int8 kernels are tensorized with). A tuning record is a schedule: it is valid on
# every CPU of the class it was tuned for, whoever tuned it (a VNNI-tensorized record needs VNNI, an AVX-512
# vectorized one AVX-512).
_X86_V3 = frozenset({"avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe"})
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_AMX = frozenset({"amx-tile", "amx-int8"})  # Intel AMX int8 tiles (Sapphire Rapids and later)
X86_CLASSES = (("x86-64-v4-amx", _X86_V4 | {"avx512vnni"} | _AMX), ("x86-64-v4-vnni", _X86_V4 | {"avx512vnni"}),
               ("x86-64-v4", _X86_V4), ("x86-64-v3", _X86_V3))
# the class whose tuning records a class uses: the AMX conv2d kernels have a fixed schedule (passes.amx), every
# tuned kernel of an AMX build is VNNI / AVX-512 code, valid on both
RECORD_CLASS = {"x86-64-v4-amx": "x86-64-v4-vnni"}


def record_class(cls: str | None) -> str | None:
    """The x86 class whose tuning records a build for ``cls`` applies (:data:`RECORD_CLASS`)."""
    return RECORD_CLASS.get(cls, cls)


@functools.lru_cache(maxsize=1)
def host_amx() -> bool:
    """Whether this CPU has AMX int8 tiles (/proc/cpuinfo ``amx_tile`` ``amx_int8``) and Linux gives this process
    the tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``, Linux 5.16+). A VM can hide the CPU's model from LLVM
    (it names this one by its AVX-512 features) while passing AMX through: the flags decide."""
    from targets import x86

    flags = x86.cpu_flags() or frozenset()
    return {"amx_tile", "amx_int8"} <= flags and x86.request_amx()


@functools.lru_cache(maxsize=64)
def cpu_features(mcpu: str) -> frozenset:
    """The LLVM features of the x86 CPU LLVM calls ``mcpu`` (any name LLVM knows, not only this machine's)."""
    import tvm
    from tvm.target import codegen

    try:
        return frozenset(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))
    except Exception:  # noqa: BLE001 - a CPU name this LLVM does not know: no feature facts
        return frozenset()


def cpu_class(mcpu: str | None, features: frozenset | None = None) -> str | None:
    """The x86-64 class (``x86-64-v4-vnni``, ``x86-64-v4``, ``x86-64-v3``) of the CPU LLVM calls ``mcpu``, or None
    (older x86, another architecture, or an unknown name)."""
    if not mcpu:
        return None
    have = cpu_features(mcpu) if features is None else features
    return next((name for name, need in X86_CLASSES if need <= have), None)


def _cpu_int8(arch: str, features: frozenset) -> tuple[bool, str]:
    """Whether a non-x86 CPU has int8 dot products (x86: its class decides, :func:`targets.x86.auto_precision`)."""
    if "dotprod" in features or "i8mm" in features:
        return True, "this CPU has Arm dotprod/i8mm int8 dot products"
    return False, f"this {arch} CPU reports no int8 dot-product instructions"


def _host_spec() -> TargetSpec:
    from targets import x86

    mcpu, arch, features = _host_cpu()
    cls = cpu_class(mcpu, features) if arch in ("x86_64", "AMD64") else None
    if arch in ("x86_64", "AMD64"):
        precision, reason = x86.auto_precision(cls)
        fast = cls is not None
        why = (f"this CPU is {cls}: {x86.CLASSES[cls].int8_instructions}" if fast else
               "this x86 CPU is below x86-64-v3 (no AVX2): no int8 dot products")
        where = f"; class {cls or 'below x86-64-v3'}"
    else:
        fast, why = _cpu_int8(arch, features)
        precision = "int8" if fast else "fp32"
        reason = why + (": int8 is its fastest format" if fast else "; CPUs gain nothing from fp16, so fp32")
        where = ""
    return TargetSpec(
        name="host", description=f"this machine's CPU ({arch}, LLVM -mcpu={mcpu}{where})", kind="cpu",
        device=_host_device(mcpu, features), host=None, cuda_arch=None, cross_compiled=False,
        default_precision=precision, precision_reason=reason, fast_int8=fast, fast_int8_reason=why,
        toolchain="LLVM (TVM) + this machine's C compiler (TVM's default linker)",
    )


def _host_device(mcpu: str, features: frozenset) -> dict:
    """The TVM target JSON of this CPU: LLVM's ``-mcpu``, plus the AMX features where the CPU has them and LLVM's
    name for it does not (:func:`host_amx`)."""
    extra = sorted(f for f in _AMX if f in features and f not in cpu_features(mcpu))
    return {"kind": "llvm", "mcpu": mcpu, **({"mattr": [f"+{f}" for f in extra]} if extra else {})}


def _x86_class_spec(name: str) -> TargetSpec:
    from targets import x86

    c = x86.CLASSES[name]
    precision, reason = x86.auto_precision(name)
    return TargetSpec(
        name=name, description=f"any x86-64 CPU of class {name} or above ({c.cpus})", kind="cpu",
        device=dict(c.device), host=None, cuda_arch=None, cross_compiled=False, default_precision=precision,
        precision_reason=reason, fast_int8=True, fast_int8_reason=f"int8 kernels: {c.int8_instructions}",
        toolchain=f"LLVM (TVM) -mcpu={c.device['mcpu']}{''.join(' ' + a for a in c.device.get('mattr', []))} + this "
                  "machine's C compiler",
        notes=("the artifact runs on every CPU of this class or above; loading it on a CPU below refuses with the "
               "missing feature", "tuning records for this target apply on every CPU of the class"),
    )


@functools.lru_cache(maxsize=1)
def _local_gpu() -> tuple[int, str | None]:
    """(sm, device name or None when no GPU is here)."""
    try:
        import tvm

        dev = tvm.cuda(0)
        if dev.exist:
            major, minor = (int(v) for v in str(dev.compute_version).split("."))
            return major * 10 + minor, str(dev.device_name)
    except Exception:  # noqa: BLE001 - no CUDA runtime / driver: no GPU
        pass
    return DEFAULT_LOCAL_CUDA_ARCH, None


def _cuda_int8(sm: int) -> bool:
    return sm == 61 or sm >= 70  # dp4a: sm_61 and sm_70+; sm_60 / sm_62 / sm_5x lack it


def _cuda_spec() -> TargetSpec:
    sm, gpu = _local_gpu()
    mcpu, _, _ = _host_cpu()
    where = f"{gpu}, sm_{sm}" if gpu else f"no GPU here: assumes sm_{sm} (H100/H200)"
    fast = _cuda_int8(sm)
    if fast:
        precision, reason = "int8", f"sm_{sm} has dp4a/int8 tensor cores: int8 is its fastest format"
    elif sm >= 53:
        precision, reason = "int8-weights", _FP16_WEIGHTS.format(sm=f"sm_{sm}")
    else:
        precision, reason = "fp32", f"sm_{sm} has neither fast int8 nor fast fp16"
    # NVRTC 11.8 knows sm_35 .. sm_90; a newer GPU needs the local toolkit (TVM's own compile callback)
    nvrtc = sm <= 90
    toolchain = (f"NVRTC 11.8 + ptxas 11.8 (pip) -> sm_{sm} cubin embedded in the .so; host: LLVM + this "
                 "machine's C compiler" if nvrtc else
                 "TVM's own tvm_callback_cuda_compile (the local CUDA toolkit); host: LLVM + this machine's C compiler")
    return TargetSpec(
        name="cuda", description=f"this machine's GPU ({where})", kind="cuda",
        device={"kind": "cuda", "arch": f"sm_{sm}"}, host={"kind": "llvm", "mcpu": mcpu}, cuda_arch=sm,
        cross_compiled=False, default_precision=precision, precision_reason=reason, fast_int8=fast,
        fast_int8_reason=(f"sm_{sm} has dp4a" if fast else f"sm_{sm} has no dp4a"), toolchain=toolchain,
        cuda_compiler="nvrtc-11.8" if nvrtc else "tvm",
    )


def get(name: str) -> TargetSpec:
    """The target called ``name``; a UserError listing the known names for anything else."""
    key = str(name).strip().lower()
    if key in _STATIC:
        return _STATIC[key]()
    if key == "host":
        return _host_spec()
    if key.startswith("x86-64-v"):
        from targets import x86

        if key in x86.CLASSES:
            return _x86_class_spec(key)
    if key == "cuda":
        return _cuda_spec()
    raise UserError(f"unknown target '{name}': choose one of {', '.join(NAMES)}")


def runs_here(spec: TargetSpec) -> bool:
    """Whether this machine can run ``spec``'s code: a CPU target that is not cross-compiled and, for x86, whose
    CPU features this CPU has (an x86 class above this CPU's is built here but verified through a host build)."""
    if spec.kind != "cpu" or spec.cross_compiled:
        return False
    from targets import x86

    return not x86.missing_features(spec.required_cpu_features() or [])


def host_class() -> str | None:
    """The x86-64 class of this machine's CPU (None: not x86, or below x86-64-v3)."""
    mcpu, arch, features = _host_cpu()
    return cpu_class(mcpu, features) if arch in ("x86_64", "AMD64") else None


def all_targets() -> list[TargetSpec]:
    return [get(n) for n in NAMES]


def names() -> tuple[str, ...]:
    return NAMES


# build helpers (imported lazily: they pull in TVM)
_LAZY = {
    "relax_pipeline": "targets.build",
    "compile_module": "targets.build",
    "export_library": "targets.export",
    "cuda_compile_callback": "targets.cuda",
}


def __getattr__(name):  # PEP 562: keep `import targets` light
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'targets' has no attribute {name!r}")


__all__ = ["TargetSpec", "PRECISIONS", "NAMES", "get", "all_targets", "names", "host_class", "runs_here", *_LAZY]
