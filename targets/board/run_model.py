#!/usr/bin/env python3
"""Run a compiled model.so over a batch of images with the TVM runtime only, and save the logits.

    python3 run_model.py model.so images.npy logits.npy [--batch N] [--device cpu|cuda]

``images.npy``: float32 N x 3 x 32 x 32, already normalized as the artifact's manifest says. The module's batch
is static: the images go through in chunks of ``--batch`` (the last one padded). Runs on a board, or in the
emulated board (``eval --artifact DIR --emulate``). Needs Python >= 3.9, numpy and TVM 0.27's runtime
(``TVM_USE_RUNTIME_LIB=1`` is enough). A problem the user must act on ends with one ``error:`` line, exit 3.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")

import numpy as np  # noqa: E402


def fail(message):
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(3)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("library")
    p.add_argument("images")
    p.add_argument("logits")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--what", default="the model", help="the artifact, in words, for messages")
    args = p.parse_args()

    t0 = time.perf_counter()
    import tvm
    from tvm.runtime.vm import VirtualMachine

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        lib = tvm.runtime.load_module(args.library)
    except Exception as e:  # noqa: BLE001 - the runtime's own message, made one line
        text = str(e)
        if "loader of that name is not registered" in text and "cuda" in text:
            fail(f"no CUDA device: {args.what} loaded here (its aarch64 host code resolved every symbol against "
                 "this runtime, libstdc++ and glibc), but its GPU code needs a CUDA device and a TVM runtime built "
                 "with CUDA, which this board does not have; run it on the Jetson with the runtime of "
                 "deploy/build_tvm_runtime.sh")
        fail(f"cannot load {args.library} with TVM {tvm.__version__}: {text.strip().splitlines()[-1]}")
    t_load = time.perf_counter() - t0
    if args.device == "cuda":
        dev = tvm.cuda(0)
        if not dev.exist:
            fail(f"no CUDA device: {args.what} loaded, but this board has no CUDA device to run it on")
    else:
        dev = tvm.cpu(0)
    vm = VirtualMachine(lib, dev)
    x = np.load(args.images).astype("float32", copy=False)
    outs = []
    t0 = time.perf_counter()
    for i in range(0, len(x), args.batch):
        chunk = x[i:i + args.batch]
        n = len(chunk)
        if n < args.batch:
            chunk = np.concatenate([chunk, np.zeros((args.batch - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(vm["main"](tvm.runtime.tensor(np.ascontiguousarray(chunk), dev)).numpy()[:n])
    t_run = time.perf_counter() - t0
    logits = np.concatenate(outs) if outs else np.zeros((0, 10), "float32")
    np.save(args.logits, logits)
    import platform

    print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "tvm": tvm.__version__,
                      "images": int(len(x)), "import_s": round(t_import, 2), "load_s": round(t_load, 3),
                      "run_s": round(t_run, 3)}), flush=True)


if __name__ == "__main__":
    main()
