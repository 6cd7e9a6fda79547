"""Image and multimodal attacks on CLIP image-text retrieval, in [0, 1] pixel space, and their evaluation.

Every attack perturbs the *whole* gallery: each image (L-inf radius ``eps``) and each caption (``text.budget``
words); retrieval is then scored over all adversarial images against all adversarial captions.

* ``pgd``       image only: PGD lowering each image's cosine similarity to its own (clean) captions; uniform
                start in the ball, ``steps`` sign steps of ``alpha`` (default 2.5 eps / steps: 0.5/255 at 2/255,
                10 steps).
* ``text``      caption only: BERT-Attack, the word that most shifts the text embedding (KL criterion).
* ``co-attack`` Co-Attack (Zhang et al., 2022) as its CLIP code runs it: the text first (``text``), then the image
                from a one-sided random start in [0, eps], ``steps`` sign steps of ``alpha`` (default
                1.25 eps / steps: 0.25/255 at 2/255, 10 steps) maximising
                KL(softmax(u) ‖ softmax(u')) + kl_weight · KL(softmax(t') ‖ softmax(f')),
                u / u' the clean / adversarial *unnormalised* image embedding, f' its unit-norm version and t' the
                unit-norm embedding of the image's adversarial caption (its first caption; the reference code
                attacks every (image, caption) pair and keeps the image of the last pair it meets).
* ``sga``       SGA, the set-level guidance attack (Lu et al., 2023): (1) each caption's substitute lowering its
                similarity to the clean image; (2) the image against the *set* of its adversarial captions, over
                the image and copies rescaled by ``scales`` with N(0, sigma) noise and resized back, uniform start,
                ``alpha`` as PGD's; (3) the original captions again, now guided by the adversarial image.

The image steps of all three run the image tower through :meth:`rclip.models.CLIPBundle.attack_features`, a leaner
forward of the same ViT (equal to open_clip's ``encode_image`` up to float rounding; for the world CLIP on 2 CPU
threads, 1.49x faster in forward and input gradient); the adversarial images are then scored with open_clip's
forward, as every other evaluation.

Attack success (SGA's definition, a ratio) is the share of queries retrieved correctly at R@K before the attack
that are not after it; Co-Attack reports the difference of R@K before and after. :func:`attack_success` gives the
former; the tables in the book say which they show.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from rclip.attacks.image import ascend, per_batch
from rclip.attacks.text import TextAttackConfig, _embed, rank_words, text_attack
from rclip.errors import RClipError
from rclip.retrieval import i2t_ranks, recall_at_k, t2i_ranks

ATTACKS = ("clean", "pgd", "text", "co-attack", "sga")


@dataclass
class RetrievalAttackConfig:
    """Budgets of the retrieval attacks (defaults: the papers' Flickr30k/COCO settings on ViT-B/16).

    eps: L-inf radius in [0, 1] units. steps / alpha: the image attack's sign steps (alpha ``None``: each
    attack's reference step, see the module docstring). kl_weight: Co-Attack's α. scales / sigma: SGA's image set.
    text: the caption attack (budget 1 word, 10 substitutes). image_batch: images attacked together.
    """
    eps: float = 2 / 255
    steps: int = 10
    alpha: float | None = None
    kl_weight: float = 3.0
    scales: tuple[float, ...] = (0.5, 0.75, 1.25, 1.5)
    sigma: float = 0.05
    text: TextAttackConfig = field(default_factory=TextAttackConfig)
    seed: int = 0
    image_batch: int | None = 128

    def step(self, attack: str) -> float:
        """The image step: ``alpha``, else the reference's total travel spread over ``steps`` - Co-Attack
        1.25 eps (0.25/255 per step at 2/255, 10 steps), PGD and SGA 2.5 eps (0.5/255 per step)."""
        if self.alpha is not None:
            return self.alpha
        return (1.25 if attack == "co-attack" else 2.5) * self.eps / max(1, self.steps)


def _owner_matrix(img2txt: Sequence[Sequence[int]], n_txt: int) -> torch.Tensor:
    """(N_img, N_txt) with 1 where the caption belongs to the image."""
    own = torch.zeros(len(img2txt), n_txt)
    for i, caps in enumerate(img2txt):
        own[i, list(caps)] = 1.0
    return own


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(n_in: int, n_out: int, antialias: bool, device: torch.device, dtype: torch.dtype
                    ) -> torch.Tensor:
    """(n_out, n_in): the 1-D resampling ``F.interpolate(mode="bicubic", align_corners=False)`` applies along one side
    of an image (its weights and border handling, read off in float64 by resizing each basis vector), on ``device``
    in ``dtype``. Built outside inference mode, so that autograd may save it; callers never write to it."""
    with torch.inference_mode(False), torch.no_grad():
        basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1).expand(n_in, 1, n_in, 8).contiguous()
        out = F.interpolate(basis, size=(n_out, 8), mode="bicubic", align_corners=False, antialias=antialias)
        return out[..., 0].reshape(n_in, n_out).T.to(device, dtype).contiguous()


def _bicubic(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bicubic", align_corners=False, antialias=antialias)`` as the two 1-D resamplings
    it is made of, one matrix product per side (equal up to float rounding, ~1e-6): on the CPU its backward is a
    matrix product too, several times faster than interpolate's (SGA runs it on every view of every step)."""
    rows = _bicubic_matrix(x.shape[-2], size[0], antialias, x.device, x.dtype)
    cols = _bicubic_matrix(x.shape[-1], size[1], antialias, x.device, x.dtype)
    return rows @ x @ cols.T


def scaled_views(x: torch.Tensor, scales: Sequence[float], sigma: float, generator: torch.Generator | None
                 ) -> torch.Tensor:
    """SGA's image set: x and, per ratio r, x + N(0, sigma) resized to r x side (bicubic, antialiased when
    shrinking), clipped to [0, 1] and resized back. x: (B, 3, H, W) -> (B * (1 + len(scales)), 3, H, W),
    differentiable in x."""
    size = tuple(x.shape[-2:])
    out = [x]
    for r in scales:
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype) * sigma
        small = (max(1, int(r * size[0])), max(1, int(r * size[1])))
        out.append(_bicubic(_bicubic(x + noise, small, r < 1).clamp(0, 1), size, False))
    return torch.cat(out)


def _similarity_descent(bundle, images, targets, cfg: RetrievalAttackConfig, attack: str,
                        views: bool, generator: torch.Generator) -> torch.Tensor:
    """Sign-gradient steps lowering f(view) · target_i summed over images (and views). targets: (N, D)."""
    targets = targets.to(bundle.device)

    def attack_batch(x, idx, _):
        g = targets[idx]

        def objective(adv):
            batch = scaled_views(adv, cfg.scales, cfg.sigma, generator) if views else adv
            f = bundle.attack_features(batch).float()
            return -(f * g.repeat(len(batch) // len(adv), 1)).sum()
        return ascend(objective, x, cfg.eps, steps=cfg.steps, alpha=cfg.step(attack), generator=generator)

    return per_batch(bundle.model, images, torch.arange(len(images)), cfg.eps if cfg.steps else 0.0,
                     cfg.image_batch, attack_batch)


@torch.no_grad()
def _image_embeddings(bundle, images: torch.Tensor, batch: int | None, normalize: bool = True) -> torch.Tensor:
    from rclip.attacks.image import fp32_eval

    bs = batch or len(images)
    with fp32_eval(bundle.model):
        out = [bundle.model.encode_image(bundle.normalize(images[i:i + bs].to(bundle.device).float()),
                                         normalize=normalize).float() for i in range(0, len(images), bs)]
    return torch.cat(out)


def pgd_retrieval(bundle, images: torch.Tensor, captions: Sequence[str], img2txt: Sequence[Sequence[int]],
                  cfg: RetrievalAttackConfig) -> torch.Tensor:
    """PGD on the images alone: lower each image's mean cosine similarity to its own clean captions."""
    from rclip.attacks.image import fp32_eval

    with fp32_eval(bundle.model):
        txt = _embed(bundle, list(captions), cfg.text.batch_size)
    own = _owner_matrix(img2txt, len(captions)).to(txt.device)
    targets = (own @ txt) / own.sum(1, keepdim=True)
    return _similarity_descent(bundle, images, targets, cfg, "pgd", False, torch.Generator().manual_seed(cfg.seed))


def co_attack(bundle, images: torch.Tensor, captions: Sequence[str], img2txt: Sequence[Sequence[int]],
              cfg: RetrievalAttackConfig, adv_captions: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Co-Attack: adversarial captions first (``adv_captions`` if already made by :func:`text_attack` with the
    ``kl`` criterion), then each image against its clean embedding and its (first) caption's adversarial
    embedding. Returns (adversarial images (N, 3, H, W), adversarial captions)."""
    from rclip.attacks.image import fp32_eval

    adv_caps = list(adv_captions) if adv_captions is not None else kl_text_attack(bundle, captions, cfg)
    with fp32_eval(bundle.model):
        txt = _embed(bundle, adv_caps, cfg.text.batch_size)
    paired = txt[torch.tensor([caps[0] for caps in img2txt], device=txt.device)]
    clean = _image_embeddings(bundle, images, cfg.image_batch, normalize=False)
    gen = torch.Generator().manual_seed(cfg.seed)

    def attack_batch(x, idx, _):
        u0 = clean[idx].log_softmax(-1)
        t = paired[idx].log_softmax(-1)

        def objective(adv):
            u = bundle.attack_features(adv, normalize=False).float()
            f = F.normalize(u, dim=-1)
            kl_image = (u0.exp() * (u0 - u.log_softmax(-1))).sum()
            kl_text = (t.exp() * (t - f.log_softmax(-1))).sum()
            return kl_image + cfg.kl_weight * kl_text
        start = x + torch.rand(x.shape, generator=gen).to(x.device, x.dtype) * cfg.eps  # one-sided, in [0, eps]
        return ascend(objective, x, cfg.eps, steps=cfg.steps, alpha=cfg.step("co-attack"), start=start)

    adv = per_batch(bundle.model, images, torch.arange(len(images)), cfg.eps if cfg.steps else 0.0,
                    cfg.image_batch, attack_batch)
    return adv, adv_caps


def sga(bundle, images: torch.Tensor, captions: Sequence[str], img2txt: Sequence[Sequence[int]],
        cfg: RetrievalAttackConfig) -> tuple[torch.Tensor, list[str]]:
    """SGA: captions guided by the clean image, the image guided by the set of its adversarial captions over
    rescaled copies, then the captions again guided by the adversarial image. Returns (images, captions)."""
    from rclip.attacks.image import fp32_eval

    owner = torch.empty(len(captions), dtype=torch.long)
    for i, caps in enumerate(img2txt):
        owner[list(caps)] = i
    guided = replace(cfg.text, criterion="guide")
    clean = _image_embeddings(bundle, images, cfg.image_batch)
    ranked = rank_words(bundle, captions, guided)       # the same for both passes: computed once
    memo = {}                                           # and so are most candidate captions: encoded once
    adv_caps = text_attack(bundle, captions, guided, guide=clean[owner.to(clean.device)], ranked=ranked, memo=memo)
    with fp32_eval(bundle.model):
        txt = _embed(bundle, adv_caps, cfg.text.batch_size)
    own = _owner_matrix(img2txt, len(captions)).to(txt.device)
    adv = _similarity_descent(bundle, images, own @ txt, cfg, "sga", True, torch.Generator().manual_seed(cfg.seed))
    adv_emb = _image_embeddings(bundle, adv, cfg.image_batch)
    adv_caps = text_attack(bundle, captions, guided, guide=adv_emb[owner.to(adv_emb.device)], ranked=ranked,
                           memo=memo)
    return adv, adv_caps


def kl_text_attack(bundle, captions: Sequence[str], cfg: RetrievalAttackConfig) -> list[str]:
    """BERT-Attack's captions (the ``kl`` shift criterion), as the ``text`` attack and Co-Attack use them."""
    return text_attack(bundle, captions, replace(cfg.text, criterion="kl"))


def attack_retrieval(bundle, images: torch.Tensor, captions: Sequence[str], img2txt: Sequence[Sequence[int]],
                     attack: str, cfg: RetrievalAttackConfig | None = None,
                     adv_captions: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Adversarial (images, captions) of a gallery under ``attack`` (one of :data:`ATTACKS`).

    images: (N, 3, H, W) in [0, 1]; captions: all T captions; img2txt: per image the indices of its captions.
    adv_captions: the ``text`` attack's captions when already made (reused by ``text`` and ``co-attack``).
    """
    cfg = cfg or RetrievalAttackConfig()
    if attack not in ATTACKS:
        raise RClipError(f"unknown retrieval attack {attack!r}; choose one of {ATTACKS}")
    captions = list(captions)
    images = images.to(bundle.device)
    if attack == "clean":
        return images, captions
    if attack == "pgd":
        return pgd_retrieval(bundle, images, captions, img2txt, cfg), captions
    if attack == "text":
        return images, list(adv_captions) if adv_captions is not None else kl_text_attack(bundle, captions, cfg)
    if attack == "co-attack":
        return co_attack(bundle, images, captions, img2txt, cfg, adv_captions)
    return sga(bundle, images, captions, img2txt, cfg)


@dataclass
class RetrievalAttackResult:
    """recall: R@K in percent (``i2t_R@1`` ...). i2t_ranks (N_img,) / t2i_ranks (N_txt,): 0-based ranks of the
    best true caption of each image / the true image of each caption. captions: the adversarial captions;
    images: the adversarial images (kept only when asked)."""
    attack: str
    recall: dict[str, float]
    i2t_ranks: torch.Tensor
    t2i_ranks: torch.Tensor
    captions: list[str]
    images: torch.Tensor | None = None


def evaluate_attacks(bundle, rset, attacks: Sequence[str], cfg: RetrievalAttackConfig | None = None, *,
                     ks: Sequence[int] = (1, 5, 10), keep_images: bool = False,
                     text_captions: Sequence[str] | None = None) -> dict[str, RetrievalAttackResult]:
    """Attack the whole gallery of ``rset`` (a :class:`~rclip.data.base.RetrievalSet`) with each of ``attacks``,
    then score every adversarial image against every adversarial caption. The ``text`` attack's captions are made
    once and reused by ``co-attack``; ``text_captions``: those captions when an earlier call already made them
    (the same model, gallery and ``cfg.text``)."""
    cfg = cfg or RetrievalAttackConfig()
    images = rset.image_tensor()
    if text_captions is not None and len(text_captions) != len(rset.captions):
        raise RClipError(f"text_captions has {len(text_captions)} captions, the gallery {len(rset.captions)}: pass "
                         f"the text attack's captions of this gallery")
    out, text_adv = {}, None if text_captions is None else list(text_captions)
    with _eval(bundle):
        for attack in attacks:
            if attack in ("text", "co-attack") and text_adv is None:
                text_adv = kl_text_attack(bundle, rset.captions, cfg)
            adv_images, adv_caps = attack_retrieval(bundle, images, rset.captions, rset.img2txt, attack, cfg,
                                                    text_adv if attack in ("text", "co-attack") else None)
            sim = bundle.encode_images(adv_images) @ bundle.encode_texts(adv_caps).T
            out[attack] = RetrievalAttackResult(attack, recall_at_k(sim, rset.txt2img, ks),
                                                i2t_ranks(sim, rset.txt2img), t2i_ranks(sim, rset.txt2img),
                                                adv_caps, adv_images.cpu() if keep_images else None)
    return out


def evaluate_attack(bundle, rset, attack: str, cfg: RetrievalAttackConfig | None = None, *,
                    ks: Sequence[int] = (1, 5, 10), keep_images: bool = False) -> RetrievalAttackResult:
    """One attack of :func:`evaluate_attacks`."""
    return evaluate_attacks(bundle, rset, [attack], cfg, ks=ks, keep_images=keep_images)[attack]


def recall_table(results: dict[str, RetrievalAttackResult], ks: Sequence[int] = (1, 5)) -> dict[str, dict]:
    """``{attack: {"TR@1": ..., "TR@5": ..., "IR@1": ..., "IR@5": ...}}`` (percent) from :func:`evaluate_attacks`:
    TR = text retrieval (image query), IR = image retrieval (caption query), the papers' column names."""
    return {a: {**{f"TR@{k}": r.recall[f"i2t_R@{k}"] for k in ks}, **{f"IR@{k}": r.recall[f"t2i_R@{k}"] for k in ks}}
            for a, r in results.items()}


@contextlib.contextmanager
def _eval(bundle):
    was = bundle.model.training
    bundle.model.eval()
    try:
        yield
    finally:
        bundle.model.train(was)


def attack_success(clean_ranks: torch.Tensor, adv_ranks: torch.Tensor, k: int = 1) -> float:
    """SGA's attack success rate in percent: of the queries whose truth ranks in the top ``k`` before the attack,
    the share that no longer does after it (a ratio; Co-Attack's "difference" is clean R@K - adversarial R@K)."""
    hit = clean_ranks < k
    if not bool(hit.any()):
        return float("nan")
    return 100.0 * float((adv_ranks[hit] >= k).float().mean())
