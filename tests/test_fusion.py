"""OT fusion of ViTs against independent references: a functionally identical permuted copy of a network (fusion must
return the original), POT's exact and entropic solvers on the same costs, and plain arithmetic for the weights."""
import copy

import numpy as np
import ot
import pytest
import torch

from rclip import models, world, zeroshot
from rclip.errors import RClipError
from rclip.methods.fusion import (FusionConfig, fuse_clips, fuse_visual, neuron_cost, permute_visual,
                                  permuted_copy_check, relative_weight_error, transport_plans, visual_state)


@pytest.fixture(scope="module")
def world_clip():
    return models.load("world")


def _heads(bundle):
    return bundle.model.visual.transformer.resblocks[0].attn.num_heads


def _outputs(bundle, state, x):
    visual = copy.deepcopy(bundle.model.visual)
    visual.load_state_dict(state)
    with torch.no_grad():
        return visual(bundle.normalize(x))


def _random_tower(name, seed):
    torch.manual_seed(seed)
    return visual_state(models.load(name))


def _assert_recovers(bundle, seed, x, cfg=FusionConfig("hard"), weights=(0.5, 0.5), atol=1e-6):
    original = visual_state(bundle)
    permuted, perms = permute_visual(original, _heads(bundle), seed=seed)
    assert not torch.equal(permuted["transformer.resblocks.0.mlp.c_fc.weight"],
                           original["transformer.resblocks.0.mlp.c_fc.weight"])
    out = _outputs(bundle, original, x)
    # the permuted copy is the same function ...
    torch.testing.assert_close(_outputs(bundle, permuted, x), out, atol=1e-4 * out.abs().max().item(), rtol=0)
    # ... and hard fusion of (original, permuted) returns the original's weights and outputs
    models_ = [original, permuted]
    if cfg.features == "activations":
        models_ = [bundle, bundle.copy()]
        models_[1].model.visual.load_state_dict(permuted)
    res = fuse_visual(models_, weights, cfg=cfg, heads=_heads(bundle), images=bundle.normalize(x))
    for k, v in original.items():
        torch.testing.assert_close(res.state[k], v.float(), atol=atol, rtol=0, msg=k)
    torch.testing.assert_close(_outputs(bundle, res.state, x), out, atol=1e-5 * out.abs().max().item(), rtol=0)
    # the maps found are the permutations applied: model 1's neuron i (new position i holds old neuron perm[i])
    # is matched to anchor neuron perm[i]
    residual = "residual" if "residual" in res.maps else "residual.embed"
    for name, perm in (("block0.fc", perms["mlp0"]), ("block0.v", perms["v0"]), ("block0.qk", perms["qk0"]),
                       (residual, perms["residual"])):
        r = res.maps[name][1]
        assert set(r.unique().tolist()) == {0.0, 1.0} and torch.equal(r.sum(0), torch.ones(len(perm))), name
        assert torch.equal(r.argmax(1), perm), name
    return res


def test_fusion_recovers_a_permuted_world_clip(world_clip):
    x = world.zeroshot_task("colour_shape", n=4, seed=3).tensors()[0]
    _assert_recovers(world_clip, seed=1, x=x, weights=(0.2, 0.8))      # the anchor's weight can be anything


@pytest.mark.parametrize("cfg", [FusionConfig("hard", heads="cross", residual="combine"),
                                 FusionConfig("hard", features="activations")],
                         ids=["reference-policies", "activations"])
def test_other_policies_recover_a_permuted_copy_too(tiny, cfg):
    x = world.zeroshot_task("colour_shape", n=4, resolution=32, seed=3).tensors()[0]
    _assert_recovers(tiny, seed=1, x=x, cfg=cfg)


def test_fusion_recovers_a_permuted_vit_b_32():
    torch.manual_seed(0)
    bundle = models.load("ViT-B-32")                                      # open_clip architecture, random weights
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    _assert_recovers(bundle, seed=0, x=x, atol=1e-6)


def test_fused_tower_keeps_the_text_tower_and_zero_shot_accuracy(world_clip):
    permuted = world_clip.copy()
    state, _ = permute_visual(visual_state(world_clip), _heads(world_clip), seed=4)
    permuted.model.visual.load_state_dict(state)
    task = world.zeroshot_task("shape", n=30, seed=1)
    fused, _ = fuse_clips([world_clip, permuted], cfg=FusionConfig("hard"))
    assert zeroshot.evaluate(fused, task) == zeroshot.evaluate(world_clip, task)
    assert torch.equal(fused.model.text_projection, world_clip.model.text_projection)
    averaged, _ = fuse_clips([world_clip, permuted], cfg=FusionConfig("none"))
    assert zeroshot.evaluate(averaged, task)["templates"] < zeroshot.evaluate(world_clip, task)["templates"] - 20


def _noisy(state, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std().nan_to_num(0) * torch.randn(v.shape, generator=g) for k, v in state.items()}


def test_soft_alignment_with_small_tau_approaches_hard(world_clip):
    # a permuted copy with 5 % noise: the right match is clear but not exact, as between fine-tuned models
    original = visual_state(world_clip)
    permuted, perms = permute_visual(original, _heads(world_clip), seed=6)
    noisy = _noisy(permuted, 0.05, seed=0)
    hard = fuse_visual([original, noisy], cfg=FusionConfig("hard"), heads=_heads(world_clip))
    assert torch.equal(hard.maps["block2.fc"][1].argmax(1), perms["mlp2"])
    gaps = []
    for tau in (0.08, 0.02, 0.005):                       # tau in the cost's units (squared distances in [0, 4])
        soft = fuse_visual([original, noisy], cfg=FusionConfig("soft", reg=tau), heads=_heads(world_clip))
        gaps.append(max(((soft.state[k] - hard.state[k]).norm() / hard.state[k].norm()).item() for k in original))
    assert 0 < gaps[0] < 0.01 and gaps[0] >= gaps[1] >= gaps[2] and gaps[2] < 1e-6, gaps


def test_neuron_cost_is_two_minus_twice_the_cosine():
    """The cost is formed in place; it must equal the plain expression bit for bit (fusion's outputs depend on it)."""
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        feats = torch.randn(2, 3, 40, 17, generator=g, dtype=dtype)
        anchor = torch.randn(40, 17, generator=g, dtype=dtype)
        feats[0, 0, 5] = 0                                    # a zero neuron: at distance 2 from everything
        a, b = torch.nn.functional.normalize(feats, dim=-1), torch.nn.functional.normalize(anchor, dim=-1)
        assert torch.equal(neuron_cost(feats, anchor), (2 - 2 * a @ b.mT).clamp(min=0))
        assert torch.equal(neuron_cost(feats, anchor)[0, 0, 5], torch.full((40,), 2.0, dtype=dtype))


def test_transport_plans_match_pot():
    g = torch.Generator().manual_seed(0)
    feats, anchor = torch.randn(3, 24, 10, generator=g, dtype=torch.float64), torch.randn(24, 10, generator=g,
                                                                                          dtype=torch.float64)
    cost = neuron_cost(feats, anchor)
    u = np.full(24, 1 / 24)
    hard = transport_plans(cost, FusionConfig("hard"))
    soft = transport_plans(cost, FusionConfig("soft", reg=0.08, tol=1e-12, max_iter=10000))
    for i, c in enumerate(cost.numpy()):
        emd = ot.emd(u, u, c)
        assert np.isclose((hard[i].numpy() * c).sum(), (emd * c).sum(), atol=1e-12)   # the same optimal cost
        np.testing.assert_allclose(hard[i].numpy(), emd, atol=1e-12)                  # the unique optimum
        pot_soft = ot.sinkhorn(u, u, c, 0.08, method="sinkhorn_log", stopThr=1e-12, numItermax=10000)
        np.testing.assert_allclose(soft[i].numpy(), pot_soft, atol=1e-9)
    # related neurons (a permuted, noisy copy: each row's cheapest column is its match) beside unrelated ones (rows
    # compete for columns): the first are read off the row minima, the others solved; both are POT's optimum
    perm = torch.randperm(24, generator=g)
    close = anchor[perm] + 0.05 * torch.randn(24, 10, generator=g, dtype=torch.float64)
    mixed = torch.cat([neuron_cost(close[None], anchor), cost[:1]])
    assert len(set(mixed[0].argmin(-1).tolist())) == 24 and len(set(mixed[1].argmin(-1).tolist())) < 24
    for plan, c in zip(transport_plans(mixed, FusionConfig("hard")), mixed.numpy()):
        np.testing.assert_allclose(plan.numpy(), ot.emd(u, u, c), atol=1e-12)
    scaled = transport_plans(cost, FusionConfig("soft", reg=0.08, cost_scale="max", tol=1e-12, max_iter=10000))
    c0 = cost[0].numpy()
    np.testing.assert_allclose(scaled[0].numpy(), ot.sinkhorn(u, u, c0 / c0.max(), 0.08, method="sinkhorn_log",
                                                              stopThr=1e-12, numItermax=10000), atol=1e-9)


def test_whole_fusion_with_pot_plans_agrees():
    a = _random_tower("rclip-tiny", 0)
    models_ = [a] + [_noisy(permute_visual(a, heads=4, seed=s)[0], 0.2, seed=s) for s in (1, 2)]
    for cfg in (FusionConfig("hard"), FusionConfig("soft", reg=0.05, tol=1e-9)):
        ours = fuse_visual(models_, cfg=cfg, heads=4, dtype=torch.float64)
        ref = fuse_visual(models_, cfg=cfg, heads=4, solver="pot", dtype=torch.float64)
        for k in ours.state:
            torch.testing.assert_close(ours.state[k], ref.state[k], atol=1e-6, rtol=0, msg=k)


def test_fusion_reports_its_sinkhorn_convergence():
    """Soft fusion counts every Sinkhorn problem it solved; starved of iterations at a small τ it reports the
    problems that did not converge (their plans are not transport plans); hard fusion solves none."""
    import warnings

    a = _random_tower("rclip-tiny", 0)
    models_ = [a, _noisy(permute_visual(a, heads=4, seed=1)[0], 0.2, seed=1)]
    assert fuse_visual(models_, cfg=FusionConfig("hard"), heads=4).ot == {"problems": 0, "not_converged": 0,
                                                                          "worst_error": 0.0}
    good = fuse_visual(models_, cfg=FusionConfig("soft", reg=0.05, tol=1e-6), heads=4, dtype=torch.float64).ot
    assert good["problems"] > 0 and good["not_converged"] == 0 and good["worst_error"] <= 1e-5
    unrelated = [a, _random_tower("rclip-tiny", 1)]  # no near-permutation to find: Sinkhorn needs iterations
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        starved = fuse_visual(unrelated, cfg=FusionConfig("soft", reg=1e-3, max_iter=2), heads=4).ot
    assert starved["problems"] > 0 and starved["not_converged"] > 0 and starved["worst_error"] > 1e-3


def test_weights_reach_every_parameter_and_anchor_choice():
    a, b, c = (_random_tower("rclip-tiny", s) for s in (0, 1, 2))
    res = fuse_visual([a, b, c], [0.2, 0.3, 0.5], cfg=FusionConfig("none"), heads=4)
    for k in a:
        torch.testing.assert_close(res.state[k], 0.2 * a[k] + 0.3 * b[k] + 0.5 * c[k], msg=k)
    # three models that are permutations of one another fuse back to the anchor for any weights and any anchor
    p1, _ = permute_visual(a, heads=4, seed=1)
    p2, _ = permute_visual(a, heads=4, seed=2)
    for anchor, target in ((0, a), (2, p2)):
        res = fuse_visual([a, p1, p2], [0.6, 0.1, 0.3], anchor=anchor, cfg=FusionConfig("hard"), heads=4)
        for k in a:
            torch.testing.assert_close(res.state[k], target[k], atol=1e-6, rtol=0, msg=k)
        assert res.anchor == anchor and torch.allclose(res.maps["block1.qk"][anchor], torch.eye(64))
    # every recorded layer: K maps and plans, the anchor's the identity (plans: mass 1/n) at its index
    soft = fuse_visual([a, p1, p2], anchor=1, cfg=FusionConfig("soft"), heads=4)
    assert list(soft.maps) == list(soft.plans) and len(soft.maps) > 10
    for name in soft.maps:
        r, plan = soft.maps[name], soft.plans[name]
        n = r.shape[-1]
        assert r.shape == (3, n, n) and torch.equal(r[1], torch.eye(n)), name
        assert plan.shape == r.shape and torch.equal(plan[1], torch.eye(n) / n), name
        assert torch.allclose(r.sum(-2), torch.ones(3, n), atol=1e-5), name          # R's columns sum to 1
    first, second = list(soft.maps)[:2]                   # built when read: a repeated read, another layer, back
    a1 = soft.maps[first]
    assert soft.maps[first] is a1 and torch.equal(soft.maps[second][1], torch.eye(soft.maps[second].shape[-1]))
    assert torch.equal(soft.maps[first], a1) and first in soft.maps and "no such layer" not in soft.maps


def test_bad_inputs_are_refused(world_clip, tiny):
    with pytest.raises(RClipError, match="different architectures"):
        fuse_visual([world_clip, tiny])
    with pytest.raises(RClipError, match="one weight per model"):
        fuse_visual([tiny, tiny], [1.0])
    with pytest.raises(RClipError, match="non-negative"):
        fuse_visual([tiny, tiny], [1.0, -0.5])
    with pytest.raises(RClipError, match="anchor"):
        fuse_visual([tiny, tiny], anchor=2)
    with pytest.raises(RClipError, match="unknown alignment"):
        FusionConfig("optimal")
    with pytest.raises(RClipError, match="unsupported parameters"):
        fuse_visual([{**visual_state(tiny), "attn_pool.weight": torch.zeros(1)}])
    other = tiny.copy()
    with torch.no_grad():
        other.model.text_projection.add_(1.0)
    with pytest.raises(RClipError, match="different text tower"):
        fuse_clips([tiny, other])


def test_permuted_copy_check_returns_the_original_and_breaks_averaging(tiny):
    task = world.zeroshot_task("colour", n=12, resolution=32, seed=2)
    rows = permuted_copy_check(tiny, task, {"average": FusionConfig("none"), "hard": FusionConfig("hard")}, seed=1)
    assert list(rows) == ["original", "permuted copy", "average", "hard"]
    assert rows["original"] == {"weight_error": 0.0, "top1": zeroshot.evaluate(tiny, task)["templates"]}
    assert rows["permuted copy"]["weight_error"] is None
    assert rows["permuted copy"]["top1"] == rows["original"]["top1"]           # the same function
    assert rows["hard"]["weight_error"] < 1e-6 and rows["hard"]["top1"] == rows["original"]["top1"]
    assert rows["average"]["weight_error"] > 0.1
    state = visual_state(tiny)
    assert relative_weight_error(state, state) == 0.0
    doubled = {k: 2 * v for k, v in state.items()}
    assert relative_weight_error(doubled, state) == pytest.approx(1.0)        # ‖2w − w‖ / ‖w‖ per tensor


def test_fusion_benchmark_runs_and_checks_itself(tmp_path):
    """benchmarks/bench_fusion.py end to end on the tiny model (its timer wraps the plan solver: a changed solver
    signature once broke it): hard fusion recovers the permutation, and ours and POT's plans fuse the same model."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "fusion.json"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_fusion.py"), "--model", "rclip-tiny",
                          "--device", "cpu", "--threads", "1", "--repeat", "1", "--json", str(out)],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    jobs = json.loads(out.read_text())["jobs"]
    assert set(jobs) == {"pair-hard", "pair-soft", "hierarchy"}
    assert jobs["pair-hard"]["permutations_recovered"] and all(j["agree"] for j in jobs.values())
    assert all(j["ours_s"] > 0 and j["pot_s"] > 0 and j["plan_problems"] > 0 and j["runs"] == 1 for j in jobs.values())
    assert jobs["pair-hard"]["sinkhorn_max_iter"] == 0 and jobs["pair-soft"]["sinkhorn_max_iter"] >= 1
    for j in jobs.values():     # the ceiling with free plans: POT's time over ours without our plan time
        assert j["ratio_if_plans_free"] == pytest.approx(j["pot_s"] / (j["ours_s"] - j["ours_plan_s"]))
        assert j["ratio_if_plans_free"] >= j["ratio"]


def test_head_pair_costs_are_each_pairs_own_cost():
    """The (K, H, H, dh, dh) head-pair costs cut from one d x d product equal each pair's cost computed on its own."""
    from rclip.methods.fusion import _head_pair_costs

    g = torch.Generator().manual_seed(3)
    x, xa = torch.randn(2, 48, 29, generator=g), torch.randn(48, 29, generator=g)
    out = _head_pair_costs(x, xa, heads=4)
    assert out.shape == (2, 4, 4, 12, 12) and out.is_contiguous()
    for k in range(2):
        for h in range(4):
            for a in range(4):
                ref = neuron_cost(x[k:k + 1, 12 * h:12 * (h + 1)], xa[12 * a:12 * (a + 1)])[0]
                torch.testing.assert_close(out[k, h, a], ref, rtol=0, atol=1e-6)


def test_maps_one_hot_to_float32_rounding_are_applied_by_gathering():
    """A map acts as a permutation (gathered, not multiplied) when every column's largest entry is within
    ONE_HOT_ULPS units of float32 rounding of 1 and the rest of its mass within as many; then gathering differs from
    the product by at most 2 * ONE_HOT_ULPS * eps * max|x|. Softer maps, maps with an empty column and maps whose
    columns share a row are multiplied."""
    from rclip.methods.fusion import ONE_HOT_ULPS, _one_hot_columns, cols, rows

    eps, n = torch.finfo(torch.float32).eps, 96
    g = torch.Generator().manual_seed(4)
    src = torch.stack([torch.randperm(n, generator=g) for _ in range(2)])          # column j's row, per model
    hard = torch.zeros(2, n, n).scatter_(1, src[:, None, :], 1.0)

    def soft(off):                  # column mass 1: 1 - off on the row, off spread over the other rows
        return hard * (1 - off) + (1 - hard) * off / (n - 1)

    x = torch.randn(2, n, 7, generator=g)
    bound = 2 * ONE_HOT_ULPS * eps * x.abs().max() + 4 * eps * x.abs().max()          # the bound + product rounding
    for r, expect in ((hard, True), (soft(2 * eps), True), (soft(3 * ONE_HOT_ULPS * eps), False)):
        r = r.clone()
        found = _one_hot_columns(r)
        assert (found is not None) == expect
        if expect:
            assert torch.equal(found, src) and _one_hot_columns(r) is found            # the answer is kept
            assert (rows(r, x) - r.mT @ x).abs().max() <= bound
            assert (cols(x.mT, r) - x.mT @ r).abs().max() <= bound
    empty = hard.clone()
    empty[:, :, 0] = 0                                                                 # a column with no mass
    shared = hard.clone()
    shared[:, :, 1] = shared[:, :, 0]                                                  # two columns on one row
    for r in (empty, shared):
        assert _one_hot_columns(r) is None
        torch.testing.assert_close(rows(r, x), r.mT @ x, rtol=0, atol=0)


def test_soft_fusion_maps_are_gathered_within_their_solves_tolerance():
    """A soft fusion map carries the mass its columns may hold off their largest entries and still be gathered:
    tol / 2 (moving it changes the plan by at most tol in L1, the row-marginal error Sinkhorn stops at); then
    gathering differs from the product by at most tol * max|x|. Hard maps and unmarked maps keep ONE_HOT_ULPS."""
    from rclip.methods.fusion import ONE_HOT_ULPS, _Aligner, _one_hot_columns, cols, rows

    eps, n = torch.finfo(torch.float32).eps, 96
    g = torch.Generator().manual_seed(5)
    src = torch.stack([torch.randperm(n, generator=g) for _ in range(2)])
    hard = torch.zeros(2, n, n).scatter_(1, src[:, None, :], 1.0)
    x = torch.randn(2, n, 7, generator=g)
    soft_cfg = FusionConfig("soft", tol=1e-5)
    for off, expect in ((3 * ONE_HOT_ULPS * eps, True), (4e-6, True), (2e-5, False)):
        r = hard * (1 - off) + (1 - hard) * off / (n - 1)
        assert _one_hot_columns(r.clone()) is None                               # unmarked: beyond ONE_HOT_ULPS
        assert _one_hot_columns(_Aligner(FusionConfig("hard"), "rclip", 4).solved(r.clone())) is None
        marked = _Aligner(soft_cfg, "rclip", 4).solved(r.clone())
        assert (_one_hot_columns(marked) is not None) == expect, off
        if expect:
            bound = soft_cfg.tol * x.abs().max() + 4 * eps * x.abs().max()        # the bound + product rounding
            assert torch.equal(_one_hot_columns(marked), src)
            assert (rows(marked, x) - marked.mT @ x).abs().max() <= bound
            assert (cols(x.mT, marked) - x.mT @ marked).abs().max() <= bound


def test_soft_fusion_gathering_changes_the_fused_model_within_the_solves_tolerance(world_clip, monkeypatch):
    """Soft fusion of related towers (a permuted copy with 5 % noise, τ = 0.08): some maps are gathered only thanks
    to their solve's tolerance, and the fused model differs from the one with every such map multiplied by far less
    than the tolerance."""
    import rclip.methods.fusion as fusion

    original = visual_state(world_clip)
    noisy = _noisy(permute_visual(original, _heads(world_clip), seed=6)[0], 0.05, seed=0)
    cfg = FusionConfig("soft", reg=0.08)
    res = fuse_visual([original, noisy], cfg=cfg, heads=_heads(world_clip))
    solved = res.maps._solved
    thanks_to_tol = [name for name, r in solved.items() if r is not None and fusion._one_hot_columns(r) is not None
                     and fusion._one_hot_columns(r.clone()) is None]
    assert thanks_to_tol, "no map between these towers needed the solve's tolerance: the test tests nothing"
    monkeypatch.setattr(fusion._Aligner, "solved", lambda self, r: r)              # every soft map multiplied
    ref = fuse_visual([original, noisy], cfg=cfg, heads=_heads(world_clip))
    assert all(fusion._one_hot_columns(ref.maps._solved[name]) is None for name in thanks_to_tol)
    gap = max(((res.state[k] - ref.state[k]).norm() / ref.state[k].norm()).item() for k in original)
    assert 0 < gap < cfg.tol, gap


def test_assignments_run_in_threads_give_the_sequential_assignments():
    from scipy.optimize import linear_sum_assignment

    from rclip.methods.fusion import _assignment_plans, _in_threads

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parts = _in_threads(lambda p: [len(p)], np.arange(300))
        assert [int(p[0]) for p in parts] == [150, 150]                                 # one part per thread
        cost = torch.rand(300, 12, 12, generator=torch.Generator().manual_seed(5))
        plans = _assignment_plans(cost)
    finally:
        torch.set_num_threads(threads)
    for c, p in zip(cost, plans):
        assert torch.equal(p.argmax(-1), torch.as_tensor(linear_sum_assignment(c.double().numpy())[1]))
        assert torch.equal(p.sum(-1), torch.full((12,), 1 / 12))
