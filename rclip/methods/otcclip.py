"""OTCCLIP (Zhang et al., EMNLP 2025): pre-training CLIP on poisoned pairs by re-matching captions with an OT
distance between fine-grained features, plus OT alignment objectives.

Only the abstract is public; what follows is our reading, each choice a parameter.

* **Fine-grained features.** An image is the set of its patch tokens, a caption the set of its word tokens, both
  mapped into the joint embedding space by the model's own last norm and projection (``ln_post`` then ``proj`` on
  every visual token; ``ln_final`` then ``text_projection`` on every text token) and ℓ2-normalised
  (:class:`TokenFeatures`). By default the CLS and EOT tokens, which are the global embeddings, are *not* in the
  sets (``include_cls`` / ``include_eot`` add them); SOT never is: under the causal mask its output is the same for
  every caption. Padding is masked.
* **OT distance.** d(x, t) = (1 - w) · <P*, C> + w · (1 - cos(g_x, g_t)), with C_nm = 1 - cos(patch n, token m),
  uniform marginals over real tokens, P* the entropic plan (:func:`rclip.ot.sinkhorn`, ε = 0.1, ≤ 100
  iterations, as PLOT) and g the global embeddings; w = ``global_weight`` (0 = the pure fine-grained distance).
* **Caption re-matching.** Each image's candidates are its top-k captions of a pool by global cosine (chunked, so
  memory stays bounded); the image is re-assigned the candidate with the smallest OT distance (``method="ot"``),
  or the most similar one by global cosine alone (``method="global"``, RoCLIP's nearest neighbour).
* **Alignment objectives.** Inter-modality: patches ↔ words of matched pairs; intra-modality: an image's patches ↔
  its augmented view's, a caption's words ↔ its EDA version's. By default each is contrastive on OT distances
  (:func:`ot_contrastive_loss`: InfoNCE on -d / τ, the partner against a few other sets of the batch), because the
  mean OT distance of matched sets alone (``objective="distance"``) is minimised by collapsing every token onto
  one vector. The plan is not detached (UNITER/PLOT detach it): :func:`rclip.ot.sinkhorn` differentiates <P*, C>
  by implicit differentiation, at one small linear solve per pair (exact at convergence).
* **Training** (:class:`OTCCLIPTrainer`, run by :func:`rclip.methods.poison_defenses.defended_clip`). At epoch
  ``rematch_start`` and every ``rematch_every`` epochs after it, every image of the corpus is re-assigned a caption
  of the corpus by OT re-matching (:func:`rematch_corpus`, chunked so memory stays bounded). As in RoCLIP, whose
  framework OTCCLIP improves, the re-matched pairs are trained on in that epoch and the original pairs in the
  epochs between (``hold=True`` keeps the re-matched pairs until the next re-matching); the assignment is part of
  the checkpointed state. Each batch minimises the CLIP loss of (image, assigned caption) plus the weighted OT
  objectives. At every re-matching the trainer also records, on the same candidate pools, the caption global
  matching would pick, so both can be scored against the world's ground truth.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rclip.errors import RClipError
from rclip.methods.pretraining import Trainer, augment_images, augment_texts, masked_contrastive
from rclip.ot import all_finite, sinkhorn

# ----------------------------------------------------------------------------------------------------------------
# Fine-grained features
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TokenFeatures:
    """Sets of unit token features in the joint space, with their global embeddings.

    tokens: (..., L, D) unit rows; padded entries are exactly zero. mask: (..., L) bool, True on real tokens (at
    least one per set). pooled: (..., D) the unit global embedding (the model's own image / text embedding).
    Indexing (``f[idx]``) selects along the leading batch dim.
    """
    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> "TokenFeatures":
        return TokenFeatures(self.tokens[index], self.mask[index], self.pooled[index])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TokenFeatures":
        return TokenFeatures(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device),
                             self.pooled.to(device=device, dtype=dtype))

    @staticmethod
    def cat(parts: Sequence["TokenFeatures"]) -> "TokenFeatures":
        """Concatenate along the batch dim, zero-padding the token axis to the longest set."""
        if not parts:
            raise RClipError("nothing to concatenate: give at least one TokenFeatures")
        length = max(p.tokens.shape[-2] for p in parts)
        tokens = [F.pad(p.tokens, (0, 0, 0, length - p.tokens.shape[-2])) for p in parts]
        masks = [F.pad(p.mask, (0, length - p.mask.shape[-1])) for p in parts]
        return TokenFeatures(torch.cat(tokens), torch.cat(masks), torch.cat([p.pooled for p in parts]))


def token_set(tokens: torch.Tensor, mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None
              ) -> TokenFeatures:
    """Build :class:`TokenFeatures` from raw features: ℓ2-normalise, zero the padding, validate.

    tokens: (..., L, D) finite. mask: (..., L) bool (None = all real). pooled: (..., D) (None = the normalised mean
    of the real tokens).
    """
    tokens = torch.as_tensor(tokens)
    if tokens.ndim < 2 or tokens.shape[-1] == 0 or tokens.shape[-2] == 0:
        raise RClipError(f"tokens must have shape (..., L, D) with L, D >= 1; got {tuple(tokens.shape)}")
    if not all_finite(tokens):
        raise RClipError("token features contain NaN or inf; check the model (a diverged run?) and its inputs")
    mask = torch.ones(tokens.shape[:-1], dtype=torch.bool, device=tokens.device) if mask is None else \
        torch.as_tensor(mask, device=tokens.device).bool()
    if mask.shape != tokens.shape[:-1]:
        raise RClipError(f"mask {tuple(mask.shape)} must match the tokens' (..., L) = {tuple(tokens.shape[:-1])}")
    if not mask.any(-1).all():
        raise RClipError("a token set has no real token (an all-False mask row); every set needs at least one")
    unit = F.normalize(tokens, dim=-1) * mask[..., None]
    if pooled is None:
        pooled = unit.sum(-2)
    pooled = torch.as_tensor(pooled, device=tokens.device)
    if pooled.shape != tokens.shape[:-2] + tokens.shape[-1:]:
        raise RClipError(f"pooled {tuple(pooled.shape)} must have shape (..., D) = "
                         f"{tuple(tokens.shape[:-2] + tokens.shape[-1:])}")
    if not all_finite(pooled):
        raise RClipError("the global (pooled) features contain NaN or inf")
    return TokenFeatures(unit, mask, F.normalize(pooled, dim=-1))


def _vision_tower(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    needed = ("_embeds", "transformer", "ln_post", "proj", "_pool")
    if visual is None or not all(hasattr(visual, a) for a in needed) or getattr(visual, "attn_pool", None) is not None \
            or visual.proj is None:
        raise RClipError(f"patch features need an open_clip ViT CLIP (a VisionTransformer with a projection and no "
                         f"attentional pooler); got {type(visual).__name__}. ResNet and timm towers have no "
                         "patch tokens in the joint space")
    return visual


def _text_tower(model: nn.Module) -> None:
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    if not all(hasattr(model, a) for a in needed) or model.text_projection is None:
        raise RClipError(f"token features need an open_clip CLIP with its own text transformer; {type(model).__name__} "
                         "has none (a CustomTextCLIP / Hugging Face text tower is not supported)")
    if getattr(model, "text_pool_type", "argmax") not in ("argmax", "eos"):
        raise RClipError(f"text pool type {model.text_pool_type!r} is not supported: the EOT token must be the "
                         "global embedding ('argmax' or 'eos')")


def image_tokens(bundle, images: torch.Tensor, *, include_cls: bool = False) -> TokenFeatures:
    """Differentiable patch features of [0, 1] images (B, 3, S, S) -> TokenFeatures with tokens (B, P, D) (or
    (B, 1 + P, D), CLS first, with ``include_cls``) and pooled (B, D) = the model's unit ``encode_image``."""
    visual = _vision_tower(bundle.model)
    if images.ndim != 4:
        raise RClipError(f"images must have shape (B, 3, S, S); got {tuple(images.shape)}")
    x = visual.transformer(visual._embeds(bundle.normalize(images)))
    pooled, _ = visual._pool(x)                         # the model's own pooling, whatever its pool type
    tokens = visual.ln_post(x) @ visual.proj            # every token through the last norm and projection
    if not include_cls:
        tokens = tokens[:, 1:]
    return token_set(tokens, None, pooled @ visual.proj)


def text_tokens(bundle, texts: Sequence[str] | torch.Tensor, *, include_eot: bool = False) -> TokenFeatures:
    """Differentiable word-token features of captions (strings or token ids (B, L)) -> TokenFeatures with tokens
    (B, L', D), L' = the longest caption's length including SOT and EOT (positions kept: token m is position m),
    mask True on the word tokens (and the EOT with ``include_eot``; always on the EOT of a caption without words),
    pooled (B, D) = the model's unit ``encode_text``."""
    model = bundle.model
    _text_tower(model)
    ids = bundle.tokenizer(list(texts)) if not isinstance(texts, torch.Tensor) else texts
    ids = ids.to(bundle.device)
    if ids.ndim != 2 or len(ids) == 0:
        raise RClipError(f"give at least one caption; token ids must have shape (B, L), got {tuple(ids.shape)}")
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    project = model.text_projection if isinstance(model.text_projection, nn.Linear) else \
        (lambda h: h @ model.text_projection)
    if model.text_pool_type == "argmax":
        eot = ids.argmax(-1)
    else:
        eot = (ids == model.text_eos_id).int().argmax(-1)
    rows = torch.arange(len(ids), device=ids.device)
    pooled = project(x[rows, eot])
    length = int(eot.max()) + 1
    pos = torch.arange(length, device=ids.device)
    mask = (pos >= 1) & (pos < eot[:, None])
    mask |= (pos == eot[:, None]) & (include_eot | ~mask.any(-1, keepdim=True))
    return token_set(project(x[:, :length]), mask, pooled)


@torch.no_grad()
def encode_image_tokens(bundle, images: torch.Tensor, *, batch_size: int = 256, include_cls: bool = False
                        ) -> TokenFeatures:
    """:func:`image_tokens` of many images (N, 3, S, S), in eval mode and batches, returned on the CPU."""
    return _encode(bundle, images, batch_size, lambda b: image_tokens(bundle, b.to(bundle.device),
                                                                      include_cls=include_cls))


@torch.no_grad()
def encode_text_tokens(bundle, texts: Sequence[str], *, batch_size: int = 512, include_eot: bool = False
                       ) -> TokenFeatures:
    """:func:`text_tokens` of many captions, in eval mode and batches, returned on the CPU (padded to the longest)."""
    return _encode(bundle, list(texts), batch_size, lambda b: text_tokens(bundle, b, include_eot=include_eot))


def _encode(bundle, items, batch_size: int, fn) -> TokenFeatures:
    if len(items) == 0:
        raise RClipError("nothing to encode: the image or caption list is empty")
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        parts = [fn(items[i:i + batch_size]).to("cpu", torch.float32) for i in range(0, len(items), batch_size)]
    finally:
        bundle.model.train(was_training)
    return TokenFeatures.cat(parts)


# ----------------------------------------------------------------------------------------------------------------
# OT distance
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class OTConfig:
    """The OT distance. reg: Sinkhorn ε on the cost 1 - cos (in [0, 2]); max_iter, tol: its stopping rule.
    global_weight: w in d = (1 - w) · OT + w · (1 - global cosine), in [0, 1]."""
    reg: float = 0.1
    max_iter: int = 100
    tol: float = 1e-6
    global_weight: float = 0.0


def ot_distance(x: TokenFeatures, y: TokenFeatures, config: OTConfig | None = None, *, domain: str = "log"
                ) -> torch.Tensor:
    """OT distance between token sets, batched: x tokens (..., N, D), y tokens (..., M, D) with broadcasting batch
    dims -> (...). Uniform marginals over real tokens (padding weighs 0); differentiable in both feature sets.
    domain: where Sinkhorn iterates (:func:`rclip.ot.sinkhorn`); re-matching uses ``"auto"``."""
    cfg = config or OTConfig()
    if not 0 <= cfg.global_weight <= 1:
        raise RClipError(f"global_weight must be in [0, 1]; got {cfg.global_weight}")
    if x.tokens.shape[-1] != y.tokens.shape[-1]:
        raise RClipError(f"feature dims differ: {x.tokens.shape[-1]} vs {y.tokens.shape[-1]}; both sets must be in "
                         "the same joint space")
    differentiable = torch.is_grad_enabled() and (x.tokens.requires_grad or y.tokens.requires_grad)
    if (not differentiable and x.tokens.ndim == y.tokens.ndim >= 4 and x.tokens.shape[-3] == 1
            and x.tokens.shape[:-3] == y.tokens.shape[:-3]):
        # re-matching, one image against its k captions: one product per image, (N, D) x (D, k·M), instead of k
        # broadcast copies of it (the same values; benchmarks/bench_rematch.py times the OT part). Not under
        # autograd: its gradient would be summed in another order than the broadcast product's, and training must
        # not change in the last bit
        k, m = y.tokens.shape[-3:-1]
        cost = 1 - (x.tokens[..., 0, :, :] @ y.tokens.flatten(-3, -2).mT).unflatten(-1, (k, m)).movedim(-2, -3)
    else:
        try:
            cost = 1 - x.tokens @ y.tokens.mT                                  # (..., N, M)
        except RuntimeError:
            raise RClipError(f"the batch dims of {tuple(x.tokens.shape)} and {tuple(y.tokens.shape)} do not "
                             "broadcast") from None
    a, b = _uniform(x.mask, cost.dtype), _uniform(y.mask, cost.dtype)
    distance = sinkhorn(cost, a, b, reg=cfg.reg, max_iter=cfg.max_iter, tol=cfg.tol, domain=domain).cost
    if cfg.global_weight > 0:
        glob = 1 - (x.pooled * y.pooled).sum(-1)
        distance = (1 - cfg.global_weight) * distance + cfg.global_weight * glob
    return distance


def _uniform(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = mask.to(dtype)
    return w / w.sum(-1, keepdim=True)


def candidate_distances(images: TokenFeatures, captions: TokenFeatures, candidates: torch.Tensor,
                        config: OTConfig | None = None, *, batch_size: int = 64, domain: str = "auto"
                        ) -> torch.Tensor:
    """OT distances (B, k) between image i and captions ``candidates[i]`` (B, k), solved ``batch_size`` images
    (i.e. batch_size · k problems) at a time. domain: where Sinkhorn iterates (:func:`rclip.ot.sinkhorn`); the
    default ``"auto"`` uses the kernel domain where the cost range allows it (the same plans as the log domain,
    1.5x faster at re-matching sizes on 2 CPU cores: ``benchmarks/bench_rematch.py``)."""
    candidates = torch.as_tensor(candidates, dtype=torch.long)
    if candidates.ndim != 2 or len(candidates) != len(images):
        raise RClipError(f"candidates must have shape (B, k) with B = {len(images)} images; got "
                         f"{tuple(candidates.shape)}")
    if candidates.numel() and (candidates.min() < 0 or candidates.max() >= len(captions)):
        raise RClipError(f"candidate indices must be in 0..{len(captions) - 1} (the caption pool)")
    out = []
    for lo in range(0, len(images), batch_size):
        rows = slice(lo, lo + batch_size)
        x = images[rows]
        x = TokenFeatures(x.tokens[:, None], x.mask[:, None], x.pooled[:, None])   # (b, 1, N, D)
        out.append(ot_distance(x, captions[candidates[rows]], config, domain=domain))   # vs (b, k, M, D)
    return torch.cat(out) if out else torch.zeros(0, candidates.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# Caption re-matching
# ----------------------------------------------------------------------------------------------------------------

#: Keys per group of the two-level top-k (:func:`topk_similar`): the scan keeps each group's maximum and looks
#: inside only the groups whose maxima can hold a top-k similarity.
TOPK_GROUP = 64


@torch.no_grad()
def topk_similar(queries: torch.Tensor, keys: torch.Tensor, k: int, *, chunk_size: int = 16384,
                 query_batch: int | None = None, check_keys: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k keys most similar (dot product) to each query: values and indices (B, k), best first; among equal
    similarities the lower key index comes first (so which keys are chosen does not depend on the chunk sizes; the
    values may differ in the last bits with the query batch). Not differentiable (a search, not a loss).

    queries: (B, D), keys: (K, D) (unit vectors for cosine). Keys are scanned ``chunk_size`` at a time into one
    reused buffer, so memory is O(query_batch · (chunk_size + k · K / chunk_size)). Within a chunk
    the top-k is found in two levels: the maxima of groups of :data:`TOPK_GROUP` keys, then the elements of the k
    groups with the largest maxima — every top-k element lies in one of them (each of those k maxima is an element,
    so the k-th largest element is at least the k-th largest maximum) — sorted stably. check_keys=False skips the
    NaN/inf check of ``keys`` (a pass over the whole pool) for a caller that checked them once for many calls.
    query_batch: queries per pass over the pool (default: 256 on the CPU — with 16 384 keys a 16 MB buffer — and
    1 024 elsewhere).
    """
    if keys.ndim != 2 or len(keys) == 0:
        raise RClipError(f"the caption pool is empty or not (K, D): got {tuple(keys.shape)}")
    if queries.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise RClipError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be (B, D) and (K, D) "
                         "with the same D")
    if not 1 <= k <= len(keys):
        raise RClipError(f"k={k} candidates must be between 1 and the pool size {len(keys)}")
    if not (queries.is_floating_point() and keys.is_floating_point()):
        raise RClipError(f"queries and keys must be floating point (embeddings); got {queries.dtype} and {keys.dtype}")
    if not (all_finite(queries) and (not check_keys or all_finite(keys))):
        raise RClipError("the global features contain NaN or inf")
    query_batch = (256 if queries.device.type == "cpu" else 1024) if query_batch is None else query_batch
    if chunk_size < 1 or query_batch < 1:
        raise RClipError("chunk_size and query_batch must be >= 1")
    g = TOPK_GROUP
    width = -(-min(chunk_size, len(keys)) // g) * g                  # a chunk, padded to whole groups
    buffer = torch.empty(min(query_batch, len(queries)) * width, dtype=queries.dtype, device=queries.device)
    values, indices = [], []
    for q0 in range(0, len(queries), query_batch):
        q = queries[q0:q0 + query_batch]
        found_v, found_i = [], []                                    # each chunk's top-k, chunks in key order
        for k0 in range(0, len(keys), chunk_size):
            block = keys[k0:k0 + chunk_size].to(q)
            m = len(block)
            padded = -(-m // g) * g
            sims = buffer[:len(q) * padded].view(len(q), padded)     # contiguous, reused: no fresh pages per chunk
            if padded == m:
                torch.mm(q, block.T, out=sims)
            else:
                sims[:, :m] = q @ block.T
                sims[:, m:] = float("-inf")                          # padding never beats a real key
            v, i = _chunk_topk(sims, min(k, m), g)
            found_v.append(v)
            found_i.append(i + k0)
        # one stable sort of every chunk's top-k: among equal values, lower indices (earlier chunks) stay first
        v, order = torch.cat(found_v, 1).sort(dim=1, descending=True, stable=True)
        values.append(v[:, :k])
        indices.append(torch.cat(found_i, 1).gather(1, order[:, :k]))
    return torch.cat(values), torch.cat(indices)


def _chunk_topk(sims: torch.Tensor, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``sims`` (b, m), m a multiple of ``group``: values and column indices, by decreasing
    value and, among equal values, increasing index."""
    b, m = sims.shape
    n_groups = m // group
    if n_groups <= k:                                                 # a small chunk: sort it whole
        v, i = sims.sort(dim=1, descending=True, stable=True)
        return v[:, :k], i[:, :k]
    grouped = sims.view(b, n_groups, group)
    maxima = grouped.amax(-1)                                         # (b, groups)
    chosen = maxima >= maxima.topk(k, dim=1).values[:, -1:]          # every group that may hold a top-k element
    ties = chosen.sum(1, dtype=torch.int32) != k                      # tied maxima at the k-th: sorted whole below
    if ties.any():
        chosen[ties] = False
        chosen[ties, :k] = True                                       # placeholders, overwritten below
    groups = chosen.nonzero()[:, 1].view(b, k)                        # the k groups, ascending
    cand = grouped.gather(1, groups[:, :, None].expand(b, k, group)).view(b, k * group)   # ascending columns
    v, pos = cand.topk(k, dim=1)
    ties |= (cand >= v[:, -1:]).sum(1, dtype=torch.int32) != k        # an equal value just outside the k
    pos, order = pos.sort(dim=1)                                      # equal values: the lower column first
    v, order = v.gather(1, order).sort(dim=1, descending=True, stable=True)
    pos = pos.gather(1, order)
    i = groups.gather(1, pos // group) * group + pos % group
    if ties.any():
        rows = ties.nonzero().flatten()
        sv, si = sims[rows].sort(dim=1, descending=True, stable=True)
        v[rows], i[rows] = sv[:, :k], si[:, :k]
    return v, i


@dataclass
class RematchConfig:
    """k: candidates per image (top-k by global cosine). method: ``"ot"`` (OTCCLIP) or ``"global"`` (RoCLIP's
    nearest neighbour). ot: the OT distance. chunk_size: pool captions scanned at once; batch_size: images per
    batched OT solve (batch_size · k problems)."""
    k: int = 10
    method: str = "ot"
    ot: OTConfig = field(default_factory=OTConfig)
    chunk_size: int = 16384
    batch_size: int = 64


@dataclass
class Rematch:
    """Result of :func:`rematch_captions`. assigned: (B,) caption index per image. candidates: (B, k), by
    decreasing global cosine ``similarity`` (B, k). distance: (B, k) OT distances (None for ``"global"``)."""
    assigned: torch.Tensor
    candidates: torch.Tensor
    similarity: torch.Tensor
    distance: torch.Tensor | None
    method: str


@torch.no_grad()
def rematch_captions(images: TokenFeatures, captions: TokenFeatures, config: RematchConfig | None = None
                     ) -> Rematch:
    """Re-assign each image a caption of the pool: top-k candidates by global cosine, then the one at the
    smallest OT distance (``method="ot"``) or the most similar (``"global"``). Ties go to the more similar one."""
    cfg = config or RematchConfig()
    if cfg.method not in ("ot", "global"):
        raise RClipError(f"method must be 'ot' (OTCCLIP) or 'global' (RoCLIP); got {cfg.method!r}")
    if len(images) == 0:
        raise RClipError("no images to re-match")
    sims, cand = topk_similar(images.pooled, captions.pooled, cfg.k, chunk_size=cfg.chunk_size)
    if cfg.method == "global":
        return Rematch(cand[:, 0].clone(), cand, sims, None, "global")
    dist = candidate_distances(images, captions, cand, cfg.ot, batch_size=cfg.batch_size)
    best = dist.argmin(1)                                 # first minimum = the most similar among equals
    return Rematch(cand.gather(1, best[:, None])[:, 0], cand, sims, dist, "ot")


def rematch_report(assigned: torch.Tensor, describes: Callable[[int, int], bool], *,
                   poisoned: torch.Tensor | None = None, keeps_poison: Callable[[int, int], bool] | None = None,
                   original: torch.Tensor | None = None, candidates: torch.Tensor | None = None) -> dict:
    """Ground-truth quality of a re-matching (image i was assigned caption ``assigned[i]``).

    describes(i, j): is caption j a true description of image i (world: ``spec.matches(scene)``, or
    :meth:`rclip.attacks.poison.PoisonedPairs.describes`). poisoned: (B,) bool, the images of poisoned pairs.
    keeps_poison(i, j): would pairing poisoned image i with caption j still teach the attack (default: not a true
    description). original: (B,) each image's caption before re-matching. candidates: (B, k) each image's
    candidate pool.

    Returns precision (fraction of true assignments) and n; with ``poisoned``, clean_precision, n_poisoned,
    poisoned_broken (fraction of poisoned images whose new caption no longer teaches the attack) and
    poisoned_corrected (fraction given a true caption); with ``original``, changed (fraction re-assigned); with
    ``candidates``, pool_hit (fraction of images with at least one true caption among their candidates: the
    precision an oracle choosing from the same pools would reach).
    """
    assigned = torch.as_tensor(assigned).tolist()
    if not assigned:
        raise RClipError("no assignments to score")
    true = torch.tensor([bool(describes(i, j)) for i, j in enumerate(assigned)])
    report = {"n": len(assigned), "precision": float(true.double().mean())}
    if poisoned is not None:
        poisoned = torch.as_tensor(poisoned, dtype=torch.bool).cpu()
        if len(poisoned) != len(assigned):
            raise RClipError(f"poisoned has {len(poisoned)} entries for {len(assigned)} images")
        keeps = keeps_poison or (lambda i, j: not describes(i, j))
        rows = poisoned.nonzero().flatten().tolist()
        broken = [not keeps(i, assigned[i]) for i in rows]
        report.update(n_poisoned=len(rows),
                      clean_precision=float(true[~poisoned].double().mean()) if (~poisoned).any() else float("nan"),
                      poisoned_broken=float(sum(broken) / len(rows)) if rows else float("nan"),
                      poisoned_corrected=float(true[poisoned].double().mean()) if rows else float("nan"))
    if original is not None:
        original = torch.as_tensor(original).cpu()
        if len(original) != len(assigned):
            raise RClipError(f"original has {len(original)} entries for {len(assigned)} images")
        report["changed"] = float((original != torch.as_tensor(assigned)).double().mean())
    if candidates is not None:
        candidates = torch.as_tensor(candidates).tolist()
        if len(candidates) != len(assigned):
            raise RClipError(f"candidates has {len(candidates)} rows for {len(assigned)} images")
        report["pool_hit"] = sum(any(describes(i, j) for j in row) for i, row in enumerate(candidates)) / len(assigned)
    return report


def rematch_items(assigned: torch.Tensor, describes: Callable[[int, int], bool] | None = None, *,
                  poisoned: torch.Tensor | None = None, keeps_poison: Callable[[int, int], bool] | None = None,
                  candidates: torch.Tensor | None = None) -> dict:
    """Per-item outcomes of a re-matching (image i was assigned caption ``assigned[i]``), in points (0 or 100), so
    that two matchings of the same images can be compared item by item (:func:`rclip.claims.compare`).

    describes(i, j): is caption j true of image i (None: no ground truth, e.g. a web corpus). poisoned: (N,) bool,
    the images of poisoned pairs; keeps_poison(i, j): would pairing poisoned image i with caption j still teach the
    attack. candidates: (N, k) each image's candidate pool.

    Returns ``precision`` (N,) — the assigned caption is true of the image (None without ``describes``);
    ``broken`` (P,) — per poisoned pair, in index order, the new caption no longer teaches the attack (None without
    ``poisoned``); ``pool hit`` (N,) — at least one true caption among the image's candidates (None without
    ``describes`` or ``candidates``); ``poisoned index`` (P,) — the poisoned pairs ``broken`` is about.
    """
    assigned = torch.as_tensor(assigned).tolist()
    if not assigned:
        raise RClipError("no assignments to score")
    out = {"precision": None, "broken": None, "pool hit": None, "poisoned index": None}
    if describes is not None:
        out["precision"] = 100.0 * np.array([bool(describes(i, j)) for i, j in enumerate(assigned)], dtype=float)
    if poisoned is not None:
        poisoned = torch.as_tensor(poisoned, dtype=torch.bool).cpu()
        if len(poisoned) != len(assigned):
            raise RClipError(f"poisoned has {len(poisoned)} entries for {len(assigned)} images")
        if keeps_poison is None:
            if describes is None:
                raise RClipError("poison broken needs keeps_poison (or describes, to read 'not true' as broken)")
            keeps_poison = (lambda i, j: not describes(i, j))  # noqa: E731
        rows = poisoned.nonzero().flatten().tolist()
        out["poisoned index"] = np.array(rows, dtype=int)
        out["broken"] = 100.0 * np.array([not keeps_poison(i, assigned[i]) for i in rows], dtype=float)
    if candidates is not None and describes is not None:
        candidates = torch.as_tensor(candidates).tolist()
        if len(candidates) != len(assigned):
            raise RClipError(f"candidates has {len(candidates)} rows for {len(assigned)} images")
        out["pool hit"] = 100.0 * np.array([any(describes(i, j) for j in row) for i, row in enumerate(candidates)],
                                           dtype=float)
    return out


def restrict(rematch: "Rematch", k: int) -> "Rematch":
    """The re-matching the same model would make with only the ``k`` most similar candidates of each image: the
    first k columns of the pools (they are sorted by decreasing global cosine, so they are exactly the top-k pools),
    the OT choice re-taken among them. Global matching's choice (the first candidate) does not depend on k."""
    if rematch.distance is None:
        raise RClipError("a global re-matching has no OT distances to restrict; re-match with method='ot'")
    if not 1 <= k <= rematch.candidates.shape[1]:
        raise RClipError(f"k={k} must be between 1 and the {rematch.candidates.shape[1]} candidates re-matched; "
                         "re-match with the largest k you need")
    cand, sims, dist = rematch.candidates[:, :k], rematch.similarity[:, :k], rematch.distance[:, :k]
    return Rematch(cand.gather(1, dist.argmin(1, keepdim=True))[:, 0], cand, sims, dist, "ot")


def mixed_choice(rematch: "Rematch", weight: float) -> torch.Tensor:
    """The caption each image of an OT re-matching would get under the mixed distance (1 - w) · OT + w · (1 - global
    cosine), on the same candidate pools: (N,) caption indices. w = 0 is the OT choice, w = 1 the most similar
    candidate (global matching); ties go to the more similar candidate."""
    if rematch.distance is None:
        raise RClipError("a global re-matching has no OT distances to mix; re-match with method='ot'")
    if not 0 <= weight <= 1:
        raise RClipError(f"the global weight must be in [0, 1]; got {weight}")
    mixed = (1 - weight) * rematch.distance + weight * (1 - rematch.similarity)
    return rematch.candidates.gather(1, mixed.argmin(1, keepdim=True))[:, 0]


@torch.no_grad()
def transport_plan(bundle, image: torch.Tensor, caption: str, *, reg: float = 0.1, max_iter: int = 200) -> dict:
    """The OT plan between one caption's words and one image's patches, as the book draws it.

    image: (3, S, S) in [0, 1]. The cost is 1 - cos between the model's word and patch features
    (:func:`text_tokens`, :func:`image_tokens`), the word marginal uniform over real words, the patch marginal
    uniform; the plan is the entropic one (Sinkhorn, ``reg``). Returns ``words`` (W str), ``plan`` (W, P) with each
    word's row normalised to sum 1 (where its mass goes), and ``patch_mass`` (W, gh, gw), the rows on the patch grid.
    """
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        img = image_tokens(bundle, image[None].to(bundle.device))
        ids = bundle.tokenizer([caption])
        txt = text_tokens(bundle, ids)
    finally:
        bundle.model.train(was_training)
    keep = txt.mask[0]
    cost = 1 - txt.tokens[0][keep] @ img.tokens[0].T                                # words x patches
    plan = sinkhorn(cost.float(), None, None, reg=reg, max_iter=max_iter, return_plan=True).plan.cpu()
    plan = plan / plan.sum(1, keepdim=True)
    positions = keep.nonzero().flatten().tolist()
    words = [bundle.tokenizer.decode([int(ids[0, p])]).strip() for p in positions]
    grid = tuple(bundle.model.visual.grid_size)
    return {"words": words, "plan": plan, "patch_mass": plan.reshape(len(words), *grid)}


# ----------------------------------------------------------------------------------------------------------------
# OT alignment objectives
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class AlignmentConfig:
    """Weights of the OT objectives (added to the CLIP loss by the caller), their OT distance and their form.

    objective: ``"contrastive"`` — InfoNCE on negative OT distances (temperature ``temperature``), each set against
    its partner and ``negatives`` other sets of the batch (:func:`ot_contrastive_loss`); ``"distance"`` — the mean
    OT distance of the matched sets alone (:func:`inter_modality_loss`), which has a collapsed minimiser (every
    token the same vector) and, measured, pulls a CLIP trained from scratch there.
    """
    inter_weight: float = 1.0
    image_intra_weight: float = 1.0
    text_intra_weight: float = 1.0
    ot: OTConfig = field(default_factory=OTConfig)
    objective: str = "contrastive"
    negatives: int = 3
    temperature: float = 0.1


def inter_modality_loss(images: TokenFeatures, texts: TokenFeatures, config: OTConfig | None = None
                        ) -> torch.Tensor:
    """Mean OT distance between the patches and word tokens of matched pairs: images and texts (B, ...) -> ()."""
    _same_batch(images, texts, "images", "texts")
    return ot_distance(images, texts, config).mean()


def intra_modality_loss(features: TokenFeatures, augmented: TokenFeatures, config: OTConfig | None = None
                        ) -> torch.Tensor:
    """Mean OT distance between each token set and its augmented version's (images or texts, (B, ...)) -> ()."""
    _same_batch(features, augmented, "features", "augmented")
    return ot_distance(features, augmented, config).mean()


def ot_contrastive_loss(x: TokenFeatures, y: TokenFeatures, config: OTConfig | None = None, *, negatives: int = 3,
                        temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE on OT distances between matched token sets x[i] ↔ y[i] (B sets each), with in-batch
    negatives: the logits of x[i] are -d(x[i], y[i + s]) / temperature for s = 0..m (indices mod B, m =
    min(negatives, B - 1)), those of y[j] are -d(x[j - s], y[j]) / temperature; the target is s = 0. Solves
    B · (m + 1) OT problems, so the cost grows with m, not with B². Returns a scalar."""
    _same_batch(x, y, "x", "y")
    if x.tokens.ndim != 3:
        raise RClipError(f"token sets must be (B, L, D); got {tuple(x.tokens.shape)}")
    if temperature <= 0 or negatives < 0:
        raise RClipError(f"temperature must be > 0 and negatives >= 0; got {temperature}, {negatives}")
    b = len(x)
    m = min(int(negatives), b - 1)
    shifts = torch.arange(m + 1, device=x.tokens.device)
    rows = torch.arange(b, device=x.tokens.device)
    partner = (rows[:, None] + shifts[None]) % b                                   # (B, m + 1)
    xs = TokenFeatures(x.tokens[:, None], x.mask[:, None], x.pooled[:, None])
    d = ot_distance(xs, y[partner], config)                                        # d[i, s] = d(x_i, y_{i+s})
    target = torch.zeros(b, dtype=torch.long, device=d.device)
    by_y = d[(rows[:, None] - shifts[None]) % b, shifts[None].expand(b, -1)]      # d(x_{j-s}, y_j)
    return 0.5 * (F.cross_entropy(-d / temperature, target) + F.cross_entropy(-by_y / temperature, target))


def alignment_losses(images: TokenFeatures, texts: TokenFeatures, images_aug: TokenFeatures | None = None,
                     texts_aug: TokenFeatures | None = None, config: AlignmentConfig | None = None
                     ) -> dict[str, torch.Tensor]:
    """The weighted OT objectives of a batch: ``inter`` (patches ↔ words of matched pairs), ``image_intra``
    (patches ↔ the augmented view's patches), ``text_intra`` (words ↔ the augmented caption's words), each
    unweighted and 0 when its weight is 0 or its augmented input is None, and ``total`` = Σ weight · loss."""
    cfg = config or AlignmentConfig()
    if cfg.objective == "contrastive":
        def term(x, y):
            return ot_contrastive_loss(x, y, cfg.ot, negatives=cfg.negatives, temperature=cfg.temperature)
    elif cfg.objective == "distance":
        def term(x, y):
            _same_batch(x, y, "x", "y")
            return ot_distance(x, y, cfg.ot).mean()
    else:
        raise RClipError(f"objective must be 'contrastive' or 'distance'; got {cfg.objective!r}")
    zero = images.tokens.new_zeros(())
    inter = term(images, texts) if cfg.inter_weight else zero
    image_intra = term(images, images_aug) if cfg.image_intra_weight and images_aug is not None else zero
    text_intra = term(texts, texts_aug) if cfg.text_intra_weight and texts_aug is not None else zero
    total = cfg.inter_weight * inter + cfg.image_intra_weight * image_intra + cfg.text_intra_weight * text_intra
    return {"inter": inter, "image_intra": image_intra, "text_intra": text_intra, "total": total}


def _same_batch(x: TokenFeatures, y: TokenFeatures, xname: str, yname: str) -> None:
    if x.tokens.shape[:-2] != y.tokens.shape[:-2]:
        raise RClipError(f"{xname} and {yname} must be the same batch of pairs: batch shapes "
                         f"{tuple(x.tokens.shape[:-2])} vs {tuple(y.tokens.shape[:-2])}")


# ----------------------------------------------------------------------------------------------------------------
# Re-matching a whole corpus, chunked
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def rematch_corpus(bundle, corpus, config: RematchConfig | None = None, *, image_chunk: int = 1024,
                   text_batch: int = 512) -> Rematch:
    """Re-match every image of ``corpus`` (``__getitems__`` -> images; ``texts``: the caption pool) with a caption of
    the same corpus, in eval mode, with memory bounded by the chunk sizes rather than the corpus size.

    The pool's global text embeddings (N, D) are computed once; then, ``image_chunk`` images at a time, their patch
    tokens and global embeddings, their top-k captions by global cosine (scanning the pool ``config.chunk_size`` at
    a time), the word tokens of just those candidates, and the OT distances (``config.batch_size`` images per
    batched solve). ``method="global"`` skips the token work. Returns a :class:`Rematch` over the whole corpus
    (``distance`` None for global), on the CPU.
    """
    cfg = config or RematchConfig()
    if cfg.method not in ("ot", "global"):
        raise RClipError(f"method must be 'ot' (OTCCLIP) or 'global' (RoCLIP); got {cfg.method!r}")
    texts = list(corpus.texts)
    if not texts:
        raise RClipError("the caption pool is empty")
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        pool = torch.cat([bundle.encode_texts(texts[i:i + text_batch]).float()
                          for i in range(0, len(texts), text_batch)])
        parts = []
        for lo in range(0, len(corpus), image_chunk):
            images = corpus.__getitems__(list(range(lo, min(len(corpus), lo + image_chunk))))["images"]
            feats = encode_image_tokens(bundle, images, batch_size=256) if cfg.method == "ot" else None
            pooled = feats.pooled if feats is not None else bundle.encode_images(images).float().cpu()
            sims, cand = topk_similar(pooled.to(pool.device), pool, cfg.k, chunk_size=cfg.chunk_size,
                                      check_keys=lo == 0)                # the pool is checked once, on the first call
            sims, cand = sims.cpu(), cand.cpu()
            if cfg.method == "global":
                parts.append((cand[:, 0].clone(), cand, sims, None))
                continue
            unique, local = cand.unique(return_inverse=True)             # encode only the candidates
            words = encode_text_tokens(bundle, [texts[j] for j in unique.tolist()], batch_size=text_batch)
            dist = candidate_distances(feats, words, local, cfg.ot, batch_size=cfg.batch_size)
            parts.append((cand.gather(1, dist.argmin(1)[:, None])[:, 0], cand, sims, dist))
    finally:
        bundle.model.train(was_training)
    assigned, cand, sims = (torch.cat([p[i] for p in parts]) for i in range(3))
    dist = None if cfg.method == "global" else torch.cat([p[3] for p in parts])
    return Rematch(assigned, cand, sims, dist, cfg.method)


# ----------------------------------------------------------------------------------------------------------------
# Pre-training
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class OTCCLIPConfig:
    """OTCCLIP's pre-training (our reading of the abstract; every choice is a parameter).

    rematch: re-assign captions by OT during training (False = the ablation "OT losses only"; the matching is still
    computed and recorded at the same epochs). rematch_start: first epoch (0-based) that trains on re-matched pairs;
    rematch_every: epochs between re-matchings. hold: False (default, RoCLIP's schedule, which OTCCLIP builds on) —
    the re-matched pairs are trained on in the re-matching epoch only and the original pairs in the epochs between;
    True — the assignment replaces the pairs until the next re-matching. matching: the candidate pool (k) and the OT distance of the re-matching; ``matching.method`` may be
    ``"global"`` for a global-similarity variant. align: weights of the OT objectives (all 0 = the ablation "OT
    matching only"). augment_scale: crop area range of the augmented view in the image intra-modality term.
    record_candidates: keep every measured epoch's candidate pools in the report (N × k integers per epoch).
    """
    rematch: bool = True
    rematch_start: int = 1
    rematch_every: int = 2
    hold: bool = False
    matching: RematchConfig = field(default_factory=lambda: RematchConfig(k=16, ot=OTConfig(max_iter=50, tol=1e-4)))
    align: AlignmentConfig = field(default_factory=lambda: AlignmentConfig(
        inter_weight=1.0, image_intra_weight=0.5, text_intra_weight=0.5, ot=OTConfig(max_iter=50, tol=1e-4)))
    augment_scale: tuple[float, float] = (0.5, 1.0)
    record_candidates: bool = True


class TokenCLIP(nn.Module):
    """``forward(images in [0, 1], token ids) -> (image TokenFeatures, text TokenFeatures, logit scale)`` of a
    bundle's CLIP: one module for :func:`rclip.train.fit` to wrap in DDP, so every gradient is synchronised."""

    def __init__(self, bundle):
        super().__init__()
        self.model = bundle.model
        self.bundle = bundle

    def forward(self, images: torch.Tensor, ids: torch.Tensor):
        return image_tokens(self.bundle, images), text_tokens(self.bundle, ids), self.model.logit_scale.exp()


class OTCCLIPTrainer(Trainer):
    """OTCCLIP for :func:`rclip.train.fit`: ``loss`` is the batch loss, ``module`` the network it runs through, and
    the hooks re-match captions between epochs (the assignment is part of the checkpointed state)."""

    name = "otcclip"

    def __init__(self, bundle, corpus, schedule, config: OTCCLIPConfig | None = None, rank: int = 0, world: int = 1):
        super().__init__(bundle, corpus, schedule, rank, world)
        self.config = c = config or OTCCLIPConfig()
        if c.rematch_start < 0 or c.rematch_every < 1:
            raise RClipError("rematch_start must be >= 0 and rematch_every >= 1 epoch")
        if c.matching.k > len(corpus):
            raise RClipError(f"k={c.matching.k} candidates exceed the {len(corpus)} captions of the corpus")
        self.module = TokenCLIP(bundle)
        self.assignment = torch.arange(len(corpus))
        self.events: list[dict] = []

    def rematches(self, epoch: int) -> bool:
        """Is ``epoch`` a re-matching epoch of the schedule (whether or not its matching is applied)?"""
        c = self.config
        return epoch >= c.rematch_start and (epoch - c.rematch_start) % c.rematch_every == 0

    def start_epoch(self, epoch: int) -> None:
        if not self.rematches(epoch):
            if not self.config.hold:
                self.assignment = torch.arange(len(self.corpus))
            return
        ot = rematch_corpus(self.bundle, self.corpus, self.config.matching)
        event = {"epoch": epoch, "applied": self.config.rematch, "ot": ot.assigned.clone(),
                 "global": ot.candidates[:, 0].clone()}
        if self.config.record_candidates:
            event["candidates"] = ot.candidates.to(torch.int32)
        self.events.append(event)
        self.assignment = ot.assigned.clone() if self.config.rematch else torch.arange(len(self.corpus))

    def loss(self, net, batch: dict) -> torch.Tensor:
        device = self.bundle.device
        texts = [self.corpus.texts[j] for j in self.assignment[batch["index"]].tolist()]
        images = batch["images"].to(device, non_blocking=True)
        ids = self.bundle.tokenizer(texts).to(device)
        a = self.config.align
        b = len(images)
        gen, rng = self.generators()
        if a.image_intra_weight:                       # the augmented view rides along in the same forward pass
            images = torch.cat([images, augment_images(images, gen, scale=tuple(self.config.augment_scale))])
        if a.text_intra_weight:
            ids = torch.cat([ids, self.bundle.tokenizer(augment_texts(texts, rng)).to(device)])
        img, txt, scale = net(images, ids)
        img, txt = img.to(dtype=torch.float32), txt.to(dtype=torch.float32)
        loss = masked_contrastive(img.pooled[:b], txt.pooled[:b], scale.float(), None, self.rank, self.world)
        if a.inter_weight or a.image_intra_weight or a.text_intra_weight:
            with warnings.catch_warnings():   # the objectives run a fixed, small Sinkhorn budget by design
                warnings.filterwarnings("ignore", message="sinkhorn did not converge", category=RuntimeWarning)
                terms = alignment_losses(img[:b], txt[:b], img[b:] if a.image_intra_weight else None,
                                         txt[b:] if a.text_intra_weight else None, a)
            loss = loss + terms["total"]
        return loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "assignment": self.assignment.clone(), "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.assignment, self.events = state["assignment"].clone(), list(state["events"])

    def report(self) -> dict:
        """Per measured epoch: the caption OT and global matching chose for every image (same candidate pools),
        whether OT's choice was applied, and (optionally) the pools; and the final assignment."""
        return {"events": self.events, "assignment": self.assignment.clone()}


__all__ = ["ot_contrastive_loss", "TokenFeatures", "token_set", "image_tokens", "text_tokens", "encode_image_tokens",
           "encode_text_tokens", "OTConfig", "ot_distance", "candidate_distances", "topk_similar", "RematchConfig",
           "Rematch", "rematch_captions", "rematch_report", "rematch_items", "restrict", "mixed_choice", "transport_plan",
           "AlignmentConfig", "inter_modality_loss", "intra_modality_loss", "alignment_losses", "rematch_corpus",
           "OTCCLIPConfig", "TokenCLIP", "OTCCLIPTrainer"]
