"""``compare`` and ``report`` end to end on small real inputs: a ResNet8 with random weights (BN randomized), a
pruned copy made with the prune package's functions, and a tiny generated CIFAR-10 folder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compiler.checkpoint import save_checkpoint
from compiler.models import build_model
from helpers import assert_user_error, cli, randomize_bn, run_cli

ROWS_KEYS = {"engine", "model", "precision", "batch", "median_ms", "p90_ms", "available"}
# ONNX Runtime fp32 against PyTorch fp32: float32 summation order differs, nothing else may
ONNX_FP32_TOL = 1e-4




def last_json(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """tiny npz CIFAR-10 (64 train, 32 test), a dense resnet8 checkpoint and a 40%-FLOPs pruned one."""
    from compiler.prune import dependency, importance, pruner

    root = tmp_path_factory.mktemp("cr")
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        np.savez(root / f"cifar10_{split}.npz", x=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, size=(n,), dtype=np.int64))
    torch.manual_seed(0)
    model = build_model("resnet8")
    randomize_bn(model)
    model.eval()
    save_checkpoint(root / "dense.pt", "resnet8", model, "cifar")
    graph = dependency.analyze(model)
    res = pruner.prune(model, graph, importance.compute("l1", model, graph, None), 0.4)
    record = pruner.make_record(graph, res.masks, criterion="l1", flops_reduction_requested=0.4, round_to=8,
                                floor=0.1, prune_stream=False, flops_reduction=res.flops_reduction,
                                flops_dense=res.flops_dense, flops_pruned=res.flops_pruned,
                                params_dense=res.params_dense, params_pruned=res.params_pruned)
    save_checkpoint(root / "pruned.pt", "resnet8", model, "cifar", pruning=record)
    return root


def test_compare_rows_side_by_side(small, tmp_path):
    import onnx
    import onnxruntime as ort

    from compiler.checkpoint import load_checkpoint

    keep = tmp_path / "keep"
    out = last_json(cli("compare", "--model", "resnet8", "--checkpoint", small / "dense.pt",
                        "--pruned", small / "pruned.pt", "--data", small, "--batch", 2, "--repeat", 2,
                        "--number", 1, "--warmup", 1, "--calib-images", 32, "--keep", keep, "--json"))
    rows = out["rows"]
    assert all(ROWS_KEYS <= set(r) for r in rows)
    # no --threads: every engine is timed at each candidate count and shown at its fastest (issue 14)
    from compiler import threads

    for r in rows:
        if r["available"] and r["engine"] != "tensorrt":
            tried = {int(n): ms for n, ms in r["threads_ms"].items()}
            assert sorted(tried) == threads.candidates() and r["median_ms"] == tried[r["threads"]] == min(
                tried.values()), r
    have = {(r["engine"], r["model"], r["precision"]) for r in rows if r["available"]}
    assert have >= {("pytorch", "dense", "fp32"), ("pytorch", "pruned", "fp32"),
                    ("onnxruntime", "dense", "fp32"), ("onnxruntime", "pruned", "fp32"),
                    ("onnxruntime", "pruned", "int8"),
                    ("tvm", "dense", "fp32"), ("tvm", "pruned", "fp32"), ("tvm", "pruned", "int8")}
    for r in rows:
        assert r["engine"] in ("pytorch", "onnxruntime", "openvino", "tvm", "tensorrt") and r["model"] in ("dense", "pruned")
        if r["available"]:
            assert r["batch"] == 2 and 0 < r["median_ms"] <= r["p90_ms"] and r["speedup"] > 0
        else:
            assert r["reason"] and r["median_ms"] is None
    base = next(r for r in rows if (r["engine"], r["model"], r["precision"]) == ("pytorch", "dense", "fp32"))
    assert base["speedup"] == 1.0
    best = out["best"]  # the fastest TVM pruned row against the fastest PyTorch / ONNX Runtime pruned row
    tvm_rows = [r["median_ms"] for r in rows if r["engine"] == "tvm" and r["model"] == "pruned" and r["available"]]
    peers = [r["median_ms"] for r in rows if r["engine"] in ("pytorch", "onnxruntime", "openvino")
             and r["model"] == "pruned" and r["available"]]
    assert best["tvm"]["median_ms"] == min(tvm_rows) and best["peer"]["median_ms"] == min(peers)
    assert best["tvm_vs_best_peer"] == round(min(peers) / min(tvm_rows), 2)
    assert set(best["goals"]) == {"tvm_vs_pytorch_dense >= 6", "tvm_vs_best_peer >= 1.5"}
    for r in rows:  # vs_best_peer: relative to the fastest CPU peer on the row's own model
        if r["available"]:
            peer = min(p["median_ms"] for p in rows if p["available"] and p["model"] == r["model"]
                       and p["engine"] in ("pytorch", "onnxruntime", "openvino"))
            assert r["vs_best_peer"] == round(peer / r["median_ms"], 2), r
    # OpenVINO: fp32 of both models and the same int8 QDQ model ONNX Runtime runs, or one row saying why not
    ov = [r for r in rows if r["engine"] == "openvino"]
    try:
        import openvino  # noqa: F401
    except ImportError:
        assert len(ov) == 1 and not ov[0]["available"] and "pip install openvino" in ov[0]["reason"]
    else:
        assert {(r["model"], r["precision"]) for r in ov if r["available"]} == {
            ("dense", "fp32"), ("pruned", "fp32"), ("pruned", "int8")}
        assert all(r["argmax_agree"] is not None and r["threads"] in threads.candidates() for r in ov)
    trt = [r for r in rows if r["engine"] == "tensorrt"]
    assert trt
    if not torch.cuda.is_available():
        assert len(trt) == 1 and not trt[0]["available"] and "not available on this machine" in trt[0]["reason"]
    # fp32 engines agree with PyTorch on the same images; int8 stays close
    for r in rows:
        if r["available"] and r["precision"] == "fp32" and r["engine"] != "pytorch":
            assert r["max_abs_diff"] < ONNX_FP32_TOL and r["argmax_agree"] == 100.0, r
    # the exported ONNX (opset 18) run by ONNX Runtime equals PyTorch within ONNX_FP32_TOL
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for kind, ckpt in (("dense", "dense.pt"), ("pruned", "pruned.pt")):
        path = keep / f"resnet8-{kind}-fp32.onnx"
        assert max(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")) == 18
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.inference_mode():
            ref = load_checkpoint(small / ckpt).model(x).numpy()
        assert np.abs(got - ref).max() < ONNX_FP32_TOL * max(1.0, float(np.abs(ref).max()))
    int8 = out["onnx"]["pruned-int8"]
    assert int8["format"] == "QDQ" and len(int8["kept_fp32"]) == 1  # the first conv, as TVM


def test_report_writes_table_plots_and_matches_eval(small, tmp_path, capsys):
    out_dir = tmp_path / "report"
    res = last_json(cli("report", "--models", "resnet8", "--checkpoint", small / "dense.pt", "--data", small,
                        "--out", out_dir, "--limit-test", 16, "--repeat", 2, "--number", 1, "--warmup", 1,
                        "--throughput-batch", 2, "--throughput-repeat", 1, "--calib-images", 32, "--threads", 1,
                        "--json"))
    for name in ("report.md", "report.json", "accuracy_vs_flops.png", "latency_per_stage.png"):
        assert (out_dir / name).is_file(), name
    for png in ("accuracy_vs_flops.png", "latency_per_stage.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out_dir / "report.json").read_text())["rows"] == res["rows"]
    rows = res["rows"]
    assert [r["stage"] for r in rows] == ["baseline", "pruned", "pruned + int8"]
    assert [r["precision"] for r in rows] == ["fp32", "fp32", "int8"]
    assert not rows[0]["one_shot"] and rows[1]["one_shot"] and rows[2]["one_shot"]  # no --pruned: pruned here
    assert rows[1]["macs"] < 0.6 * rows[0]["macs"] and rows[1]["macs"] == rows[2]["macs"]
    assert rows[2]["weight_bytes"] < rows[1]["weight_bytes"] < rows[0]["weight_bytes"]
    assert all(r["n_test"] == 16 and r["latency_ms"] > 0 and r["throughput_ips"] > 0 for r in rows)
    # the CPU peers at batch 1 on each stage's model (compare's rows): TVM's speed-up against the fastest one
    for r in rows:
        assert r["best_peer_ms"] == min(r["peers_b1_ms"].values()) > 0, r
        assert r["vs_best_peer"] == round(r["best_peer_ms"] / r["latency_ms"], 2)
    assert {"pytorch fp32", "onnxruntime fp32"} <= set(rows[0]["peers_b1_ms"])
    assert "onnxruntime int8" in rows[2]["peers_b1_ms"] and "onnxruntime int8" not in rows[0]["peers_b1_ms"]
    try:
        import openvino  # noqa: F401
    except ImportError:
        assert any("pip install openvino" in n for n in res["notes"])
    else:
        assert {"openvino fp32", "openvino int8"} <= set(rows[2]["peers_b1_ms"])
    md = (out_dir / "report.md").read_text()
    assert "best CPU peer b1 ms" in md
    assert "ONE-SHOT" in md and "| resnet8 | baseline |" in md and "--limit-test" in md
    # the table's top-1 is what `eval --artifact` prints for the same artifact
    for r in (rows[0], rows[2]):
        code, out, err = run_cli(capsys, "eval", "--artifact", r["accuracy_artifact"], "--data", small, "--limit", 16,
                              "--json")
        assert code == 0, err
        ev = json.loads(out.strip().splitlines()[-1])
        assert ev["top1"] == r["top1"] and ev["n"] == 16


def test_bad_inputs(small, tmp_path, capsys):
    def cli(*args):
        return run_cli(capsys, *args)

    assert_user_error(cli("compare", "--checkpoint", tmp_path / "none.pt", "--data", small), "does not exist")
    assert_user_error(cli("compare", "--model", "resnet21", "--checkpoint", small / "dense.pt", "--data", small),
                      "unknown model")
    assert_user_error(cli("compare", "--checkpoint", small / "dense.pt", "--pruned", small / "dense.pt",
                          "--data", small), "not a pruned checkpoint")
    assert_user_error(cli("report", "--models", "resnet21", "--data", small, "--out", tmp_path / "r"),
                      "unknown model")
    assert_user_error(cli("report", "--models", "resnet8", "--checkpoint", tmp_path / "none.pt", "--data", small,
                          "--out", tmp_path / "r"), "does not exist")
    assert not (tmp_path / "r").exists()
    # no --checkpoint: the shipped model is the pruned side; the error names the dense file it was pruned from
    base = json.loads((Path(__file__).resolve().parents[1] / "compiler" / "zoo" / "resnet56.json").read_text())["base"]
    for verb in (("compare",), ("report", "--out", tmp_path / "r")):
        rc, _, err = cli(*verb, "--data", small)
        last = err.strip().splitlines()[-1]
        assert rc == 2 and last.startswith("error: the shipped resnet56 is pruned"), err
        assert "--checkpoint" in last and base["file"] in last and base["sha256"][:12] in last
    assert not (tmp_path / "r").exists()
