"""The CLI contract: --help per verb, --json last line, bad input = one `error:` line, exit 2, nothing written."""

import json
import os
import subprocess
import sys

import pytest
import torch

from compiler.checkpoint import save_checkpoint
from compiler.cli import VERBS
from compiler.models import build_model
from helpers import cli




def assert_user_error(r, pattern):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_for_every_verb(verb):
    r = cli(verb, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout


def test_unknown_verb_and_flag():
    assert_user_error(cli("frobnicate"), "invalid choice")
    assert_user_error(cli("eval", "--no-such-flag"), "unrecognized arguments")


def test_eval_json_on_tiny_data(tmp_path, tiny_cifar):
    save_checkpoint(tmp_path / "m.pt", "resnet8", build_model("resnet8"), "cifar")
    r = cli("eval", "--checkpoint", tmp_path / "m.pt", "--data", tiny_cifar, "--limit", 20, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["model"] == "resnet8" and out["n"] == 20 and 0 <= out["top1"] <= 100
    assert set(out) >= {"top1", "n", "model", "seconds"}


def test_eval_bad_inputs(tmp_path, tiny_cifar):
    save_checkpoint(tmp_path / "m.pt", "resnet8", build_model("resnet8"), "cifar")
    assert_user_error(cli("eval", "--checkpoint", tmp_path / "none.pt", "--data", tiny_cifar), "does not exist")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert_user_error(cli("eval", "--checkpoint", tmp_path / "junk.pt", "--data", tiny_cifar), "not a readable")
    assert_user_error(cli("eval", "--model", "resnet20", "--checkpoint", tmp_path / "m.pt", "--data", tiny_cifar),
                      "is a resnet8 checkpoint, not resnet20")
    assert_user_error(cli("eval", "--model", "resnet21", "--checkpoint", tmp_path / "m.pt"), "unknown model")
    assert_user_error(cli("eval", "--checkpoint", tmp_path / "m.pt", "--data", tmp_path / "nodata"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("eval", "--checkpoint", tmp_path / "m.pt", "--data", tmp_path / "empty"), "no CIFAR-10 in")


def test_train_writes_resumable_checkpoint_and_never_overwrites_foreign_files(tmp_path, tiny_cifar):
    out = tmp_path / "t.pt"
    r = cli("train", "--model", "resnet8", "--data", tiny_cifar, "--epochs", 1, "--batch-size", 32,
            "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["epochs"] == 1
    ck = torch.load(out, weights_only=True)
    assert ck["train_state"]["epoch"] == 1 and ck["model"] == "resnet8"
    # resume: a second epoch continues the same run
    r = cli("train", "--model", "resnet8", "--data", tiny_cifar, "--epochs", 2, "--batch-size", 32, "--out", out)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    assert torch.load(out, weights_only=True)["train_state"]["epoch"] == 2
    # a file that is not a training checkpoint of ours is left alone
    foreign = tmp_path / "user.pt"
    torch.save(build_model("resnet8").state_dict(), foreign)
    before = foreign.read_bytes()
    r = cli("train", "--model", "resnet8", "--data", tiny_cifar, "--epochs", 1, "--out", foreign)
    assert_user_error(r, "not a resumable training checkpoint")
    assert foreign.read_bytes() == before


def test_zoo_add_writes_card_that_eval_reproduces_and_refuses_unfinished_runs(tmp_path, tiny_cifar):
    out, zoo_dir = tmp_path / "t.pt", tmp_path / "zoo"
    r = cli("train", "--model", "resnet8", "--data", tiny_cifar, "--epochs", 1, "--batch-size", 32, "--out", out)
    assert r.returncode == 0, r.stderr
    ck = torch.load(out, weights_only=True)
    assert ck["metrics"]["command"].startswith("python -m compiler train --model resnet8")
    assert ck["metrics"]["device"] and ck["metrics"]["torch"] == torch.__version__
    # an unfinished run is refused, and nothing is written
    ck["train_state"]["epochs"] = 5
    torch.save(ck, tmp_path / "unfinished.pt")
    r = cli("zoo", "--add", tmp_path / "unfinished.pt", "--data", tiny_cifar, "--zoo-dir", zoo_dir)
    assert_user_error(r, "unfinished (epoch 1/5)")
    assert not zoo_dir.exists() or not any(zoo_dir.iterdir())
    r = cli("zoo", "--add", out, "--data", tiny_cifar, "--zoo-dir", zoo_dir, "--json")
    assert r.returncode == 0, r.stderr
    card = json.loads(r.stdout.strip().splitlines()[-1])["added"]
    assert card["model"] == "resnet8" and card["epochs"] == 1 and card["n_test"] == 32
    assert card["storage"] in ("fp16", "fp32") and card["command"] == ck["metrics"]["command"]
    assert sorted(p.name for p in zoo_dir.iterdir()) == ["resnet8.calib.npz", "resnet8.json", "resnet8.md",
                                                         "resnet8.pt", "resnet8.verify.npz"]
    assert card["calibration"]["file"] == "resnet8.calib.npz" and card["calibration"]["requested"] == 512
    # the card's top-1 is what eval of the shipped file prints
    r = cli("eval", "--checkpoint", zoo_dir / "resnet8.pt", "--data", tiny_cifar, "--json")
    assert json.loads(r.stdout.strip().splitlines()[-1])["top1"] == card["top1"]
    listing = cli("zoo", "--zoo-dir", zoo_dir, "--json")
    assert [c["model"] for c in json.loads(listing.stdout.strip().splitlines()[-1])["shipped"]] == ["resnet8"]
    assert_user_error(cli("zoo", "--add", out, "--data", tiny_cifar, "--zoo-dir", zoo_dir), "already shipped")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_train_on_cuda_without_a_gpu_is_a_clear_error(tmp_path, tiny_cifar):
    r = cli("train", "--model", "resnet8", "--data", tiny_cifar, "--epochs", 1, "--device", "cuda",
            "--out", tmp_path / "t.pt")
    assert_user_error(r, "no CUDA GPU")
    assert not (tmp_path / "t.pt").exists()


def test_eval_shared_resnet56_limit(shared_data, shared_resnet56):
    r = cli("eval", "--model", "resnet56", "--checkpoint", shared_resnet56, "--data", shared_data,
            "--normalize", "imagenet", "--limit", 1000, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == 1000 and out["top1"] > 90 and out["macs"] == 125_485_696  # dense: all of it


def test_zoo_add_ships_a_pruned_model_with_its_base_licence_and_verification_images(tmp_path, tiny_cifar):
    """A finished `prune` checkpoint ships with MACs dense/compiled, the prune command, the base's provenance and
    licence file, and the first test images with the shipped model's logits (what build verifies on)."""
    import numpy as np

    from compiler import checkpoint, data

    base, pruned, zoo_dir = tmp_path / "base.pt", tmp_path / "p.pt", tmp_path / "zoo"
    save_checkpoint(base, "resnet8", build_model("resnet8"), "cifar")
    r = cli("prune", "--checkpoint", base, "--data", tiny_cifar, "--flops-reduction", 0.5, "--finetune-epochs", 1,
            "--batch-size", 32, "--bn-batches", 1, "--out", pruned)
    assert r.returncode == 0, r.stderr
    lic = tmp_path / "LICENSE.base"
    lic.write_text("Copyright (c) 2018, Somebody\nBSD-2-Clause conditions ...\n")
    r = cli("zoo", "--add", pruned, "--data", tiny_cifar, "--zoo-dir", zoo_dir, "--license", lic,
            "--provenance", "example/repo, base.pt, BSD-2-Clause", "--json")
    assert r.returncode == 0, r.stderr
    card = json.loads(r.stdout.strip().splitlines()[-1])["added"]
    assert card["kind"] == "pruned" and card["macs_compiled"] < card["macs_dense"]
    assert card["macs_cut_pct"] == round(100 * (1 - card["macs_compiled"] / card["macs_dense"]), 2) >= 40
    assert card["command"].startswith("python -m compiler prune --checkpoint") and card["epochs"] == 1
    assert card["base"]["sha256"] == checkpoint.load_checkpoint(base).sha256
    assert card["base"]["provenance"].startswith("example/repo") and card["base"]["license_file"] == "resnet8.LICENSE"
    assert (zoo_dir / "resnet8.LICENSE").read_text() == lic.read_text()
    md = (zoo_dir / "resnet8.md").read_text()
    assert f"{card['macs_cut_pct']} % cut" in md and "example/repo" in md and "resnet8.LICENSE" in md
    shipped = checkpoint.load_checkpoint(zoo_dir / "resnet8.pt")
    assert shipped.pruning is not None and shipped.train_state is None
    with np.load(zoo_dir / "resnet8.verify.npz") as z:
        test = data.load_split(tiny_cifar, "test")
        assert np.array_equal(z["x"], test.images[:len(z["x"])].permute(0, 2, 3, 1).numpy())
        with torch.inference_mode():
            want = shipped.model(data.normalize(test.images[:len(z["x"])], "cifar")).numpy()
        np.testing.assert_allclose(z["logits"], want, atol=1e-5)
    assert_user_error(cli("zoo", "--add", pruned, "--data", tiny_cifar, "--zoo-dir", tmp_path / "z2",
                          "--license", tmp_path / "none"), "--license")


def test_main_job_builds_the_shipped_pruned_model_for_the_tx2(tmp_path):
    """The README's main job as a user runs it (a real `python -m compiler` process, the one subprocess smoke test
    of the CLI): no --checkpoint, no --data. It builds the shipped pruned ResNet56, says so, verifies it on the
    shipped real test images with a real argmax requirement, and nothing says "untrained"."""
    from compiler import zoo

    card = zoo.card("resnet56")
    assert card is not None, "compiler/zoo/resnet56.pt is the shipped default and must be in the package"
    out = tmp_path / "tx2"
    r = subprocess.run([sys.executable, "-m", "compiler", "build", "--target", "jetson-tx2", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path, env={
                           k: v for k, v in os.environ.items() if k not in ("CIFAR10_DIR", "TVM_NUM_THREADS")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "untrained" not in (r.stdout + r.stderr).lower()
    assert "using the shipped resnet56" in r.stderr and "shipped resnet56" in r.stdout
    man = json.loads((out / "manifest.json").read_text())
    assert man["checkpoint"]["shipped"] and man["checkpoint"]["sha256"] == card["sha256"]
    assert man["flops"]["compiled"] <= 0.5 * man["flops"]["dense"]
    v = man["verification"]
    assert v["real_images"] and "shipped in compiler/zoo" in v["inputs"]
    assert v["argmax_agreement"] >= v["argmax_agreement_required"] >= 0.9
    assert v["top1_on_inputs"] >= 75  # 32 real test images; the model scores ~92.9 % on all 10,000
    assert man["runtime"]["threads"] is None and "GPU" in man["runtime"]["how"]


def test_shipped_model_builds_int8_without_data_from_its_shipped_calibration(tmp_path, monkeypatch, shared_data):
    """`build --target host --precision int8` with no --data and no CIFAR10_DIR: the shipped model is quantized
    from the calibration histograms shipped beside it (no error asking for CIFAR-10), and those histograms are the
    ones build makes from the real training images (same thresholds by every calibration method)."""
    from compiler import checkpoint, precision, zoo
    from compiler.build import calibrate
    from passes import calibration as calib

    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    out = tmp_path / "int8"
    r = cli("build", "--target", "host", "--precision", "int8", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["precision"] == "int8" and man["checkpoint"]["shipped"]
    assert "histograms shipped in compiler/zoo/resnet56.calib.npz" in man["quantization"]["calibration_images"]
    assert man["verification"]["argmax_agreement"] >= man["verification"]["argmax_agreement_required"]
    ckpt = checkpoint.load_checkpoint(zoo.ZOO_DIR / "resnet56.pt")
    stored, _ = zoo.calibration(ckpt, precision.DEFAULT_CALIB_IMAGES)
    fresh, desc = calibrate(ckpt.model, shared_data, ckpt.normalize)
    assert desc.startswith("512 CIFAR-10 training images") and fresh.layer_names == stored.layer_names
    for name in fresh.layer_names:
        for method in calib.METHODS:  # fp32 kernels of another CPU may round a value into a neighbouring bin
            assert stored.threshold(name, q_config(method), True) == pytest.approx(
                fresh.threshold(name, q_config(method), True), rel=1e-3), (name, method)
    # another image count is not what was shipped: that still needs CIFAR-10
    r = cli("build", "--target", "host", "--precision", "int8", "--calib-images", 64, "--out", tmp_path / "n")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error:") and "calibration needs its training images" in last
    assert not (tmp_path / "n").exists()


def q_config(method):
    from passes.quantize import QuantConfig

    return QuantConfig(method=method)


def test_eval_without_checkpoint_prints_the_shipped_cards_top1(shared_data):
    from compiler import zoo

    card = zoo.card("resnet56")
    r = cli("eval", "--model", "resnet56", "--data", shared_data, "--json")
    assert r.returncode == 0, r.stderr
    assert "using the shipped resnet56" in r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == card["n_test"] == 10000 and out["top1"] == card["top1"] >= 92.5
    assert out["macs"] == card["macs_compiled"] < 0.5 * card["macs_dense"]  # it ran the shrunk network
