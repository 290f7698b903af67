import pytest
import torch

from compiler import checkpoint
from compiler.errors import UserError
from compiler.models import build_model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("layout", ["bare", "state_dict", "module_prefix"])
def test_accepted_layouts(tmp_path, layout):
    m = build_model("resnet20")
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    if layout == "state_dict":
        obj = {"state_dict": sd, "best_prec1": 91.0}
    elif layout == "module_prefix":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    else:
        obj = sd
    torch.save(obj, tmp_path / "c.th")
    ck = checkpoint.load_checkpoint(tmp_path / "c.th", "resnet20")
    assert _same_weights(ck.model, m) and ck.normalize == "cifar"
    assert checkpoint.load_checkpoint(tmp_path / "c.th").model_name == "resnet20"  # architecture inferred


def test_own_format_roundtrip_and_half(tmp_path):
    m = build_model("resnet8")
    checkpoint.save_checkpoint(tmp_path / "a.pt", "resnet8", m, "imagenet", metrics={"top1": 1.0})
    ck = checkpoint.load_checkpoint(tmp_path / "a.pt")
    assert ck.model_name == "resnet8" and ck.normalize == "imagenet" and ck.metrics == {"top1": 1.0}
    assert _same_weights(ck.model, m)
    checkpoint.save_checkpoint(tmp_path / "h.pt", "resnet8", m, "cifar", half=True)
    h = checkpoint.load_checkpoint(tmp_path / "h.pt")
    assert h.model.conv1.weight.dtype == torch.float32
    assert torch.allclose(h.model.conv1.weight, m.conv1.weight, rtol=1e-3, atol=1e-4)
    assert (tmp_path / "h.pt").stat().st_size < 0.6 * (tmp_path / "a.pt").stat().st_size


def test_foreign_architecture_names_the_key(tmp_path):
    torch.save(build_model("resnet20").state_dict(), tmp_path / "r20.pt")
    with pytest.raises(UserError, match=r"does not fit resnet56: missing key 'layer1.3.conv1.weight'.*resnet20"):
        checkpoint.load_checkpoint(tmp_path / "r20.pt", "resnet56")
    with pytest.raises(UserError, match="does not fit googlenet: missing key 'pre_layers.0.weight'"):
        checkpoint.load_checkpoint(tmp_path / "r20.pt", "googlenet")


def test_recorded_model_must_match(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "a.pt", "resnet8", build_model("resnet8"), "cifar")
    with pytest.raises(UserError, match="is a resnet8 checkpoint, not resnet20"):
        checkpoint.load_checkpoint(tmp_path / "a.pt", "resnet20")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_refuses_code_executing_pickle(tmp_path, capsys):
    torch.save({"state_dict": build_model("resnet8").state_dict(), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refused to load"):
        checkpoint.load_checkpoint(tmp_path / "evil.pt", "resnet8")
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"PK\x03\x04broken zip"], ids=["empty", "garbage", "zip"])
def test_corrupt_files(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "bad.pt", "resnet8")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "nope.pt", "resnet8")


def test_no_tensors(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "n.pt")
    with pytest.raises(UserError, match="holds no state dict"):
        checkpoint.load_checkpoint(tmp_path / "n.pt", "resnet8")


def test_shared_resnet56_loads(shared_resnet56):
    ck = checkpoint.load_checkpoint(shared_resnet56, "resnet56", "imagenet")
    assert ck.model_name == "resnet56" and ck.sha256 and len(ck.sha256) == 64
