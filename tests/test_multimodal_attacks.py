"""Image and multimodal retrieval attacks (PGD, Co-Attack, SGA) on a tiny CLIP: each lowers what it targets more
than a random perturbation of the same size, stays in the budget, is deterministic; the success rate against
brute force."""
import pytest
import torch
import torch.nn.functional as F

from rclip import world
from rclip.attacks import (RetrievalAttackConfig, attack_success, co_attack, evaluate_attacks, pgd_retrieval,
                           scaled_views, sga, text_attack)
from rclip.attacks.image import ascend, fp32_eval
from rclip.attacks.text import TextAttackConfig
from rclip.errors import RClipError

EPS = 8 / 255


@pytest.fixture(scope="module")
def gallery():
    return world.retrieval_set(split="test", n=6, resolution=32)


def features(bundle, images):
    with torch.no_grad():
        return bundle.image_features(images).float()


def texts(bundle, captions):
    with torch.no_grad():
        return bundle.text_features(bundle.tokenizer(captions)).float()


def random_sign(images, eps, seed=1):
    noise = torch.randint(0, 2, images.shape, generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    return (images + eps * noise).clamp(0, 1)


def own_similarity(bundle, images, rset, captions=None):
    """Mean cosine similarity of each image to its own captions."""
    t = texts(bundle, captions or rset.captions)
    f = features(bundle, images)
    return torch.stack([(f[i] @ t[caps].T).mean() for i, caps in enumerate(rset.img2txt)])


def check_budget(adv, x, eps):
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_pgd_lowers_similarity_more_than_random_noise(tiny, gallery):
    x = gallery.image_tensor()
    cfg = RetrievalAttackConfig(eps=EPS, steps=5)
    adv = pgd_retrieval(tiny, x, gallery.captions, gallery.img2txt, cfg)
    check_budget(adv, x, EPS)
    assert (own_similarity(tiny, adv, gallery) < own_similarity(tiny, random_sign(x, EPS), gallery)).all()
    assert torch.equal(adv, pgd_retrieval(tiny, x, gallery.captions, gallery.img2txt, cfg))  # seeded


def test_co_attack_moves_images_away_from_clean_and_adversarial_text(tiny, gallery):
    x = gallery.image_tensor()
    cfg = RetrievalAttackConfig(eps=EPS, steps=5)
    adv, caps = co_attack(tiny, x, gallery.captions, gallery.img2txt, cfg)
    check_budget(adv, x, EPS)
    assert caps == text_attack(tiny, gallery.captions, TextAttackConfig(criterion="kl"))  # the text goes first
    paired = texts(tiny, [caps[c[0]] for c in gallery.img2txt])
    rand = random_sign(x, EPS)

    def objective(images):  # Co-Attack's: KL from the clean embedding + 3 x KL to the adversarial text
        with torch.no_grad():
            u0 = tiny.model.encode_image(tiny.normalize(x))
            u = tiny.model.encode_image(tiny.normalize(images))
        kl1 = F.kl_div(u.log_softmax(-1), u0.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        kl2 = F.kl_div(F.normalize(u, dim=-1).log_softmax(-1), paired.log_softmax(-1), log_target=True,
                       reduction="none").sum(-1)
        return kl1 + 3 * kl2
    assert (objective(adv) > objective(rand)).all()
    assert ((features(tiny, adv) * paired).sum(-1) < (features(tiny, rand) * paired).sum(-1)).float().mean() >= 0.8


def test_sga_lowers_similarity_to_the_adversarial_caption_set(tiny, gallery):
    x = gallery.image_tensor()
    cfg = RetrievalAttackConfig(eps=EPS, steps=5)
    adv, caps = sga(tiny, x, gallery.captions, gallery.img2txt, cfg)
    check_budget(adv, x, EPS)
    # the final captions are the original ones attacked again, guided by the adversarial images
    owner = gallery.txt2img
    again = text_attack(tiny, gallery.captions, TextAttackConfig(criterion="guide"), guide=features(tiny, adv)[owner])
    assert caps == again
    assert (own_similarity(tiny, adv, gallery, caps) < own_similarity(tiny, random_sign(x, EPS), gallery, caps)).all()


def test_scaled_views_are_sga_image_set():
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    v = scaled_views(x, (0.5, 0.75, 1.25, 1.5), 0.05, torch.Generator().manual_seed(0))
    assert v.shape == (10, 3, 32, 32) and torch.equal(v[:2], x)
    assert (v[2:] - x.repeat(4, 1, 1, 1)).abs().mean() < 0.2   # blurred, noisy copies of the same images
    v.sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("shape,size,antialias", [((32, 32), (16, 16), True), ((32, 32), (24, 24), True),
                                                  ((32, 32), (40, 40), False), ((24, 24), (32, 32), False),
                                                  ((64, 64), (96, 96), False), ((96, 96), (64, 64), False),
                                                  ((24, 40), (12, 50), True), ((24, 40), (30, 20), False)])
def test_bicubic_as_matrix_products_equals_interpolate(shape, size, antialias):
    """SGA's resizes as two 1-D resampling matrices: values and input gradients equal interpolate's, non-square
    images included (rows and columns resampled each by their own matrix)."""
    from rclip.attacks.multimodal import _bicubic

    x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(shape[1]))
    w = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for f in (lambda a: F.interpolate(a, size=size, mode="bicubic", align_corners=False, antialias=antialias),
              lambda a: _bicubic(a, size, antialias)):
        a = x.clone().requires_grad_(True)
        y = f(a)
        outs.append(y.detach())
        grads.append(torch.autograd.grad((y * w).sum(), a)[0])
    assert outs[1].shape == outs[0].shape == (2, 3, *size)
    assert torch.allclose(outs[1], outs[0], atol=1e-5) and torch.allclose(grads[1], grads[0], atol=1e-4)


def count_lean_calls(monkeypatch) -> list[int]:
    """Count the calls of the lean image forward from now on (in a one-item list)."""
    from rclip import models

    calls, inner = [0], models.lean_image_forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)
    monkeypatch.setattr(models, "lean_image_forward", counted)
    return calls


def open_clip_forward(monkeypatch):
    """From now on the attacks' image steps take open_clip's encode_image (what they ran before the lean forward)."""
    from rclip import models

    monkeypatch.setattr(models, "lean_forward_covers", lambda visual: False)


def test_sga_same_adversarial_outputs_as_the_path_it_replaced(tiny, gallery, monkeypatch):
    """SGA with the matrix resizes, the memo of encoded texts and the lean image forward against the path they
    replaced (interpolate; every candidate text encoded in its round, the caption as it stands included; open_clip's
    forward) on a fixed seed: the same captions, and the same images but for sign steps that flip where a gradient
    is ~0 (a rounding difference of ~1e-7 can)."""
    import rclip.attacks.multimodal as mm
    import rclip.attacks.text as text_mod

    cfg = RetrievalAttackConfig(eps=EPS, steps=3)
    x = gallery.image_tensor()
    lean_calls = count_lean_calls(monkeypatch)
    new_adv, new_caps = sga(tiny, x, gallery.captions, gallery.img2txt, cfg)
    assert lean_calls[0] > 0
    monkeypatch.setattr(mm, "_bicubic", lambda a, size, aa: F.interpolate(a, size=size, mode="bicubic",
                                                                          align_corners=False, antialias=aa))
    open_clip_forward(monkeypatch)
    def every_text_encoded(b, texts, bs, memo):           # the replaced path: no memo, each round's texts encoded
        with fp32_eval(b.model):
            return text_mod._embed(b, texts, bs)
    monkeypatch.setattr(text_mod, "_embed_memo", every_text_encoded)
    lean_calls[0] = 0
    old_adv, old_caps = sga(tiny, x, gallery.captions, gallery.img2txt, cfg)
    assert lean_calls[0] == 0 and new_caps == old_caps
    assert ((new_adv - old_adv).abs() > 1e-6).float().mean() < 1e-3


@pytest.mark.parametrize("attack", [pgd_retrieval, co_attack])
def test_image_steps_same_adversarial_images_with_open_clips_forward(tiny, gallery, monkeypatch, attack):
    """PGD and Co-Attack step with the lean image forward; on a fixed seed they find the images open_clip's forward
    finds, but for sign steps that flip where a gradient is ~0."""

    cfg = RetrievalAttackConfig(eps=EPS, steps=3)
    x = gallery.image_tensor()
    lean_calls = count_lean_calls(monkeypatch)
    lean = attack(tiny, x, gallery.captions, gallery.img2txt, cfg)
    assert lean_calls[0] > 0
    open_clip_forward(monkeypatch)
    lean_calls[0] = 0
    old = attack(tiny, x, gallery.captions, gallery.img2txt, cfg)
    assert lean_calls[0] == 0
    lean, old = (a[0] if isinstance(a, tuple) else a for a in (lean, old))
    assert (old - x).abs().max() > EPS / 2                         # the attack moved the images
    assert ((lean - old).abs() > 1e-6).float().mean() < 1e-3


def test_ascend_explicit_start_is_projected():
    x = torch.full((1, 3, 4, 4), 0.5)
    out = ascend(lambda a: a.sum() * 0, x, 0.1, steps=0, alpha=0.01, start=x + 1.0)
    assert torch.allclose(out, x + 0.1)


def test_evaluation_scores_the_full_gallery_and_shares_the_text_attack(tiny, gallery):
    cfg = RetrievalAttackConfig(eps=EPS, steps=2)
    res = evaluate_attacks(tiny, gallery, ["clean", "text", "co-attack", "pgd"], cfg, ks=(1, 5))
    assert res["text"].captions == res["co-attack"].captions
    assert res["clean"].captions == gallery.captions and res["pgd"].captions == gallery.captions
    for r in res.values():
        assert len(r.i2t_ranks) == 6 and len(r.t2i_ranks) == 30
        assert r.recall["i2t_R@1"] == pytest.approx(100 * (r.i2t_ranks < 1).float().mean().item())
    with pytest.raises(RClipError, match="unknown retrieval attack"):
        evaluate_attacks(tiny, gallery, ["bert"], cfg)


def test_text_captions_made_earlier_are_reused_not_remade(tiny, gallery, monkeypatch):
    import rclip.attacks.multimodal as mm

    cfg = RetrievalAttackConfig(eps=EPS, steps=2)
    first = evaluate_attacks(tiny, gallery, ["co-attack"], cfg)["co-attack"]
    monkeypatch.setattr(mm, "kl_text_attack", lambda *a, **k: pytest.fail("the text attack ran again"))
    again = evaluate_attacks(tiny, gallery, ["text"], cfg, text_captions=first.captions)["text"]
    assert again.captions == first.captions
    monkeypatch.undo()
    alone = evaluate_attacks(tiny, gallery, ["text"], cfg)["text"]
    assert alone.captions == again.captions and torch.equal(alone.t2i_ranks, again.t2i_ranks)
    with pytest.raises(RClipError, match="text_captions has 2 captions"):
        evaluate_attacks(tiny, gallery, ["text"], cfg, text_captions=first.captions[:2])


def test_attack_success_is_the_share_of_correct_queries_lost():
    clean = torch.tensor([0, 0, 3, 0, 7])
    adv = torch.tensor([0, 2, 0, 5, 9])
    # correct before (rank < 1): queries 0, 1, 3; of those, 1 and 3 fail after -> 2 / 3
    assert attack_success(clean, adv, k=1) == pytest.approx(200 / 3)
    brute = sum(1 for c, a in zip(clean.tolist(), adv.tolist()) if c < 5 and a >= 5) / sum(c < 5 for c in clean.tolist())
    assert attack_success(clean, adv, k=5) == pytest.approx(100 * brute)
    assert attack_success(torch.tensor([3]), torch.tensor([0]), k=1) != attack_success(torch.tensor([3]), torch.tensor([0]), k=1)  # NaN


def brute_per_image(sim, img2txt, k):
    """Per-image R@k by explicit loops over the similarity matrix (no ranks): the image's TR hit and the mean IR hit
    of its captions, averaged, in points."""
    n_img, n_txt = sim.shape
    out = []
    for i, caps in enumerate(img2txt):
        top = sorted(range(n_txt), key=lambda t: (-float(sim[i, t]), t))[:k]
        tr = 100.0 * any(t in caps for t in top)
        ir = []
        for c in caps:
            top_img = sorted(range(n_img), key=lambda j: (-float(sim[j, c]), j))[:k]
            ir.append(100.0 * (i in top_img))
        out.append((tr + sum(ir) / len(ir)) / 2)
    return out


@pytest.mark.parametrize("groups", [[5] * 7, [2, 5, 1, 3]])
def test_per_image_recall_against_brute_force(groups):
    from rclip.retrieval import i2t_ranks, per_image_recall, recall_at_k, t2i_ranks

    img2txt, start = [], 0
    for g in groups:
        img2txt.append(list(range(start, start + g)))
        start += g
    owner = torch.tensor([i for i, caps in enumerate(img2txt) for _ in caps])
    sim = torch.randn(len(groups), start, generator=torch.Generator().manual_seed(len(groups)))
    sim[0, img2txt[0][0]] = sim[1, img2txt[1][-1]] = 5.0                       # a few sure hits
    for k in (1, 2, 5):
        got = per_image_recall(i2t_ranks(sim, owner), t2i_ranks(sim, owner), img2txt, k)
        assert got.shape == (len(groups),)
        assert got.tolist() == pytest.approx(brute_per_image(sim, img2txt, k))
        if len(set(groups)) == 1:                       # equal caption counts: the mean is (TR@k + IR@k) / 2 exactly
            r = recall_at_k(sim, owner, ks=(k,))
            assert got.mean() == pytest.approx((r[f"i2t_R@{k}"] + r[f"t2i_R@{k}"]) / 2)
    with pytest.raises(RClipError, match="caption groups"):
        per_image_recall(i2t_ranks(sim, owner)[:2], t2i_ranks(sim, owner), img2txt)
