"""TeCoA, FARE and PMG-AFT: the losses from first principles, what they train, and resume."""
import copy

import pytest
import torch
import torch.nn.functional as F

from rclip import world, zeroshot
from rclip.errors import RClipError
from rclip.methods.robust_finetune import AdvFinetuneConfig, adversarial_finetune, fare_step, pmg_step, tecoa_step
from rclip.train import TrainConfig


def _train_cfg(steps, **kw):
    return TrainConfig(steps=steps, batch_size=8, lr=1e-4, warmup_steps=1, ckpt_every=2, amp=False, **kw)


@pytest.fixture(scope="module")
def data(tiny):
    ds = world.WorldLabelled("colour", 64, resolution=32)
    task = world.zeroshot_task("colour", n=8, resolution=32)
    weights = zeroshot.class_embeddings(tiny, zeroshot.class_prompts(task))
    return ds, weights


def test_world_labelled_matches_the_task_split(data):
    ds, _ = data
    task = world.zeroshot_task("colour", split="train", n=10, resolution=32)
    x, y = task.tensors()
    batch = ds.__getitems__(list(range(10)))
    assert torch.equal(batch["images"], x) and torch.equal(batch["labels"], y)


def test_losses_at_zero_budget_are_the_clean_objectives(tiny, data):
    ds, weights = data
    batch = ds.__getitems__(list(range(8)))
    cfg = AdvFinetuneConfig("tecoa", eps=0.0, attack_steps=0)
    clf = zeroshot.ZeroShotClassifier(tiny, weights)
    with torch.no_grad():
        ce = F.cross_entropy(clf(batch["images"]), batch["labels"])
        assert torch.isclose(tecoa_step(tiny, weights, cfg)(tiny.model.visual, batch), ce, rtol=1e-5)
        # the frozen reference and the trained encoder see the same clean image: the squared distance is 0 up
        # to float round-off (the two forward passes may batch differently)
        assert fare_step(tiny, AdvFinetuneConfig("fare", eps=0.0, attack_steps=0))(tiny.model.visual, batch) < 1e-9
        # PMG-AFT at zero budget, before any update: both KL terms vanish and it is TeCoA's cross-entropy
        pmg0 = pmg_step(tiny, weights, AdvFinetuneConfig("pmg", eps=0.0, attack_steps=0))(tiny.model.visual, batch)
        assert torch.isclose(pmg0, ce, rtol=1e-5)
    # with a budget, the inner attack makes both losses larger than their clean values
    adv = AdvFinetuneConfig("tecoa", eps=8 / 255, attack_steps=3)
    assert tecoa_step(tiny, weights, adv)(tiny.model.visual, batch) > ce
    assert fare_step(tiny, AdvFinetuneConfig("fare", eps=8 / 255, attack_steps=3))(tiny.model.visual, batch) > 0


def test_pmg_kl_terms_from_first_principles(tiny, data):
    """With an encoder that differs from the frozen original, PMG-AFT = CE + α KL(orig ‖ θ) + β KL(clean ‖ adv),
    each KL computed here by hand from the class distributions."""
    ds, weights = data
    batch = ds.__getitems__(list(range(8)))
    x, y = batch["images"], batch["labels"]
    cfg = AdvFinetuneConfig("pmg", eps=4 / 255, attack_steps=2, pmg_alpha=0.7, pmg_beta=0.3)
    step = pmg_step(tiny, weights, cfg)                   # freezes the original as it is now
    moved = copy.deepcopy(tiny.model.visual)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.02 * torch.randn_like(p))
    clf = zeroshot.ZeroShotClassifier(tiny, weights)

    def probs(visual, images):
        f = F.normalize(visual(tiny.normalize(images)), dim=-1)
        return (clf.scale * f @ F.normalize(weights, dim=-1).T).softmax(-1)

    from rclip.attacks.image import ascend
    from rclip.methods.robust_finetune import _generator
    # the adversary attacks the bundle's own encoder (here still the original), as the training loop does
    x_adv = ascend(lambda a: F.cross_entropy(clf(a), y, reduction="sum"), x, cfg.eps, steps=2, alpha=cfg.eps / 4,
                   generator=_generator(0, batch))
    with torch.no_grad():
        p_adv, p_orig, p_clean = probs(moved, x_adv), probs(tiny.model.visual, x_adv), probs(moved, x)
        kl = lambda p, q: (p * (p.log() - q.log())).sum(-1).mean()  # noqa: E731
        expected = F.nll_loss(p_adv.log(), y) + 0.7 * kl(p_orig, p_adv) + 0.3 * kl(p_clean, p_adv)
    got = step(moved, batch)  # (its inner attack needs gradients)
    assert kl(p_orig, p_adv) > 1e-4 and kl(p_clean, p_adv) > 1e-4       # both terms are active
    assert torch.isclose(got, expected, rtol=1e-4), (got, expected)


@pytest.mark.parametrize("method", ["tecoa", "fare", "pmg"])
def test_finetuning_trains_only_the_image_encoder_and_resumes_exactly(tiny, data, tmp_path, method):
    ds, weights = data
    start = copy.deepcopy(tiny)
    one_go = copy.deepcopy(start)
    cfg = AdvFinetuneConfig(method, eps=4 / 255, attack_steps=2, train=_train_cfg(4))
    log = adversarial_finetune(one_go, ds, cfg, tmp_path / "a", class_weights=weights, progress=False)
    assert log["last_step"] == 4
    before, after = start.model.state_dict(), one_go.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    # stopped by its time limit after one step (checkpointed), then resumed: the same weights as in one go
    cut = AdvFinetuneConfig(method, eps=4 / 255, attack_steps=2, train=_train_cfg(4, max_minutes=0.0))
    first = adversarial_finetune(copy.deepcopy(start), ds, cut, tmp_path / "b", class_weights=weights,
                                 progress=False)
    assert first["stopped_early"] and first["last_step"] == 1
    resumed = copy.deepcopy(start)
    log = adversarial_finetune(resumed, ds, cfg, tmp_path / "b", class_weights=weights, progress=False)
    assert log["resumed_from"] == 1 and log["last_step"] == 4
    for k, v in one_go.model.state_dict().items():
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-6), k


def test_bad_settings(tiny, data, tmp_path):
    ds, _ = data
    with pytest.raises(RClipError, match="unknown"):
        adversarial_finetune(copy.deepcopy(tiny), ds, AdvFinetuneConfig("pgd"), tmp_path)
    with pytest.raises(RClipError, match="class_weights"):
        adversarial_finetune(copy.deepcopy(tiny), ds, AdvFinetuneConfig("tecoa"), tmp_path)


def test_finetuned_clip_is_cached(tiny, data):
    from rclip.methods.robust_finetune import finetuned_clip

    ds, weights = data
    cfg = AdvFinetuneConfig("fare", eps=4 / 255, attack_steps=1, train=_train_cfg(2))
    first, log = finetuned_clip(tiny, cfg, ds, {"task": "colour", "n": 64}, progress=False)
    again, log2 = finetuned_clip(tiny, cfg, ds, {"task": "colour", "n": 64}, progress=False)
    assert log2 == log and again is not first
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    assert any(not torch.equal(v, tiny.model.state_dict()[k]) for k, v in first.model.state_dict().items())
