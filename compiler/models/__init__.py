"""Model zoo by name: ``resnet<6n+2>`` (resnet20, resnet32, resnet44, resnet56, resnet110, ...) and ``googlenet``."""

from __future__ import annotations

import re

from torch import nn

from compiler.errors import UserError
from compiler.models.googlenet import GoogLeNet
from compiler.models.resnet import CifarResNet

NAMED = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "googlenet")
NUM_CLASSES = 10
INPUT_SHAPE = (3, 32, 32)
# the deepest CIFAR ResNet published (He et al. 2016, ResNet-1202: 200 blocks per stage); deeper names are refused
# before anything is built (resnet6000002 would take minutes and gigabytes just to construct)
MAX_RESNET_DEPTH = 1202


def resnet_depth(name: str) -> int | None:
    """The depth of a CIFAR ResNet name (``resnet56`` -> 56), or None if the name is not one."""
    m = re.fullmatch(r"resnet(\d+)", name)
    if not m:
        return None
    depth = int(m.group(1))
    return depth if depth >= 8 and (depth - 2) % 6 == 0 else None


def check_name(name: str) -> str:
    name = name.strip().lower()
    depth = resnet_depth(name)
    if depth is not None and depth > MAX_RESNET_DEPTH:
        raise UserError(f"{name} is too deep: the limit is resnet{MAX_RESNET_DEPTH} (the deepest CIFAR ResNet "
                        f"published, {(MAX_RESNET_DEPTH - 2) // 6} blocks per stage)")
    if name != "googlenet" and depth is None:
        raise UserError(
            f"unknown model '{name}': choose googlenet or a CIFAR ResNet of depth 6n+2 ({', '.join(NAMED[:-1])}, ...)"
        )
    return name


def build_model(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A freshly initialised model by name."""
    name = check_name(name)
    if name == "googlenet":
        return GoogLeNet(num_classes)
    return CifarResNet(resnet_depth(name), num_classes)
