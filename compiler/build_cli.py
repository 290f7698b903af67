"""``build``: the verb. Flags -> :class:`compiler.build.BuildSettings`, one :func:`compiler.build.build`, and the
build summary (see :mod:`compiler.build` for what a build does). The int8 calibration flags are shared by the verbs
that build or tune (compare, report, tune): :func:`add_quantization_args`, :func:`quant_from`."""

from __future__ import annotations

from pathlib import Path

from compiler import cli, console, precision, zoo
from compiler.build import LIBRARY, BuildSettings, QuantSettings, build, load_for_build


def configure(p) -> None:
    p.add_argument("--target", default="jetson-tx2", help="named target (see `python -m compiler targets`)")
    cli.add_model_args(p)
    p.add_argument("--precision", default="auto", choices=precision.CHOICES,
                   help="auto: the target's default (int8 where it has fast int8, fp16 on the TX2)")
    p.add_argument("--batch", type=int, default=1, help="static batch size the module is compiled for")
    p.add_argument("--out", metavar="DIR", help="artifact folder (default: artifacts/<model>-<target>)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="CIFAR-10 folder: int8 calibration (training images) and verification (test images); "
                        "default: env CIFAR10_DIR")
    add_quantization_args(p)
    p.add_argument("--tuning-log", metavar="DIR", default=None,
                   help="MetaSchedule database to apply (default: tuning_logs/<target>/<model>-<variant>/ when "
                        "it exists; see `python -m compiler tune`)")
    cli.add_json_arg(p)


def add_quantization_args(p) -> None:
    g = p.add_argument_group("int8 quantization")
    g.add_argument("--calib-images", type=int, default=precision.DEFAULT_CALIB_IMAGES, metavar="N",
                   help="training images for activation-range calibration (default %(default)s)")
    g.add_argument("--calibration", choices=precision.CALIBRATION_METHODS, default=precision.DEFAULT_CALIBRATION,
                   help="activation range: min/max, percentile or entropy (KL, as TensorRT) (default %(default)s)")
    g.add_argument("--keep-fp32", default=",".join(precision.DEFAULT_KEEP), metavar="LAYERS",
                   help="layers left in fp32: first, last, layer names such as conv2d3, or none "
                        "(default %(default)s)")


def settings_from(args) -> BuildSettings:
    """The flags of build (and of verbs that build: compare, report) as settings."""
    return BuildSettings(target=args.target, precision=args.precision, batch=args.batch, out=args.out,
                         data=args.data, quant=quant_from(args), tuning_log=args.tuning_log)


def quant_from(args) -> QuantSettings:
    return QuantSettings(calib_images=args.calib_images, calibration=args.calibration, keep_fp32=args.keep_fp32)


def run(args) -> dict:
    settings = settings_from(args)
    ckpt, note = load_for_build(args.model, args.checkpoint, args.normalize)
    result = build(ckpt, settings, untrained_note=note)
    render(result)
    m = result["manifest"]
    dense, comp = m["flops"]["dense"], m["flops"]["compiled"]
    return {
        "artifact": result["artifact"],
        "target": m["target"]["name"],
        "model": m["model"],
        "precision": m["precision"],
        "flops_dense": dense,
        "flops_compiled": comp,
        "params_dense": m["params"]["dense"],
        "params_compiled": m["params"]["compiled"],
        "weight_bytes_dense": m["weight_bytes"]["dense"],
        "weight_bytes_compiled": m["weight_bytes"]["compiled"],
        "max_abs_diff": m["verification"]["max_abs_diff"],
        "untrained": bool(m["checkpoint"]["note"]),
    }


def render(result: dict) -> None:
    """The build summary table."""
    m = result["manifest"]
    dense, comp = m["flops"]["dense"], m["flops"]["compiled"]
    rows = [
        {"": "model", "value": m["model"] + (" (untrained)" if m["checkpoint"]["note"] else
                                             f": {zoo.describe(m['model'])}" if m["checkpoint"]["shipped"] else
                                             f" ({m['checkpoint']['path']})")},
        {"": "target", "value": f"{m['target']['name']} ({m['target']['kind']})"},
        {"": "precision", "value": f"{m['precision']} - {m['precision_reason']}"},
        {"": "MACs dense -> compiled", "value": f"{dense:,} -> {comp:,} ({100 * (1 - comp / dense):.1f}% cut)"},
        {"": "params dense -> compiled", "value": f"{m['params']['dense']:,} -> {m['params']['compiled']:,}"},
        {"": "weight bytes dense -> compiled",
         "value": f"{m['weight_bytes']['dense']:,} -> {m['weight_bytes']['compiled']:,} "
                  f"({m['weight_bytes']['dense'] / max(1, m['weight_bytes']['compiled']):.2f}x smaller)"},
        {"": "tuning", "value": tuning_line(m)},
        {"": "threads", "value": threads_line(m)},
        {"": "max |diff| vs PyTorch", "value": f"{m['verification']['max_abs_diff']:.3g} "
                                             f"(tol {m['verification']['tolerance']:.3g}, {m['verification']['run_on']})"},
        {"": "verified on", "value": f"{m['verification']['inputs']}: argmax agreement "
                                     f"{m['verification']['argmax_agreement']:.2f} "
                                     f"(needs {m['verification']['argmax_agreement_required']:.2f})"
                                     + (f", top-1 {m['verification']['top1_on_inputs']}"
                                        if m['verification'].get('top1_on_inputs') is not None else "")},
        {"": "artifact", "value": str(Path(result["artifact"]) / LIBRARY)},
    ]
    print(console.table(rows, ["", "value"], title="build summary"))


# what skipping tuning costs on a CPU: the dense ResNet56 built with and without tuning_logs/host, 2-core AMD Zen 5,
# 2 threads, untuned kernels parallel (passes/parallel_fallback.py); benchmarks/resnet56_defaults.md
UNTUNED_SLOWDOWN = "ResNet56 fp32 50.2 ms untuned vs 1.35 ms tuned (37x); int8 7.04 ms vs 0.55 ms (13x)"


def tuning_line(m: dict) -> str:
    t = m["tuning"]
    lib = t.get("library") or {}
    amx = t.get("amx_conv2d") or 0
    fixed = (f"; {t['fixed_schedules'] - amx} layout kernels with a fixed schedule" if t.get("fixed_schedules") else "")
    if amx:
        fixed += f"; {amx} int8 conv2d kernels on AMX tiles (fixed schedule, passes/amx.py)"

    def counts(match) -> str:
        how = "" if match in (None, "exact") else f"; {match}"
        return f"{t.get('tasks_applied', 0)}/{t.get('tasks', '?')} kernels tuned{fixed}{how}"

    if t.get("database") and not lib.get("tasks_applied"):  # the model's database did it all (or no library)
        idle = f"; the kernel library {lib['database']} had nothing to add" if lib else ""
        return f"{t['database']} ({counts(t.get('match'))}{idle})"
    if lib:
        own = f"{t['database']}, then " if t.get("database") else ""
        return (f"{own}kernel library {lib['database']} for {lib.get('tasks_applied')} kernels "
                f"({counts(lib.get('match'))})")
    if m["target"]["kind"] != "cpu" or m["target"]["cross_compiled"]:
        return f"{t.get('note')}; tune on the board over RPC: see `python -m compiler tune --help`"
    path = m["checkpoint"].get("path")
    ck = f" --checkpoint {path}" if path and not m["checkpoint"].get("shipped") else ""
    ck += " --data DIR" if m["precision"] == "int8" else ""
    return (f"UNTUNED: {t.get('note')}. Default schedules run 10-40x slower than tuned ones ({UNTUNED_SLOWDOWN}). "
            f"Fix: python -m compiler tune --target {m['target']['name']} --model {m['model']}{ck} "
            f"--precision {m['precision']} --batch {m['input']['shape'][0]} --trials 1000, then build again")


def threads_line(m: dict) -> str:
    r = m.get("runtime") or {}
    if r.get("threads") is None:
        return r.get("how", "")
    times = ", ".join(f"{n}: {ms} ms" for n, ms in (r.get("measured_ms") or {}).items())
    return f"{r['threads']} (fastest here; {times}); applied whenever the project loads it" if times else \
        f"{r['threads']} ({r.get('how')})"
