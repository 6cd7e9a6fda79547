import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rclip import models
from rclip.train import StepBatchSampler, TrainConfig, contrastive_loss, lr_at, pretrain
from rclip.world import WorldPairs

ROOT = Path(__file__).resolve().parent.parent


def test_contrastive_loss_matches_first_principles():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    scale = torch.tensor(7.0)
    s = (scale * img @ txt.T).double()
    ref = 0.0
    for i in range(6):
        ref += -torch.log(torch.exp(s[i, i]) / torch.exp(s[i]).sum())
        ref += -torch.log(torch.exp(s[i, i]) / torch.exp(s[:, i]).sum())
    assert contrastive_loss(img, txt, scale).item() == pytest.approx(ref.item() / 12, rel=1e-5)


def test_step_sampler_partitions_each_epoch_and_resumes():
    full = list(StepBatchSampler(20, 8, 6, seed=3))
    assert all(len(b) == 8 for b in full)
    epoch0 = sorted(i for b in full[:2] for i in b)
    assert len(set(epoch0)) == 16
    assert list(StepBatchSampler(20, 8, 6, seed=3, start=4)) == full[4:]
    ranks = [list(StepBatchSampler(20, 8, 6, seed=3, rank=r, world=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == full


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.0, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) < 0.01


def _train(tmp, steps, interrupt=False):
    torch.manual_seed(0)
    bundle = models.load("rclip-tiny")
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=2, ckpt_every=2, log_every=1)
    data = WorldPairs(10_000, resolution=32)
    if interrupt:  # a zero time budget stops (checkpointed) after the first step
        pretrain(bundle, data, TrainConfig(**{**cfg.__dict__, "max_minutes": 0.0}), tmp, progress=False)
        assert json.loads((Path(tmp) / "latest.json").read_text())["step"] == 1
        torch.manual_seed(123)  # a resumed process starts from a different state
        bundle = models.load("rclip-tiny")
    log = pretrain(bundle, data, cfg, tmp, progress=False)
    return bundle, log


def test_resume_gives_the_same_weights(tmp_path):
    a, log_a = _train(tmp_path / "a", 4)
    b, log_b = _train(tmp_path / "b", 4, interrupt=True)
    assert log_b["resumed_from"] == 1 and log_b["last_step"] == 4
    for (k, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(va, vb), k
    assert [r["loss"] for r in log_a["records"]] == [r["loss"] for r in log_b["records"]]


def test_tampered_checkpoint_is_not_trusted(tmp_path):
    _train(tmp_path, 2)
    latest = json.loads((tmp_path / "latest.json").read_text())
    (tmp_path / latest["dir"] / "model.safetensors").write_bytes(b"garbage")
    from rclip.errors import RClipError

    with pytest.raises(RClipError, match="does not match"):
        _train(tmp_path, 4)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """DDP with 2 CPU processes (gloo) ends with identical weights on both ranks, equal to one process. In fp32 (the
    plain engine): under bf16 autocast the rounding of a half batch differs from the whole batch's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "RCLIP_ENGINE": "plain"}
    common = ["-m", "rclip.cli", "world-clip", "train", "--profile", "smoke", "--device", "cpu", "--no-write",
              "--quiet"]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
           "--run-dir", str(tmp_path / "ddp"), "--rank-weights", str(tmp_path / "ddp_w")]
    single = [sys.executable, *common, "--run-dir", str(tmp_path / "one"), "--rank-weights", str(tmp_path / "one_w")]
    for cmd in (ddp, single):
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    from rclip.models import read_state_dict

    r0, _ = read_state_dict(tmp_path / "ddp_w" / "rank0.safetensors")
    r1, _ = read_state_dict(tmp_path / "ddp_w" / "rank1.safetensors")
    one, _ = read_state_dict(tmp_path / "one_w" / "rank0.safetensors")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.allclose(r0[k], one[k], atol=2e-5, rtol=1e-4), (k, (r0[k] - one[k]).abs().max())
    torch.manual_seed(0)  # the initialisation the training command starts from
    init = models.load("rclip-tiny").model.state_dict()
    changed = sum(not torch.allclose(init[k], r0[k]) for k in r0)
    assert changed > len(r0) // 2  # training really moved the weights
