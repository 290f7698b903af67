"""Rendering: the terminal tables, markdown and plots of ``compare`` and ``report`` (nothing here measures)."""

from __future__ import annotations

from pathlib import Path

from compiler import console, fileio

COMPARE_COLUMNS = ["engine", "model", "precision", "batch", "threads", "median_ms", "p90_ms", "images_per_s",
                   "speedup", "vs_best_peer", "max_abs_diff", "argmax_agree", "note"]


def compare_table(rows: list[dict], name: str, batch: int, base_ms: float, check_images: int) -> str:
    """compare's rows: unavailable ones show their reason, speed-ups as ``1.23x``."""
    shown = []
    for r in rows:
        s = dict(r)
        if not r["available"]:
            s["note"] = r["reason"]
        for key in ("speedup", "vs_best_peer"):
            if r.get(key) is not None:
                s[key] = f"{r[key]:.2f}x"
        shown.append(s)
    return console.table(shown, COMPARE_COLUMNS,
                         title=f"{name}, batch {batch}: speedup relative to PyTorch eager dense fp32 "
                               f"({base_ms:.3g} ms), vs_best_peer relative to the fastest CPU peer (PyTorch, ONNX "
                               f"Runtime, OpenVINO) on the same model; max |diff| and argmax agreement (%) against "
                               f"PyTorch fp32 of the same model on {check_images} test images")


def best_line(best: dict, kind: str) -> str:
    """One line: the best TVM row on ``kind`` against PyTorch eager dense fp32 and the best CPU peer."""
    t, p = best["tvm"], best["peer"]
    return (f"best TVM {kind} row: {t['median_ms']} ms ({t['precision']}, {t['threads']} threads) = "
            f"{best['tvm_vs_pytorch_dense']}x PyTorch eager dense fp32, {best['tvm_vs_best_peer']}x the best "
            f"CPU peer on the {kind} model ({p['engine']} {p['precision']}, {p['median_ms']} ms, {p['threads']} "
            f"threads); goals: " + ", ".join(f"{g} {'met' if ok else 'NOT met'}" for g, ok in best["goals"].items()))


def report_rows(rows: list[dict]) -> list[dict]:
    """report's measured rows as the table shows them (report.md and the terminal)."""
    out = []
    for r in rows:
        out.append({
            "model": r["model"],
            "stage": r["stage"] + (" (one-shot, no fine-tuning)" if r.get("one_shot") else ""),
            "top-1 %": r["top1"],
            "test images": r["n_test"],
            "MMACs": round(r["macs"] / 1e6, 2),
            "params": r["params"],
            "model.so MB": round(r["so_bytes"] / 1e6, 3),
            "weights MB": round(r["weight_bytes"] / 1e6, 3),
            "b1 latency ms": r["latency_ms"],
            "best CPU peer b1 ms": r.get("best_peer_ms"),
            "vs best peer": f"{r['vs_best_peer']:.2f}x ({r['best_peer']})" if r.get("vs_best_peer") else "",
            f"b{r['throughput_batch']} img/s": r["throughput_ips"],
            f"kernels b1 / b{r['throughput_batch']}": f"{r['kernels_b1']} / {r['kernels_throughput']}",
        })
    return out


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |",
             "| " + " | ".join("---:" if isinstance(rows[0][c], (int, float)) else "---" for c in cols) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(console._fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_flops(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    markers = {"baseline": "o", "pruned": "s", "pruned + int8": "^"}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        ax.plot([r["macs"] / 1e6 for r in mine], [r["top1"] for r in mine], ":", color="grey", lw=1)
        for r in mine:
            ax.scatter(r["macs"] / 1e6, r["top1"], marker=markers.get(r["stage"], "o"), s=60, zorder=3,
                       label=f"{model} {r['stage']}")
            ax.annotate(f"{r['top1']:.2f}", (r["macs"] / 1e6, r["top1"]), textcoords="offset points",
                        xytext=(6, -10 if "int8" in r["stage"] else 4), fontsize=8)
    n = sorted({r["n_test"] for r in rows})
    ax.set_xlabel("MMACs per image (compiled)")
    ax.set_ylabel(f"top-1 % (compiled artifact, {'/'.join(f'{k:,}' for k in n)} test images)")
    ax.set_title("accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_latency(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4.3), dpi=100)
    bars = a1.bar(range(len(rows)), [r["latency_ms"] for r in rows], color="tab:blue")
    a1.bar_label(bars, fmt="%.3g", fontsize=8)
    a1.set_ylabel("batch-1 latency, median ms (lower is better)")
    bars = a2.bar(range(len(rows)), [r["throughput_ips"] for r in rows], color="tab:green")
    a2.bar_label(bars, fmt="%.4g", fontsize=8)
    a2.set_ylabel(f"batch-{rows[0]['throughput_batch']} throughput, images/s (higher is better)")
    for a, kernels in ((a1, "kernels_b1"), (a2, "kernels_throughput")):
        a.set_xticks(range(len(rows)), [f"{r['model']}\n{r['stage']}\n({r[kernels]})" for r in rows], fontsize=8)
        a.grid(axis="y", alpha=0.3)
    fig.suptitle("latency and throughput per stage (TVM, this machine)")
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def report_markdown(result: dict, shown: list[dict]) -> str:
    """report.md: the table, how each column was measured, the notes and the plots."""
    m = result["machine"]
    rows = result["rows"]
    n = sorted({r["n_test"] for r in rows})
    lines = [
        f"# Report: {', '.join(dict.fromkeys(r['model'] for r in rows))} - baseline, pruned, pruned + int8",
        "",
        f"Made by `python -m compiler report` on {result['created']} in {result['seconds']:.0f} s.",
        "",
        "    " + result["command"],
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['platform']}; load average (1/5/15 min) "
        f"{m.get('load_average_1_5_15')} at the start, {result['machine_at_end'].get('load_average_1_5_15')} at "
        f"the end; TVM threads: " + (f"TVM_NUM_THREADS={m['tvm_num_threads_env']} (set by the user)"
                                     if m.get("tvm_num_threads_env") else
                                     "each artifact's recorded fastest count (manifest runtime.threads)") + ". "
        f"TVM {result['versions']['tvm']}, torch {result['versions']['torch']}, target `{result['target']}`.",
        "",
        markdown_table(shown),
        "",
        "- top-1: measured on the compiled artifact (the faster one per image of the batch-1 and the "
        f"batch-{rows[0]['throughput_batch']} build; `accuracy_artifact` in report.json; `eval --artifact` on it "
        "prints the same) on " + (f"the first {'/'.join(f'{k:,}' for k in n)} CIFAR-10 test images (--limit-test: "
                                  "not the full test set)." if result["limit_test"] else
                                  f"all {'/'.join(f'{k:,}' for k in n)} CIFAR-10 test images."),
        "- MMACs: millions of multiply-accumulates per image, counted on the compiled Relax IR (after pruned "
        "channels are stripped); params likewise. int8 changes neither.",
        "- model.so MB: the compiled library's file size; weights MB: bytes of the constants in the compiled IR "
        "(int8 weights take a quarter).",
        f"- b1 latency: median of {result['timing']['repeat']} runs x {result['timing']['number']} calls "
        f"(TVM time_evaluator, {result['timing']['warmup']} warm-up); "
        f"b{rows[0]['throughput_batch']} img/s: batch / median of {result['timing']['throughput_repeat']} runs x "
        f"{result['timing']['throughput_number']} call(s).",
        "- best CPU peer b1 ms: the fastest of PyTorch eager, ONNX Runtime and OpenVINO (fp32, and the pruned "
        "model's static int8 QDQ: compare's rows) on the stage's model at batch 1, each at its fastest thread "
        "count; vs best peer: that time / the stage's TVM b1 latency (`peers_b1_ms` in report.json).",
        "- kernels: `tuned a/b` where a MetaSchedule database from tuning_logs/ applied to a of b kernels of that "
        "build (batch 1 / throughput batch), else `untuned` (TVM's default schedules; `python -m compiler tune` "
        "makes them faster). Tuning is per shape, batch included.",
    ]
    for note in result["notes"]:
        lines.append(f"- **{note}**")
    lines += ["", "![accuracy vs FLOPs](accuracy_vs_flops.png)", "",
              "![latency per stage](latency_per_stage.png)", ""]
    return "\n".join(lines)
