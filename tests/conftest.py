import os

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
