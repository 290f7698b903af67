"""Seconds per training step of a CIFAR model on this CPU under each speed option (train's inner loop).

    python benchmarks/train_speed.py --model resnet56 --steps 15

Configurations are interleaved round-robin so background load hits them alike; the median step time is
scaled to one epoch of 50,000 images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from compiler.models import build_model


def step_fn(model, opt, channels_last, bf16):
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def step(x, y):
        x = x.contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--compile", action="store_true", help="also try torch.compile (slow to compile)")
    args = ap.parse_args()
    configs = [("fp32 NCHW", False, False, False), ("fp32 channels_last", True, False, False),
               ("bf16 autocast NCHW", False, True, False), ("bf16 autocast channels_last", True, True, False)]
    if args.compile:
        configs += [("bf16 channels_last + torch.compile", True, True, True)]
    runners = {}
    for name, cl, bf16, comp in configs:
        torch.manual_seed(0)
        m = build_model(args.model).train()
        if cl:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        if comp:
            m = torch.compile(m)
        runners[name] = step_fn(m, opt, cl, bf16)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    times = {name: [] for name in runners}
    for name, step in runners.items():  # warm-up (and compile)
        t = time.perf_counter(); step(x, y); step(x, y)
        print(f"warm-up {name}: {time.perf_counter() - t:.1f} s", flush=True)
    for _ in range(args.steps):
        for name, step in runners.items():
            t = time.perf_counter(); step(x, y); times[name].append(time.perf_counter() - t)
    rows = []
    steps_per_epoch = 50_000 / args.batch
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"config": name, "ms_per_step": round(med * 1e3, 1),
                     "s_per_epoch": round(med * steps_per_epoch, 1)})
    base = rows[0]["s_per_epoch"]
    for r in rows:
        r["speedup"] = round(base / r["s_per_epoch"], 2)
        print(f"{r['config']:40s} {r['ms_per_step']:8.1f} ms/step {r['s_per_epoch']:8.1f} s/epoch  x{r['speedup']}")
    print(json.dumps({"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
