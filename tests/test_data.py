import pickle

import numpy as np
import pytest
import torch

from compiler import data
from compiler.errors import UserError


def test_npz_layout(tiny_cifar):
    split = data.load_split(tiny_cifar, "test")
    assert split.images.shape == (32, 3, 32, 32) and split.images.dtype == torch.uint8
    raw = np.load(tiny_cifar / "cifar10_test.npz")
    assert torch.equal(split.images[3], torch.from_numpy(raw["x"][3]).permute(2, 0, 1))
    assert torch.equal(split.labels, torch.from_numpy(raw["y"]))


def test_torchvision_layout(tmp_path):
    """torchvision's cifar-10-batches-py/ folder, written the way the official archive is."""
    import hashlib

    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    want = {}
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        x = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=5).tolist()
        want[name] = (x, y)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x, "labels": y}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(data.CLASSES)}, f)
    # torchvision verifies the official md5 sums; point them at our stand-in files
    CIFAR10_lists = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in want}
    orig = (CIFAR10.train_list, CIFAR10.test_list, CIFAR10.meta)
    CIFAR10.train_list = [[n, CIFAR10_lists[n]] for n, _ in orig[0]]
    CIFAR10.test_list = [[n, CIFAR10_lists[n]] for n, _ in orig[1]]
    CIFAR10.meta = {"filename": "batches.meta", "key": "label_names",
                    "md5": hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()}
    try:
        test = data.load_split(tmp_path, "test")
        train = data.load_split(tmp_path, "train")
    finally:
        CIFAR10.train_list, CIFAR10.test_list, CIFAR10.meta = orig
    x, y = want["test_batch"]
    assert test.images.shape == (5, 3, 32, 32)
    assert torch.equal(test.images, torch.from_numpy(x.reshape(5, 3, 32, 32)))
    assert test.labels.tolist() == y
    assert len(train) == 25


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_split(tmp_path / "nope")
    with pytest.raises(UserError, match="cifar10_train.npz.*cifar-10-batches-py"):
        data.load_split(tmp_path)


def test_env_default(tiny_cifar, monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", str(tiny_cifar))
    assert len(data.load_split(None, "train")) == 64
    monkeypatch.delenv("CIFAR10_DIR")
    with pytest.raises(UserError, match="CIFAR10_DIR"):
        data.load_split(None)


def test_corrupt_npz(tmp_path):
    (tmp_path / "cifar10_test.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a CIFAR-10 npz"):
        data.load_split(tmp_path, "test")


def test_normalize_matches_torchvision():
    from torchvision.transforms import v2

    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean, std = data.NORMALIZATIONS["imagenet"]
    ref = v2.Normalize(mean, std)(imgs.float() / 255)
    assert torch.allclose(data.normalize(imgs, "imagenet"), ref, atol=1e-6)


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(1, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = data.random_crop_flip(imgs, generator=g)
    assert out.shape == imgs.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(imgs, (4,) * 4)
    for i in range(16):
        found = any(
            torch.equal(out[i], c) or torch.equal(out[i], c.flip(2))
            for dy in range(9) for dx in range(9)
            for c in [padded[i, :, dy:dy + 32, dx:dx + 32]]
        )
        assert found


def test_real_cifar10_test_set(shared_data):
    split = data.load_split(shared_data, "test")
    assert len(split) == 10_000
    assert split.labels[:5].tolist() == [3, 8, 8, 0, 6]
    assert torch.bincount(split.labels).tolist() == [1000] * 10
