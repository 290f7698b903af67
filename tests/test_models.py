import pytest
import torch

from compiler.errors import UserError
from compiler.models import build_model, check_name, resnet_depth


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# Option A (parameter-free shortcut). The often-quoted 1,730,714 for resnet110 includes option B's two 1x1
# projection shortcuts (+2,752 parameters); the option-A network has 1,727,962.
@pytest.mark.parametrize("name,params", [("resnet20", 269_722), ("resnet56", 853_018), ("resnet110", 1_727_962)])
def test_resnet_parameter_counts(name, params):
    assert n_params(build_model(name)) == params


def test_googlenet_parameters_and_flops():
    from torch.utils.flop_counter import FlopCounterMode

    m = build_model("googlenet").eval()
    assert n_params(m) == 6_166_250
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.zeros(1, 3, 32, 32))
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate: 1.522 G MACs for one 32x32 image
    assert fc.get_total_flops() // 2 == 1_521_756_160


def test_resnet56_macs():
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        build_model("resnet56").eval()(torch.zeros(1, 3, 32, 32))
    assert fc.get_total_flops() // 2 == 125_485_696


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 44, 56, 110, 164])
def test_any_depth_6n_plus_2(depth):
    m = build_model(f"resnet{depth}").eval()
    assert len(m.layer1) == (depth - 2) // 6
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_state_dict_keys_follow_public_layout():
    keys = set(build_model("resnet20").state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer3.2.bn2.bias",
            "linear.weight", "linear.bias"} <= keys
    assert not any("shortcut" in k for k in keys)  # option A has no parameters


def test_option_a_shortcut_pads_channels_in_the_middle():
    m = build_model("resnet20")
    x = torch.randn(1, 16, 8, 8)
    y = m.layer2[0].shortcut(x)
    assert y.shape == (1, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("bad", ["resnet21", "resnet2", "vgg16", "resnet", ""])
def test_unknown_model_names(bad):
    with pytest.raises(UserError, match="unknown model"):
        check_name(bad)


def test_resnet_depth():
    assert resnet_depth("resnet110") == 110
    assert resnet_depth("resnet111") is None
