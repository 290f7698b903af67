"""Just enough ELF reading (64-bit little-endian) to check an artifact: the machine it is for, the newest glibc
symbol version it needs, and the CUDA cubins embedded in it. No readelf needed."""

from __future__ import annotations

import re
import struct
from pathlib import Path

EM_X86_64 = 62
EM_AARCH64 = 183
EM_CUDA = 190
MACHINES = {EM_X86_64: "x86_64", EM_AARCH64: "aarch64", EM_CUDA: "cuda"}
ET_DYN = 3
SHT_GNU_VERNEED = 0x6FFFFFFE

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")


def _data(obj) -> bytes:
    return obj if isinstance(obj, bytes | bytearray | memoryview) else Path(obj).read_bytes()


def header(obj, offset: int = 0) -> dict:
    """e_type, e_machine, e_flags, ... of the ELF at ``offset`` (ValueError if it is not an ELF64 LE file)."""
    data = _data(obj)
    if data[offset:offset + 4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    if data[offset + 4] != 2 or data[offset + 5] != 1:
        raise ValueError("only 64-bit little-endian ELF is read here")
    (ident, e_type, e_machine, _ver, _entry, e_phoff, e_shoff, e_flags, _ehsize, e_phentsize, e_phnum,
     e_shentsize, e_shnum, e_shstrndx) = _EHDR.unpack_from(data, offset)
    return {"type": e_type, "machine": e_machine, "machine_name": MACHINES.get(e_machine, str(e_machine)),
            "flags": e_flags, "shoff": e_shoff, "shentsize": e_shentsize, "shnum": e_shnum,
            "shstrndx": e_shstrndx, "osabi": ident[7], "abiversion": ident[8],
            "phoff": e_phoff, "phentsize": e_phentsize, "phnum": e_phnum}


_PHDR = struct.Struct("<IIQQQQQQ")
SHT_NOBITS = 8


def required_size(obj) -> int:
    """Bytes the file must have for its ELF header, program and section header tables and the file-backed part
    of every segment and section (a truncated shared object is refused with this before it is mapped)."""
    data = _data(obj)
    if len(data) < _EHDR.size:
        raise ValueError(f"{len(data)} bytes is too short for an ELF header")
    h = header(data)
    need = max(_EHDR.size, h["phoff"] + h["phnum"] * h["phentsize"], h["shoff"] + h["shnum"] * h["shentsize"])
    if need > len(data):
        return need
    for i in range(h["phnum"]):
        _type, _flags, off, _vaddr, _paddr, filesz, _memsz, _align = _PHDR.unpack_from(
            data, h["phoff"] + i * h["phentsize"])
        need = max(need, off + filesz)
    for i in range(h["shnum"]):
        sh = _SHDR.unpack_from(data, h["shoff"] + i * h["shentsize"])
        if sh[1] != SHT_NOBITS:
            need = max(need, sh[4] + sh[5])
    return need


def sections(obj, offset: int = 0) -> list[dict]:
    data = _data(obj)
    h = header(data, offset)
    out = []
    for i in range(h["shnum"]):
        (name, sh_type, flags, addr, off, size, link, info, align, entsize) = _SHDR.unpack_from(
            data, offset + h["shoff"] + i * h["shentsize"])
        out.append({"name_off": name, "type": sh_type, "offset": off, "size": size, "link": link, "info": info,
                    "addr": addr})
    if out and h["shstrndx"] < len(out):
        strtab = out[h["shstrndx"]]
        for s in out:
            s["name"] = _cstr(data, offset + strtab["offset"] + s["name_off"])
    return out


def _cstr(data: bytes, pos: int) -> str:
    end = data.index(b"\0", pos)
    return bytes(data[pos:end]).decode(errors="replace")


def needed_versions(obj) -> dict[str, set[str]]:
    """{library: {symbol version, ...}} from .gnu.version_r (what the dynamic linker must find)."""
    data = _data(obj)
    secs = sections(data)
    out: dict[str, set[str]] = {}
    for s in secs:
        if s["type"] != SHT_GNU_VERNEED:
            continue
        strtab = secs[s["link"]]["offset"]
        pos, count = s["offset"], s["info"]
        for _ in range(count):
            _vn_version, vn_cnt, vn_file, vn_aux, vn_next = struct.unpack_from("<HHIII", data, pos)
            lib = _cstr(data, strtab + vn_file)
            aux = pos + vn_aux
            for _ in range(vn_cnt):
                _hash, _flags, _other, vna_name, vna_next = struct.unpack_from("<IHHII", data, aux)
                out.setdefault(lib, set()).add(_cstr(data, strtab + vna_name))
                if not vna_next:
                    break
                aux += vna_next
            if not vn_next:
                break
            pos += vn_next
    return out


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def max_glibc(obj) -> str | None:
    """The newest GLIBC_x.y symbol version the file needs ("2.27"), or None if it needs none."""
    versions = {v[len("GLIBC_"):] for vs in needed_versions(obj).values() for v in vs
                if v.startswith("GLIBC_") and re.fullmatch(r"GLIBC_[\d.]+", v)}
    return max(versions, key=_version_key) if versions else None


def glibc_at_most(found: str | None, limit: str) -> bool:
    return found is None or _version_key(found) <= _version_key(limit)


def embedded_cubins(obj) -> list[dict]:
    """CUDA cubins (ELF, e_machine 190) found anywhere inside the file, with their sm.

    For the CUDA 11.x cubin format ``e_flags & 0xff`` is the real sm (62 for sm_62) and ``(e_flags >> 16) & 0xff``
    the virtual arch the PTX was written for.
    """
    data = _data(obj)
    out = []
    for m in re.finditer(re.escape(b"\x7fELF"), data):
        off = m.start()
        if off == 0:
            continue
        try:
            h = header(data, off)
        except (ValueError, struct.error):
            continue
        if h["machine"] != EM_CUDA:
            continue
        flags = h["flags"]
        try:
            ends = [s["offset"] + s["size"] for s in sections(data, off) if s["type"] != 8]  # 8: SHT_NOBITS
        except (ValueError, struct.error, IndexError):
            ends = []
        size = max([h["shoff"] + h["shnum"] * h["shentsize"], h["phoff"] + h["phnum"] * h["phentsize"], *ends])
        out.append({"offset": off, "e_flags": flags, "sm": flags & 0xFF, "virtual_sm": (flags >> 16) & 0xFF,
                    "size": size})
    return out


def symbol_bytes(obj, name: str) -> bytes:
    """The bytes of the dynamic symbol ``name`` (e.g. ``__tvm_ffi__library_bin``) as stored in the file."""
    data = _data(obj)
    secs = sections(data)
    for s in secs:
        if s["type"] != 11:  # SHT_DYNSYM
            continue
        strtab = secs[s["link"]]["offset"]
        for pos in range(s["offset"], s["offset"] + s["size"], 24):
            st_name, _info, _other, _shndx, value, size = struct.unpack_from("<IBBHQQ", data, pos)
            if _cstr(data, strtab + st_name) != name:
                continue
            for sec in secs:
                if sec["addr"] and sec["type"] != 8 and sec["addr"] <= value < sec["addr"] + sec["size"]:
                    start = sec["offset"] + value - sec["addr"]
                    return bytes(data[start:start + size])
    raise KeyError(f"no dynamic symbol {name}")


def ptx_targets(obj) -> list[str]:
    """``.target sm_XX`` lines of any PTX text inside the file."""
    return sorted({m.decode() for m in re.findall(rb"\.target\s+(sm_\d+[a-z]?)", _data(obj))})


def describe(path) -> dict:
    """Facts of a built .so: machine, type, newest glibc needed, embedded cubins and PTX targets."""
    data = _data(path)
    h = header(data)
    return {
        "machine": h["machine_name"],
        "e_machine": h["machine"],
        "shared_object": h["type"] == ET_DYN,
        "max_glibc": max_glibc(data),
        "cubins": [{"sm": c["sm"], "virtual_sm": c["virtual_sm"], "e_flags": hex(c["e_flags"]),
                    "bytes": c["size"]} for c in embedded_cubins(data)],
        "ptx_targets": ptx_targets(data),
    }
