"""The blob TVM embeds in an exported .so (symbol ``__tvm_ffi__library_bin``) and how we rewrite its CUDA part.

Layout (tvm-ffi src/ffi/extra/library_module.cc, ProcessLibraryBin)::

    <nbytes: u64> <import tree: vec<u64> indptr, vec<u64> child indices>
    then per module: <kind: str> [<payload: bytes>]      (kind "_lib" = the host code itself, no payload)

    str / bytes = <u64 length><data>;  vec<u64> = <u64 count><u64 ...>

A "cuda" module's payload (src/backend/cuda/runtime/cuda_module.cc, SaveToBytes) is
``<fmt: str><function table><code: bytes>`` where fmt is "cuda" (CUDA C, compiled by whoever loads it),
"ptx", "cubin" or "fatbin". We only ever replace fmt and code; the function table is kept byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SYMBOL = "__tvm_ffi__library_bin"


def _u64(data: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", data, pos)[0], pos + 8


def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@dataclass
class LibraryBin:
    indptr: list[int]
    children: list[int]
    modules: list[tuple[str, bytes | None]]  # (kind, payload); payload None for "_lib"

    @classmethod
    def parse(cls, blob: bytes) -> LibraryBin:
        nbytes, pos = _u64(blob, 0)
        if nbytes + 8 != len(blob):
            raise ValueError(f"library blob says {nbytes} bytes, holds {len(blob) - 8}")
        vecs = []
        for _ in range(2):
            n, pos = _u64(blob, pos)
            vecs.append(list(struct.unpack_from(f"<{n}Q", blob, pos)))
            pos += 8 * n
        indptr, children = vecs
        modules = []
        for _ in range(len(indptr) - 1):
            n, pos = _u64(blob, pos)
            kind = blob[pos:pos + n].decode()
            pos += n
            payload = None
            if kind != "_lib":
                n, pos = _u64(blob, pos)
                payload = bytes(blob[pos:pos + n])
                pos += n
            modules.append((kind, payload))
        if pos != len(blob):
            raise ValueError(f"library blob has {len(blob) - pos} unread bytes")
        return cls(indptr, children, modules)

    def serialize(self) -> bytes:
        body = struct.pack("<Q", len(self.indptr)) + struct.pack(f"<{len(self.indptr)}Q", *self.indptr)
        body += struct.pack("<Q", len(self.children)) + struct.pack(f"<{len(self.children)}Q", *self.children)
        for kind, payload in self.modules:
            body += _str(kind.encode())
            if kind != "_lib":
                body += _str(payload)
        return struct.pack("<Q", len(body)) + body


@dataclass
class CudaPayload:
    fmt: str
    fmap: bytes  # the serialized function table, opaque
    code: bytes

    @classmethod
    def split(cls, payload: bytes, candidates: list[bytes]) -> CudaPayload:
        """Split a "cuda" payload; ``code`` must be one of ``candidates`` (the CUDA C or a cubin we know):
        the table's own encoding is not parsed, the known tail is matched instead."""
        n, pos = _u64(payload, 0)
        fmt = payload[pos:pos + n].decode()
        pos += n
        for code in candidates:
            tail = struct.pack("<Q", len(code)) + code
            if len(payload) - len(tail) >= pos and payload.endswith(tail):
                return cls(fmt, payload[pos:len(payload) - len(tail)], code)
        raise ValueError(f"cuda module (fmt {fmt!r}): its code is none of the {len(candidates)} known sources")

    def join(self) -> bytes:
        return _str(self.fmt.encode()) + self.fmap + _str(self.code)


def assembly(blob_path: str, symbol: str = SYMBOL) -> str:
    """GNU assembler source that places the blob file under ``symbol`` (default visibility, read-only data).
    Works for x86_64 and aarch64 alike; faster to build than a C array of a few megabytes."""
    path = str(blob_path).replace("\\", "\\\\").replace('"', '\\"')
    return (
        f'\t.section .rodata.{symbol},"a"\n'
        f"\t.globl {symbol}\n"
        f"\t.type {symbol}, %object\n"
        f"\t.balign 16\n"
        f"{symbol}:\n"
        f'\t.incbin "{path}"\n'
        f"\t.size {symbol}, .-{symbol}\n"
        f'\t.section .note.GNU-stack,"",%progbits\n'
    )
