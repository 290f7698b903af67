"""The text of deploy/ for board artifacts: README.md and load_on_board.py."""

from __future__ import annotations

from targets import TargetSpec

LOAD_ON_BOARD = r'''#!/usr/bin/env python3
"""Load the model with the TVM runtime on the board and run one random input.

    python3.10 load_on_board.py                  # ../model.so: the cubin compiled at build time
    python3.10 load_on_board.py --board-nvcc     # model_cuda_source.so: compile the CUDA C with this board's nvcc
                                                 # (use it when the driver refuses the cubin)

Needs the TVM 0.27 runtime built for the board (build_tvm_runtime.sh) on PYTHONPATH / TVM_LIBRARY_PATH.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the board has the runtime only, not the compiler

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm.runtime.vm import VirtualMachine  # noqa: E402  (the same class as tvm.relax.VirtualMachine)

HERE = Path(__file__).resolve().parent


def use_board_nvcc(arch, nvcc):
    """Register tvm_callback_cuda_compile: CUDA C -> cubin with the board's nvcc (cached by source hash).
    TVM calls it when it loads a module whose CUDA code is source (model_cuda_source.so)."""
    import tvm_ffi

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tvm-board-cubins"
    cache.mkdir(parents=True, exist_ok=True)

    def compile_cuda(code, *_ignored):
        code = str(code)
        out = cache / (hashlib.sha256(f"{arch}\n{code}".encode()).hexdigest()[:24] + ".cubin")
        if not out.exists():
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "kernels.cu"
                src.write_text(code)
                cmd = [nvcc, "--cubin", f"-arch=sm_{arch}", "-O3", "-std=c++14", "-o", str(out) + ".tmp", str(src)]
                print("compiling the CUDA C:", " ".join(cmd), file=sys.stderr)
                subprocess.run(cmd, check=True)
                os.replace(str(out) + ".tmp", out)
        return out.read_bytes()

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--board-nvcc", action="store_true",
                   help="load model_cuda_source.so and compile its CUDA C with this board's nvcc")
    p.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    p.add_argument("--arch", default="@ARCH@", help="sm of this board's GPU (default @ARCH@)")
    p.add_argument("--library", default=None, help="the .so to load (default ../model.so)")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()

    if args.board_nvcc:
        use_board_nvcc(args.arch, args.nvcc)
        lib_path = Path(args.library or HERE / "model_cuda_source.so")
    else:
        lib_path = Path(args.library or HERE.parent / "@LIBRARY@")
    dev = tvm.cuda(0)
    if not dev.exist:
        sys.exit("no CUDA device visible to the TVM runtime")
    lib = tvm.runtime.load_module(str(lib_path))
    vm = VirtualMachine(lib, dev)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 32, 32)).astype("float32")
    xd = tvm.runtime.tensor(x, dev)
    y = vm["main"](xd).numpy()  # the first call loads the cubin (or compiles the CUDA C)
    t0 = time.perf_counter()
    for _ in range(20):
        y = vm["main"](xd).numpy()
    ms = (time.perf_counter() - t0) / 20 * 1000
    print(f"{lib_path.name}: logits {y.shape}, argmax {y.argmax(axis=1).tolist()}, {ms:.2f} ms/batch")


if __name__ == "__main__":
    main()
'''


def load_on_board(spec: TargetSpec, library: str) -> str:
    return LOAD_ON_BOARD.replace("@ARCH@", str(spec.cuda_arch)).replace("@LIBRARY@", library)


def readme(spec: TargetSpec, library: str, binary) -> str:
    arch = spec.arch
    cubin = (f"an {arch} cubin ({len(binary.cubin):,} bytes, sha256 {binary.sha256[:16]}..., NVRTC 11.8 + "
             f"ptxas 11.8)" if binary else "its CUDA device code")
    notes = "".join(f"\n- {n}" for n in spec.notes)
    notes = f"\nNotes:\n{notes}\n" if notes else ""
    return f"""# Deploying `{library}` on {spec.description}

Built for target `{spec.name}`: host code for aarch64 (LLVM `-mcpu={spec.host['mcpu']}`), linked against glibc
{spec.glibc} (JetPack 4.6 or newer); GPU code embedded as {cubin}.
Board software assumed: {spec.board}.
{notes}
The board needs **the TVM runtime only** (not the compiler, not LLVM). The CUDA C that was compiled is here as
`kernels.cu` (and its PTX as `kernels.ptx`), and `model_cuda_source.so` is the same model carrying that CUDA C
instead of the cubin, for boards whose driver refuses the cubin.

## 1. The TVM runtime for the board (once per board)

TVM 0.27's CUDA runtime calls `cuLaunchKernelEx` (CUDA 12) and its Python package needs Python >= 3.10, while
JetPack 4.6 has CUDA 10.2 and Python 3.6. `build_tvm_runtime.sh` builds, on the board, Python 3.10, the TVM 0.27
runtime + CUDA runtime (with `tvm-0.27-cuda10.patch`: plain `cuLaunchKernel` when CUDA < 12) and the C++ RPC
server `tvm_rpc`, into `~/tvm-runtime` by default:

    bash build_tvm_runtime.sh            # UNTESTED on a board: read it first (expect an hour or more on a TX2)
    source ~/tvm-runtime/env.sh          # PYTHONPATH, TVM_LIBRARY_PATH, TVM_USE_RUNTIME_LIB=1, the venv

On JetPack 6 (CUDA 12.2, Python 3.10; Orin only) no patch is needed: the same script works with `PATCH=0`.

## 2. Run the model

Copy the whole artifact folder (`{library}`, `manifest.json`, `deploy/`) to the board, then:

    python deploy/load_on_board.py       # loads ../{library} on cuda:0 and runs a random input

or by hand:

```python
import numpy as np, tvm
from tvm.runtime.vm import VirtualMachine   # = tvm.relax.VirtualMachine
lib = tvm.runtime.load_module("{library}")
dev = tvm.cuda(0)
vm = VirtualMachine(lib, dev)
x = tvm.runtime.tensor(np.zeros((1, 3, 32, 32), "float32"), dev)   # normalized NCHW input
logits = vm["main"](x).numpy()                                      # (1, 10)
```

## 3. Or drive it over RPC from the build machine

On the board:

    ~/tvm-runtime/bin/tvm_rpc server --host=0.0.0.0 --port=9090
    # or: python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090

On the build machine (the same TVM version):

```python
import numpy as np, tvm
from tvm import rpc
from tvm.runtime.vm import VirtualMachine
remote = rpc.connect("BOARD_IP", 9090)
remote.upload("{library}")
lib = remote.load_module("{library}")
dev = remote.cuda(0)
vm = VirtualMachine(lib, dev)
logits = vm["main"](tvm.runtime.tensor(np.zeros((1, 3, 32, 32), "float32"), dev)).numpy()
```

## Without Python, or checked before the board

`RUNTIME.md` says which parts of the board runtime were run in an emulated aarch64 board (`python -m compiler
board --emulate setup`; no GPU there) and which still need a real board. `run_model.py` runs `{library}` over an
`.npy` of normalized images (what `eval --artifact DIR --emulate` uses); `board_runner.cc` does the same with no
Python (TVM-FFI's C ABI; built for aarch64 by `targets.emulate.build_runner`, CPU models: device cpu:0).

## 4. When the driver refuses the cubin

The cubin comes from CUDA 11.8; a CUDA 10.2 driver (JetPack 4.6) may reject it on first use
(`CUDA_ERROR_NO_BINARY_FOR_GPU`, `CUDA_ERROR_INVALID_SOURCE`, `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`). Then build
the GPU code on the board with its own nvcc:

    python deploy/load_on_board.py --board-nvcc

That loads `model_cuda_source.so`, whose GPU module is the CUDA C of `kernels.cu`; TVM hands it to
`tvm_callback_cuda_compile`, which the script registers to run
`nvcc --cubin -arch={arch} -O3 -std=c++14` (the result is cached in `~/.cache/tvm-board-cubins/`). To check that
the board's nvcc takes the source at all:

    /usr/local/cuda/bin/nvcc --cubin -arch={arch} -std=c++14 -o /tmp/kernels.cubin deploy/kernels.cu

`kernels.cu` is TVM's CUDA C with its hex float literals rewritten as exact decimals, so C++14 compilers (CUDA
10.2's nvcc) accept it; the GPU code is the same. A driver of CUDA 11.8 or newer could also JIT `kernels.ptx`
(PTX ISA 7.8, `.target {arch}`); CUDA 10.2 cannot.
"""
