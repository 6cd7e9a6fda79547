"""HOT-CLIP's pipeline on the tiny CLIP: submodels, the three fusion strategies, cached artefacts and the count of
towers in memory; the training attacks; the chapter's helpers; the independent-towers experiment."""
import numpy as np
import pytest
import torch

from rclip import world
from rclip.errors import RClipError
from rclip.methods import hot_clip as hc
from rclip.methods import towers as tw
from rclip.methods.fusion import FusionConfig, visual_state
from rclip.methods.hot_clip import HotClip, HotClipConfig, Residency, Tower, adversarial_images, memory_table
from rclip.methods.towers import TowerConfig, barrier, independent_tower, interpolation_curve
from rclip.robustness import Scores
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
    assert info_avg["fusion_s"] >= 0 and info_direct["fusion_s"] > 0 and info_h["fusion_s"] > 0   # OT solves take time
    secs = hc.finetune_seconds()

    def log_s(key):
        return hc.cached_log(key)["wall_s"]
    assert secs["submodel pool"] == pytest.approx(sum(log_s(hc.submodel_key(a, t)) for a, t in pairs), abs=0.1)
    assert secs["hierarchy's fine-tunes"] == pytest.approx(
        sum(log_s(hc.intra_key(a)) for a in hc.cfg.attacks) + log_s(hc.hierarchical_key()), abs=0.1)
    table = memory_table({"average": info_avg, "direct": info_direct, "hierarchical": info_h}, 3, 3, secs)
    assert table.loc["hierarchical", "fine-tuning beyond the pool (s, this run's logs)"] == secs["hierarchy's fine-tunes"]
    assert table.loc["average", "fine-tuning beyond the pool (s, this run's logs)"] == 0.0
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


def test_autoattack_runs_once_per_distinct_budget(tiny, monkeypatch):
    from rclip import robustness

    calls = []

    def spy(clf, x, y, eps, **kw):              # an attack that finds nothing: every clean-correct image survives
        calls.append((len(x), eps))
        return x

    monkeypatch.setattr(robustness, "autoattack", spy)
    tasks = {"colour": world.zeroshot_task("colour", n=16, resolution=32),
             "count": world.zeroshot_task("count", n=16, resolution=32)}
    budgets = {"2/255": 2 / 255, "4/255": 4 / 255, "ref": {"colour": 2 / 255, "count": 3 / 255}}
    table = robustness.autoattack_correct(tiny, tasks, budgets, steps=2)
    n = {t: int(table[t]["clean"].sum()) for t in tasks}
    assert min(n.values()) > 0                  # something to attack on both tasks
    # colour: 2/255 once (ref shares it), then 4/255; count: 2/255, 3/255 (its ref), 4/255
    assert calls == [(n["colour"], 2 / 255), (n["colour"], 4 / 255),
                     (n["count"], 2 / 255), (n["count"], 3 / 255), (n["count"], 4 / 255)]
    assert torch.equal(table["colour"]["ref"], table["colour"]["2/255"]) and list(table["colour"]) == \
        ["clean", "2/255", "4/255", "ref"]


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
    assert barrier([{"mix": 0, "loss": 1}, {"mix": 0.5, "loss": 3}, {"mix": 1, "loss": 2}]) == 1.5
    assert barrier([{"mix": 0, "top1": 50}, {"mix": 0.5, "top1": 10}, {"mix": 1, "top1": 40}], "top1") == 35
    curve = interpolation_curve(tiny, sa, sb, tasks, [0, 1])
    assert curve[0]["top1"] == pytest.approx(accuracy(zeroshot_classifier(a, tasks["colour"]),
                                                      *tasks["colour"].tensors()))
    # fusion variants, per-image scores, the table and the precondition's ratio
    configs = {"none": FusionConfig("none"), "weights, hard": FusionConfig("hard")}
    fused, aligned = tw.fuse_variants(a, b, configs)
    assert set(fused) == {"none", "weights, hard"} and set(aligned) == {"weights, hard"}
    for k in sa:                                                    # plain averaging: the arithmetic mean
        torch.testing.assert_close(fused["none"].state[k], (sa[k].float() + sb[k].float()) / 2)
    models = {"A": a, "B": b, tw.label("none"): tiny.with_visual(fused["none"].state)}
    scores, losses = tw.evaluate(models, tasks)
    assert scores.items("A", "clean", ["colour"]).mean() == pytest.approx(curve[0]["top1"])
    assert losses["A"] == pytest.approx(curve[0]["loss"]) and tw.label("none") == tw.AVERAGE == "plain average"
    table = tw.table(scores, losses, {"A": 12.5})
    assert list(table.index) == ["A", "B", "plain average"] and table.loc["A", "A aligned, alone (%)"] == 12.5
    assert np.isnan(table.loc["B", "A aligned, alone (%)"])
    top_b = tw.pooled_top1(scores, "B")
    assert tw.relative_top1(scores, "A", "B") == (None if top_b == 0 else pytest.approx(100 * curve[0]["top1"] / top_b))


def test_chapter_helpers(tiny):
    params = {"attacks": ["pgd", "mim"], "n_templates": 2, "train_eps": 2, "hot_attack_steps": 3, "submodel_steps": 8,
              "intra_steps": 4, "inter_steps": 0, "hot_batch": 16, "hot_lr": None, "finetune": {"lr": 1e-4},
              "fusion_alignment": "soft", "fusion_reg": 0.08, "seed": 3}
    cfg = hc.config(params)
    assert cfg.attacks == ("pgd", "mim") and cfg.eps == 2 / 255 and cfg.fusion == FusionConfig("soft", reg=0.08)
    assert cfg.submodel.lr == cfg.intra.lr == 1e-4 and cfg.submodel.min_lr == pytest.approx(1e-5)   # hot_lr unset
    assert (cfg.submodel.steps, cfg.intra.steps, cfg.inter.steps, cfg.submodel.seed) == (8, 4, 0, 3)
    assert hc.config({**params, "hot_lr": 3e-5}).submodel.lr == 3e-5
    only = hc.fusion_only(cfg)
    assert only.intra.steps == only.inter.steps == 0 and only.submodel == cfg.submodel
    assert hc.pools(3, 3) == [(1, 3), (2, 3), (3, 3), (3, 1)] and hc.pools(1, 1) == [(1, 1)]
    peaks = {"average": (10, 3.0), "direct": (10, 3.0), "hierarchical": (4, 1.2)}
    mem = hc.memory_table({k: {"peak_towers": n, "peak_mb": mb} for k, (n, mb) in peaks.items()}, 3, 3)
    assert mem.iloc[:, 2].tolist() == [10, 10, 4]                   # |A||T| + 1, |A||T| + 1, max(|A|, |T|) + 1
    # scores: a measured encoder enters another table unchanged; gaps and the n a stated gain needs
    tasks = {"colour": world.zeroshot_task("colour", n=16, resolution=32)}
    first = hc.autoattack_scores({"CLIP": tiny}, tasks, {"4/255": 4 / 255}, steps=2)
    again = hc.autoattack_scores({"CLIP": hc.measured(first, "CLIP", ["colour"], first.conditions)}, tasks, {}, steps=2)
    assert again.data.keys() == first.data.keys()
    assert all(np.array_equal(again.data[k], first.data[k]) for k in first.data)
    head = {"colour": tasks["colour"].first(5)}                      # a smaller table on the first images
    part = hc.autoattack_scores({"CLIP": hc.measured(first, "CLIP", ["colour"], first.conditions, limit=5)}, head, {},
                                steps=2)
    assert all(np.array_equal(part.data[k], first.data[k][:5]) for k in first.data)
    fresh = hc.autoattack_scores({"CLIP": tiny}, head, {}, steps=2)      # the prefix is the same images, in order
    assert np.array_equal(fresh.data[("CLIP", "colour", "clean")], first.data[("CLIP", "colour", "clean")][:5])
    s = Scores({"t": 2})
    s.add("a", "t", "clean", np.r_[np.ones(90), np.zeros(10)])
    s.add("b", "t", "clean", np.r_[np.ones(80), np.zeros(20)])
    assert s.disagreement("a", "b", "clean") == pytest.approx(10)       # images 80..89: right for a, wrong for b
    s.add("c", "t", "clean", np.r_[np.ones(50), np.zeros(50)])           # at chance (2 classes): no task to compare
    assert s.disagreement("a", "c", "clean") is None
    from rclip.claims import n_needed

    d = s.items("a", "clean", ["t"]) - s.items("b", "clean", ["t"])
    assert hc.n_to_resolve(s, "a", "b", "clean", 1.0) == n_needed(1.0, d.std(ddof=1) / 10, 100)
    assert hc.n_to_resolve(s, "a", "b", "clean", 1.0) > hc.n_to_resolve(s, "a", "b", "clean", 5.0)
    assert hc.n_to_resolve(s, "a", "a", "clean", 1.0) is None                     # no spread: nothing to size


def test_variant_and_self_match(tiny):
    pipe = _pipeline(tiny)
    small = pipe.variant(attacks=("pgd",), n_templates=2)
    assert small.cfg.attacks == ("pgd",) and small.cfg.n_templates == 2 and small.data_key == pipe.data_key
    assert pipe.variant(hc.fusion_only(pipe.cfg)).cfg.inter.steps == 0
    shares, direct = pipe.self_match()
    assert set(shares) == {"all 9 submodels onto one anchor", "within FGSM", "within PGD", "within MIM"}
    assert all(0 < v <= 1 for v in shares.values()) and len(direct.weights) == 9


def test_drift_measures_distance_and_alignment(tiny):
    from rclip.methods.fusion import permute_visual

    start = visual_state(tiny)
    heads = hc._heads(tiny)
    same = hc.drift(start, start, FusionConfig("hard"), heads)
    assert same == {"weight_distance": 0.0, "self_match": 1.0}
    # a neuron-permuted copy is the same function far away in weight space: OT maps it back, off the diagonal
    perm, maps = permute_visual(start, heads, seed=1)
    moved = hc.drift(start, perm, FusionConfig("hard"), heads)
    assert moved["weight_distance"] > 0.5
    # hard OT recovers the permutation, so each map's diagonal holds exactly the permutation's fixed points
    fixed = {k: float((p == torch.arange(len(p))).float().mean()) for k, p in maps.items()}
    names = ["residual"] * 3 + [f"{k}{i}" for i in range(len(tiny.model.visual.transformer.resblocks))
                                for k in ("qk", "v", "mlp")]     # the fusion's maps: 3 residual ones, 3 per block
    assert moved["self_match"] == pytest.approx(np.mean([fixed[n] for n in names]), abs=1e-6)
    # a 4-step submodel records its drift after steps 2 and 4, cached with it and read back by a new pipeline
    four = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, ckpt_every=2, eval_every=2)
    curve = _pipeline(tiny, submodel=four).drift_curve("pgd", "a photo of a {}.")
    assert [p["step"] for p in curve] == [0, 2, 4] and curve[0] == {"step": 0, "samples": 0, **same}
    assert 0 < curve[1]["weight_distance"] < curve[2]["weight_distance"] < 0.5
    assert all(0 < p["self_match"] <= 1 for p in curve)
    assert _pipeline(tiny, submodel=four).drift_curve("pgd", "a photo of a {}.") == curve
    silent = _pipeline(tiny, submodel=TrainConfig(steps=1, batch_size=8, lr=1e-3, warmup_steps=1, ckpt_every=1))
    with pytest.raises(RClipError, match="without drift records"):
        silent.drift_curve("fgsm", "a photo of a {}.")       # eval_every 0: no curve, said, not faked


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
    params.update(scale="paper", inputs=inputs, tasks=None, ablation_tasks=None, n_eval=6,
                  finetune={**params["finetune"], "n": None}, results_path=str(results))
    os.environ.setdefault("RCLIP_ROOT", str(root))
    pm.execute_notebook(str(root / "notebooks" / "02_hot_clip.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters=params, kernel_name="python3", cwd=str(root / "notebooks"), progress_bar=False)
    res = json.loads(results.read_text())["results"]
    assert res["scale"] == "paper" and res["tasks"] == ["cifar10"] and res["n_eval"] == 6
    assert res["budgets_255"] == {"2/255": 2, "4/255": 4}                # no world reference budget
    assert res["reference_budgets_255"] == {}
    assert {f"{m} | cifar10" for m in ("CLIP", "TeCoA", "FARE", "HOT-CLIP")} <= set(res["table1"])
    assert set(res["table1"]["CLIP | cifar10"]) >= {"chance", "clean", "2/255", "4/255", "above chance"}
    assert {"direct average (model soup)", "direct OT fusion", "hierarchical OT, fusion only",
            "HOT-CLIP"} == set(res["table5_mean"])
    assert set(res["table7_mean"]) == {"1 x 3", "2 x 3", "3 x 3", "3 x 1"} and len(res["table8_mean"]) == 2
    assert res["baseline_precondition"]["split"] == "test"              # no validation split at paper scale
    table7 = [r for r in res["claims"] if "Table 7" in r["claim"]]
    assert len(table7) == 6 and all(any("score differently" in p["name"] for p in r["preconditions"]) for r in table7)
    assert "towers" not in res                                           # the tower experiment is world-only
    assert set(res["memory"]) == {"average", "direct", "hierarchical"}
    from rclip import claims

    records = [claims.check(r) for r in res["claims"]]
    assert any(r["claim"].startswith("HOT-CLIP improves robustness over TeCoA") for r in records)
    assert not any(r["claim"].startswith("OTFusion") for r in records)


def test_perturbation_curve_moves_the_tower_by_the_size_asked(tiny):
    from rclip.methods.hot_clip import perturbation_curve

    curve = perturbation_curve(tiny, [0, 0.1, 1, 8], FusionConfig("soft", reg=0.08), seed=0)
    assert [p["relative_size"] for p in curve] == [0, 0.1, 1, 8]
    assert curve[0]["weight_distance"] == 0 and curve[0]["self_match"] > 0.999      # the tower itself
    for p in curve[1:]:                              # noise of norm d·‖v‖ per tensor: distance d overall
        assert p["weight_distance"] == pytest.approx(p["relative_size"], rel=0.1)
    assert curve[-1]["self_match"] < curve[1]["self_match"]              # enough noise scrambles the neurons
    assert all(p["ot"]["problems"] > 0 and p["ot"]["not_converged"] <= p["ot"]["problems"] for p in curve)
    again = perturbation_curve(tiny, [1], FusionConfig("soft", reg=0.08), seed=0)
    assert perturbation_curve(tiny, [1], FusionConfig("soft", reg=0.08), seed=0) == again      # seeded
    with pytest.raises(RClipError, match="relative norms"):
        perturbation_curve(tiny, [-1], FusionConfig("soft"))


def test_best_submodel_is_the_most_robust_on_the_tasks_all_are_above_chance_on(tiny, monkeypatch):
    import rclip.chapter as chapter

    pipe = _pipeline(tiny, attacks=("pgd",), n_templates=2)
    tasks = {"shape": object(), "count": object()}
    calls = []

    def scored(table):
        def fake_scores(bundles, tasks_, budgets, *, n, steps, seed):
            calls.append((sorted(bundles), tasks_, budgets, n, steps, seed))
            s = Scores({"shape": 4, "count": 4})
            for name, per_task in table.items():
                s.add_all(name, {t: {"clean": np.arange(100) < c, "PGD 4/255": np.arange(100) < a}
                                 for t, (c, a) in per_task.items()})
            return s
        return fake_scores
    # t1 the more robust on shape; t0 alone at chance on count (25 % clean), where t1 is weak: on its own mean t0
    # (shape only, 50) would beat t1 (shape and count, (60 + 10) / 2 = 35) - ranked on shape alone, t1 wins
    monkeypatch.setattr(chapter, "attacked_scores", scored({"PGD / t0": {"shape": (90, 50), "count": (25, 70)},
                                                            "PGD / t1": {"shape": (80, 60), "count": (60, 10)}}))
    pick = pipe.best_submodel(tasks, {"4/255": 4 / 255}, n=100, steps=3, seed=1)
    assert calls == [(["PGD / t0", "PGD / t1"], tasks, {"4/255": 4 / 255}, 100, 3, 1)]
    assert pick["means"].loc["PGD / t0", "PGD 4/255"] > pick["means"].loc["PGD / t1", "PGD 4/255"]
    assert pick["name"] == "PGD / t1" and pick["tasks"] == ["shape"] and pick["condition"] == "PGD 4/255"
    assert list(pick["means"].iloc[:, -1]) == [50.0, 60.0]                     # the ranking's column
    t1 = pipe.templates_for("pgd")[1]
    want = visual_state(pipe.bundle(pipe.submodel("pgd", t1)))
    assert all(torch.equal(v, want[k]) for k, v in visual_state(pick["bundle"]).items())
    # ties keep the pool's order; no task on which all are above chance: nothing chosen
    monkeypatch.setattr(chapter, "attacked_scores", scored({m: {"shape": (80, 60), "count": (25, 20)}
                                                            for m in ("PGD / t0", "PGD / t1")}))
    assert pipe.best_submodel(tasks, {"4/255": 4 / 255}, n=100, steps=3, seed=1)["name"] == "PGD / t0"
    monkeypatch.setattr(chapter, "attacked_scores", scored({"PGD / t0": {"shape": (25, 20), "count": (80, 60)},
                                                            "PGD / t1": {"shape": (80, 60), "count": (25, 20)}}))
    none = pipe.best_submodel(tasks, {"4/255": 4 / 255}, n=100, steps=3, seed=1)
    assert none["name"] is None and none["bundle"] is None and none["tasks"] == []
    with pytest.raises(RClipError, match="one budget"):
        pipe.best_submodel(tasks, {"2/255": 2 / 255, "4/255": 4 / 255}, n=1, steps=1, seed=0)
