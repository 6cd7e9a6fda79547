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
    monkeypatch.setattr(engine, "native_bf16", lambda: True)
    assert engine.mode() == "fast"
    monkeypatch.setattr(engine, "native_bf16", lambda: False)      # bf16 emulated: plain unless asked for
    assert engine.mode() == "plain"
    with engine.use("fast"):
        assert engine.mode() == "fast" and engine.fast()
    with engine.use("plain"):
        assert engine.mode() == "plain" and not engine.fast()
    assert engine.mode() == "plain"
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


def test_attacks_run_in_fp32_even_inside_a_bf16_region():
    net, g = _Recorder(), torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 3, 8, 8, generator=g), torch.arange(6) % 4
    reference = pgd(net, x, y, 8 / 255, steps=3)
    net.seen.clear()
    with engine.use("fast"), torch.autocast("cpu", dtype=torch.bfloat16):
        adv = pgd(net, x, y, 8 / 255, steps=3)
    assert net.seen and set(net.seen) == {torch.float32}
    assert torch.equal(adv, reference)


def test_inner_attack_of_adversarial_training_is_fp32_and_the_same_under_both_engines(tiny, monkeypatch):
    """One TeCoA loss through fit's wrapper under each engine, same weights and batch: the inner PGD runs every
    forward in fp32 (eval mode) and finds the same adversarial images; only the update's forward is bf16 under fast."""
    from rclip.methods import robust_finetune as rf

    bundle = tiny.copy()
    rf.freeze_all_but_image_encoder(bundle.model)
    weights = torch.nn.functional.normalize(torch.randn(4, bundle.model.text_projection.shape[1]), dim=-1)
    cfg = rf.AdvFinetuneConfig("tecoa", eps=4 / 255, attack_steps=3, train=TrainConfig(steps=1))
    batch = {"images": torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
             "labels": torch.arange(5) % 4, "index": torch.arange(5)}
    found, dtypes = {}, []
    adversary = rf._ce_adversary
    monkeypatch.setattr(rf, "_ce_adversary", lambda *a: found.setdefault(engine.mode(), adversary(*a)))
    hook = bundle.model.visual.transformer.resblocks[0].mlp.c_fc.register_forward_hook(
        lambda m, i, o: dtypes.append((engine.mode(), bundle.model.visual.training, o.dtype)))
    try:
        for mode in ("plain", "fast"):
            with engine.use(mode):
                bundle.model.train()                      # as fit does
                loss = rf.tecoa_step(bundle, weights, cfg)(engine.TrainingForward(bundle.model.visual, "cpu"), batch)
            assert loss.dtype == torch.float32 and torch.isfinite(loss)
    finally:
        hook.remove()
    assert torch.equal(found["plain"], found["fast"])
    attack = {d for mode, training, d in dtypes if not training}
    update = {(mode, d) for mode, training, d in dtypes if training}
    assert attack == {torch.float32} and update == {("plain", torch.float32), ("fast", torch.bfloat16)}


def test_half_outputs_come_back_fp32_and_others_unchanged():
    from collections import namedtuple

    from rclip.methods.otcclip import TokenFeatures

    Pair = namedtuple("Pair", "a b")
    h = torch.ones(2, 3, dtype=torch.bfloat16)
    feats = TokenFeatures(h.view(2, 1, 3), torch.ones(2, 1, dtype=torch.bool), h)
    out = engine._fp32((Pair(h, torch.arange(2)), [h.double()], {"f": feats}))
    assert isinstance(out[0], Pair) and out[0].a.dtype == torch.float32 and out[0].b.dtype == torch.int64
    assert out[1][0].dtype == torch.float64                          # fp64 is not narrowed
    f = out[2]["f"]
    assert f.tokens.dtype == f.pooled.dtype == torch.float32 and f.mask.dtype == torch.bool


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
    moved = (weights["plain"] - weights["fast"]).norm() / weights["plain"].norm()
    assert moved < 0.05, moved                                  # rounding, not another model
    paths = {}
    for mode in ("plain", "fast"):
        with engine.use(mode):
            paths[mode] = artefact_path("model", {"x": 1}, root=tmp_path / "cache")
    assert paths["plain"] != paths["fast"]


def test_a_checkpoint_resumes_only_under_its_engine(tmp_path):
    data = WorldPairs(2_000, resolution=32)
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, ckpt_every=1)
    with engine.use("plain"):
        pretrain(models.load("rclip-tiny"), data, TrainConfig(**{**cfg.__dict__, "max_minutes": 0.0}), tmp_path,
                 progress=False)
    with engine.use("fast"), pytest.raises(RClipError, match="'plain' engine.*RCLIP_ENGINE=plain"):
        pretrain(models.load("rclip-tiny"), data, cfg, tmp_path, progress=False)
    with engine.use("plain"):
        assert pretrain(models.load("rclip-tiny"), data, cfg, tmp_path, progress=False)["last_step"] == 4
