import os
import pickle

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RCLIP_CACHE", str(tmp_path_factory.getbasetemp() / "rclip-cache"))


@pytest.fixture(scope="session")
def tiny():
    from rclip import models

    torch.manual_seed(0)
    return models.load("rclip-tiny")


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def make_cifar10():
    """Writes a small CIFAR-10 test split in torchvision's layout: make_cifar10(root, n) -> (data, labels)."""
    def make(root, n=6):
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        data = np.random.default_rng(0).integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [i % 10 for i in range(n)]
        with open(base / "test_batch", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        with open(base / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": CIFAR10_NAMES}, f)
        return data, labels
    return make
