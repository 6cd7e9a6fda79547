import pytest
import torch
import torchattacks

from rclip import robustness, world, zeroshot
from rclip.attacks import pgd
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
