"""OTCCLIP against independent references: the model's own encoders, POT per pair, brute-force top-k, a
constructed re-matching case, finite differences, and the world's ground truth."""
from types import SimpleNamespace

import numpy as np
import ot as pot
import pytest
import torch
import torch.nn.functional as F

from rclip import models, world
from rclip.methods import otcclip as otc
from rclip.attacks.poison import TargetedPoisonConfig, targeted_poison
from rclip.errors import RClipError
from rclip.methods.otcclip import (AlignmentConfig, OTConfig, RematchConfig, TokenFeatures, alignment_losses,
                                   candidate_distances, encode_image_tokens, encode_text_tokens, image_tokens,
                                   inter_modality_loss, intra_modality_loss, ot_contrastive_loss, ot_distance,
                                   rematch_captions, rematch_corpus, rematch_report, text_tokens, token_set,
                                   topk_similar)

CAPTIONS = ["a red circle", "", "a large blue square on a striped background", "two small stars"]


def _random_sets(g, batch, length, dim, min_len=1, dtype=torch.float64):
    """Token sets (batch, length, dim) with random real lengths in [min_len, length]."""
    lengths = torch.randint(min_len, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    return token_set(torch.randn(batch, length, dim, generator=g, dtype=dtype), mask)


def test_image_tokens_are_the_models_own_embedding_space(tiny):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = F.normalize(tiny.model.encode_image(tiny.normalize(x)), dim=-1)
        with_cls = image_tokens(tiny, x, include_cls=True)
        patches = image_tokens(tiny, x)
    grid = tiny.model.visual.grid_size
    assert with_cls.tokens.shape == (3, 1 + grid[0] * grid[1], 32) and with_cls.mask.all()
    assert torch.allclose(with_cls.tokens[:, 0], reference, atol=1e-5)   # CLS through ln_post @ proj
    assert torch.allclose(with_cls.pooled, reference, atol=1e-5)
    assert torch.equal(patches.tokens, with_cls.tokens[:, 1:])
    assert torch.allclose(patches.tokens.norm(dim=-1), torch.ones(3, grid[0] * grid[1]), atol=1e-5)


def test_text_tokens_mask_words_and_keep_eot_as_the_global_embedding(tiny):
    ids = tiny.tokenizer(CAPTIONS)
    with torch.no_grad():
        reference = F.normalize(tiny.model.encode_text(ids), dim=-1)
        with_eot = text_tokens(tiny, CAPTIONS, include_eot=True)
        words = text_tokens(tiny, ids)
    eot = ids.argmax(-1)
    rows = torch.arange(len(CAPTIONS))
    assert with_eot.tokens.shape[1] == int(eot.max()) + 1
    assert torch.allclose(with_eot.tokens[rows, eot], reference, atol=1e-5)
    assert torch.allclose(words.pooled, reference, atol=1e-5)
    n_words = (ids != 0).sum(-1) - 2                                     # minus SOT and EOT
    assert words.mask.sum(-1).tolist() == [max(1, int(n)) for n in n_words]
    assert not words.mask[:, 0].any() and not words.mask[rows, eot][n_words > 0].any()
    assert words.mask[1, eot[1]]                                         # the empty caption falls back to its EOT
    assert (words.tokens[~words.mask] == 0).all()
    assert torch.equal(with_eot.mask, words.mask | (torch.arange(with_eot.mask.shape[1]) == eot[:, None]))


def test_pool_encoders_batch_pad_and_restore_train_mode(tiny):
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tiny.model.train()
    try:
        imgs = encode_image_tokens(tiny, x, batch_size=2)
        txts = encode_text_tokens(tiny, CAPTIONS, batch_size=3)
        assert tiny.model.training
    finally:
        tiny.model.eval()
    with torch.no_grad():
        ref = text_tokens(tiny, CAPTIONS)
        assert torch.allclose(imgs.tokens, image_tokens(tiny, x).tokens, atol=1e-5)
    assert torch.equal(txts.mask, ref.mask) and torch.allclose(txts.tokens, ref.tokens, atol=1e-5)
    with pytest.raises(RClipError, match="empty"):
        encode_text_tokens(tiny, [])
    with pytest.raises(RClipError, match="ViT"):
        image_tokens(SimpleNamespace(model=torch.nn.Linear(2, 2)), x)


def test_ot_distance_matches_pot_per_pair_with_padding():
    g = torch.Generator().manual_seed(0)
    x, y = _random_sets(g, 6, 9, 8), _random_sets(g, 6, 5, 8)
    cfg = OTConfig(reg=0.1, max_iter=5000, tol=1e-12)
    d = ot_distance(x, y, cfg)
    for i in range(6):
        a_idx, b_idx = x.mask[i].nonzero().flatten(), y.mask[i].nonzero().flatten()
        xi, yi = x.tokens[i, a_idx].numpy(), y.tokens[i, b_idx].numpy()
        cost = 1 - xi @ yi.T
        a, b = np.full(len(xi), 1 / len(xi)), np.full(len(yi), 1 / len(yi))
        expected = pot.sinkhorn2(a, b, cost, 0.1, numItermax=20000, stopThr=1e-13)
        assert abs(float(d[i]) - float(expected)) < 1e-8
    mixed = ot_distance(x, y, OTConfig(reg=0.1, max_iter=5000, tol=1e-12, global_weight=0.25))
    glob = 1 - (x.pooled * y.pooled).sum(-1)
    assert torch.allclose(mixed, 0.75 * d + 0.25 * glob, atol=1e-12)
    # batched over (image, candidate) pairs = pair by pair
    pool = _random_sets(g, 10, 7, 8)
    cand = torch.randint(0, 10, (6, 3), generator=g)
    batched = candidate_distances(x, pool, cand, cfg, batch_size=4)
    single = torch.stack([torch.stack([ot_distance(x[i], pool[int(j)], cfg) for j in cand[i]]) for i in range(6)])
    assert torch.allclose(batched, single, atol=1e-10)
    with pytest.raises(RClipError, match="global_weight"):
        ot_distance(x, y, OTConfig(global_weight=1.5))
    with pytest.raises(RClipError, match="feature dims"):
        ot_distance(x, _random_sets(g, 6, 5, 4))


def test_chunked_topk_equals_brute_force_and_breaks_ties_by_index():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(37, 16, generator=g), dim=-1)
    keys = F.normalize(torch.randn(1000, 16, generator=g), dim=-1)
    values, indices = topk_similar(q, keys, 7, chunk_size=64, query_batch=10)
    ref_v, ref_i = (q @ keys.T).topk(7, dim=1)
    assert torch.equal(indices, ref_i) and torch.allclose(values, ref_v)
    _, i1 = topk_similar(q, keys, 1000, chunk_size=333)
    assert torch.equal(i1, (q @ keys.T).topk(1000, dim=1).indices)
    for n, k in ((3000, 16), (700, 40), (150, 3)):                  # many exact ties: duplicate, integer keys
        tied_keys = torch.randint(-2, 3, (n, 8), generator=g).float()
        tied_q = torch.randint(-2, 3, (23, 8), generator=g).float()
        ref_v, ref_i = (tied_q @ tied_keys.T).sort(dim=1, descending=True, stable=True)   # ties: lower index first
        for chunk_size, query_batch in ((64, 5), (100, 1024), (1000, 7), (5000, 1024)):
            values, indices = topk_similar(tied_q, tied_keys, k, chunk_size=chunk_size, query_batch=query_batch)
            assert torch.equal(values, ref_v[:, :k]) and torch.equal(indices, ref_i[:, :k])
    with pytest.raises(RClipError, match="k=1001"):
        topk_similar(q, keys, 1001)
    with pytest.raises(RClipError, match="empty"):
        topk_similar(q, keys[:0], 1)
    with pytest.raises(RClipError, match="same D"):
        topk_similar(q, keys[:, :8], 1)
    with pytest.raises(RClipError, match="NaN"):
        topk_similar(q, keys.index_fill(0, torch.tensor([3]), float("nan")), 2)
    with pytest.raises(RClipError, match="query_batch must be >= 1"):
        topk_similar(q, keys, 2, query_batch=0)
    with pytest.raises(RClipError, match="floating point"):
        topk_similar(q.round().long(), keys.round().long(), 2)
    v, _ = topk_similar(q.clone().requires_grad_(), keys, 3, chunk_size=64)     # a search: no graph, no error
    assert not v.requires_grad


def test_rematching_by_ot_picks_the_caption_that_global_similarity_misses():
    e = torch.eye(4, dtype=torch.float64)
    # image: two objects e0, e1; its global embedding leans towards e3
    image = token_set(e[None, :2], pooled=(e[3] + 0.2 * e[0])[None])
    # pool: [wrong caption, true caption, true tokens but unrelated global]
    tokens = torch.stack([torch.stack([e[3], e[3]]), e[:2], e[:2]])
    pooled = torch.stack([e[3], 0.6 * e[3] + 0.8 * e[1], e[2]])
    pool = token_set(tokens, pooled=pooled)
    describes = lambda i, j: j in (1, 2)                                  # noqa: E731
    glob = rematch_captions(image, pool, RematchConfig(k=2, method="global"))
    by_ot = rematch_captions(image, pool, RematchConfig(k=2, method="ot", ot=OTConfig(reg=0.01, max_iter=500)))
    assert glob.assigned.tolist() == [0] and by_ot.assigned.tolist() == [1]
    assert by_ot.candidates.tolist() == [[0, 1]] and by_ot.distance[0, 1] < 0.01 < 0.9 < by_ot.distance[0, 0]
    wide = rematch_captions(image, pool, RematchConfig(k=3, ot=OTConfig(reg=0.01, max_iter=500)))
    assert wide.assigned.tolist() == [1]                                  # tie with caption 2: the more similar wins
    assert rematch_report(by_ot.assigned, describes)["precision"] == 1.0
    assert rematch_report(glob.assigned, describes, original=torch.tensor([0]))["changed"] == 0.0
    with pytest.raises(RClipError, match="method"):
        rematch_captions(image, pool, RematchConfig(method="gmm"))
    with pytest.raises(RClipError, match="pool size"):
        rematch_captions(image, pool, RematchConfig(k=4))


def test_rematch_report_counts_broken_poison():
    describes = lambda i, j: i == j                                       # noqa: E731
    keeps = lambda i, j: j == 3                                           # caption 3 is the poison caption
    r = rematch_report(torch.tensor([0, 1, 3, 2]), describes, poisoned=torch.tensor([False, False, True, True]),
                       keeps_poison=keeps, original=torch.arange(4))
    assert r == {"n": 4, "precision": 0.5, "n_poisoned": 2, "clean_precision": 1.0, "poisoned_broken": 0.5,
                 "poisoned_corrected": 0.0, "changed": 0.5}
    with pytest.raises(RClipError, match="poisoned has"):
        rematch_report(torch.tensor([0]), describes, poisoned=torch.tensor([True, False]))


def test_world_rematching_breaks_targeted_poison():
    bundle = models.load("world")
    ds = targeted_poison(world.WorldPairs(60, resolution=64), TargetedPoisonConfig(n_targets=1, captions_per_target=8))
    idx = list(range(len(ds)))
    imgs = encode_image_tokens(bundle, ds.images(idx))
    caps = encode_text_tokens(bundle, [c.text for c in ds.captions()])
    before = rematch_report(torch.arange(len(ds)), ds.describes, poisoned=ds.poisoned, keeps_poison=ds.keeps_poison)
    assert before["precision"] == pytest.approx(60 / 68) and before["poisoned_broken"] == 0.0
    for method in ("global", "ot"):
        cfg = RematchConfig(k=5, method=method, ot=OTConfig(global_weight=0.5))
        r = rematch_report(rematch_captions(imgs, caps, cfg).assigned, ds.describes, poisoned=ds.poisoned,
                           keeps_poison=ds.keeps_poison)
        assert r["poisoned_broken"] >= 0.5 and r["precision"] > 0.5


def test_ot_losses_have_exact_gradients():
    g = torch.Generator().manual_seed(0)
    raw_x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    raw_y = torch.randn(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask_x = torch.tensor([[True, True, True, False], [True, True, True, True]])
    cfg = OTConfig(reg=0.5, max_iter=10000, tol=1e-14)

    def inter(a, b):
        return inter_modality_loss(token_set(a, mask_x), token_set(b), cfg)

    def intra(a):
        return intra_modality_loss(token_set(a, mask_x), token_set(a.flip(1), mask_x.flip(1)), cfg)

    assert torch.autograd.gradcheck(inter, (raw_x, raw_y), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(intra, (raw_x,), eps=1e-6, atol=1e-6)
    with pytest.raises(RClipError, match="same batch"):
        inter_modality_loss(token_set(raw_x), token_set(raw_y[:1]))


def test_alignment_losses_train_the_tiny_clip(tiny):
    torch.manual_seed(0)
    model = tiny.model
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    texts = ["a red circle", "a blue square", "two small stars", "a green ring on a dotted background"]
    cfg = AlignmentConfig(inter_weight=1.0, image_intra_weight=0.5, text_intra_weight=0.5)
    params = [model.visual.proj, model.text_projection]

    def total():
        return alignment_losses(image_tokens(tiny, x), text_tokens(tiny, texts), image_tokens(tiny, x.flip(-1)),
                                text_tokens(tiny, [t.replace("a ", "one ") for t in texts]), cfg)

    saved = [p.detach().clone() for p in params]
    try:
        losses = total()
        assert set(losses) == {"inter", "image_intra", "text_intra", "total"}
        weighted = losses["inter"] + 0.5 * losses["image_intra"] + 0.5 * losses["text_intra"]
        assert torch.isclose(losses["total"], weighted)
        grads = torch.autograd.grad(losses["total"], params)
        assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p -= 0.05 * gr / gr.norm()
            assert total()["total"] < losses["total"]
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    none = alignment_losses(image_tokens(tiny, x), text_tokens(tiny, texts), config=AlignmentConfig(inter_weight=0))
    assert float(none["total"]) == 0.0


def test_token_sets_reject_bad_input():
    with pytest.raises(RClipError, match="NaN"):
        token_set(torch.tensor([[[float("nan"), 1.0]]]))
    with pytest.raises(RClipError, match="no real token"):
        token_set(torch.ones(2, 3, 4), torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(RClipError, match="mask"):
        token_set(torch.ones(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(RClipError, match="shape"):
        token_set(torch.ones(4))
    parts = TokenFeatures.cat([token_set(torch.ones(1, 2, 3)), token_set(torch.ones(2, 5, 3))])
    assert parts.tokens.shape == (3, 5, 3) and parts.mask.sum().item() == 12


def test_ot_contrastive_loss_is_cross_entropy_on_pairwise_ot_distances():
    g = torch.Generator().manual_seed(3)
    x, y = _random_sets(g, 5, 4, 6), _random_sets(g, 5, 3, 6)
    cfg = OTConfig(reg=0.2, max_iter=3000, tol=1e-12)
    loss = ot_contrastive_loss(x, y, cfg, negatives=2, temperature=0.3)
    d = torch.stack([torch.stack([ot_distance(x[i], y[j], cfg) for j in range(5)]) for i in range(5)])
    rows_x = torch.stack([d[i, [(i + s) % 5 for s in range(3)]] for i in range(5)])
    rows_y = torch.stack([d[[(j - s) % 5 for s in range(3)], j] for j in range(5)])
    zero = torch.zeros(5, dtype=torch.long)
    expected = 0.5 * (F.cross_entropy(-rows_x / 0.3, zero) + F.cross_entropy(-rows_y / 0.3, zero))
    assert torch.allclose(loss, expected, atol=1e-10)
    assert torch.allclose(ot_contrastive_loss(x, y, cfg, negatives=99), ot_contrastive_loss(x, y, cfg, negatives=4))
    dist = alignment_losses(x, y, config=AlignmentConfig(objective="distance", ot=cfg, image_intra_weight=0,
                                                         text_intra_weight=0))
    assert torch.allclose(dist["inter"], ot_distance(x, y, cfg).mean())
    with pytest.raises(RClipError, match="objective"):
        alignment_losses(x, y, config=AlignmentConfig(objective="kl"))
    with pytest.raises(RClipError, match="temperature"):
        ot_contrastive_loss(x, y, cfg, temperature=0)


def test_corpus_rematching_in_chunks_equals_rematching_in_memory(tiny):
    from rclip.data.pairs import FocusedWorldPairs, PairCorpus

    corpus = PairCorpus.render(FocusedWorldPairs(23, seed=1))
    imgs = encode_image_tokens(tiny, corpus.images())
    caps = encode_text_tokens(tiny, corpus.texts)
    for method in ("ot", "global"):
        cfg = RematchConfig(k=5, method=method, chunk_size=4, batch_size=3)
        ref = rematch_captions(imgs, caps, cfg)
        got = rematch_corpus(tiny, corpus, cfg, image_chunk=7, text_batch=6)
        assert torch.equal(got.candidates, ref.candidates) and torch.equal(got.assigned, ref.assigned)
        assert torch.allclose(got.similarity, ref.similarity, atol=1e-5)
        if method == "ot":
            assert torch.allclose(got.distance, ref.distance, atol=1e-5)
    describes = lambda i, j: (i + j) % 3 == 0                            # noqa: E731
    hit = rematch_report(got.assigned, describes, candidates=got.candidates)["pool_hit"]
    assert hit == sum(any((i + int(j)) % 3 == 0 for j in row) for i, row in enumerate(got.candidates)) / 23


def test_otcclip_trainer_rematches_on_schedule(tiny, monkeypatch):
    from rclip.data.pairs import FocusedWorldPairs, PairCorpus
    from rclip.methods import otcclip as otc
    from rclip.methods.poison_defenses import PretrainConfig

    corpus = PairCorpus.render(FocusedWorldPairs(32, seed=2))
    shuffled = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    fake = otc.Rematch(shuffled, torch.stack([shuffled, torch.arange(32)], 1), torch.zeros(32, 2), None, "ot")
    monkeypatch.setattr(otc, "rematch_corpus", lambda *a, **k: fake)
    schedule = PretrainConfig(epochs=6, batch_size=8)                      # 4 steps per epoch

    def epochs_run(config):
        trainer = otc.OTCCLIPTrainer(tiny, corpus, schedule, config)
        seen = []
        for epoch in range(6):
            trainer.before_step(4 * epoch)
            seen.append(torch.equal(trainer.assignment, shuffled))
        return trainer, seen

    alternate, seen = epochs_run(otc.OTCCLIPConfig(rematch_start=1, rematch_every=2))
    assert [e["epoch"] for e in alternate.events] == [1, 3, 5] and seen == [False, True, False, True, False, True]
    assert all(e["applied"] for e in alternate.events) and alternate.events[0]["candidates"].dtype == torch.int32
    _, held = epochs_run(otc.OTCCLIPConfig(rematch_start=1, rematch_every=2, hold=True))
    assert held == [False] + [True] * 5
    measured, never = epochs_run(otc.OTCCLIPConfig(rematch=False, rematch_start=2, rematch_every=2))
    assert never == [False] * 6 and [e["epoch"] for e in measured.events] == [2, 4]
    assert not any(e["applied"] for e in measured.events)
    with torch.no_grad():
        x = corpus.images([0, 1])
        ids = tiny.tokenizer(corpus.texts[:2])
        img, txt, scale = otc.TokenCLIP(tiny)(x, ids)
        assert torch.allclose(img.tokens, image_tokens(tiny, x).tokens) and torch.equal(txt.mask, text_tokens(tiny, ids).mask)
    with pytest.raises(RClipError, match="exceed"):
        otc.OTCCLIPTrainer(tiny, corpus, schedule, otc.OTCCLIPConfig(matching=RematchConfig(k=40)))
    import warnings                                    # the objectives' Sinkhorn budget is truncated by design: silent

    short = otc.OTCCLIPConfig(align=otc.AlignmentConfig(ot=otc.OTConfig(max_iter=1, tol=1e-9)))
    trainer = otc.OTCCLIPTrainer(tiny, corpus, schedule, short)
    trainer.before_step(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = trainer.loss(trainer.module, corpus.__getitems__(list(range(8))))
    assert torch.isfinite(loss) and not [w for w in caught if "sinkhorn did not converge" in str(w.message)]


def test_rematch_items_are_the_report_item_by_item():
    describes = lambda i, j: i == j or (i, j) == (2, 1)                  # noqa: E731
    keeps = lambda i, j: j == 3                                           # noqa: E731
    poisoned = torch.tensor([False, False, True, True])
    assigned, pools = torch.tensor([0, 2, 3, 1]), torch.tensor([[0, 1], [0, 3], [3, 1], [0, 2]])
    items = otc.rematch_items(assigned, describes, poisoned=poisoned, keeps_poison=keeps, candidates=pools)
    assert items["precision"].tolist() == [100, 0, 0, 0] and items["pool hit"].tolist() == [100, 0, 100, 0]
    assert items["poisoned index"].tolist() == [2, 3] and items["broken"].tolist() == [0, 100]
    report = rematch_report(assigned, describes, poisoned=poisoned, keeps_poison=keeps, candidates=pools)
    assert items["precision"].mean() == pytest.approx(100 * report["precision"])
    assert items["broken"].mean() == pytest.approx(100 * report["poisoned_broken"])
    assert items["pool hit"].mean() == pytest.approx(100 * report["pool_hit"])
    bare = otc.rematch_items(assigned, None, poisoned=poisoned, keeps_poison=keeps, candidates=pools)
    assert bare["precision"] is None and bare["pool hit"] is None and bare["broken"].tolist() == [0, 100]
    with pytest.raises(RClipError, match="keeps_poison"):
        otc.rematch_items(assigned, None, poisoned=poisoned)


def test_mixed_choice_interpolates_between_ot_and_global_on_the_same_pools():
    cand = torch.tensor([[4, 7, 1], [2, 0, 5]])
    sims = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5]])
    dist = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.4, 0.05]])
    r = otc.Rematch(cand.gather(1, dist.argmin(1, keepdim=True))[:, 0], cand, sims, dist, "ot")
    assert otc.mixed_choice(r, 0.0).tolist() == r.assigned.tolist() == [7, 5]
    assert otc.mixed_choice(r, 1.0).tolist() == [4, 2]                   # the most similar candidate: global
    mixed = 0.5 * dist + 0.5 * (1 - sims)                                 # [[.3, .2, .6], [.2, .4, .275]]
    assert otc.mixed_choice(r, 0.5).tolist() == [7, 2] == cand.gather(1, mixed.argmin(1, keepdim=True))[:, 0].tolist()
    with pytest.raises(RClipError, match="no OT distances"):
        otc.mixed_choice(otc.Rematch(cand[:, 0], cand, sims, None, "global"), 0.5)
    with pytest.raises(RClipError, match="global weight"):
        otc.mixed_choice(r, 1.5)


def test_transport_plan_is_the_sinkhorn_plan_of_words_against_patches(tiny):
    image = torch.rand(3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(0))
    was = tiny.model.training
    tiny.model.train()
    out = otc.transport_plan(tiny, image, "a large red circle")
    assert tiny.model.training                                            # the train/eval mode is restored
    tiny.model.train(was)
    grid = tuple(tiny.model.visual.grid_size)
    assert out["words"] == ["a", "large", "red", "circle"] and out["plan"].shape == (4, grid[0] * grid[1])
    assert out["patch_mass"].shape == (4, *grid) and torch.allclose(out["plan"].sum(1), torch.ones(4), atol=1e-5)
    img, txt = image_tokens(tiny, image[None]), text_tokens(tiny, ["a large red circle"])
    cost = (1 - txt.tokens[0][txt.mask[0]] @ img.tokens[0].T).detach().double().numpy()
    ref = pot.sinkhorn(np.full(4, 1 / 4), np.full(cost.shape[1], 1 / cost.shape[1]), cost, 0.1, numItermax=200)
    assert np.allclose(out["plan"].numpy(), ref / ref.sum(1, keepdims=True), atol=1e-3)


def test_restricting_a_rematching_to_k_candidates_equals_rematching_with_k(tiny):
    from rclip.data.pairs import FocusedWorldPairs, PairCorpus

    corpus = PairCorpus.render(FocusedWorldPairs(19, seed=3))
    imgs = encode_image_tokens(tiny, corpus.images())
    caps = encode_text_tokens(tiny, corpus.texts)
    exact = OTConfig(max_iter=5000, tol=1e-9)          # converged, so batches of other sizes solve the same problems
    wide = rematch_captions(imgs, caps, RematchConfig(k=8, ot=exact))
    for k in (1, 3, 8):
        ref = rematch_captions(imgs, caps, RematchConfig(k=k, ot=exact))      # re-matched from scratch with k
        got = otc.restrict(wide, k)
        assert torch.equal(got.candidates, ref.candidates) and torch.equal(got.assigned, ref.assigned)
        assert torch.allclose(got.distance, ref.distance, atol=1e-6)
    assert torch.equal(otc.restrict(wide, 1).assigned, wide.candidates[:, 0])   # one candidate: global matching
    with pytest.raises(RClipError, match="largest k"):
        otc.restrict(wide, 9)
    with pytest.raises(RClipError, match="no OT distances"):
        otc.restrict(rematch_captions(imgs, caps, RematchConfig(k=8, method="global")), 2)
