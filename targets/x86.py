"""x86-64 CPU classes as targets: the psABI levels compilers use (``x86-64-v3`` = AVX2 + FMA, ``x86-64-v4`` =
AVX-512), v4 split by VNNI (the int8 dot product). An artifact built for a class runs on every CPU of that class
or above; :func:`missing_features` is what the loader checks (the CPU's ``/proc/cpuinfo`` flags against the
features the manifest records), so a CPU below the class gets one ``error:`` line instead of SIGILL.

Which precision ``auto`` picks for a class is measured, not assumed: :data:`MEASURED` holds batch-1 latencies of
the shipped (pruned) ResNet56 per class, fp32 and int8, tuned, with the command that measured them and where.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

MEASURED = Path(__file__).resolve().parents[1] / "tuning_logs" / "x86_precision.json"
MEASURED_FORMAT = "cifar-hybrid-compiler/x86-precision"


@dataclass(frozen=True)
class X86Class:
    name: str
    device: dict  # the TVM target JSON (LLVM generic CPU of the level, plus VNNI for v4-vnni)
    int8_isa: str  # the key of passes.vnni.ISAS its int8 conv2d kernels use
    int8_instructions: str
    cpus: str  # examples, in words


CLASSES = {
    "x86-64-v4-amx": X86Class("x86-64-v4-amx", {"kind": "llvm", "mcpu": "x86-64-v4",
                                                "mattr": ["+avx512vnni", "+amx-tile", "+amx-int8"]},
                              "amx", "AMX tdpbusd int8 tiles (conv2d), AVX-512 VNNI vpdpbusd (the rest)",
                              "Intel Sapphire Rapids, Emerald Rapids, Granite Rapids (Xeon Scalable gen 4 and later)"),
    "x86-64-v3": X86Class("x86-64-v3", {"kind": "llvm", "mcpu": "x86-64-v3"}, "avx2",
                          "AVX2 vpmaddubsw + vpmaddwd (ymm; 7-bit weights: vpmaddubsw saturates int16)",
                          "Intel Haswell ... Comet Lake / Alder Lake and later clients, AMD Zen 1-3"),
    "x86-64-v4": X86Class("x86-64-v4", {"kind": "llvm", "mcpu": "x86-64-v4"}, "avx512",
                          "AVX-512BW vpmaddubsw + vpmaddwd (zmm; 7-bit weights: vpmaddubsw saturates int16)",
                          "Intel Skylake-SP / Skylake-X (AVX-512 without VNNI)"),
    "x86-64-v4-vnni": X86Class("x86-64-v4-vnni", {"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]},
                               "vnni", "AVX-512 VNNI vpdpbusd (zmm, ymm)",
                               "Intel Cascade Lake, Ice Lake, Sapphire Rapids and later; AMD Zen 4 / Zen 5"),
}

# LLVM feature -> the /proc/cpuinfo flag that says the CPU has it (the ISA extensions code may use)
CPUINFO_FLAG = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm",
    "movbe": "movbe", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd",
    "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512ifma": "avx512ifma", "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-int8": "amx_int8", "gfni": "gfni", "vaes": "vaes",
    "vpclmulqdq": "vpclmulqdq", "sha": "sha_ni",
}


def required_features(target_json: dict) -> list[str]:
    """The ``/proc/cpuinfo`` flags a CPU needs to run code LLVM generates for the x86 ``target_json``, sorted."""
    import tvm
    from tvm.target import codegen

    features = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(target_json))}
    return sorted(CPUINFO_FLAG[f] for f in features if f in CPUINFO_FLAG)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset | None:
    """This machine's CPU flags from /proc/cpuinfo (None where there is no such file: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def request_amx() -> bool:
    """Ask Linux for the AMX tile state for this process (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``;
    idempotent): False where it refuses (Linux before 5.16, a CPU without AMX, not Linux)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    from passes.amx import ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL, XFEATURE_XTILEDATA  # what the kernels ask too

    try:
        return ctypes.CDLL(None, use_errno=True).syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def missing_features(required: list[str], flags: frozenset | None = None) -> list[str] | None:
    """The flags of ``required`` this CPU lacks ([] when it has them all; None when it cannot be told)."""
    here = flags is None
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    missing = [f for f in required if f not in flags]
    if here and not missing and "amx_tile" in required and not request_amx():
        missing = ["amx_tile (Linux does not give this process the tile state: arch_prctl, Linux 5.16 or later)"]
    return missing


def runs_here(target_json: dict) -> bool:
    """Whether code for the x86 ``target_json`` can run on this CPU (unknown: assumed so)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    return not missing_features(required_features(target_json))


def measured(class_name: str) -> dict | None:
    """The committed latencies of class ``class_name`` (:data:`MEASURED`), None when it was not measured."""
    try:
        data = json.loads(MEASURED.read_text())
    except (OSError, ValueError):
        return None
    if data.get("format") != MEASURED_FORMAT:
        return None
    row = data.get("classes", {}).get(class_name)
    return None if row is None else {**row, "model": data.get("model"), "batch": data.get("batch")}


def auto_precision(class_name: str | None) -> tuple[str, str]:
    """(precision, reason) ``auto`` picks on an x86 CPU of ``class_name``: the faster of fp32 and int8 as measured
    there (:data:`MEASURED`), quoting the numbers; int8 where the class was not measured but has int8 dot products
    (say so); fp32 below x86-64-v3."""
    if class_name not in CLASSES:
        return "fp32", "an x86 CPU below x86-64-v3 (no AVX2): no int8 dot-product kernels here, so fp32"
    row = measured(class_name)
    isa = CLASSES[class_name].int8_instructions
    if row is None or not row.get("int8_ms") or not row.get("fp32_ms"):
        return "int8", (f"{class_name} has int8 dot products ({isa}); not measured for this class yet "
                        f"({MEASURED.name}), so int8")
    fp32, int8 = float(row["fp32_ms"]), float(row["int8_ms"])
    pick = "int8" if int8 <= fp32 else "fp32"
    tuned = row.get("tuned") or {}

    def kernels(p: str) -> str:
        if p not in tuned:
            return ""
        head, _, rest = str(tuned[p]).partition("; ")  # "3/4; 17 conv2d on AMX tiles"
        return (" (untuned" if head == "untuned" else f" ({head} kernels tuned") + (f"; {rest})" if rest else ")")

    return pick, (f"measured on {class_name} ({row.get('model')}, batch {row.get('batch')}, {row.get('where')}): "
                  f"int8 {int8:.3g} ms{kernels('int8')} vs fp32 {fp32:.3g} ms{kernels('fp32')}, so {pick} "
                  f"({fp32 / int8 if pick == 'int8' else int8 / fp32:.2f}x; tuning_logs/{MEASURED.name})")
