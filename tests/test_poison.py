"""Poisoning threats against the world's ground truth: structure, determinism, triggers pixel by pixel."""
import pytest
import torch

from rclip import world
from rclip.attacks.poison import (BackdoorConfig, GroundTruth, TargetedPoisonConfig, Trigger, attack_success_rate,
                                  backdoor_poison, backdoor_test_images, class_captions, spec_label, targeted_poison,
                                  threat_items, threat_report)
from rclip.errors import RClipError


@pytest.fixture(scope="module")
def base():
    return world.WorldPairs(40, resolution=32, seed=3)


def test_class_captions_state_their_class():
    for task, label in [("shape", 4), ("colour", 2), ("colour_shape", 37), ("texture", 1), ("count", 2)]:
        caps = class_captions(task, label, 6, seed=1)
        assert all(spec_label(task, c.spec) == label for c in caps)
        assert [c.text for c in caps] == [c.text for c in class_captions(task, label, 6, seed=1)]
    with pytest.raises(RClipError, match="not a class"):
        class_captions("shape", 10, 1)


def test_targeted_poison_appends_adversarial_pairs_on_test_targets(base):
    cfg = TargetedPoisonConfig(task="shape", n_targets=3, captions_per_target=5, seed=1)
    ds = targeted_poison(base, cfg)
    n = len(base)
    assert len(ds) == n + 15
    assert ds.poisoned.tolist() == [False] * n + [True] * 15
    assert (ds.target_adversarial != ds.target_label).all()
    assert ds.adversarial_label[n:].tolist() == ds.target_adversarial.repeat_interleave(5).tolist()
    # clean pairs are the base's, untouched
    clean = ds.__getitems__([0, 7])
    ref = base.__getitems__([0, 7])
    assert clean["texts"] == ref["texts"] and torch.equal(clean["images"], ref["images"])
    # poison pairs: the target test image with a caption of the adversarial class
    task = world.zeroshot_task("shape", split="test", n=int(ds.target_index.max()) + 1, resolution=32, seed=3)
    x_test, y_test = task.tensors()
    images, labels, adv = ds.target_images()
    assert torch.equal(images, x_test[ds.target_index]) and torch.equal(labels, y_test[ds.target_index])
    for t in range(3):
        rows = list(range(n + 5 * t, n + 5 * (t + 1)))
        batch = ds.__getitems__(rows)
        assert torch.equal(batch["images"], images[t].expand(5, -1, -1, -1)) and batch["poisoned"].all()
        assert all(spec_label("shape", ds.pair(i)[1].spec) == int(adv[t]) for i in rows)
        assert not ds.describes(rows[0], rows[0]) and ds.keeps_poison(rows[0], rows[1])
    assert ds.describes(0, 0) and not ds.keeps_poison(0, n)        # a clean image keeps no poison
    # deterministic under the seed; another seed, other targets or captions
    again = targeted_poison(base, cfg)
    assert torch.equal(again.target_index, ds.target_index) and again.captions() == ds.captions()
    other = targeted_poison(base, TargetedPoisonConfig(task="shape", n_targets=3, captions_per_target=5, seed=2))
    assert other.captions()[n:] != ds.captions()[n:]


def test_targeted_poison_rate_fixed_label_and_errors(base):
    ds = targeted_poison(base, TargetedPoisonConfig(n_targets=2, captions_per_target=None, poison_rate=0.25,
                                                    adversarial_label=4))
    assert len(ds) == 40 + 2 * 5 and (ds.target_adversarial == 4).all() and (ds.target_label != 4).all()
    with pytest.raises(RClipError, match="exactly one"):
        targeted_poison(base, TargetedPoisonConfig(captions_per_target=5, poison_rate=0.1))
    with pytest.raises(RClipError, match="target_pool"):
        targeted_poison(base, TargetedPoisonConfig(n_targets=30, target_pool=20))
    with pytest.raises(RClipError, match="unknown world task"):
        targeted_poison(base, TargetedPoisonConfig(task="size"))


def test_patch_trigger_touches_only_its_square():
    x = (torch.rand(4, 3, 32, 32) * 255).round() / 255                # 8-bit images, as the world renders
    trig = Trigger("patch", patch_size=5, seed=1)
    y = trig.apply(x)
    pattern = trig.pattern(32)
    assert pattern.shape == (3, 5, 5) and torch.equal(y[:, :, -5:, -5:], pattern.expand(4, -1, -1, -1))
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[-5:, -5:] = False
    assert torch.equal(y[:, :, outside], x[:, :, outside])
    assert Trigger("patch").side(224) == 16 and Trigger("patch").side(32) == 3
    rnd = Trigger("patch", patch_size=4, location="random", seed=1)
    a, b = rnd.apply(x, [10, 11, 12, 13]), rnd.apply(x[2:3], [12])
    assert torch.equal(a[2:3], b)                                     # the key, not the batch, places the patch
    assert not torch.equal((a[0] != x[0]).any(0), (a[1] != x[1]).any(0))
    with pytest.raises(RClipError, match="does not fit"):
        Trigger("patch", patch_size=40).apply(x)
    with pytest.raises(RClipError, match="kind"):
        Trigger("warp")


def test_blend_trigger_is_the_convex_mix():
    x = torch.rand(2, 3, 16, 16)
    trig = Trigger("blend", alpha=0.2, seed=5)
    expected = ((0.8 * x + 0.2 * trig.pattern(16)) * 255).round() / 255
    assert torch.allclose(trig.apply(x), expected, atol=1e-6)
    with pytest.raises(RClipError, match="alpha"):
        Trigger("blend", alpha=0.0)


def test_backdoor_replaces_a_fraction_with_triggered_target_pairs(base):
    trig = Trigger("patch", patch_size=4, seed=2)
    ds = backdoor_poison(base, BackdoorConfig(trigger=trig, task="colour", target_label=3, poison_rate=0.1, seed=4))
    assert len(ds) == len(base) and int(ds.poisoned.sum()) == 4
    rows = ds.poison_index.tolist()
    batch, ref = ds.__getitems__(list(range(len(ds)))), base.__getitems__(list(range(len(base))))
    clean = ~ds.poisoned
    assert torch.equal(batch["images"][clean], ref["images"][clean])
    assert [t for t, c in zip(batch["texts"], clean) if c] == [t for t, c in zip(ref["texts"], clean) if c]
    assert torch.equal(batch["images"][rows], trig.apply(ref["images"][rows], rows))
    assert torch.equal(ds.images(rows), batch["images"][rows])
    assert all(spec_label("colour", ds.pair(i)[1].spec) == 3 for i in rows)
    assert (ds.adversarial_label[rows] == 3).all() and (ds.adversarial_label[clean] == -1).all()
    assert ds.keeps_poison(rows[0], rows[1]) and not ds.keeps_poison(rows[0], int(clean.nonzero()[0]))
    again = backdoor_poison(base, BackdoorConfig(trigger=trig, task="colour", target_label=3, poison_rate=0.1, seed=4))
    assert torch.equal(again.poison_index, ds.poison_index) and again.captions() == ds.captions()
    assert len(backdoor_poison(base, BackdoorConfig(poison_rate=None, n_poison=7)).poison_index) == 7
    with pytest.raises(RClipError, match="exactly one"):
        backdoor_poison(base, BackdoorConfig(poison_rate=0.1, n_poison=3))
    with pytest.raises(RClipError, match="target_label"):
        backdoor_poison(base, BackdoorConfig(task="colour", target_label=8))


def test_backdoor_test_images_and_asr():
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    trig = Trigger("patch", patch_size=3)
    xt, yt = backdoor_test_images(x, y, trig, target_label=0)
    assert (yt != 0).all() and len(xt) == 4 and torch.equal(xt, trig.apply(x[y != 0], [1, 2, 4, 5]))
    assert attack_success_rate(torch.tensor([0, 0, 1, 2]), 0) == 0.5
    assert attack_success_rate(torch.tensor([3, 1]), torch.tensor([3, 2])) == 0.5
    with pytest.raises(RClipError, match="target class"):
        backdoor_test_images(x[:1], y[:1], trig, 0)
    with pytest.raises(RClipError, match="empty"):
        attack_success_rate(torch.tensor([]), 0)


def test_stacked_attacks_poison_disjoint_pairs_and_keep_every_layer(base):
    patch = Trigger("patch", patch_size=4, seed=1)
    blend = Trigger("blend", alpha=0.3, seed=2)
    first = backdoor_poison(base, BackdoorConfig(trigger=patch, task="texture", target_label=1, n_poison=5,
                                                 poison_rate=None, seed=1))
    second = backdoor_poison(first, BackdoorConfig(trigger=blend, task="texture", target_label=4, n_poison=6,
                                                   poison_rate=None, seed=2))
    ds = targeted_poison(second, TargetedPoisonConfig(task="colour", n_targets=2, captions_per_target=3, seed=3))
    n = len(base)
    assert ds.layers() == [first, second, ds] and len(ds) == n + 6
    assert not (first.own & second.own[:n]).any() and int(ds.poisoned.sum()) == 5 + 6 + 6
    assert torch.equal(ds.poisoned, torch.cat([first.own | second.own, torch.ones(6, dtype=torch.bool)]))
    assert (ds.adversarial_label[first.poison_index] == 1).all() and (ds.adversarial_label[second.poison_index] == 4).all()
    # each image carries exactly its own layer's trigger (applied to the clean render)
    clean = base.__getitems__(list(range(n)))
    got = ds.__getitems__(list(range(n)))
    p_rows, b_rows = first.poison_index.tolist(), second.poison_index.tolist()
    assert torch.equal(got["images"][p_rows], patch.apply(clean["images"][p_rows], p_rows))
    assert torch.equal(got["images"][b_rows], blend.apply(clean["images"][b_rows]))
    untouched = ~ds.poisoned[:n]
    assert torch.equal(got["images"][untouched], clean["images"][untouched])
    # owners and "would this caption still teach the attack", across layers and the appended captions
    assert ds.owner(p_rows[0]) is first and ds.owner(b_rows[0]) is second and ds.owner(n) is ds
    assert ds.owner(int(untouched.nonzero()[0])) is None
    assert ds.keeps_poison(p_rows[0], p_rows[1]) and not ds.keeps_poison(p_rows[0], b_rows[0])
    assert ds.keeps_poison(n, n + 1) and not ds.keeps_poison(n, n + 3)     # target 0's captions vs target 1's
    assert ds.caption_mentions == ("size", "colour", "shape", "texture", "position")


def test_ground_truth_equals_the_corpus_answers(base):
    ds = targeted_poison(backdoor_poison(base, BackdoorConfig(task="colour", target_label=2, n_poison=4,
                                                              poison_rate=None)),
                         TargetedPoisonConfig(task="colour", n_targets=1, captions_per_target=4))
    truth = GroundTruth(ds)
    for i in range(len(ds)):
        for j in range(0, len(ds), 3):
            assert truth.describes(i, j) == ds.describes(i, j)
            assert truth.keeps_poison(i, j) == ds.keeps_poison(i, j)


def test_poison_captions_speak_the_corpus_language():
    from rclip.data.pairs import FocusedWorldPairs

    focused = FocusedWorldPairs(30, mentions=("colour", "texture"))
    ds = backdoor_poison(focused, BackdoorConfig(task="texture", target_label=3, n_poison=10, poison_rate=None))
    for i in ds.poison_index.tolist():
        spec = ds.pair(i)[1].spec
        assert spec.texture == 3 and spec.shape is None and spec.size is None and spec.position is None
    caps = class_captions("colour", 1, 20, extras=("texture",))
    assert all(c.spec.colour == 1 and c.spec.shape is None and c.spec.size is None for c in caps)


def test_threat_report_equals_the_zero_shot_predictions(tiny, base):
    from rclip import zeroshot

    trig = Trigger("patch", patch_size=5, seed=4)
    ds = targeted_poison(backdoor_poison(base, BackdoorConfig(trigger=trig, task="colour", target_label=2,
                                                              n_poison=3, poison_rate=None)),
                         TargetedPoisonConfig(task="colour", n_targets=3, captions_per_target=2))
    report = threat_report(tiny, ds, n_test=24)
    assert set(report) == {"patch 5px", "targeted"}
    task = world.zeroshot_task("colour", split="test", n=24, resolution=32, seed=3)
    clf = zeroshot.zeroshot_classifier(tiny, task)
    x, y = task.tensors()
    xt, _ = backdoor_test_images(x, y, trig, 2)
    assert report["patch 5px"]["asr"] == pytest.approx(100 * (zeroshot.predict(clf, xt) == 2).float().mean().item())
    assert report["patch 5px"]["n"] == int((y != 2).sum()) and report["patch 5px"]["target"] == 2
    images, labels, adv = ds.target_images()
    pred = zeroshot.predict(clf, images)
    assert report["targeted"]["asr"] == pytest.approx(100 * (pred == adv).float().mean().item())
    assert report["targeted"]["base_rate"] == pytest.approx(100 * (pred == labels).float().mean().item())
    items = threat_items(tiny, ds, n_test=24)                 # the per-item outcomes the rates are the means of
    assert torch.equal(items["targeted"]["hit"], pred == adv) and torch.equal(items["targeted"]["base"], pred == labels)
    assert torch.equal(items["patch 5px"]["hit"], zeroshot.predict(clf, xt) == 2)
    assert torch.equal(items["patch 5px"]["base"], zeroshot.predict(clf, x[y != 2]) == 2)   # same images, no trigger
    assert torch.equal(items["patch 5px"]["labels"], y[y != 2]) and items["patch 5px"]["target"] == 2
    for name, entry in items.items():
        assert report[name]["asr"] == pytest.approx(100 * entry["hit"].float().mean().item())
        assert report[name]["base_rate"] == pytest.approx(100 * entry["base"].float().mean().item())


def test_world_and_paper_corpora_share_one_poisoning_path(base):
    """The paper path (any corpus, template captions) takes the same pairs and targets as the world path for the
    same configs, with the same checks; only where images and captions come from differs."""
    from dataclasses import replace

    from rclip.attacks.poison import PoisonedCorpus, TemplateClassCaptions, attack_names, poison_counts
    from rclip.data.pairs import PairCorpus

    batch = base.__getitems__(list(range(len(base))))
    corpus = PairCorpus((batch["images"] * 255).round().to(torch.uint8), batch["texts"])
    task = world.zeroshot_task("shape", split="test", n=60, resolution=32, seed=base.seed)
    backdoors = [BackdoorConfig(trigger=Trigger("patch", patch_size=4), task="shape", target_label=1, poison_rate=0.1),
                 BackdoorConfig(trigger=Trigger("blend"), task="shape", target_label=2, n_poison=3, poison_rate=None,
                                seed=1)]
    for targeted in (TargetedPoisonConfig(task="shape", n_targets=5, captions_per_target=3, target_pool=60, seed=4),
                     TargetedPoisonConfig(task="shape", n_targets=4, captions_per_target=None, poison_rate=0.2,
                                          adversarial_label=0, target_pool=60)):
        world_ds = targeted_poison(backdoor_poison(backdoor_poison(base, backdoors[0]), backdoors[1]), targeted)
        paper_ds = PoisonedCorpus(corpus, task, backdoors=backdoors, targeted=targeted)
        assert torch.equal(world_ds.poisoned, paper_ds.poisoned)
        assert torch.equal(world_ds.adversarial_label, paper_ds.adversarial_label)
        assert attack_names(world_ds) == attack_names(paper_ds) and poison_counts(world_ds) == poison_counts(paper_ds)
        assert [layer.kind for layer in world_ds.layers()] == [layer.kind for layer in paper_ds.layers()]
        for w, p in zip(world_ds.layers()[-1].target_images(), paper_ds.layers()[-1].target_images()):
            assert torch.equal(w, p)                      # same target images, true and adversarial classes
        rows = paper_ds.poisoned[:len(base)].nonzero().flatten().tolist()
        assert torch.equal(paper_ds.images(rows), world_ds.images(rows))     # the same triggers on the same pairs
        classes = TemplateClassCaptions(task)
        assert all(paper_ds.texts[i] in classes.texts(int(paper_ds.adversarial_label[i]))
                   for i in paper_ds.poisoned.nonzero().flatten().tolist())
    # what the world path refuses, the paper path refuses with the same message
    bad_backdoors = [replace(backdoors[0], poison_rate=1.5), replace(backdoors[0], target_label=10),
                     replace(backdoors[0], n_poison=4), replace(backdoors[0], trigger=Trigger("patch", patch_size=40))]
    bad_targeted = [TargetedPoisonConfig(task="shape", n_targets=0), TargetedPoisonConfig(task="shape",
                    captions_per_target=None, poison_rate=2.0), TargetedPoisonConfig(task="shape", n_targets=4, target_pool=3)]
    for bad in bad_backdoors + bad_targeted:
        kw = {"backdoors": [bad]} if isinstance(bad, BackdoorConfig) else {"targeted": bad}
        with pytest.raises(RClipError) as world_err:
            (backdoor_poison if "backdoors" in kw else targeted_poison)(base, bad)
        with pytest.raises(RClipError) as paper_err:
            PoisonedCorpus(corpus, task, **kw)
        assert str(world_err.value).split(" of ")[0] == str(paper_err.value).split(" of ")[0]
