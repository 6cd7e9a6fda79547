import pytest
import torch
import torchattacks

from rclip import robustness, world, zeroshot
from rclip.attacks import autoattack, cw, fgsm, margin_loss, mim, pgd
from rclip.errors import RClipError


@pytest.fixture(scope="module")
def setup(tiny):
    task = world.zeroshot_task("shape", n=20, resolution=32)
    clf = zeroshot.zeroshot_classifier(tiny, task)
    x, y = task.tensors()
    return clf, x, y


def test_pgd_equals_torchattacks_without_random_start(setup):
    clf, x, y = setup
    eps, alpha = 4 / 255, 1 / 255
    ours = pgd(clf, x, y, eps, steps=5, alpha=alpha, random_start=False)
    ref = torchattacks.PGD(clf, eps=eps, alpha=alpha, steps=5, random_start=False)(x, y)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_pgd_stays_in_the_ball_and_hurts(setup):
    clf, x, y = setup
    eps = 8 / 255
    adv = pgd(clf, x, y, eps, steps=10, seed=1)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(clf(adv), y) > ce(clf(x), y)
    again = pgd(clf, x, y, eps, steps=10, seed=1)
    assert torch.equal(adv, again)
    assert not torch.equal(adv, pgd(clf, x, y, eps, steps=10, seed=2))
    margin = pgd(clf, x, y, eps, steps=10, loss="margin", kappa=50)
    assert (margin - x).abs().max() <= eps + 1e-6


def test_pgd_rejects_bad_input(setup):
    clf, x, y = setup
    with pytest.raises(RClipError, match=r"\[0, 1\]"):
        pgd(clf, x * 4 - 2, y, 1 / 255)
    with pytest.raises(RClipError, match="NaN"):
        pgd(clf, x.masked_fill(x > 0.5, float("nan")), y, 1 / 255)
    assert torch.equal(pgd(clf, x, y, 0.0), x)


def test_pgd_sweep_and_reference_budget(setup):
    clf, x, y = setup
    sweep = robustness.pgd_sweep(clf, x, y, [0.0, 1 / 255, 16 / 255], steps=3)
    assert sweep[0.0] == zeroshot.accuracy(clf, x, y)
    assert sweep[16 / 255] <= sweep[0.0]
    # the budget is the first radius where *every* task is below the threshold, not where the first one is
    sweeps = {"a": {0.0: 90.0, 1.0: 5.0, 2.0: 0.0, 4.0: 0.0},
              "b": {0.0: 99.0, 1.0: 60.0, 2.0: 12.0, 4.0: 3.0}}
    assert robustness.collapse_radius(sweeps["a"]) == 1.0
    assert robustness.collapse_radius(sweeps["b"]) == 4.0
    assert robustness.reference_budget(sweeps) == 4.0
    assert robustness.reference_budget(sweeps, threshold=15.0) == 2.0
    assert robustness.reference_budget({"c": {0.0: 99.0, 1.0: 50.0}}) is None


def test_fgsm_and_mim_equal_torchattacks(setup):
    clf, x, y = setup
    eps = 4 / 255
    assert torch.allclose(fgsm(clf, x, y, eps), torchattacks.FGSM(clf, eps=eps)(x, y), atol=1e-6)
    ours = mim(clf, x, y, eps, steps=5)
    ref = torchattacks.MIFGSM(clf, eps=eps, alpha=eps / 5, steps=5, decay=1.0)(x, y)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_cw_lowers_the_margin(setup):
    clf, x, y = setup
    eps = 4 / 255
    adv = cw(clf, x, y, eps, steps=10, kappa=50)
    assert (adv - x).abs().max() <= eps + 1e-6
    with torch.no_grad():
        assert margin_loss(clf(adv), y, 50) < margin_loss(clf(x), y, 50)
    # first principles: one step from x (no random start) moves each pixel by eps against the margin's gradient
    x0 = x.clone().requires_grad_(True)
    logits = clf(x0)
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = torch.where(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), -1e9, logits).max(1).values
    grad, = torch.autograd.grad(torch.clamp(true - other, min=-50).sum(), x0)
    manual = (x - eps * grad.sign()).clamp(0, 1)
    one_step = pgd(clf, x, y, eps, steps=1, alpha=eps, random_start=False, loss="margin", kappa=50)
    assert torch.allclose(one_step, manual, atol=1e-6)


def test_autoattack_is_at_least_as_strong_as_its_ce_stage(setup):
    clf, x, y = setup
    eps = 2 / 255
    adv = autoattack(clf, x, y, eps, steps=10)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    ce_only = torchattacks.APGD(clf, eps=eps, steps=10, seed=0, loss="ce")(x, y)
    with torch.no_grad():
        fooled, fooled_ce = clf(adv).argmax(1) != y, clf(ce_only).argmax(1) != y
    assert (fooled | ~fooled_ce).all()  # every sample APGD-CE fools, AutoAttack fools too
    assert torch.equal(adv, autoattack(clf, x, y, eps, steps=10))


def test_eot_pgd_on_a_deterministic_defense_is_pgd(setup):
    clf, x, y = setup
    eps = 4 / 255

    class Deterministic(torch.nn.Module):  # ignores the generator, so every draw is the same
        def __init__(self):
            super().__init__()
            self.clf = clf

        def forward(self, images, generator):
            return self.clf(images)

    from rclip.attacks import eot_pgd
    for eot in (1, 3):
        adv = eot_pgd(Deterministic(), x, y, eps, steps=5, eot=eot, seed=2)
        assert torch.allclose(adv, pgd(clf, x, y, eps, steps=5, seed=2), atol=1e-6)


def test_eot_pgd_averages_over_draws(setup):
    clf, x, y = setup
    eps = 4 / 255
    calls = []

    class Random(torch.nn.Module):  # a defense that adds generator-drawn noise to its logits
        def __init__(self):
            super().__init__()
            self.clf = clf

        def forward(self, images, generator):
            calls.append(generator.initial_seed())
            return self.clf(images) + torch.randn(len(images), clf.num_classes, generator=generator)

    from rclip.attacks import eot_pgd
    adv = eot_pgd(Random(), x, y, eps, steps=3, eot=4)
    assert len(calls) == 12 and len(set(calls)) == 12  # a fresh draw for every sample of every step
    assert (adv - x).abs().max() <= eps + 1e-6


def test_transfer_sets_run_each_attack_at_its_own_budgets(setup):
    clf, x, y = setup
    x, y = x[:6], y[:6]
    budgets = {"1/255": 1 / 255, "4/255": 4 / 255}
    sets = robustness.transfer_sets(clf, x, y, budgets, steps=2, attacks={"pgd": None, "cw": ["1/255"]})
    assert list(sets) == ["clean", "PGD 1/255", "CW 1/255", "PGD 4/255"]
    assert torch.equal(sets["CW 1/255"][0], cw(clf, x, y, 1 / 255, steps=2))
    assert torch.equal(sets["PGD 4/255"][0], pgd(clf, x, y, 4 / 255, steps=2))
    with pytest.raises(RClipError, match="2/255"):
        robustness.transfer_sets(clf, x, y, budgets, attacks={"cw": ["2/255"]})


def test_validation_tasks_are_the_same_tasks_on_the_validation_split(tiny):
    from rclip.chapter import Setup

    test = {"shape": world.zeroshot_task("shape", n=6, resolution=32)}
    val = Setup("world", tiny, test, {}).validation(4)["shape"]
    assert val.meta["split"] == "val" and len(val) == 4 and val.classnames == test["shape"].classnames
    assert not torch.equal(val.tensors()[0], test["shape"].tensors(4)[0])
    with pytest.raises(RClipError, match="world scale only"):
        Setup("paper", tiny, test, {}).validation(4)


def test_attacked_scores_attack_each_model_against_itself_on_the_tasks_given(tiny, monkeypatch):
    import copy

    from rclip import chapter

    tasks = {"shape": world.zeroshot_task("shape", n=6, resolution=32),
             "colour": world.zeroshot_task("colour", n=6, resolution=32)}
    other = copy.deepcopy(tiny)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.model.visual.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    victims, real = [], robustness.transfer_sets

    def spy(victim, images, labels, budgets, **kw):     # which model each attack targets, on which images
        victims.append((victim.bundle, len(images), dict(budgets), kw["steps"], kw["seed"]))
        return real(victim, images, labels, budgets, **kw)

    monkeypatch.setattr(robustness, "transfer_sets", spy)
    scores = chapter.attacked_scores({"A": tiny, "B": other}, tasks, {"4/255": 4 / 255}, n=5, steps=2, seed=3)
    assert len(victims) == 4                                # one attack per model and task, no more
    assert [(v[0] is b, v[1:]) for v, b in zip(victims, [tiny, tiny, other, other])] == \
        [(True, (5, {"4/255": 4 / 255}, 2, 3))] * 4
    assert scores.models == ["A", "B"] and scores.tasks == ["shape", "colour"]
    assert scores.conditions == ["clean", "PGD 4/255"]
    for name, bundle in (("A", tiny), ("B", other)):      # first principles: PGD against that model, first n images
        clf = zeroshot.zeroshot_classifier(bundle, tasks["colour"])
        x, y = tasks["colour"].tensors(5)
        adv = pgd(clf, x, y, 4 / 255, steps=2, seed=3)
        assert scores.data[(name, "colour", "PGD 4/255")].tolist() == (zeroshot.correct(clf, adv, y).float() * 100
                                                                       ).tolist()
        assert scores.data[(name, "colour", "clean")].tolist() == (zeroshot.correct(clf, x, y).float() * 100).tolist()
    for bundles, tasks_ in (({}, tasks), ({"A": tiny}, {})):
        with pytest.raises(RClipError, match="at least one model and one task"):
            chapter.attacked_scores(bundles, tasks_, {"4/255": 4 / 255}, n=5, steps=2, seed=0)


def test_robust_precondition_is_the_engines_lower_end_against_clip():
    from rclip import chapter, claims, models

    clip = models.load("world")                     # above chance on these tasks, so the engine compares
    other = clip.copy()
    with torch.no_grad():
        for p in other.model.visual.parameters():
            p.add_(0.003 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    tasks = {t: world.zeroshot_task(t, n=12, resolution=64, split="val") for t in ("colour", "texture")}
    encoders = {"CLIP": clip, "B": other}
    out = chapter.robust_precondition(encoders, tasks, eps_255=2, n=12, steps=2, seed=0, where="validation",
                                      threshold=-100)
    scores = chapter.attacked_scores(encoders, tasks, {"2/255": 2 / 255}, n=12, steps=2, seed=0)
    keep = scores.tasks_above_chance("B", "CLIP")
    assert keep                                     # the engine's record on the same items, recomputed
    ref = claims.compare("x", scores.items("B", "PGD 2/255", keep), scores.items("CLIP", "PGD 2/255", keep),
                         metric="m")
    gap = out["gaps"]["B"]
    assert (gap["n"], gap["estimate"], gap["ci_low"], gap["ci_high"]) == \
        (ref["n"], ref["estimate"], ref["ci_low"], ref["ci_high"])
    pre = out["preconditions"]["B"]
    assert pre.value == gap["ci_low"] and pre.threshold == -100 and pre.holds and list(out["gaps"]) == ["B"]
    assert "2/255" in pre.name and "12 validation images per task" in pre.name
    strict = chapter.robust_precondition(encoders, tasks, eps_255=2, n=12, steps=2, seed=0, where="validation",
                                         threshold=101)
    assert not strict["preconditions"]["B"].holds                   # no gap can exceed 100 points
    rec = out["record"]
    assert rec["split"] == "validation" and rec["n_per_task"] == 12 and rec["budget"] == "2/255"
    assert rec["preconditions"]["B"]["value"] == gap["ci_low"] and rec["gaps"] == [gap]
    with pytest.raises(RClipError, match="'CLIP' and at least one encoder"):
        chapter.robust_precondition({"B": other}, tasks, eps_255=4, n=8, steps=2, seed=0, where="validation")


def test_finetune_recipe_states_the_schedule_the_config_runs():
    from rclip.chapter import finetune_config, finetune_recipe

    params = {"seed": 0, "scale": "world", "finetune": {"task": "colour_shape", "n": 20000, "steps": 240,
                                                        "batch": 32, "attack_steps": 3, "eps": 4, "lr": 1e-4}}
    text = finetune_recipe(params)
    cfg = finetune_config(params, "tecoa")
    assert cfg.attack_steps == 3 and cfg.train.steps == 240 and cfg.train.warmup_steps == 24
    for part in ("PGD-3", "ε = 4/255", "240 steps × 32 images", "20,000 train images of colour_shape", "AdamW",
                 "lr 0.0001", "warm-up 24 steps", "cosine to 1e-05", f"clipped at {cfg.train.grad_clip:g}"):
        assert part in text, part
    paper = finetune_recipe({**params, "scale": "paper", "finetune": {**params["finetune"], "n": None}})
    assert "all train images of inputs.datasets.imagenet_train" in paper and "colour_shape" not in paper
    with pytest.raises(RClipError, match="finetune parameter"):
        finetune_recipe({"seed": 0, "finetune": {"steps": 1}})
