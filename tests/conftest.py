"""Shared fixtures. Real CIFAR-10 and the pretrained ResNet56 come from ../shared when it is there."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_RESNET56 = SHARED / "weights" / "akamaster_resnet56-4bfd9763.th"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar10_test.npz").is_file():
        pytest.skip(f"real CIFAR-10 not found at {SHARED_DATA} (../shared is absent on this clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_resnet56() -> Path:
    if not SHARED_RESNET56.is_file():
        pytest.skip(f"pretrained ResNet56 not found at {SHARED_RESNET56} (../shared is absent on this clone)")
    return SHARED_RESNET56


@pytest.fixture
def tiny_cifar(tmp_path) -> Path:
    """A folder in the npz layout with a few random images per split (for tests that need no real data)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=(n,), dtype=np.int64)
        np.savez(tmp_path / f"cifar10_{split}.npz", x=x, y=y)
    return tmp_path


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): one worker per core, at most 4. Most tests are one-threaded (TVM's LLVM
    code generation, qemu, Python), so the 2-core CI machine does twice the work at once; more than 4 workers
    would each hold torch + TVM in memory for little gain."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def pytest_configure(config) -> None:
    """In a worker of a parallel run (pytest-xdist), PyTorch computes on one thread: the workers already fill
    the cores, and a second spinning OpenMP thread per worker only takes time from the other worker. TVM's
    threads are left alone (tests time thread counts and check the ones applied)."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
