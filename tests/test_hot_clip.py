"""HOT-CLIP's pipeline on the tiny CLIP: submodels, the three fusion strategies, cached artefacts and the count of
towers in memory; the training attacks; the fusion experiment's helpers."""
import pytest
import torch

from rclip import world
from rclip.errors import RClipError
from rclip.methods.fusion import FusionConfig, visual_state
from rclip.methods.hot_clip import (HotClip, HotClipConfig, Residency, Tower, TowerConfig, adversarial_images, barrier,
                                    independent_tower, interpolation_curve)
from rclip.train import TrainConfig
from rclip.zeroshot import accuracy, zeroshot_classifier

STEP = TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup_steps=1, ckpt_every=2)


def _pipeline(tiny, **kw):
    data = world.WorldLabelled("colour_shape", 32, resolution=32)
    task = world.zeroshot_task("colour_shape", n=1, resolution=32)
    cfg = HotClipConfig(**{"n_templates": 3, "attack_steps": 1, "submodel": STEP, "intra": STEP, "inter": STEP,
                           "fusion": FusionConfig("hard"), **kw})   # soft alignment: tests/test_fusion.py
    return HotClip(tiny, data, {"task": "colour_shape", "n": 32}, task.classnames, task.templates, cfg)


def test_strategies_count_towers_and_share_the_pool(tiny):
    hc = _pipeline(tiny)
    pairs = hc.pool()
    assert len(pairs) == 9 and all(hc.path(hc.submodel_key(a, t)).is_file() for a, t in pairs)
    assert hc.residency.live == 0                                   # every submodel was released after training
    assert [hc.templates_for(a)[0] for a in hc.cfg.attacks] == ["a photo of a {}."] * 3   # t0 trains the anchor
    assert len({t for a in hc.cfg.attacks for t in hc.templates_for(a)}) > 3             # sampled per attack
    subs = [hc.submodel(a, t) for a, t in pairs]
    base = visual_state(tiny)
    assert all(not torch.equal(s["proj"], base["proj"]) for s in subs)
    assert not torch.equal(subs[0]["proj"], subs[3]["proj"])          # another attack, another model
    mean = {k: sum(s[k] for s in subs) / 9 for k in base}
    del subs                                                        # or they would count as resident below
    average, info_avg = hc.strategy("average")
    for k in base:                                                  # direct average = the arithmetic mean
        torch.testing.assert_close(average[k], mean[k], atol=1e-6, rtol=1e-5)
    del average
    direct, info_direct = hc.strategy("direct")
    del direct
    tower, info_h = hc.strategy("hierarchical")
    # direct fusion holds all 9 submodels and its result; the hierarchy max(|A|, |T|) + 1 = 4 at any moment
    assert info_avg["peak_towers"] == info_direct["peak_towers"] == 10
    assert info_h["peak_towers"] == 4 and info_h["peak_mb"] < info_direct["peak_mb"] / 2
    assert any("FARE" in e for e, _ in info_h["events"])
    # a second pipeline with the same settings finds everything cached: nothing is trained again
    again = _pipeline(tiny)
    cached, _ = again.strategy("hierarchical")
    assert not again.logs and all(torch.equal(cached[k], tower[k]) for k in tower)
    # a smaller pool (1 attack x 3 templates) reuses the submodels of the big one
    small = _pipeline(tiny, attacks=("pgd",))
    small.hierarchical()
    assert not any(k.startswith("submodel") for k in small.logs)


def test_residency_follows_references():
    r = Residency()
    a = r.track(Tower({"w": torch.zeros(1024)}), "a")
    b = r.track(Tower({"w": torch.zeros(1024)}), "b")
    assert (r.live, r.peak) == (2, 2)
    del a
    assert r.live == 1
    r.reset()
    with r.holding("copy", 0.5):
        assert r.live == 2
    del b
    assert (r.live, r.peak) == (0, 2) and r.log[-1] == ("- b", 0)


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "mim"])
def test_training_attacks_stay_in_the_ball_and_hurt(tiny, attack):
    task = world.zeroshot_task("colour", n=16, resolution=32)
    x, y = task.tensors()
    clf = zeroshot_classifier(tiny, task)
    eps = 8 / 255
    adv = adversarial_images(clf, x, y, attack, eps, steps=3)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(clf(adv), y) > loss(clf(x), y)
    with pytest.raises(RClipError, match="unknown training attack"):
        adversarial_images(clf, x, y, "cw", eps, steps=1)


def test_config_and_evaluation(tiny):
    with pytest.raises(RClipError, match="attacks"):
        HotClipConfig(attacks=("pgd", "apgd"))
    with pytest.raises(RClipError, match="eps"):
        HotClipConfig(eps=4)
    with pytest.raises(RClipError, match="templates per attack"):
        task = world.zeroshot_task("count", n=1, resolution=32)
        HotClip(tiny, None, {}, task.classnames, task.templates[:2], HotClipConfig())
    tasks = {"colour": world.zeroshot_task("colour", n=16, resolution=32)}
    from rclip.robustness import autoattack_correct

    table = autoattack_correct(tiny, tasks, {"4/255": 4 / 255, "ref": {"colour": 2 / 255}}, steps=2)
    x, y = tasks["colour"].tensors()
    assert 100 * table["colour"]["clean"].float().mean() == accuracy(zeroshot_classifier(tiny, tasks["colour"]), x, y)
    assert not (table["colour"]["4/255"] & ~table["colour"]["clean"]).any()      # only clean-correct images survive
    assert not (table["colour"]["4/255"] & ~table["colour"]["ref"]).any()        # the larger ball is attacked last


def test_independent_towers_and_interpolation(tiny):
    cfg = TowerConfig(pairs=16, resolution=32, train=TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup_steps=1,
                                                                 ckpt_every=2))
    a, log = independent_tower(tiny, 1, cfg)
    b, _ = independent_tower(tiny, 2, cfg)
    again, log2 = independent_tower(tiny, 1, cfg)                  # from the cache
    assert log == log2 and torch.equal(again.model.visual.proj, a.model.visual.proj)
    assert not torch.equal(a.model.visual.conv1.weight, b.model.visual.conv1.weight)
    assert torch.equal(a.model.text_projection, tiny.model.text_projection)       # the text tower stays frozen
    tasks = {"colour": world.zeroshot_task("colour", n=8, resolution=32)}
    sa, sb = visual_state(a), visual_state(b)
    flat = interpolation_curve(tiny, sa, sa, tasks, [0, 0.5, 1])
    assert barrier(flat) == pytest.approx(0, abs=1e-5)
    assert barrier([{"lambda": 0, "loss": 1}, {"lambda": 0.5, "loss": 3}, {"lambda": 1, "loss": 2}]) == 1.5
    assert barrier([{"lambda": 0, "top1": 50}, {"lambda": 0.5, "top1": 10}, {"lambda": 1, "top1": 40}],
                   "top1") == 35
    curve = interpolation_curve(tiny, sa, sb, tasks, [0, 1])
    assert curve[0]["top1"] == pytest.approx(accuracy(zeroshot_classifier(a, tasks["colour"]),
                                                      *tasks["colour"].tensors()))


# ----------------------------------------------------------------------------------------------------------------
# Paper scale: fail fast without inputs; the chapter end to end on stand-ins
# ----------------------------------------------------------------------------------------------------------------

def _image_folder(root, classes=("cat", "dog", "bird"), per_class=4):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_paper_inputs_fail_fast_and_name_the_fix(tmp_path, tiny):
    from rclip import book, data
    from rclip.profiles import notebook_parameters

    with pytest.raises(RClipError, match="needs the profile's inputs"):
        data.inputs.paper_finetune_set(None, tiny.preprocess)
    with pytest.raises(RClipError, match="inputs.datasets.imagenet_train is not set"):
        data.inputs.paper_finetune_set({"datasets": {"cifar10": "x"}}, tiny.preprocess)
    with pytest.raises(RClipError, match="image folder not found"):
        data.inputs.paper_finetune_set({"datasets": {"imagenet_train": str(tmp_path / "missing")}}, tiny.preprocess)
    with pytest.raises(RClipError, match="imagenet_train"):
        book.validate_inputs({"model": "rclip-tiny", "checkpoint": None,
                              "datasets": {"imagenet_train": str(tmp_path / "missing")}})
    params = notebook_parameters("paper", "02_hot_clip")
    assert params["scale"] == "paper" and "imagenet_train" in params["inputs"]["datasets"]
    folder = str(_image_folder(tmp_path / "train"))
    train, task = data.inputs.paper_finetune_set({"datasets": {"imagenet_train": folder}}, tiny.preprocess, n=6)
    batch = train.__getitems__([0, 5])
    assert batch["images"].shape == (2, 3, 32, 32) and batch["labels"].tolist() == [0, 2]
    assert task.classnames == ["bird", "cat", "dog"] and task.templates[0] == "a photo of a {}."


@pytest.mark.slow
def test_chapter2_runs_at_paper_scale_on_stand_ins(tmp_path, tiny, make_cifar10):
    import json
    import os
    from pathlib import Path

    import papermill as pm

    from rclip import models
    from rclip.profiles import notebook_parameters

    root = Path(__file__).resolve().parent.parent
    make_cifar10(tmp_path / "cifar", n=12)
    ckpt = tmp_path / "tiny.safetensors"
    models.save(tiny, ckpt)
    inputs = {"model": "rclip-tiny", "checkpoint": str(ckpt),
              "datasets": {"cifar10": str(tmp_path / "cifar"), "imagenet_train": str(_image_folder(tmp_path / "in"))},
              "descriptions": {}, "robust_checkpoints": {}}
    params = notebook_parameters("smoke", "02_hot_clip")
    results = tmp_path / "02_hot_clip.json"
    params.update(scale="paper", inputs=inputs, tasks=None, ablation_tasks=None, n_eval=6, finetune_n=None,
                  results_path=str(results))
    os.environ.setdefault("RCLIP_ROOT", str(root))
    pm.execute_notebook(str(root / "notebooks" / "02_hot_clip.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters=params, kernel_name="python3", cwd=str(root / "notebooks"), progress_bar=False)
    res = json.loads(results.read_text())["results"]
    assert res["scale"] == "paper" and res["tasks"] == ["cifar10"] and res["n_eval"] == 6
    assert res["budgets_255"] == {"2/255": 2, "4/255": 4}                # no world reference budget
    assert {"CLIP/cifar10", "TeCoA/cifar10", "FARE/cifar10", "HOT-CLIP/cifar10"} <= set(res["table1"])
    assert "towers" not in res                                           # the tower experiment is world-only
    assert set(res["memory"]) == {"average", "direct", "hierarchical"} and res["claims"]
