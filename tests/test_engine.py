"""The fast and plain engines: what each changes (training precision, attention, optimiser) and what neither touches
(attacks and evaluation stay fp32 and identical)."""
import pytest
import torch
from torch import nn

from rclip import engine, models
from rclip.attacks.image import pgd
from rclip.errors import RClipError
from rclip.train import TrainConfig, make_optimizer, pretrain
from rclip.world import WorldPairs


class _Recorder(nn.Module):
    """A small classifier that records the dtype of its hidden layer's output at every forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out, self.seen = nn.Linear(3 * 8 * 8, 16), nn.Linear(16, 4), []
        self.num_classes = 4

    def forward(self, x):
        h = self.hidden(x.flatten(1))
        self.seen.append(h.dtype)
        return self.out(torch.relu(h))


def test_mode_default_switch_and_bad_value(monkeypatch):
    monkeypatch.delenv(engine.ENV, raising=False)
    assert engine.mode() == "fast"
    with engine.use("plain"):
        assert engine.mode() == "plain" and not engine.fast()
    assert engine.mode() == "fast"
    monkeypatch.setenv(engine.ENV, "turbo")
    with pytest.raises(RClipError, match="RCLIP_ENGINE.*fast.*plain"):
        engine.mode()
    with pytest.raises(RClipError, match="unknown engine"):
        with engine.use("turbo"):
            pass


def test_training_forward_is_bf16_under_fast_fp32_under_plain_and_returns_fp32():
    net, x = _Recorder(), torch.rand(5, 3, 8, 8)
    with engine.use("fast"):
        out = engine.TrainingForward(net, "cpu")(x)
    assert net.seen[-1] == torch.bfloat16 and out.dtype == torch.float32
    with engine.use("plain"):
        plain = engine.TrainingForward(net, "cpu")(x)
    assert net.seen[-1] == torch.float32 and torch.equal(plain, net(x))
    with engine.use("fast"):                                   # amp off: fp32 under either engine
        assert engine.TrainingForward(net, "cpu", amp=False)(x).dtype == torch.float32
        assert net.seen[-1] == torch.float32


@pytest.mark.parametrize("mode", ["plain", "fast"])
def test_attacks_run_in_fp32_and_agree_across_engines(mode):
    """Attacks stay fp32 under either engine, even called inside a bf16 autocast region, and give the same images."""
    net, g = _Recorder(), torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 3, 8, 8, generator=g), torch.arange(6) % 4
    with engine.use("plain"):
        reference = pgd(net, x, y, 8 / 255, steps=3)
    net.seen.clear()
    with engine.use(mode), torch.autocast("cpu", dtype=torch.bfloat16):
        adv = pgd(net, x, y, 8 / 255, steps=3)
    assert net.seen and set(net.seen) == {torch.float32}
    assert torch.equal(adv, reference)


def test_optimizer_is_fused_under_fast_only():
    net = nn.Linear(3, 2)
    cfg = TrainConfig(steps=1)
    with engine.use("fast"):
        assert make_optimizer(net, cfg).defaults["fused"] is True
    with engine.use("plain"):
        assert not make_optimizer(net, cfg).defaults["fused"]


def test_engines_train_different_models_and_cache_them_apart(tmp_path):
    """Pre-training under each engine: both learn (loss falls), the weights differ (bf16 rounding), and the cache
    keeps them apart."""
    from rclip.cache import artefact_path

    data, weights, logs = WorldPairs(2_000, resolution=32), {}, {}
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=100)
    for mode in ("plain", "fast"):
        torch.manual_seed(0)
        bundle = models.load("rclip-tiny")
        with engine.use(mode):
            logs[mode] = pretrain(bundle, data, cfg, tmp_path / mode, progress=False)
        weights[mode] = bundle.model.visual.conv1.weight.detach().clone()
    for mode in logs:
        losses = [r["loss"] for r in logs[mode]["records"]]
        assert losses[-1] < losses[0], (mode, losses)
    assert not torch.equal(weights["plain"], weights["fast"])
    assert torch.allclose(weights["plain"], weights["fast"], atol=5e-3)
    paths = {}
    for mode in ("plain", "fast"):
        with engine.use(mode):
            paths[mode] = artefact_path("model", {"x": 1}, root=tmp_path / "cache")
    assert paths["plain"] != paths["fast"]
