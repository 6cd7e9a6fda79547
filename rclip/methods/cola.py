"""COLA (Zhu et al., NeurIPS 2025): zero-shot classification by OT between image views and class descriptions,
with image features projected onto the subspace spanned by the class text features.

For an image x and class y, COLA compares two discrete distributions on the unit sphere:

* P(x) = Σ_n a_n δ[Π(f(x_n))] over N views x_n (the image itself and N - 1 random resized crops / flips),
* Q_y = Σ_m b_y^m δ[z_y^m] over M text features of class y (the hand-crafted prompt and M - 1 descriptions),

with cost C_y^Π(n, m) = 1 - cos(Π(f(x_n)), z_y^m), where Π = U_C U_Cᵀ projects onto the top-C left singular vectors
of the D × KM matrix of all class text features. It predicts argmin_y of the OT cost <T*, C_y^Π>.

Settings the paper does not state follow AWT's public code (the book page *Settings the papers leave open*) and
are parameters here: the text matrix is neither centred nor re-normalised; entropy weights are softmax(-H / T) with T = 0.5, over views and, per
class, over its text features; the Sinkhorn solve uses ε = 0.1 and at most 100 iterations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rclip.errors import RClipError
from rclip.ot import ConvergenceTally, sinkhorn


@dataclass
class COLAConfig:
    """Every switch of the paper's ablations.

    n_views: N, views per image (1 = the image only). n_texts: M, text features per class (None = all given).
    n_components: C, the projection's rank (None = all, i.e. no reduction). project: use Π in the cost (C^Π vs C).
    use_ot: OT plan (True) or the independent coupling a bᵀ, i.e. weighted averaging (False).
    reg: Sinkhorn ε on the cost (cost is in [0, 2]). entropy_temp: T of the entropy weights (None = uniform).
    crop_scale: area range of the random resized crops. flip: random horizontal flips. seed: the views' RNG.
    """
    n_views: int = 5
    n_texts: int | None = None
    n_components: int | None = None
    project: bool = True
    use_ot: bool = True
    reg: float = 0.1
    max_iter: int = 100
    tol: float = 1e-6
    entropy_temp: float | None = 0.5
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    seed: int = 0


def text_projection(text_features: torch.Tensor, n_components: int | None) -> torch.Tensor:
    """U_C (D, C): top-C left singular vectors of Z = [z_1, ..., z_{KM}] (D × KM), from features (KM, D)."""
    z = text_features.reshape(-1, text_features.shape[-1]).double()
    rank_cap = min(z.shape)
    c = rank_cap if n_components is None else n_components
    if not 1 <= c <= rank_cap:
        raise RClipError(f"n_components={n_components} must be between 1 and min(D, K*M) = {rank_cap}")
    u, _, _ = torch.linalg.svd(z.T, full_matrices=False)
    return u[:, :c].to(text_features.dtype)


def entropy_weights(logits: torch.Tensor, temp: float | None) -> torch.Tensor:
    """Weights over the second-to-last axis from class logits (..., P, K): softmax(-H(softmax(logits)) / temp).

    Lower entropy (a more confident support point) gives a higher weight; ``temp=None`` gives uniform weights.
    Returns (..., P), summing to 1 over P.
    """
    if temp is None:
        return torch.full(logits.shape[:-1], 1.0 / logits.shape[-2], dtype=logits.dtype, device=logits.device)
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (-entropy / temp).softmax(-1)


def random_views(images: torch.Tensor, n_views: int, *, crop_scale=(0.5, 1.0), flip: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> (B, N, 3, S, S): view 0 is the image, views 1..N-1 random resized crops (square
    boxes of area fraction in ``crop_scale``, bilinear resize back to S) with random horizontal flips.

    Differentiable in ``images`` (the crops are fixed by ``generator``), so an attacker can take gradients through
    the views (expectation over transformations).
    """
    b, _, h, w = images.shape
    views = [images]
    for _ in range(n_views - 1):
        scale = torch.empty(b).uniform_(*crop_scale, generator=generator)
        side = (scale.sqrt() * min(h, w)).round().clamp(2, min(h, w)).long()
        crops = []
        for i in range(b):
            s = int(side[i])
            top = int(torch.randint(0, h - s + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - s + 1, (1,), generator=generator))
            crop = images[i:i + 1, :, top:top + s, left:left + s]
            crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=s > h)
            if flip and bool(torch.rand(1, generator=generator) < 0.5):
                crop = crop.flip(-1)
            crops.append(crop)
        views.append(torch.cat(crops))
    return torch.stack(views, 1)


class COLA(nn.Module):
    """[0, 1] pixels (B, 3, S, S) -> logits (B, K) = -scale * OT cost, so argmax is COLA's prediction.

    Args:
        bundle: the CLIP (its image encoder and differentiable normalisation are used).
        text_features: (K, M, D) unit text features per class (prompt first, then descriptions), or a list of K
            tensors (M_k, D); classes with more than ``n_texts`` keep their first ``n_texts``.
        config: :class:`COLAConfig`.
    """

    def __init__(self, bundle, text_features, config: COLAConfig | None = None, scale: float | None = None):
        super().__init__()
        self.config = cfg = config or COLAConfig()
        if cfg.n_views < 1:
            raise RClipError(f"n_views must be >= 1, got {cfg.n_views}")
        if cfg.entropy_temp is not None and not cfg.entropy_temp > 0:
            raise RClipError(f"entropy_temp must be > 0 (or None for uniform weights), got {cfg.entropy_temp}")
        low, high = cfg.crop_scale
        if not 0 < low <= high <= 1:
            raise RClipError(f"crop_scale is an area fraction range (low, high) with 0 < low <= high <= 1; got "
                             f"{tuple(cfg.crop_scale)}")
        if not cfg.reg > 0:
            raise RClipError(f"reg (Sinkhorn ε) must be > 0, got {cfg.reg}")
        feats = _stack_texts(text_features, cfg.n_texts)                     # (K, M, D)
        self.bundle = bundle
        self.ot = ConvergenceTally()  # every Sinkhorn problem solved, attacks' included: ``cola.ot.summary()``
        self.clip, self.normalize = bundle.model, bundle.normalize
        self.scale = float(bundle.model.logit_scale.detach().exp()) if scale is None else float(scale)
        feats = F.normalize(feats.float(), dim=-1).to(bundle.device)
        prototypes = F.normalize(feats.mean(1), dim=-1)                        # (K, D)
        self.register_buffer("texts", feats)
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("basis", text_projection(feats, cfg.n_components))  # (D, C)
        # b_y^m: each text feature's confidence about its own class system, per class over m
        self.register_buffer("text_weights", entropy_weights(self.scale * feats @ prototypes.T, cfg.entropy_temp))

    @property
    def num_classes(self) -> int:
        return self.texts.shape[0]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Π(f) = U_C U_Cᵀ f, re-normalised to the unit sphere. (..., D) -> (..., D)."""
        return F.normalize(features @ self.basis @ self.basis.T, dim=-1)

    def view_features(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Unit image features of the N views, (B, N, D); projected if ``config.project``."""
        cfg = self.config
        gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
        views = random_views(images, cfg.n_views, crop_scale=cfg.crop_scale, flip=cfg.flip, generator=gen)
        b, n = views.shape[:2]
        f = self.clip.encode_image(self.normalize(views.flatten(0, 1)), normalize=True).reshape(b, n, -1)
        return self.project(f) if cfg.project else f

    def distances(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """OT cost between each image's views and each class's texts, (B, K); lower is more likely."""
        return self.feature_distances(self.view_features(images, generator))

    def feature_distances(self, f: torch.Tensor) -> torch.Tensor:
        """OT costs (B, K) from the views' unit features f (B, N, D) (projected or not, as ``view_features``)."""
        cfg = self.config
        f = f.float()
        a = entropy_weights(self.scale * f @ self.prototypes.T, cfg.entropy_temp)  # (B, N)
        cost = 1 - torch.einsum("bnd,kmd->bknm", f, self.texts)                # (B, K, N, M)
        a = a[:, None, :].expand(-1, self.num_classes, -1)                     # (B, K, N)
        b = self.text_weights[None].expand(len(f), -1, -1)                     # (B, K, M)
        if not cfg.use_ot:
            return torch.einsum("bkn,bknm,bkm->bk", a, cost, b)
        return self.ot.add(sinkhorn(cost, a, b, reg=cfg.reg, max_iter=cfg.max_iter, tol=cfg.tol)).cost

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits (B, K); ``generator`` draws the random views (default: a fresh one seeded by ``config.seed``,
        so the defense is deterministic; an EOT attacker passes fresh generators)."""
        return -self.scale * self.distances(images, generator)


def cola_classifier(bundle, task, config: COLAConfig | None = None, scale: float | None = None) -> COLA:
    """COLA for a zero-shot task: per class, its template prompts (averaged into one hand-crafted prompt feature)
    followed by its descriptions, as in the paper's M = 1 prompt + (M - 1) descriptions.

    A task without descriptions (a real dataset given no CuPL/AWT JSON) falls back to templates only: the
    averaged prompt followed by each filled template, M = 1 + the number of templates.
    """
    from rclip.zeroshot import class_embeddings, class_prompts, prompt_embeddings

    filled = class_prompts(task, "templates")
    prompt = class_embeddings(bundle, filled)                                    # (K, D)
    has_descriptions = bool(task.descriptions) and all(task.descriptions)
    rest = prompt_embeddings(bundle, class_prompts(task, "descriptions") if has_descriptions else filled)
    texts = [torch.cat([p[None], d]) for p, d in zip(prompt, rest)]
    return COLA(bundle, texts, config, scale)


def _stack_texts(text_features, n_texts: int | None) -> torch.Tensor:
    groups = list(text_features)
    if not groups:
        raise RClipError("COLA needs at least one class (got an empty list of class text features)")
    m = min(len(g) for g in groups) if n_texts is None else n_texts
    if m < 1 or any(len(g) < m for g in groups):
        raise RClipError(f"every class needs at least n_texts={m} text features; the smallest class has "
                         f"{min(len(g) for g in groups)}")
    feats = torch.stack([torch.as_tensor(g)[:m] for g in groups])
    if not torch.isfinite(feats).all():
        raise RClipError("the class text features contain NaN or inf")
    return feats


def cosine_distortion(clean: torch.Tensor, adversarial: torch.Tensor, texts: torch.Tensor,
                      basis: torch.Tensor | None = None, per_image: bool = False) -> torch.Tensor:
    """Δ: mean |cos(x_adv, z) - cos(x, z)| over images and text features; with ``basis`` (D, C), Δ_Π after
    projecting both image features with U_C U_Cᵀ. clean/adversarial: (B, D); texts: (T, D). Returns a scalar, or
    with ``per_image`` the (B,) mean over text features of each image."""
    def cos(x):
        if basis is not None:
            x = x @ basis @ basis.T
        return F.normalize(x, dim=-1) @ F.normalize(texts, dim=-1).T
    gap = (cos(adversarial) - cos(clean)).abs()
    return gap.mean(1) if per_image else gap.mean()


def ot_margin(distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """γ per image: the runner-up class's OT cost minus the true class's, (B,); positive when correctly classified."""
    true = distances.gather(1, labels[:, None]).squeeze(1)
    other = distances.masked_fill(F.one_hot(labels, distances.shape[1]).bool(), float("inf")).amin(1)
    return other - true


def outside_share(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The share (B,) of each vector's squared norm that lies outside span(U_C): ‖v − U_C U_Cᵀ v‖² / ‖v‖², for
    vectors (B, D) and an orthonormal basis (D, C). What Π removes from an image feature, or from an adversarial
    feature shift f(x_adv) − f(x); 0 when C is the full rank of D."""
    v = vectors.double()
    u = basis.double()
    rest = v - (v @ u) @ u.T
    return (rest.pow(2).sum(-1) / v.pow(2).sum(-1).clamp_min(1e-30)).to(vectors.dtype)


def projection_shares(bundle, tasks: dict, clean: dict, adversarial: dict, components, config: COLAConfig
                      ) -> "object":
    """What the projection removes, per task and C: the mean share (%) of the clean image feature and of the
    adversarial feature shift f(x_adv) − f(x) outside span(U_C), with U_C from the task's class text features
    (COLA's ``config`` otherwise). clean / adversarial: task -> images (B, 3, H, W), paired. Components above a
    task's text rank min(D, K·M) are skipped. Returns a DataFrame indexed by (task, C)."""
    import pandas as pd
    from dataclasses import replace

    rows = {}
    for t, task in tasks.items():
        with torch.no_grad():
            f, fa = bundle.encode_images(clean[t]).cpu(), bundle.encode_images(adversarial[t]).cpu()
        texts = cola_classifier(bundle, task, replace(config, n_components=None)).texts.flatten(0, 1).cpu()
        rank = min(texts.shape)
        for c in components:
            if c > rank:
                continue
            u = text_projection(texts, c)
            rows[(t, c)] = {"text rank": rank, "clean feature outside (%)": 100 * float(outside_share(f, u).mean()),
                            "adversarial shift outside (%)": 100 * float(outside_share(fa - f, u).mean())}
    out = pd.DataFrame(rows).T
    out.index.names = ["task", "C"]
    return out
