"""``compare``: one model, side by side in one process on the same input batch - PyTorch eager, ONNX Runtime,
TVM and (where it exists) TensorRT - with speed-ups relative to PyTorch eager on the dense fp32 model.

Rows (each model in each precision):

* ``pytorch``      eager, dense fp32 and pruned fp32 (the physically shrunk copy: removed channels deleted)
* ``onnxruntime``  the same models exported once to ONNX (opset 18, torch.onnx's dynamo exporter, checked with
                   onnx.checker), fp32; and static int8 of the pruned model (``onnxruntime.quantization``: QDQ,
                   per-channel int8 weights, activations calibrated on the same training images as TVM's int8
                   build, the same layers kept fp32)
* ``tvm``          artifacts built here for ``host`` (fp32 dense, fp32 pruned, int8 pruned; tuning databases in
                   tuning_logs/ apply by themselves), or the folders given with ``--artifact``
* ``tensorrt``     fp32 / fp16 / int8 engines from the same ONNX when the tensorrt package imports and a CUDA GPU
                   is present; otherwise one row saying why it is not available

Without ``--pruned`` the int8 rows are of the dense model. Every row also shows how far its logits are from
PyTorch fp32 of the same model on a few test images (max |diff|, argmax agreement). Timing follows ``bench``
(warm-up, then ``--repeat`` runs of ``--number`` calls each; median and p90). PyTorch and ONNX Runtime are timed
before TVM runs anything in the process: TVM's worker threads keep spinning after a run and slow what follows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from compiler import bench, cli, console, data, precision
from compiler.errors import UserError

OPSET = 18
CHECK_IMAGES = 16
DEFAULT_BATCH = 1
BASELINE = ("pytorch", "dense", "fp32")
TENSORRT_PRECISIONS = ("fp32", "fp16", "int8")


def configure(p) -> None:
    cli.add_model_args(p)
    p.add_argument("--pruned", metavar="PRUNED",
                   help="pruned checkpoint of the same model (the output of `prune`); its int8 rows replace the "
                        "dense model's")
    cli.add_data_args(p)
    p.add_argument("--batch", type=int, default=None,
                   help=f"input batch for every engine (default: the --artifact folders' batch, else {DEFAULT_BATCH})")
    p.add_argument("--artifact", metavar="DIR", action="append", default=None,
                   help="time this TVM artifact (built for this machine) instead of building them here; repeatable")
    p.add_argument("--repeat", type=int, default=30, help="timed runs (each the mean of --number calls)")
    p.add_argument("--number", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    add_threads_arg(p)
    from compiler.build import add_quantization_args

    add_quantization_args(p)
    p.add_argument("--keep", metavar="DIR", default=None,
                   help="keep the ONNX files and the TVM artifacts built here in DIR (default: a temporary folder)")
    cli.add_json_arg(p)


def add_threads_arg(p) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for PyTorch, ONNX Runtime and TVM alike (default: each engine is timed at 1, 2, "
                        "4, ... up to this machine's cores and shown at its fastest count)")


def thread_counts(n: int | None) -> list[int]:
    """The thread counts every engine is timed at: ``[n]`` (``--threads N``), else each candidate up to the cores."""
    from compiler import threads

    if n is not None and n <= 0:
        raise UserError("--threads must be positive")
    threads.prepare_tvm()
    return [n] if n is not None else threads.candidates()


# ---------------------------------------------------------------------------------------------------------------
# models


def load_models(model: str | None, checkpoint: str | None, pruned: str | None, normalize: str | None):
    """(dense Checkpoint, pruned Checkpoint or None, physically shrunk pruned nn.Module or None)."""
    from compiler import zoo

    dense = check_dense(zoo.load(model, checkpoint, normalize))
    pr = pruned_for(dense, pruned, normalize)
    return (dense, None, None) if pr is None else (dense, pr, shrunk(pr))


def pruned_for(dense, pruned: str | None, normalize: str | None):
    """The ``--pruned`` checkpoint; without one, the shipped pruned model when it was pruned from exactly ``dense``
    (saying so in one line); else None."""
    import sys

    from compiler import zoo

    if pruned is None:
        shipped = zoo.shipped_pruned_for(dense)
        if shipped is None:
            return None
        print(f"no --pruned: using {zoo.describe(dense.model_name)}, pruned from this checkpoint", file=sys.stderr)
        pruned = shipped
    return load_pruned(pruned, dense.model_name, normalize)


def check_dense(ck):
    """``ck`` itself, or a clear error when it is a pruned checkpoint given as the baseline."""
    if ck.pruning:
        raise UserError(f"{ck.path} is a pruned checkpoint; pass its dense original as --checkpoint "
                        "and it as --pruned")
    return ck


def load_pruned(path, model_name: str, normalize: str | None):
    """The ``--pruned`` checkpoint, or a clear error when it has no pruning record."""
    from compiler import checkpoint as ckpt_mod

    pr = ckpt_mod.load_checkpoint(path, model_name, normalize)
    if not pr.pruning:
        raise UserError(f"{path} is not a pruned checkpoint (no pruning record); pass the output of "
                        "`python -m compiler prune` as --pruned")
    return pr


def shrunk(pr):
    """The physically smaller copy of a pruned checkpoint's model (removed channels deleted; same function)."""
    from compiler.prune import dependency, pruner

    graph = dependency.analyze(pr.model, prune_stream=bool(pr.pruning.get("prune_stream")))
    try:
        masks = pruner.masks_from_record(pr.pruning)
        return pruner.shrink(pr.model, graph, masks).eval()
    except (KeyError, ValueError) as e:
        raise UserError(f"{pr.path}: its pruning record does not fit {pr.model_name} ({e})") from None


def test_batch(data_dir, n: int) -> np.ndarray:
    """The first ``n`` CIFAR-10 test images, uint8 NCHW (tiled when the test set is smaller)."""
    import torch

    images = data.load_split(data_dir, "test").images[:n]
    if len(images) < n:
        images = images[torch.as_tensor(np.resize(np.arange(len(images)), n))]
    return images


def normalized(images, normalize: str) -> np.ndarray:
    return np.ascontiguousarray(data.normalize(images, normalize).numpy(), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# ONNX and ONNX Runtime


def export_onnx(model, path: Path, example: np.ndarray) -> dict:
    """Export ``model`` to ONNX (opset 18, dynamic batch) with torch.onnx's dynamo exporter; onnx.checker'd."""
    import onnx
    import torch

    from compiler import fileio

    x = torch.from_numpy(example[:1])
    with fileio.atomic_path(path) as tmp:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (x,), str(tmp), opset_version=OPSET, dynamo=True, verbose=False,
                              input_names=["x"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        onnx.checker.check_model(str(tmp), full_check=True)
    return {"file": str(path), "bytes": path.stat().st_size, "opset": OPSET,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}"}


def _quantizable(model_path: Path) -> tuple[list[str], list[str]]:
    """Names of the ONNX graph's Conv nodes and Gemm/MatMul nodes, in graph order (as TVM numbers its layers)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    mats = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    return convs, mats


def _excluded(model_path: Path, keep: tuple[str, ...]) -> list[str]:
    """TVM's ``--keep-fp32`` layers as ONNX node names: first (convs reading the input), last, conv2dK, matmulK."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    convs, mats = _quantizable(model_path)
    inputs = {i.name for i in graph.input}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    out = []
    for k in keep:
        if k == "first":
            out += [n.name for n in layers if any(i in inputs for i in n.input)]
        elif k == "last" and layers:
            out.append(layers[-1].name)
        elif k.startswith("conv2d") and k[6:].isdigit() and int(k[6:]) < len(convs):
            out.append(convs[int(k[6:])])
        elif k.startswith("matmul") and k[6:].isdigit() and int(k[6:]) < len(mats):
            out.append(mats[int(k[6:])])
    return sorted(set(out))


def quantize_onnx(fp32: Path, out: Path, calib: np.ndarray, method: str, keep: tuple[str, ...]) -> dict:
    """Static int8 with onnxruntime.quantization: QDQ, per-channel int8 weights, activations calibrated on
    ``calib`` (uint8 activations on x86, as TVM's int8 uses there), ``keep`` left in fp32."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import targets
    from passes.calibration import DEFAULT_PERCENTILE
    from passes.quantize import config_for

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.chunks = iter(calib[i:i + 64] for i in range(0, len(calib), 64))

        def get_next(self):
            chunk = next(self.chunks, None)
            return None if chunk is None else {"x": chunk}

    from compiler import fileio

    unsigned = config_for(targets.get("host")).unsigned_activations
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    extra = {"CalibPercentile": DEFAULT_PERCENTILE} if method == "percentile" else {}
    with tempfile.TemporaryDirectory(prefix="ort-quant-") as scratch, fileio.atomic_path(out) as tmp:
        pre = Path(scratch) / "pre.onnx"  # shape inference + graph optimization, as onnxruntime recommends
        quant_pre_process(str(fp32), str(pre))
        excluded = _excluded(pre, keep)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=methods[method],
                            nodes_to_exclude=excluded, extra_options=extra)
    return {"file": str(out), "bytes": out.stat().st_size, "format": "QDQ", "weights": "int8 per channel",
            "activations": "uint8" if unsigned else "int8", "calibration": method, "kept_fp32": excluded}


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_ort(session, x: np.ndarray, repeat: int, number: int, warmup: int) -> dict:
    feed = {session.get_inputs()[0].name: x}
    return bench.time_calls(lambda: session.run(None, feed), repeat, number, warmup)


# ---------------------------------------------------------------------------------------------------------------
# TensorRT (only where the package imports and a CUDA GPU is present)


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    why = []
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a broken install failing on its CUDA libraries
        why.append("the tensorrt Python package is not installed")
    try:
        import torch

        gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        gpu = False
    if not gpu:
        why.append("no CUDA GPU is present")
    return None if not why else "TensorRT is not available on this machine: " + " and ".join(why)


def time_tensorrt(onnx_path: Path, prec: str, x: np.ndarray, repeat: int, number: int, warmup: int):
    """Build a TensorRT engine from ``onnx_path`` (fp32, fp16, or int8 from a QDQ ONNX: explicit quantization,
    so the int8 ranges are the same calibration as ONNX Runtime's) and time it. (stats, logits of ``x``)."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8; implicit in 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    if prec in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if prec == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    name = network.get_input(0).name
    profile = builder.create_optimization_profile()
    profile.set_shape(name, x.shape, x.shape, x.shape)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("the engine build failed")
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    context.set_input_shape(name, x.shape)
    xin = torch.from_numpy(x).cuda()
    out_name = engine.get_tensor_name(engine.num_io_tensors - 1)
    out = torch.empty(tuple(context.get_tensor_shape(out_name)), dtype=torch.float32, device="cuda")
    context.set_tensor_address(name, xin.data_ptr())
    context.set_tensor_address(out_name, out.data_ptr())
    stream = torch.cuda.Stream()
    stats = bench.time_calls(lambda: context.execute_async_v3(stream.cuda_stream), repeat, number, warmup,
                             sync=stream.synchronize)
    return stats, out.cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# TVM


def build_artifact(checkpoint_path, model: str, prec: str, batch: int, out: Path, *, data_dir, normalize=None,
                   calib_images: int = precision.DEFAULT_CALIB_IMAGES,
                   calibration: str = precision.DEFAULT_CALIBRATION,
                   keep_fp32: str = ",".join(precision.DEFAULT_KEEP), target: str = "host") -> dict:
    """``build`` in-process (same pipeline, verification, tuning lookup and artifact folder); its result dict."""
    from compiler import build

    args = argparse.Namespace(target=target, model=model, checkpoint=str(checkpoint_path), normalize=normalize,
                              precision=prec, batch=batch, out=str(out), data=data_dir, calib_images=calib_images,
                              calibration=calibration, keep_fp32=keep_fp32, tuning_log=None)
    return build.build(args)


def tuning_note(manifest: dict) -> str:
    t = manifest.get("tuning") or {}
    if t.get("database"):
        return f"tuned ({t.get('tasks_applied')}/{t.get('tasks')} kernels, {t['database']})"
    return "untuned"


# ---------------------------------------------------------------------------------------------------------------
# the verb


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    from compiler import threads

    cpu = console.cpu_name()
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "tvm_num_threads_env": threads.user_tvm_threads(), "platform": platform.platform()}
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _row(engine, model, prec, batch, stats=None, reason=None, **extra) -> dict:
    row = {"engine": engine, "model": model, "precision": prec, "batch": batch,
           "median_ms": None, "p90_ms": None, "available": stats is not None}
    if stats is not None:
        row.update(median_ms=stats["median_ms"], p90_ms=stats["p90_ms"], runs=stats["runs"],
                   images_per_s=round(1e3 * batch / stats["median_ms"], 1))
    else:
        row["reason"] = reason
    row.update(extra)
    return row


def _agreement(logits: np.ndarray, ref: np.ndarray) -> dict:
    n = min(len(logits), len(ref))
    return {"max_abs_diff": float(np.abs(logits[:n] - ref[:n]).max()),
            "argmax_agree": round(100.0 * float((logits[:n].argmax(1) == ref[:n].argmax(1)).mean()), 1)}


def best_rows(rows: list[dict], kind: str) -> dict:
    """The fastest TVM row and the fastest other CPU engine's row on the ``kind`` model, and their ratios."""
    def fastest(engines):
        got = [r for r in rows if r["available"] and r["engine"] in engines and r["model"] == kind]
        return min(got, key=lambda r: r["median_ms"]) if got else None

    base = next((r for r in rows if (r["engine"], r["model"], r["precision"]) == BASELINE and r["available"]), None)
    tvm, peer = fastest(("tvm",)), fastest(("pytorch", "onnxruntime"))
    if not (tvm and peer and base):
        return {}
    keep = ("engine", "precision", "median_ms", "threads")
    return {"tvm": {k: tvm.get(k) for k in keep}, "peer": {k: peer.get(k) for k in keep},
            "tvm_vs_pytorch_dense": round(base["median_ms"] / tvm["median_ms"], 2),
            "tvm_vs_best_peer": round(peer["median_ms"] / tvm["median_ms"], 2)}


def _check_args(args) -> None:
    if args.repeat <= 0 or args.number <= 0 or args.warmup < 0:
        raise UserError("--repeat and --number must be positive, --warmup 0 or more")
    if args.batch is not None:
        from compiler.build import check_batch

        check_batch(args.batch)


def _is_keep_dir(folder: Path) -> bool:
    """What --keep may reuse: a folder holding only what compare writes there (ONNX files, artifact folders)."""
    from compiler.artifact import is_artifact

    return all(p.name.startswith(".") or (p.is_file() and ".onnx" in p.name) or (p.is_dir() and is_artifact(p))
               for p in folder.iterdir())


def run(args) -> dict:
    import torch

    from compiler import artifact
    from compiler.build import parse_keep, run_module

    from compiler import threads

    _check_args(args)
    counts = thread_counts(args.threads)
    torch_default = torch.get_num_threads()
    t_start = time.perf_counter()
    info = {"machine_at_start": machine()}
    dense, pruned, small = load_models(args.model, args.checkpoint, args.pruned, args.normalize)
    name = dense.model_name
    if args.keep:
        from compiler import fileio

        fileio.check_output(args.keep, is_ours=_is_keep_dir, flag="--keep", what="--keep folder of compare",
                            inputs=(dense.path, pruned and pruned.path, args.data, *(args.artifact or [])))

    # TVM artifacts given: check them before the long work
    given = []
    for folder in args.artifact or []:
        manifest = artifact.read_manifest(folder)
        if manifest["model"] != name:
            raise UserError(f"{folder} is a {manifest['model']} artifact, not {name}")
        artifact.check_runs_here(folder, manifest)
        sha = manifest["checkpoint"].get("sha256")
        kind = ("pruned" if pruned is not None and sha == pruned.sha256 else "dense" if sha == dense.sha256
                else "pruned" if manifest["checkpoint"].get("pruning") else "dense")
        if kind == "pruned" and pruned is None:
            raise UserError(f"{folder} was built from a pruned checkpoint: pass that checkpoint as --pruned too")
        ck = pruned if kind == "pruned" else dense
        if manifest["input"]["normalize"] != ck.normalize:
            raise UserError(f"{folder} expects {manifest['input']['normalize']} normalization, the {kind} "
                            f"checkpoint {ck.normalize}: pass --normalize {manifest['input']['normalize']}")
        given.append((kind, folder, manifest))
    batches = {m["input"]["shape"][0] for _, _, m in given}
    if len(batches) > 1:
        raise UserError(f"the --artifact folders are compiled for different batches ({sorted(batches)}); "
                        "compare one batch at a time")
    batch = args.batch or (batches.pop() if batches else DEFAULT_BATCH)
    for _, folder, m in given:
        if m["input"]["shape"][0] != batch:
            raise UserError(f"{folder} is compiled for batch {m['input']['shape'][0]}, not --batch {batch}")

    raw = test_batch(args.data, max(batch, CHECK_IMAGES))
    keep = parse_keep(args.keep_fp32)
    models = {"dense": (dense, dense.model)}
    if pruned is not None:
        models["pruned"] = (pruned, small)
    int8_of = "pruned" if pruned is not None else "dense"
    inputs = {k: normalized(raw, ck.normalize) for k, (ck, _) in models.items()}
    x_of = {k: v[:batch] for k, v in inputs.items()}
    check_of = {k: v[:CHECK_IMAGES] for k, v in inputs.items()}
    with torch.inference_mode():  # the checkpoints' own (dense-shaped) models: what build verifies against
        reference = {k: ck.model(torch.from_numpy(check_of[k])).numpy() for k, (ck, _) in models.items()}
    timing = dict(repeat=args.repeat, number=args.number, warmup=args.warmup)
    rows: list[dict] = []

    ctx = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="compare-")
    with ctx as work:
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)
        steps = console.progress(desc="compare", unit="step", leave=False)

        # 1. PyTorch eager
        for kind, (ck, model) in models.items():
            steps.set_postfix_str(f"pytorch {kind}")
            def time_torch(n: int, model=model, kind=kind) -> dict:
                torch.set_num_threads(n)
                return bench.time_pytorch(model, batch, x=torch.from_numpy(x_of[kind]), **timing)

            stats, used = threads.at_best(time_torch, counts)
            torch.set_num_threads(torch_default)
            agree = {}
            if model is not ck.model:
                with torch.inference_mode():
                    agree = _agreement(model(torch.from_numpy(check_of[kind])).numpy(), reference[kind])
            rows.append(_row("pytorch", kind, "fp32", batch, stats, **used, **agree,
                             note="shrunk copy (removed channels deleted)" if kind == "pruned" else "eager"))
            steps.update()

        # 2. ONNX export + ONNX Runtime fp32 and static int8
        onnx_info: dict = {}
        onnx_files: dict = {}
        for kind, (ck, model) in models.items():
            steps.set_postfix_str(f"onnx export {kind}")
            try:
                onnx_info[kind] = export_onnx(model, work / f"{name}-{kind}-fp32.onnx", inputs[kind])
                onnx_files[(kind, "fp32")] = Path(onnx_info[kind]["file"])
            except Exception as e:  # noqa: BLE001 - an exporter failure costs only the rows that need the ONNX
                onnx_info[kind] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
                console.warn(f"ONNX export of the {kind} model failed: {onnx_info[kind]['error']}")
        calib_desc = None
        if (int8_of, "fp32") in onnx_files:
            steps.set_postfix_str(f"onnxruntime int8 calibration ({int8_of})")
            ck = models[int8_of][0]
            try:
                calib, calib_desc = precision.calibration_images(args.data, ck.normalize, args.calib_images)
                onnx_info[f"{int8_of}-int8"] = quantize_onnx(onnx_files[(int8_of, "fp32")],
                                                             work / f"{name}-{int8_of}-int8.onnx", calib,
                                                             args.calibration, keep)
                onnx_files[(int8_of, "int8")] = Path(onnx_info[f"{int8_of}-int8"]["file"])
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001
                onnx_info[f"{int8_of}-int8"] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
                console.warn(f"ONNX Runtime int8 quantization failed: {onnx_info[f'{int8_of}-int8']['error']}")
        for kind, prec in [(k, "fp32") for k in models] + [(int8_of, "int8")]:
            steps.set_postfix_str(f"onnxruntime {kind} {prec}")
            path = onnx_files.get((kind, prec))
            if path is None:
                err = onnx_info.get(kind if prec == "fp32" else f"{int8_of}-int8", {}).get("error")
                rows.append(_row("onnxruntime", kind, prec, batch,
                                 reason=f"no ONNX model: {err or 'export failed'}"))
                continue
            def time_onnx(n: int, path=path, kind=kind) -> dict:
                sess = ort_session(path, n)
                return time_ort(sess, x_of[kind], **timing)

            stats, used = threads.at_best(time_onnx, counts)
            sess = ort_session(path, used["threads"])
            logits = sess.run(None, {sess.get_inputs()[0].name: check_of[kind]})[0]
            rows.append(_row("onnxruntime", kind, prec, batch, stats, **used,
                             **_agreement(logits, reference[kind]), note=f"opset {OPSET}" + (
                                 f", QDQ, {onnx_info[f'{kind}-int8']['activations']} activations"
                                 if prec == "int8" else "")))
            del sess
            steps.update()

        # 3. TensorRT (GPU), still before TVM
        why = tensorrt_unavailable()
        if why:
            rows.append(_row("tensorrt", "dense", "/".join(TENSORRT_PRECISIONS), batch, reason=why))
        else:
            for kind in models:
                for prec in TENSORRT_PRECISIONS:
                    src = onnx_files.get((kind, "int8" if prec == "int8" else "fp32"))
                    if src is None:
                        if prec == "int8" and kind != int8_of:
                            continue
                        rows.append(_row("tensorrt", kind, prec, batch, reason="no ONNX model to build from"))
                        continue
                    steps.set_postfix_str(f"tensorrt {kind} {prec}")
                    try:
                        stats, logits = time_tensorrt(src, prec, x_of[kind], **timing)
                        n = min(batch, CHECK_IMAGES)
                        rows.append(_row("tensorrt", kind, prec, batch, stats,
                                         **_agreement(logits[:n], reference[kind][:n]),
                                         note="explicit quantization (QDQ ONNX)" if prec == "int8" else ""))
                    except Exception as e:  # noqa: BLE001 - an engine that does not build is a row, not a crash
                        rows.append(_row("tensorrt", kind, prec, batch,
                                         reason=f"TensorRT failed: {type(e).__name__}: {str(e).strip()[:300]}"))

        # 4. TVM: the given artifacts, or host builds of fp32 dense, fp32 pruned, int8 (pruned)
        tvm_jobs = []  # (kind, folder, manifest or None)
        if given:
            tvm_jobs = [(kind, Path(folder), m) for kind, folder, m in given]
        else:
            for kind, prec in [(k, "fp32") for k in models] + [(int8_of, "int8")]:
                ck = models[kind][0]
                folder = work / f"{name}-{kind}-{prec}-b{batch}"
                steps.set_postfix_str(f"tvm build {kind} {prec}")
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        res = build_artifact(ck.path, name, prec, batch, folder, data_dir=args.data,
                                             normalize=args.normalize, calib_images=args.calib_images,
                                             calibration=args.calibration, keep_fp32=args.keep_fp32)
                    tvm_jobs.append((kind, Path(res["artifact"]), res["manifest"]))
                except UserError as e:
                    rows.append(_row("tvm", kind, prec, batch, reason=f"build refused: {e}"))
                steps.update()
        for kind, folder, m in tvm_jobs:
            steps.set_postfix_str(f"tvm {kind} {m['precision']}")
            executable, m = artifact.load_local(folder)

            def time_tvm(n: int, executable=executable, kind=kind) -> dict:
                threads.set_tvm(n)
                return bench.time_tvm(executable, batch, x=x_of[kind], **timing)

            stats, used = threads.at_best(time_tvm, counts)
            logits = run_module(executable, check_of[kind], batch)
            rows.append(_row("tvm", kind, m["precision"], batch, stats, **used,
                             recorded_threads=(m.get("runtime") or {}).get("threads"),
                             **_agreement(logits, reference[kind]),
                             note=tuning_note(m), artifact=str(folder) if args.keep or given else None))
            steps.update()
        steps.close()

    # speed-up relative to PyTorch eager dense fp32
    base = next(r for r in rows if (r["engine"], r["model"], r["precision"]) == BASELINE)
    for r in rows:
        r["speedup"] = round(base["median_ms"] / r["median_ms"], 2) if r["available"] else None
    order = {"pytorch": 0, "onnxruntime": 1, "tvm": 2, "tensorrt": 3}
    rows.sort(key=lambda r: (order[r["engine"]], r["model"], r["precision"]))
    shown = []
    for r in rows:
        s = dict(r)
        if not r["available"]:
            s["note"] = r["reason"]
        elif r.get("speedup") is not None:
            s["speedup"] = f"{r['speedup']:.2f}x"
        shown.append(s)
    print(console.table(shown, ["engine", "model", "precision", "batch", "threads", "median_ms", "p90_ms",
                                "images_per_s", "speedup", "max_abs_diff", "argmax_agree", "note"],
                        title=f"{name}, batch {batch}: speed-up relative to PyTorch eager dense fp32 "
                              f"({base['median_ms']:.3g} ms); max |diff| and argmax agreement (%) against "
                              f"PyTorch fp32 of the same model on {CHECK_IMAGES} test images"))
    info["best"] = best_rows(rows, int8_of)
    if info["best"].get("tvm_vs_best_peer"):
        b = info["best"]
        print(f"best TVM {int8_of} row: {b['tvm']['median_ms']} ms ({b['tvm']['precision']}, {b['tvm']['threads']} "
              f"threads) = {b['tvm_vs_pytorch_dense']}x PyTorch eager dense fp32, {b['tvm_vs_best_peer']}x the best "
              f"other engine on the {int8_of} model ({b['peer']['engine']} {b['peer']['precision']}, "
              f"{b['peer']['median_ms']} ms, {b['peer']['threads']} threads)")
    info["machine_at_end"] = machine()
    return {
        "model": name,
        "checkpoint": dense.path,
        "pruned": pruned.path if pruned is not None else None,
        "normalize": {k: ck.normalize for k, (ck, _) in models.items()},
        "batch": batch,
        "input": f"the first {batch} CIFAR-10 test images (normalized per model); agreement on the first "
                 f"{CHECK_IMAGES}",
        "timing": {**timing, "scheme": "warm-up calls, then repeat x (mean of number calls); median and p90",
                   "threads": (f"--threads {args.threads} for every engine" if args.threads else
                               f"each engine at its fastest of {counts} threads (row: threads, threads_ms)")},
        "calibration": {"images": calib_desc, "method": args.calibration, "keep_fp32": list(keep)},
        "onnx": onnx_info,
        "rows": rows,
        "baseline": "pytorch dense fp32",
        "seconds": round(time.perf_counter() - t_start, 1),
        **info,
    }
