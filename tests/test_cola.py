"""COLA and TTC against brute force: POT per problem, hand-written loops, and the plain zero-shot classifier."""
import numpy as np
import ot as pot
import pytest
import torch
import torch.nn.functional as F

from rclip import world, zeroshot
from rclip.errors import RClipError
from rclip.methods.cola import (COLA, COLAConfig, cola_classifier, cosine_distortion, entropy_weights, ot_margin,
                                random_views, text_projection)
from rclip.methods.ttc import TTC, TTCConfig


@pytest.fixture(scope="module")
def task():
    return world.zeroshot_task("colour", n=8, resolution=32)


def test_projection_keeps_the_text_span_and_removes_the_rest():
    g = torch.Generator().manual_seed(0)
    texts = F.normalize(torch.randn(6, 4, 16, generator=g), dim=-1)   # K=6, M=4, D=16
    basis = text_projection(texts, 5)
    assert basis.shape == (16, 5)
    assert torch.allclose(basis.T @ basis, torch.eye(5), atol=1e-5)
    full = text_projection(texts, None)                                # rank min(D, KM) = 16: the identity
    x = torch.randn(3, 16, generator=g)
    assert torch.allclose(x @ full @ full.T, x, atol=1e-4)
    # a direction orthogonal to every text feature is removed entirely
    low = F.normalize(torch.randn(10, 2, generator=g), dim=-1) @ torch.randn(2, 16, generator=g)
    b = text_projection(low.reshape(5, 2, 16), 2)
    q, _ = torch.linalg.qr(torch.cat([b, torch.randn(16, 1, generator=g)], 1))
    ortho = q[:, 2]
    assert (ortho @ b @ b.T).abs().max() < 1e-5
    with pytest.raises(RClipError, match="n_components"):
        text_projection(texts, 17)


def test_entropy_weights_favour_confident_points():
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    w = entropy_weights(logits, 0.5)
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    assert w[0] > w[2] > w[1]
    assert torch.allclose(entropy_weights(logits, None), torch.full((3,), 1 / 3))


def test_views_start_with_the_image_and_are_seeded(task):
    x, _ = task.tensors()
    v = random_views(x, 4, generator=torch.Generator().manual_seed(1))
    assert v.shape == (len(x), 4, *x.shape[1:])
    assert torch.equal(v[:, 0], x) and not torch.equal(v[:, 1], x)
    assert torch.equal(v, random_views(x, 4, generator=torch.Generator().manual_seed(1)))
    same = random_views(x, 3, crop_scale=(1.0, 1.0), flip=False, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(same, x[:, None].expand_as(same), atol=1e-6)


def _brute_force(cola, images, use_ot):
    """Per image and class, from the view features: a by entropy, b from the buffers, cost by loops, POT's Sinkhorn."""
    with torch.no_grad():
        f = cola.view_features(images).double()
    out = np.zeros((len(images), cola.num_classes))
    for i in range(len(images)):
        logits = cola.scale * f[i] @ cola.prototypes.double().T
        p = logits.softmax(-1)
        h = -(p * p.log()).sum(-1)
        a = (-h / cola.config.entropy_temp).softmax(0).numpy()
        for k in range(cola.num_classes):
            b = cola.text_weights[k].double().numpy()
            cost = np.array([[1 - float(f[i, n] @ cola.texts[k, m].double()) for m in range(cola.texts.shape[1])]
                             for n in range(f.shape[1])])
            if use_ot:
                # plain (non-log) Sinkhorn: float64 is safe at reg 0.1 on costs in [0, 2], and it is fast
                out[i, k] = pot.sinkhorn2(a, b, cost, cola.config.reg, method="sinkhorn", numItermax=5000,
                                          stopThr=1e-10)
            else:
                out[i, k] = a @ cost @ b
    return torch.from_numpy(out)


@pytest.mark.parametrize("use_ot", [True, False])
def test_cola_distances_equal_brute_force(tiny, task, use_ot):
    x = task.tensors()[0][:4]
    cfg = COLAConfig(n_views=3, n_texts=5, n_components=20, use_ot=use_ot, max_iter=2000, tol=1e-7)
    cola = cola_classifier(tiny, task, cfg)
    assert cola.texts.shape[:2] == (8, 5)
    with torch.no_grad():
        ours = cola.distances(x).double()
    assert torch.allclose(ours, _brute_force(cola, x, use_ot), rtol=1e-4, atol=1e-5)


def test_single_view_single_text_cola_is_the_zero_shot_classifier(tiny, task):
    x, y = task.tensors()
    prompts = zeroshot.class_embeddings(tiny, zeroshot.class_prompts(task, "templates"))
    cfg = COLAConfig(n_views=1, project=False, entropy_temp=None)
    cola = COLA(tiny, prompts[:, None], cfg)
    clf = zeroshot.ZeroShotClassifier(tiny, prompts)
    with torch.no_grad():
        assert torch.equal(cola(x).argmax(1), clf(x).argmax(1))
        assert torch.allclose(cola(x), clf(x) - cola.scale, atol=1e-3)  # -scale * (1 - cos)


def test_cola_is_differentiable_and_validates(tiny, task):
    x, y = task.tensors()
    cola = cola_classifier(tiny, task, COLAConfig(n_views=2, n_texts=3))
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(cola(xr), y).backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    with pytest.raises(RClipError, match="empty"):
        COLA(tiny, [], COLAConfig())
    bad = torch.full((2, 3, tiny.meta["embed_dim"]), float("nan"))
    with pytest.raises(RClipError, match="NaN"):
        COLA(tiny, bad, COLAConfig())
    with pytest.raises(RClipError, match="n_texts"):
        COLA(tiny, torch.randn(2, 3, tiny.meta["embed_dim"]), COLAConfig(n_texts=4))


def test_cola_reports_its_sinkhorn_convergence(tiny, task):
    """Every OT problem COLA solves (B images x K classes per forward pass) is counted; starved of iterations at a
    small reg its plans are not transport plans, and the tally says so instead of passing the costs as right."""
    import warnings

    x = task.tensors()[0][:4]
    k = task.num_classes
    good = cola_classifier(tiny, task, COLAConfig(n_views=3, n_texts=5, max_iter=2000))
    with torch.no_grad():
        good(x), good(x[:2])
    assert good.ot.summary()["problems"] == 6 * k and good.ot.summary()["not_converged"] == 0
    starved = cola_classifier(tiny, task, COLAConfig(n_views=3, n_texts=5, reg=1e-3, max_iter=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with torch.no_grad():
            starved(x)
    s = starved.ot.summary()
    assert s["problems"] == 4 * k and s["not_converged"] > 0 and s["worst_error"] > 1e-3


def test_distortion_and_margin_helpers():
    g = torch.Generator().manual_seed(0)
    clean, texts = torch.randn(4, 8, generator=g), torch.randn(5, 8, generator=g)
    assert cosine_distortion(clean, clean, texts) == 0
    adv = clean + 0.3 * torch.randn(4, 8, generator=g)
    full = torch.eye(8)
    assert torch.isclose(cosine_distortion(clean, adv, texts, full), cosine_distortion(clean, adv, texts))
    d = torch.tensor([[0.1, 0.5, 0.3], [0.4, 0.2, 0.6]])
    assert torch.allclose(ot_margin(d, torch.tensor([0, 0])), torch.tensor([0.2, -0.2]))


def test_ttc_counterattacks_only_suspicious_inputs(tiny, task):
    x, _ = task.tensors()
    clf = zeroshot.zeroshot_classifier(tiny, task)
    never = TTC(clf, TTCConfig(tau_threshold=0.0))       # nothing judged adversarial: x + delta0 only
    out, tau = never.counterattack(x)
    g = torch.Generator().manual_seed(0)
    delta0 = (torch.rand(x.shape, generator=g) * 2 - 1) * (4 / 255)
    assert torch.allclose(out, (x + delta0).clamp(0, 1), atol=1e-6)
    assert (tau > 0).all()
    always = TTC(clf, TTCConfig(tau_threshold=float("inf")))
    countered, _ = always.counterattack(x)
    assert (countered - x).abs().max() <= 4 / 255 + 1e-6
    assert not torch.allclose(countered, out)
    # the counterattack moves the embedding further from the original than the random start does
    with torch.no_grad():
        f0 = always._embed(x)
        assert (always._embed(countered) - f0).norm(dim=-1).mean() > (always._embed(out) - f0).norm(dim=-1).mean()
    with torch.no_grad():
        assert always(x).shape == (len(x), clf.num_classes)


def test_tau_statistic_is_the_tau_ttc_computes_batch_by_batch(tiny, task):
    from rclip.methods.ttc import tau_statistic

    x, _ = task.tensors()
    clf = zeroshot.zeroshot_classifier(tiny, task)
    cfg = TTCConfig(eps=2 / 255, steps=1, alpha=1 / 255, seed=3)
    for batch in (3, 8):
        expected = torch.cat([TTC(clf, cfg).counterattack(xb)[1] for xb in x.split(batch)])
        assert torch.equal(tau_statistic(clf, x, cfg, batch_size=batch), expected)


def test_ttc_tuning_scores_every_setting_and_applies_its_rule(tiny, task):
    """The sweep's numbers are TTC's top-1 computed directly, and the choice is the stated rule, checked by brute
    force over the table: best under the attack, ties (within the tolerance) broken by clean top-1."""
    from rclip import robustness
    from rclip.methods.ttc import tune

    x, y = task.tensors()
    clf = zeroshot.zeroshot_classifier(tiny, task)
    sets = robustness.transfer_sets(clf, x, y, {"1/255": 1 / 255}, steps=2, attacks=("pgd",))
    validation = {"colour": (clf, sets)}
    grid = [{"eps": 4, "steps": 2, "alpha": 1}, {"eps": 1, "steps": 1, "alpha": 1}]
    sweep = tune(validation, grid, condition="PGD 1/255", tau_quantiles=(None, 0.5), tolerance=0.5)
    assert len(sweep.table) == 4
    for label, row in sweep.table.iterrows():
        cfg = TTCConfig(eps=row["ε (/255)"] / 255, steps=int(row["steps"]), alpha=row["step (/255)"] / 255,
                        tau_threshold=row["τ threshold"])
        for cond in ("clean", "PGD 1/255"):
            direct = 100 * zeroshot.correct(TTC(clf, cfg), *sets[cond]).float().mean().item()
            assert row[cond] == pytest.approx(direct)
    best = sweep.table["PGD 1/255"].max()
    near = sweep.table[sweep.table["PGD 1/255"] >= best - 0.5]
    assert sweep.chosen_label in near.index
    assert sweep.table.loc[sweep.chosen_label, "clean"] == near["clean"].max()
    q_rows = sweep.table[[("q0.5" in k) for k in sweep.table.index]]
    assert (q_rows["counterattacked (%)"] == 50).all()           # the median threshold splits the 8 images
    assert set(sweep.tau["colour"]) == {"clean", "PGD 1/255"}
    with pytest.raises(RClipError, match="'PGD 4/255'"):
        tune(validation, grid, condition="PGD 4/255")
    with pytest.raises(RClipError, match="eps, steps and alpha"):
        tune(validation, [{"eps": 4, "steps": 2}], condition="PGD 1/255")


def test_outside_share_is_the_least_squares_residual():
    from rclip.methods.cola import outside_share

    g = torch.Generator().manual_seed(1)
    texts = F.normalize(torch.randn(5, 3, 12, generator=g), dim=-1)
    v = torch.randn(7, 12, generator=g, dtype=torch.float64)
    for c in (1, 4, 9):
        basis = text_projection(texts, c).double()
        coef = np.linalg.lstsq(basis.numpy(), v.numpy().T, rcond=None)[0]
        resid = v.numpy().T - basis.numpy() @ coef
        expected = (resid ** 2).sum(0) / (v.numpy() ** 2).sum(1)
        assert np.allclose(outside_share(v, basis).numpy(), expected)
    assert torch.allclose(outside_share(v, text_projection(texts, None).double()), torch.zeros(7, dtype=torch.float64),
                          atol=1e-12)


def test_projection_shares_per_task_and_component(tiny, task):
    from rclip.methods.cola import projection_shares

    x, _ = task.tensors()
    x_adv = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    cfg = COLAConfig(n_views=2, n_texts=3, n_components=4)
    shares = projection_shares(tiny, {"colour": task}, {"colour": x}, {"colour": x_adv}, [2, 4, 10**6], cfg)
    rank = int(shares["text rank"].iloc[0])
    assert list(shares.index) == [("colour", 2), ("colour", 4)]          # components above the text rank skipped
    assert rank == min(tiny.encode_images(x[:1]).shape[-1], task.num_classes * 3)
    clean = shares["clean feature outside (%)"]
    assert clean.loc[("colour", 2)] >= clean.loc[("colour", 4)] >= 0    # a larger span removes less
