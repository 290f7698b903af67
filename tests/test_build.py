"""The build pipeline end to end on this CPU: artifact folder, manifest, verification, eval --artifact."""

import json
import os

import pytest
import torch

from compiler.checkpoint import save_checkpoint
from compiler.models import build_model
from helpers import cli, randomize_bn




def zero_inner_channels(model, fraction=0.5, seed=0):
    """Prune like the pruning half does: zero conv1 filters of every block and bn1's weight and bias."""
    g = torch.Generator().manual_seed(seed)
    zeroed = 0
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "conv1") and hasattr(m, "bn2"):
                c = m.conv1.out_channels
                idx = torch.randperm(c, generator=g)[: int(c * fraction)]
                m.conv1.weight[idx] = 0
                m.bn1.weight[idx] = 0
                m.bn1.bias[idx] = 0
                zeroed += len(idx)
    return zeroed


@pytest.fixture(scope="module")
def pruned_resnet20(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "r20.pt"
    m = build_model("resnet20")
    randomize_bn(m)
    zero_inner_channels(m)
    save_checkpoint(path, "resnet20", m, "cifar")
    return path


def test_host_build_strips_and_matches_pytorch(tmp_path, pruned_resnet20, tiny_cifar):
    out = tmp_path / "art"
    r = cli("build", "--target", "host", "--checkpoint", pruned_resnet20, "--precision", "fp32", "--batch", 4,
            "--data", tiny_cifar, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out / "model.so").is_file() and (out / "manifest.json").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["name"] == "host" and m["precision"] == "fp32" and m["model"] == "resnet20"
    # half of every block's inner channels were zeroed: the IR-counted MACs must show it
    assert res["flops_compiled"] < 0.75 * res["flops_dense"]
    assert m["flops"]["dense"] == res["flops_dense"] and m["params"]["compiled"] < m["params"]["dense"]
    assert res["max_abs_diff"] <= m["verification"]["tolerance"]
    assert len(m["checkpoint"]["sha256"]) == 64 and len(m["artifact"]["sha256"]) == 64
    # the compiled artifact evaluates like the PyTorch model on the same images
    ra = cli("eval", "--artifact", out, "--data", tiny_cifar, "--json")
    rp = cli("eval", "--checkpoint", pruned_resnet20, "--data", tiny_cifar, "--json")
    assert ra.returncode == 0 and rp.returncode == 0, ra.stderr + rp.stderr
    a, p = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (ra, rp))
    assert a["n"] == p["n"] == 32 and a["top1"] == p["top1"]
    # bench times the artifact and PyTorch eager on the same batch
    rb = cli("bench", "--artifact", out, "--repeat", 3, "--number", 1, "--pytorch", pruned_resnet20, "--json")
    assert rb.returncode == 0, rb.stderr
    rows = json.loads(rb.stdout.strip().splitlines()[-1])["rows"]
    assert [r["engine"] for r in rows] == ["tvm", "pytorch"]
    assert all(r["batch"] == 4 and r["runs"] == 3 and 0 < r["median_ms"] <= r["p90_ms"] for r in rows)


def test_build_records_the_fastest_thread_count_and_loaders_apply_it(tmp_path, pruned_resnet20, tiny_cifar,
                                                                    monkeypatch):
    """Issue 14: build times the module at each candidate thread count, records the fastest, and loading the
    artifact sets TVM to it; a TVM_NUM_THREADS the user set wins."""
    import tvm

    from compiler import artifact, threads

    out = tmp_path / "art"
    r = cli("build", "--target", "host", "--checkpoint", pruned_resnet20, "--precision", "fp32",
            "--data", tiny_cifar, "--out", out)
    assert r.returncode == 0, r.stderr
    rt = json.loads((out / "manifest.json").read_text())["runtime"]
    measured = {int(n): ms for n, ms in rt["measured_ms"].items()}
    assert sorted(measured) == threads.candidates() and rt["threads"] == min(measured, key=measured.get)
    assert f"{rt['threads']} (fastest here" in r.stdout
    others = [n for n in threads.candidates() if n != rt["threads"]]
    if others:
        threads.set_tvm(others[0])
        assert tvm.runtime.num_threads() == others[0]
    _, m = artifact.load_local(out)
    assert m["runtime_applied"] == {"threads": rt["threads"], "source": "measured fastest at build"}
    assert tvm.runtime.num_threads() == rt["threads"]
    monkeypatch.setattr(threads, "_user_env", "1")
    _, m = artifact.load_local(out)
    assert m["runtime_applied"]["threads"] == 1 and "yours" in m["runtime_applied"]["source"]
    assert tvm.runtime.num_threads() == 1


def test_fastest_picks_the_lowest_median_and_the_fewer_threads_on_a_tie():
    from compiler import threads

    times = {1: 0.5, 2: 0.4, 4: 0.4}
    best, results = threads.fastest(lambda n: {"median_ms": times[n]}, [1, 2, 4])
    assert best == 2 and results[4]["median_ms"] == 0.4
    assert threads.candidates()[0] == 1 and threads.candidates()[-1] == threads.cores()


def test_bad_inputs_leave_existing_artifact_alone(tmp_path, pruned_resnet20):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    r = cli("build", "--target", "no-such-board", "--checkpoint", pruned_resnet20, "--out", out)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "jetson-tx2" in r.stderr
    r = cli("build", "--target", "host", "--checkpoint", tmp_path / "missing.pt", "--out", out)
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert (out / "mine.txt").read_text() == "precious"
    r = cli("eval", "--artifact", out)
    assert r.returncode == 2 and "not an artifact folder" in r.stderr


def test_int8_build_calibrates_and_stays_close(tmp_path, tiny_cifar):
    ck = tmp_path / "r8.pt"
    m = build_model("resnet8")
    randomize_bn(m)
    save_checkpoint(ck, "resnet8", m, "cifar")
    out = tmp_path / "int8"
    r = cli("build", "--target", "host", "--checkpoint", ck, "--precision", "int8", "--batch", 8,
            "--data", tiny_cifar, "--calib-images", 64, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    man = json.loads((out / "manifest.json").read_text())
    q = man["quantization"]
    assert man["precision"] == "int8" and q["calibration_images"].startswith("64 CIFAR-10 training images")
    assert [k["layer"] if isinstance(k, dict) else k for k in q["kept"]]  # the first conv recorded as kept in fp32
    assert res["weight_bytes_dense"] / res["weight_bytes_compiled"] > 3.5
    assert man["verification"]["argmax_agreement"] >= man["verification"]["argmax_agreement_required"] > 0
    # int8 without calibration data is refused for a real checkpoint, and nothing is written
    r = cli("build", "--target", "host", "--checkpoint", ck, "--precision", "int8", "--data", tmp_path / "nodata",
            "--out", tmp_path / "never")
    assert r.returncode == 2 and r.stderr.startswith("error:") and not (tmp_path / "never").exists()


def test_main_job_builds_a_board_artifact(tmp_path):
    """`build --target jetson-tx2` with only --model/--out: auto precision, cross-compiled, deploy/ shipped."""
    out = tmp_path / "tx2"
    r = cli("build", "--target", "jetson-tx2", "--model", "resnet8", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    assert "UNTRAINED" in r.stderr  # no shipped default yet: said loudly
    man = json.loads((out / "manifest.json").read_text())
    assert man["precision"] == "int8-weights" and "auto:" in man["precision_reason"]
    assert man["target"]["cross_compiled"] and man["target"]["tvm"]["kind"] == "cuda"
    assert (out / "deploy" / "README.md").is_file() and (out / "deploy" / "kernels.cu").is_file()
    assert (out / "model.so").read_bytes()[:4] == b"\x7fELF"
    r = cli("eval", "--artifact", out)
    assert r.returncode == 2 and "cannot run" in r.stderr


def test_tuning_measures_on_the_targets_cores_unless_the_user_chose(monkeypatch):
    """MetaSchedule's runner processes inherit TVM_NUM_THREADS: tune sets it to the target's num-cores (TVM's own
    default is half the logical CPUs, one thread on a 2-vCPU VM), and a count the user set stays theirs."""
    from compiler import threads

    monkeypatch.setattr(threads, "_user_env", None)
    monkeypatch.setenv(threads.ENV, "7")
    assert threads.for_measurement(2) == 2 and os.environ[threads.ENV] == "2"
    monkeypatch.setattr(threads, "_user_env", "3")
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.for_measurement(2) == 3 and os.environ[threads.ENV] == "3"


def test_tvm_workers_are_not_pinned_to_one_core_each():
    """set_tvm leaves every TVM worker, and the calling thread, free on all of the process's cores. TVM's default
    pins worker i to core i; when the OS puts the calling thread on worker 1's core the two share it and every
    parallel kernel runs at one core's speed (2x slower at batch 64, benchmarks/resnet56_defaults.md). Run in a
    fresh process: TVM's pool is sized once per process."""
    import subprocess
    import sys

    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and at least 2 cores for TVM to pin a second worker to")
    code = (
        "import json, os\n"
        "from compiler import threads\n"
        "allowed = sorted(os.sched_getaffinity(0))\n"
        "more = threads.set_tvm(len(allowed) + 2)\n"  # more threads than cores: the user's count still wins
        "assert more == len(allowed) + 2, more\n"
        "n = threads.set_tvm(2)\n"
        "print(json.dumps({'allowed': allowed, 'threads': n, 'tasks': threads.thread_affinities()}))\n"
    )
    env = dict(os.environ, TVM_NUM_THREADS=str(len(os.sched_getaffinity(0)) + 2))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["threads"] == 2, got
    assert all(cores == got["allowed"] for cores in got["tasks"]), got  # no thread narrowed to one core
