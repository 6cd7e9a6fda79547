"""Poisoning defenses against first principles: augmentations pixel by pixel, EDA edits word by word, the masked
InfoNCE against the training loss on a subset, the GMM against Bayes' rule, the bank against a FIFO list, and every
trainer's resume against an uninterrupted run (weights and between-epoch state identical)."""
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

from rclip import models
from rclip.data.pairs import FocusedWorldPairs, PairCorpus
from rclip.errors import RClipError
from rclip.methods import otcclip as otc
from rclip.methods import poison_defenses as pdef
from rclip.methods.poison_defenses import (MemoryBank, PretrainConfig, RoCLIPConfig, SafeCLIPConfig, augment_images,
                                           defended_clip, eda, fit_gmm_1d, make_trainer, masked_contrastive)
from rclip.train import TrainConfig, TrainHooks, contrastive_loss, fit, lr_at
from rclip.world.language import LEXICON


@pytest.fixture(scope="module")
def corpus():
    return PairCorpus.render(FocusedWorldPairs(64, seed=5, mentions=("colour", "texture"), size=1))


def test_image_augmentation_is_a_crop_flip_and_jitter():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    same = augment_images(x, torch.Generator().manual_seed(1), scale=(1.0, 1.0), flip_p=0.0, jitter=0.0)
    assert torch.allclose(same, x, atol=1e-5)                                  # the identity crop
    flipped = augment_images(x, torch.Generator().manual_seed(1), scale=(1.0, 1.0), flip_p=1.0, jitter=0.0)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)
    a = augment_images(x, torch.Generator().manual_seed(2))
    b = augment_images(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, x, atol=1e-2)
    bright = augment_images(x, torch.Generator().manual_seed(3), scale=(1.0, 1.0), flip_p=0.0, jitter=0.5)
    ratio = bright.mean((1, 2, 3)) / x.mean((1, 2, 3))          # contrast keeps the mean, brightness scales it
    assert ((ratio > 0.5 - 1e-3) & (ratio < 1.5 + 1e-3)).all() and not torch.allclose(ratio, torch.ones(3))


def test_eda_edits_words_as_it_says():
    text = "a small red circle on a striped background"
    words = text.split()
    seen = set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        out = eda(text, rng).split()
        if sorted(out) == sorted(words) and out != words:
            seen.add("swap")
        elif len(out) < len(words):
            assert all(w in words for w in out)
            seen.add("delete")
        elif len(out) > len(words):
            extra = list(out)
            for w in words:
                extra.remove(w)
            assert all(LEXICON.canonical(e) in {LEXICON.canonical(w) for w in words} for e in extra)
            seen.add("insert")
        elif out != words:
            changed = [(a, b) for a, b in zip(words, out) if a != b]
            assert all(LEXICON.canonical(a) == LEXICON.canonical(b) for a, b in changed)
            seen.add("synonym")
    assert seen == {"swap", "delete", "insert", "synonym"}
    assert eda("word", np.random.default_rng(0)) == "word"
    assert eda(text, np.random.default_rng(7)) == eda(text, np.random.default_rng(7))


def test_masked_contrastive_is_clip_loss_on_the_kept_pairs():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    b = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(7.0)
    assert torch.allclose(masked_contrastive(a, b, scale), contrastive_loss(a, b, scale))
    keep = torch.tensor([True, False, True, True, False, True])
    assert torch.allclose(masked_contrastive(a, b, scale, keep), contrastive_loss(a[keep], b[keep], scale), atol=1e-6)
    none = masked_contrastive(a.requires_grad_(), b, scale, torch.zeros(6, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad


def test_gmm_recovers_a_mixture_and_its_posterior_is_bayes():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.1 + 0.05 * torch.randn(3000, generator=g), 0.6 + 0.1 * torch.randn(1000, generator=g)])
    gmm = fit_gmm_1d(x)
    assert gmm["means"].tolist() == pytest.approx([0.1, 0.6], abs=0.01)
    assert gmm["stds"].tolist() == pytest.approx([0.05, 0.1], abs=0.01)
    assert gmm["weights"].tolist() == pytest.approx([0.75, 0.25], abs=0.02)
    (m0, m1), (s0, s1), (w0, w1) = gmm["means"].tolist(), gmm["stds"].tolist(), gmm["weights"].tolist()
    p1 = w1 * norm.pdf(x.numpy(), m1, s1)
    bayes = p1 / (p1 + w0 * norm.pdf(x.numpy(), m0, s0))
    assert torch.allclose(gmm["posterior"], torch.as_tensor(bayes), atol=1e-6)
    ll = float(torch.as_tensor(p1 + w0 * norm.pdf(x.numpy(), m0, s0)).log().mean())
    assert gmm["log_likelihood"] == pytest.approx(ll, abs=1e-6)
    with pytest.raises(RClipError, match="GMM"):
        fit_gmm_1d(torch.tensor([float("nan"), 1.0]))


def test_memory_bank_is_a_fifo_with_nearest_neighbours():
    bank, ref = MemoryBank(5, 3), deque(maxlen=5)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        feats = F.normalize(torch.randn(3, 3, generator=g), dim=-1)
        idx = torch.arange(3) + 10 * step
        bank.push(feats, idx)
        ref.extend(zip(feats, idx.tolist()))
        assert bank.count == len(ref)
        stored = {int(i): f for f, i in zip(bank.features[:bank.count], bank.index[:bank.count])}
        assert sorted(stored) == sorted(i for _, i in ref)
    q = F.normalize(torch.randn(4, 3, generator=g), dim=-1)
    nearest, index = bank.nearest(q)
    brute = torch.stack([f for f, _ in ref])
    best = (q @ brute.T).argmax(1)
    assert torch.allclose(nearest, brute[best]) and index.tolist() == [list(ref)[int(b)][1] for b in best]


def test_roclip_matches_images_to_captions_already_in_the_bank(tiny, corpus):
    schedule = PretrainConfig(epochs=2, batch_size=16)
    trainer = make_trainer("roclip", tiny, corpus, schedule, RoCLIPConfig(bank_size=32, match_every=2))
    tiny.model.train()
    try:
        for step in range(8):                                   # epoch 0 plain, epoch 1 matching
            trainer.before_step(step)
            before = set(trainer.bank.index[:trainer.bank.count].tolist())
            batch = corpus.__getitems__(list(range((16 * step) % 64, (16 * step) % 64 + 16)))
            loss = trainer.loss(tiny.model, batch)
            assert torch.isfinite(loss)
            if step >= 4:
                assert set(trainer.matches[-1]["caption"][-16:].tolist()) <= before
    finally:
        tiny.model.eval()
    assert [m["epoch"] for m in trainer.matches] == [1] and len(trainer.matches[0]["image"]) == 64


def test_safeclip_splits_by_the_gmm_then_grows(tiny, corpus, monkeypatch):
    sims = torch.cat([torch.full((48,), 0.5), torch.full((16,), -0.2)]) + 0.01 * torch.randn(
        64, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(pdef, "pair_similarities", lambda bundle, c: sims)
    trainer = make_trainer("safeclip", tiny, corpus, PretrainConfig(epochs=6, batch_size=16),
                           SafeCLIPConfig(unimodal_epochs=1, lowlr_epochs=1, lowlr_scale=0.25, safe_growth=0.1))
    assert [trainer.phase(e) for e in range(4)] == ["unimodal", "lowlr", "filtered", "filtered"]
    assert trainer.lr_scale(4) == 0.25 and trainer.lr_scale(0) == 1.0 and trainer.lr_scale(8) == 1.0
    trainer.before_step(8)                                      # epoch 2: the first split, p >= 0.9
    assert trainer.safe.tolist() == (fit_gmm_1d(sims)["posterior"] >= 0.9).tolist() and trainer.fraction == 0.75
    trainer.before_step(12)                                     # epoch 3: the top 85 % by posterior
    assert int(trainer.safe.sum()) == round(0.85 * 64) and trainer.safe[:48].all()
    assert trainer.splits[0]["poisoned"] == 0 and len(trainer.splits) == 2


class _Crash(RuntimeError):
    pass


def _run(bundle, corpus, method, config, out, crash_at=None):
    """fit for 2 epochs of 3 steps with a checkpoint every 2 steps; optionally crash (like a killed process) before
    step crash_at."""
    schedule = PretrainConfig(epochs=2, batch_size=16, lr=1e-3, warmup_steps=2)
    trainer = make_trainer(method, bundle, corpus, schedule, config)
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-3, warmup_steps=2, ckpt_every=2, log_every=1)

    def loss(net, batch):
        if crash_at is not None and trainer.step == crash_at:
            raise _Crash
        return trainer.loss(net, batch)
    fit(bundle, corpus, cfg, out, loss, module=getattr(trainer, "module", None), hooks=trainer, progress=False)
    return trainer


@pytest.mark.parametrize("method,config", [
    ("roclip", RoCLIPConfig(bank_size=24, match_every=2)),
    ("safeclip", SafeCLIPConfig(unimodal_epochs=0, lowlr_epochs=1)),
    ("otcclip", otc.OTCCLIPConfig(rematch_start=1, rematch_every=1, matching=otc.RematchConfig(k=4),
                                  align=otc.AlignmentConfig(ot=otc.OTConfig(max_iter=10), negatives=1))),
])
def test_an_interrupted_run_resumes_to_the_same_model_and_state(corpus, tmp_path, method, config):
    small = PairCorpus(corpus.uint8[:48], corpus.texts[:48])        # 3 steps per epoch
    torch.manual_seed(0)
    whole = models.load("rclip-tiny")
    ref = _run(whole, small, method, config, tmp_path / "whole")
    torch.manual_seed(0)
    broken = models.load("rclip-tiny")
    with pytest.raises(_Crash):
        _run(broken, small, method, config, tmp_path / "broken", crash_at=5)   # mid-epoch 1, after ckpt 4
    resumed = models.load("rclip-tiny")                                        # a fresh process: other weights
    again = _run(resumed, small, method, config, tmp_path / "broken")
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert _flat(ref.state_dict()) == _flat(again.state_dict())
    assert ref.epoch_done == 1 and (method != "otcclip" or [e["epoch"] for e in again.events] == [1])


def _flat(obj):
    if isinstance(obj, dict):
        return {k: _flat(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flat(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def test_hooks_scale_the_learning_rate_and_need_their_state_on_resume(tiny, corpus, tmp_path):
    class Half(TrainHooks):
        def lr_scale(self, step):
            return 0.5

    cfg = TrainConfig(steps=3, batch_size=16, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=3)
    bundle = models.load("rclip-tiny")
    trainer = make_trainer("clip", bundle, corpus, PretrainConfig(epochs=1, batch_size=16))
    log = fit(bundle, corpus, cfg, tmp_path / "a", trainer.loss, hooks=Half(), progress=False)
    assert [r["lr"] for r in log["records"]] == [0.5 * lr_at(s, cfg) for s in range(3)]
    plain = tmp_path / "b"
    fit(bundle, corpus, TrainConfig(steps=3, batch_size=16, ckpt_every=3), plain, trainer.loss, progress=False)
    with pytest.raises(RClipError, match="without the method's state"):
        fit(bundle, corpus, TrainConfig(steps=6, batch_size=16, ckpt_every=3), plain, trainer.loss, hooks=trainer,
            progress=False)


def test_defended_clip_is_cached_by_its_settings(corpus, monkeypatch):
    schedule = PretrainConfig(epochs=1, batch_size=32, warmup_steps=1)
    first, log, report = defended_clip("rclip-tiny", corpus, {"c": 1}, "clip", schedule)
    assert log["last_step"] == 2 and report == {}
    monkeypatch.setattr(pdef, "pretrain_defense", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again, _, _ = defended_clip("rclip-tiny", corpus, {"c": 1}, "clip", schedule)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    with pytest.raises(RClipError, match="unknown pre-training method"):
        make_trainer("cleanclip", first, corpus, schedule)
    with pytest.raises(RClipError, match="bank_size"):
        make_trainer("roclip", first, corpus, schedule, RoCLIPConfig(bank_size=1000))
    with pytest.raises(RClipError, match="no filtered epoch"):
        make_trainer("safeclip", first, corpus, schedule)


# -- the chapter's experiment (notebook 04_otcclip) -----------------------------------------------------------------

def _evaluation(clean: dict, asr: dict, n: int = 200):
    """A synthetic :class:`pdef.Evaluation` on the 8-class task ``colour``: ``clean`` model -> top-1 (%), ``asr``
    model -> ASR (%) of one backdoor on n triggered images and of a targeted attack on 8 targets."""
    from rclip.robustness import Scores

    zs, lp = Scores({"colour": 8}), Scores({"colour": 8}, clean="linear probe")
    threats = {}
    for m, acc in clean.items():
        hits = torch.arange(n) < round(acc * n / 100)
        zs.add(m, "colour", "clean", hits)
        lp.add(m, "colour", "linear probe", hits)
        threats[m] = {a: {"task": "colour", "target": t, "hit": torch.arange(k) < round(asr[m] * k / 100),
                          "base": torch.zeros(k, dtype=torch.bool), "labels": torch.zeros(k, dtype=torch.long)}
                      for a, t, k in (("patch 3px", 0, n), ("targeted", -1, 8))}
    return pdef.Evaluation(zs, lp, threats)


def _failed(record):
    return [p["name"] for p in record["preconditions"] if not p["holds"]]


def test_asr_claims_count_a_defense_only_above_chance_and_against_a_poisoned_competent_victim():
    ev = _evaluation({"CLIP": 90, "OTCCLIP": 85, "dead": 12}, {"CLIP": 100, "OTCCLIP": 0, "dead": 0})
    won = ev.asr_claim("OTCCLIP lowers the ASR", "OTCCLIP", "CLIP", ev.attacks)
    assert won["verdict"] == "reproduced" and won["n"] == 208 and won["items"] == "attacked items"
    assert won["sides"] == ["CLIP ASR", "OTCCLIP ASR"] and won["estimate"] == pytest.approx(100)
    dead = ev.asr_claim("a model that learned nothing lowers the ASR", "dead", "CLIP", ["targeted"])
    assert dead["verdict"] == "untestable" and _failed(dead) == ["dead's clean top-1 on colour, 95 % lower end (%)"]
    assert dead["items"] == "target images"
    table = ev.asr_table()
    assert np.isnan(table.loc[("dead", "patch 3px"), "ASR (%)"]) and table.loc[("CLIP", "targeted"), "ASR (%)"] == 100
    assert ev.rates()["dead"]["patch 3px"]["asr"] == 0.0 and not table.loc[("dead", "targeted"), "above chance"]
    weak = _evaluation({"CLIP": 70, "OTCCLIP": 85}, {"CLIP": 100, "OTCCLIP": 0})
    assert _failed(weak.asr_claim("c", "OTCCLIP", "CLIP", ["patch 3px"])) == ["CLIP's clean top-1 on colour (%)"]
    unpoisoned = _evaluation({"CLIP": 90, "OTCCLIP": 85}, {"CLIP": 40, "OTCCLIP": 0})
    assert _failed(unpoisoned.asr_claim("c", "OTCCLIP", "CLIP", ["patch 3px"])) == \
        ["CLIP's ASR, lowest over patch 3px (%)"]
    summary = ev.summary(["CLIP", "OTCCLIP", "dead"])
    assert summary.loc["OTCCLIP", "zero-shot (%)"] == pytest.approx(85) and np.isnan(summary.loc["dead", "zero-shot (%)"])
    assert summary.loc["dead", "zero-shot: left out (at chance)"] == "colour"


def test_rematch_claims_need_ground_truth_pools_with_true_captions_and_a_recording():
    full, low = np.full(50, 100.0), np.r_[np.full(20, 100.0), np.zeros(30)]
    ot = {"precision": np.r_[np.full(40, 100.0), np.zeros(10)], "pool hit": full, "broken": np.full(10, 100.0)}
    gl = {"precision": np.r_[np.full(10, 100.0), np.zeros(40)], "pool hit": full, "broken": np.zeros(10)}
    assert pdef.rematch_claim("c", ot, gl, labels=("OT", "global"))["verdict"] == "reproduced"
    shallow = pdef.rematch_claim("c", {**ot, "pool hit": low}, gl, labels=("OT", "global"))
    assert shallow["verdict"] == "untestable" and _failed(shallow) == \
        ["pool hit: images with a true caption among their candidates (%)"]
    blind = pdef.rematch_claim("c", {**ot, "precision": None, "pool hit": None}, gl, labels=("OT", "global"))
    assert blind["verdict"] == "untestable" and blind["n"] == 0 and "images with exact ground truth (%)" in _failed(blind)
    broken = pdef.rematch_claim("c", {**ot, "pool hit": low}, gl, labels=("OT", "global"), metric="broken")
    assert broken["verdict"] == "reproduced" and broken["items"] == "poisoned pairs"      # no pool needed to break
    none = pdef.rematch_claim("c", None, None, labels=("OT", "global"))
    assert none["verdict"] == "untestable" and _failed(none) == ["re-matchings recorded"]
    assert pdef.item_means(ot, torch.tensor([False] * 40 + [True] * 10)) == \
        {"precision": 80.0, "clean precision": 100.0, "poison broken": 100.0, "pool hit": 100.0}
    items = {("OTCCLIP", 1, "ot"): ot, ("OTCCLIP", 1, "global"): gl, ("OTCCLIP", 3, "ot"): gl,
             ("OTCCLIP", 3, "global"): ot}
    assert pdef.last_event(items, "OTCCLIP") == (gl, ot, 3) and pdef.last_event(items, "CLIP") == (None, None, None)


def test_chapter_regimes_keep_the_papers_settings_and_the_world_setup_carries_every_attack():
    from rclip.profiles import notebook_parameters

    p = notebook_parameters("smoke", "04_otcclip")
    p.update(tasks=["texture"], n_pairs=96, n_test=8)
    regimes = pdef.chapter_regimes(p)
    assert list(regimes) == list(pdef.REGIMES) and regimes["CLIP"] == ("clip", None)
    ro, safe, oc = regimes["RoCLIP"][1], regimes["SafeCLIP"][1], regimes["OTCCLIP"][1]
    assert (ro.bank_size, ro.match_every) == (p["roclip_bank"], 2)
    assert (safe.lowlr_epochs, safe.safe_p, safe.safe_cap) == (1, 0.9, 0.85)
    assert (oc.rematch_start, oc.rematch_every, oc.hold, oc.matching.k) == (1, p["otc_every"], False, p["otc_k"])
    assert oc.matching.ot == otc.OTConfig(max_iter=50, tol=1e-4) and oc.align.temperature == 0.1
    assert oc.align.image_intra_weight == oc.align.text_intra_weight == p["otc_intra"]
    assert regimes["OT matching only"][1].align.inter_weight == 0 and not regimes["OT losses only"][1].rematch
    setup = pdef.poison_setup(p)
    assert list(setup.tasks) == ["texture", "colour"]                   # the attacked task is always evaluated
    assert len(setup.attacked.layers()) == len(p["patch_sizes"]) + 2 and setup.truth is not None
    assert setup.n_poison == int(setup.attacked.poisoned.sum()) and len(setup.pairs) == len(setup.attacked)
    assert setup.attack_text().startswith(f"on colour: targeted ({p['n_targets']} targets")
    caption = setup.caption("ASR", n="8 images")
    assert all(part in caption for part in ("world scale", "rclip-tiny (32 px)", "96 world pairs", "n = 8 images"))
    images, titles = pdef.example_pairs(setup, n_clean=2)
    assert images.shape == (len(setup.attacked.layers()) + 2, 3, 32, 32) and titles[0].startswith("[patch]")
    with pytest.raises(RClipError, match="corpus must be"):
        pdef.poison_setup({**p, "corpus": "web"})
    for bad in ([], [0, 4], [4.5], "8"):
        with pytest.raises(RClipError, match="pool_ks must be a non-empty list"):
            pdef.poison_setup({**p, "pool_ks": bad})


def test_poison_rates_count_each_attacks_pairs_and_the_regime_is_checked():
    from rclip.attacks.poison import attack_names, poison_counts
    from rclip.profiles import notebook_parameters

    p = notebook_parameters("smoke", "04_otcclip")
    p.update(tasks=["colour"], n_pairs=200, n_test=8, patch_sizes=[3, 3], patch_targets=[0, 1], n_targets=3,
             captions_per_target=2, backdoor_rate=0.01)
    setup = pdef.poison_setup(p)
    names = attack_names(setup.attacked)
    assert names == ["patch 3px", "patch 3px_2", "blend 0.2", "targeted"]          # repeats numbered
    counts = poison_counts(setup.attacked)
    assert counts == {"patch 3px": 2, "patch 3px_2": 2, "blend 0.2": 2, "targeted": 6}
    assert sum(counts.values()) == setup.n_poison == int(setup.pairs.poisoned.sum())
    rates = setup.poison_rates
    assert rates["targeted"] == pytest.approx(100 * 6 / 206) and rates["all attacks"] == pytest.approx(100 * 12 / 206)
    pre = {c.name: c for c in setup.regime_preconditions(["patch 3px", "targeted"])}
    assert not pre["poisoned pairs, all attacks (% of the corpus)"].holds          # 5.8 % > 1 %
    assert pre["patch 3px poisoned pairs (% of the corpus)"].holds is False         # 0.97 % > 0.5 %
    assert pre["targets of targeted poisoning"].value == 3 and not pre["targets of targeted poisoning"].holds
    loose = setup.regime_preconditions(["patch 3px", "targeted"], max_rate=10, max_backdoor_rate=1, min_targets=3)
    assert all(c.holds for c in loose)


def test_roclip_bank_is_the_papers_share_of_the_corpus_unless_given():
    assert pdef.roclip_bank_size(None, 1_000_000) == 21_845 and pdef.roclip_bank_size(None, 10_340) == 226
    assert pdef.roclip_bank_size(64, None) == 64 and pdef.roclip_bank_size(None, 10) == 1
    with pytest.raises(RClipError, match="n_corpus"):
        pdef.roclip_bank_size(None, None)
    with pytest.raises(RClipError, match=">= 1"):
        pdef.roclip_bank_size(0, 100)
    from rclip.profiles import notebook_parameters

    p = {**notebook_parameters("smoke", "04_otcclip"), "roclip_bank": None}
    assert pdef.chapter_regimes(p, 5000)["RoCLIP"][1].bank_size == 109


def test_continued_pretraining_starts_from_the_shipped_clip_on_a_new_crawl():
    from rclip.profiles import notebook_parameters

    p = notebook_parameters("smoke", "04_otcclip")
    p.update(model="world", resolution=32, tasks=["colour"], n_pairs=64, n_test=8)
    with pytest.raises(RClipError, match="resolution: 64"):
        pdef.poison_setup(p)
    setup = pdef.poison_setup({**p, "resolution": 64, "corpus": "full"})
    assert setup.continued and setup.seed == p["seed"] + 1 and setup.attacked.seed == setup.seed
    from rclip import world

    x, _ = setup.tasks["colour"].tensors()                     # the test tasks are the crawl seed's test split
    assert torch.equal(x, world.zeroshot_task("colour", split="test", n=8, resolution=64, seed=setup.seed).tensors()[0])
    assert not torch.equal(x, world.zeroshot_task("colour", split="test", n=8, resolution=64, seed=p["seed"]).tensors()[0])
    assert "shipped world CLIP (64 px)" in setup.model_text and "fine-tuning threat" in setup.scope()
    scratch = pdef.poison_setup(p | {"model": "rclip-tiny"})
    assert not scratch.continued and scratch.seed == p["seed"] and "from scratch" in scratch.model_text


def test_pool_sweep_scores_ot_and_global_on_nested_pools(tiny, corpus):
    from types import SimpleNamespace

    truth = SimpleNamespace(describes=lambda i, j: (i + j) % 4 == 0, keeps_poison=lambda i, j: (i + j) % 4 != 0)
    setup = SimpleNamespace(pairs=SimpleNamespace(poisoned=torch.zeros(len(corpus), dtype=torch.bool),
                                                  texts=corpus.texts), truth=truth)
    r = otc.rematch_corpus(tiny, corpus, otc.RematchConfig(k=6))
    table, items = pdef.pool_sweep({"CLIP": r}, setup, [1, 3, 6])
    assert list(table.index.get_level_values("k").unique()) == [1, 3, 6]
    for k in (1, 3, 6):                                          # global takes the first candidate, whatever k
        assert np.array_equal(items[("CLIP", k, "global")]["precision"], items[("CLIP", 1, "global")]["precision"])
        hit = [any(truth.describes(i, int(j)) for j in row) for i, row in enumerate(r.candidates[:, :k])]
        assert table.loc[("CLIP", k, "ot"), "pool hit"] == pytest.approx(100 * np.mean(hit))
    assert np.array_equal(items[("CLIP", 1, "ot")]["precision"], items[("CLIP", 1, "global")]["precision"])
    ot6 = [truth.describes(i, int(j)) for i, j in enumerate(r.assigned)]
    assert table.loc[("CLIP", 6, "ot"), "precision"] == pytest.approx(100 * np.mean(ot6))
    sweep, _ = pdef.weight_sweep({"CLIP": r}, setup, [0.5])
    assert sweep.loc[("CLIP", 0.0), "precision"] == table.loc[("CLIP", 6, "ot"), "precision"]
    assert sweep.loc[("CLIP", 1.0), "precision"] == table.loc[("CLIP", 6, "global"), "precision"]
