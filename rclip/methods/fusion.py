"""OT fusion of open_clip Vision Transformers: align neurons to an anchor model by optimal transport, then average.

This is the fusion HOT-CLIP uses (its Appendix C.1), after OTFusion (Singh & Jaggi, NeurIPS 2020) and transformer
fusion with OT (Imfeld et al., ICLR 2024). Models are open_clip ``VisionTransformer`` state dicts of one
architecture; every model is aligned to the anchor layer by layer, then every parameter is averaged with the same
weights (the anchor's included: no parameter gets another weight).

**Neurons and cost.** A layer's neurons are the rows of its weight matrix (with the bias appended), taken after
its columns were aligned by the map of the layer that feeds it, and ℓ2-normalised (``features="weights"``, the
paper's choice). The ground cost between neuron ``i`` of a model and neuron ``j`` of the anchor is the squared
Euclidean distance of the unit vectors, ``‖u_i - v_j‖² = 2 - 2 cos`` in [0, 4]. It is **not rescaled** by default
(``cost_scale="none"``), so the soft alignment's τ is in these units; ``cost_scale="max"`` divides each cost matrix
by its maximum (the reference implementation's convention, on which the same τ is softer). Both measures are
uniform. ``features="activations"`` describes neurons instead by their centred activations on a batch of images
(OTFusion's other option; cost 2 - 2 × correlation), which needs the models as modules.

**Maps.** Hard alignment solves the exact OT problem; with uniform measures of equal size its solution is a
permutation (Birkhoff), found by the assignment solver (``scipy.optimize.linear_sum_assignment``). Soft alignment
solves the entropic problem with τ = ``reg`` by log-domain Sinkhorn (:func:`rclip.ot.sinkhorn`). Either plan T
(n × n, mass 1/n per row and column) becomes the aligning map R = T diag(1 / Tᵀ1): every column is divided by its
actual mass (which stays right when Sinkhorn stops before convergence), so each anchor neuron receives a convex
combination of the model's neurons; for a permutation R is the 0/1 permutation matrix. A weight W (out × in) is
aligned as Rₒᵤₜᵀ W Rᵢₙ, a bias or LayerNorm vector as Rᵀ b. All models other than the anchor are aligned at once:
one batched problem per layer. A map whose every column is one-hot (every hard map) is applied by gathering rows
instead of a matrix product; so is a soft map whose columns each carry at most ``tol`` / 2 of their mass off their
largest entry (soft maps between closely related towers carry ~1e-6): moving that mass onto the largest entries
changes the plan by at most ``tol`` in L1, the row-marginal error its Sinkhorn solve was already allowed to stop at.
Any other map is one-hot only to within :data:`ONE_HOT_ULPS` float32 roundings.

**How maps flow through the ViT** (``residual="shared"``, the default)::

    residual stream: one map R_res for the whole stream, solved on a cost that combines everything that writes to
        it or reads from it: the patch embedding's rows (conv1), [class embedding; positional embedding column],
        the LayerNorms, proj's rows, and per block the attention output's and the MLP output's rows (main branches)
        and the Q/K/V and MLP input columns (``residual_passes`` refinements, the inner maps from the previous pass)
    conv1 rows, class / positional embedding, ln_pre, every ln_1 / ln_2, ln_post, proj rows ◄─ R_res
    per block:  Q, K rows (columns by R_res) ─► one shared map R_qk (T_Q = T_K: it cancels inside QKᵀ)
                V rows (columns by R_res) ─► R_v ;  out_proj: columns by R_v, rows by R_res
                c_fc (columns by R_res) ─► R_fc ;  c_proj: columns by R_fc, rows by R_res
    proj columns (the joint embedding space): never permuted

``proj``'s output side is the joint image-text embedding space, so a fused image tower still works with the frozen
text tower its inputs were trained against. Attention heads are matched as wholes by default
(``heads="within"``: a head-to-head plan, then dimension-to-dimension plans inside matched heads), so a hard map
permutes heads and dimensions within heads and, with the one residual map, leaves an aligned model the same
function. The reference implementation's policies are available for comparison: ``heads="cross"`` solves Q/K and V
over all heads' rows at once (cross-head alignment), and ``residual="combine"`` aligns each layer's rows by its own
map and lets the map flowing on be (1 - γ) · branch map + γ · skip map (γ = ``residual_gamma``). When branch and
skip maps disagree, the aligned model then computes a different function.

For a model that is a neuron permutation of the anchor (residual stream, heads, dimensions within heads, MLP
units), hard alignment recovers the permutation exactly with any of these policies, and fusion returns the anchor
(see :func:`permute_visual`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rclip.errors import RClipError
from rclip.ot import CPU_CHUNK_ENTRIES, ConvergenceTally, sinkhorn

ALIGNMENTS = ("hard", "soft", "none")
COST_SCALES = ("none", "max")
SOLVERS = ("rclip", "pot")
RESIDUAL_POLICIES = ("shared", "combine")
HEAD_POLICIES = ("within", "cross")
FEATURES = ("weights", "activations")

_BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
               "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias")
_TOP_KEYS = ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
             "ln_post.weight", "ln_post.bias", "proj")


@dataclass(frozen=True)
class FusionConfig:
    """How models are aligned before they are averaged.

    alignment: ``"hard"`` (exact OT: a permutation per layer), ``"soft"`` (entropic OT, log-domain Sinkhorn) or
        ``"none"`` (plain weight averaging, no alignment).
    reg: τ, the entropic regularisation of soft alignment, in the cost's units (default 8·10⁻², the paper's).
    cost_scale: ``"none"``: the squared distance of unit vectors, in [0, 4]; ``"max"``: divided by its maximum
        per layer (the reference implementation's convention), in [0, 1].
    features: ``"weights"`` (incoming weight vectors) or ``"activations"`` (centred activations on a batch).
    heads: ``"within"`` (heads matched as wholes) or ``"cross"`` (one plan over all heads' rows).
    residual: ``"shared"`` (one map for the stream) or ``"combine"`` (per-layer maps mixed with γ).
    residual_passes: refinements of the shared residual map with the blocks' inner maps (weights only).
    residual_gamma: γ of ``residual="combine"``: the skip map's share of the map flowing on (1 - γ: the branch's).
    with_bias: append the bias to each neuron's incoming weight vector.
    max_iter, tol: Sinkhorn's iteration cap and row-marginal tolerance (L1). A plan stopped by the cap is still
        used: its aligning map divides each column by the column's actual mass. A soft map each of whose columns
        carries at most ``tol`` / 2 of its mass off its largest entry is applied by gathering that entry's row.
    """
    alignment: str = "hard"
    reg: float = 0.08
    cost_scale: str = "none"
    features: str = "weights"
    heads: str = "within"
    residual: str = "shared"
    residual_passes: int = 1
    residual_gamma: float = 0.5
    with_bias: bool = True
    max_iter: int = 500
    tol: float = 1e-5

    def __post_init__(self):
        if self.alignment not in ALIGNMENTS:
            raise RClipError(f"unknown alignment {self.alignment!r}; choose one of {ALIGNMENTS}")
        if self.cost_scale not in COST_SCALES:
            raise RClipError(f"unknown cost_scale {self.cost_scale!r}; choose one of {COST_SCALES}")
        if self.features not in FEATURES:
            raise RClipError(f"unknown neuron features {self.features!r}; choose one of {FEATURES}")
        if self.heads not in HEAD_POLICIES:
            raise RClipError(f"unknown head policy {self.heads!r}; choose one of {HEAD_POLICIES}")
        if self.residual not in RESIDUAL_POLICIES:
            raise RClipError(f"unknown residual policy {self.residual!r}; choose one of {RESIDUAL_POLICIES}")
        if not isinstance(self.residual_passes, int) or self.residual_passes < 0:
            raise RClipError(f"residual_passes must be an integer >= 0; got {self.residual_passes!r}")
        if not 0.0 <= self.residual_gamma <= 1.0:
            raise RClipError(f"residual_gamma must lie in [0, 1]; got {self.residual_gamma}")
        if not (self.reg > 0 and math.isfinite(self.reg)):
            raise RClipError(f"reg (τ) must be a finite number > 0; got {self.reg}")


@dataclass
class FusionResult:
    """What :func:`fuse_visual` returns.

    state: the fused state dict (the architecture's keys, float32 on the input's device).
    maps: layer name -> aligning maps R (K, n, n) of every model (the anchor's is the identity; built when read, so
        treat them as read-only); names are
        ``embed.conv``, ``embed.pos``, ``residual.<stage>`` (the residual stream after a stage), and
        ``block<i>.qk``, ``block<i>.v``, ``block<i>.out``, ``block<i>.fc``, ``block<i>.proj``.
    plans: the same layers' transport plans T (K, n, n) (each row and column carries mass 1/n; None for residual
        maps, which are combinations, not plans).
    weights: the averaging weights used (K,), summing to 1. anchor: the anchor's index.
    ot: the Sinkhorn problems solved for soft plans (:meth:`rclip.ot.ConvergenceTally.summary`: problems,
        not_converged, worst_error); hard plans are exact assignments and count no problems.
    """
    state: dict[str, torch.Tensor]
    maps: Mapping[str, torch.Tensor] = field(default_factory=dict)
    plans: Mapping[str, torch.Tensor | None] = field(default_factory=dict)
    weights: torch.Tensor | None = None
    anchor: int = 0
    ot: dict = field(default_factory=lambda: ConvergenceTally().summary())


# ----------------------------------------------------------------------------------------------------------------
# Transport maps
# ----------------------------------------------------------------------------------------------------------------

def neuron_cost(features: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between ℓ2-normalised neurons: features (K, n, f), anchor (n, f) -> (K, n, n)
    in [0, 4] (``2 - 2 cos``). A zero vector is at distance 2 from everything."""
    a = F.normalize(features, dim=-1)
    b = F.normalize(anchor, dim=-1)
    return (a @ b.mT).mul_(-2).add_(2).clamp_(min=0)          # 2 - 2 cos without two (K, n, n) temporaries


def transport_plans(cost: torch.Tensor, cfg: FusionConfig, solver: str = "rclip",
                    tally: ConvergenceTally | None = None) -> torch.Tensor:
    """Transport plans (K, n, n) for costs (K, n, n) between uniform measures (mass 1/n per neuron).

    ``tally``: where the soft solves' convergence is counted (:class:`rclip.ot.ConvergenceTally`).

    ``solver="rclip"``: hard = each row's cheapest column where those form a permutation, else
    ``scipy.optimize.linear_sum_assignment`` (see :func:`_assignment_plans`), soft = one batched
    :func:`rclip.ot.sinkhorn` call. ``solver="pot"``: POT's ``ot.emd`` / ``ot.sinkhorn(method="sinkhorn_log")``
    one problem at a time on the CPU in float64 (the independent reference, for tests and benchmarks).
    """
    if solver not in SOLVERS:
        raise RClipError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    k, n, m = cost.shape
    if n != m:
        raise RClipError(f"fusion needs layers of equal width; got {n} and {m} neurons")
    if cfg.alignment == "none":
        return torch.eye(n, dtype=cost.dtype, device=cost.device).expand(k, n, n) / n
    if cfg.cost_scale == "max":
        cost = cost / cost.amax((-2, -1), keepdim=True).clamp_min(1e-12)
    if solver == "pot":
        return _pot_plans(cost, cfg)
    if cfg.alignment == "hard":
        return _assignment_plans(cost)
    res = sinkhorn(cost, reg=cfg.reg, max_iter=cfg.max_iter, tol=cfg.tol, return_plan=True, values=False)
    if tally is not None:
        tally.add(res)
    return res.plan.to(cost.dtype)


def _assignment_plans(cost: torch.Tensor) -> torch.Tensor:
    """Exact assignment plans (K, n, n), mass 1/n on each matched pair, for costs (K, n, n).

    Where every row's cheapest column is a different column, those columns are the optimal assignment: any
    assignment pays at least each row's minimum, and this one pays exactly that. Between related models (fine-tunes
    of one model, permuted copies) that holds for most layers and costs one pass over the cost; the other problems
    go to ``scipy.optimize.linear_sum_assignment``."""
    from scipy.optimize import linear_sum_assignment

    k, n, _ = cost.shape
    c = cost.detach()
    best = c.argmin(-1)                                                        # (K, n): each row's cheapest column
    distinct = (best.sort(-1).values.diff(dim=-1) != 0).all(-1) if n > 1 else torch.ones(k, dtype=torch.bool)
    source = best.clone()
    rest = (~distinct).nonzero().flatten()
    if len(rest):
        costs = c[rest].double().cpu().numpy()                                 # one conversion for all of them
        found = np.concatenate(_in_threads(lambda part: [linear_sum_assignment(x)[1] for x in part], costs))
        source[rest] = torch.as_tensor(found, device=source.device)
    plans = torch.zeros_like(cost)
    plans.scatter_(-1, source[..., None], 1.0 / n)
    return plans


def _in_threads(fn, items: np.ndarray) -> list:
    """``fn`` over ``items`` cut into one contiguous part per torch CPU thread, run in threads (scipy's assignment
    solver releases the GIL: 1.9x on 2 cores for fusion's thousands of 64 x 64 head-pair problems); the parts'
    results in order, the same as one call on all of them."""
    parts = [p for p in np.array_split(items, max(1, min(torch.get_num_threads(), len(items) // 64))) if len(p)]
    if len(parts) == 1:
        return [np.asarray(fn(parts[0]))]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(parts)) as pool:
        return [np.asarray(x) for x in pool.map(fn, parts)]


def _pot_plans(cost: torch.Tensor, cfg: FusionConfig) -> torch.Tensor:
    import ot

    n = cost.shape[-1]
    u = np.full(n, 1.0 / n)
    out = []
    for c in cost.detach().double().cpu().numpy():
        if cfg.alignment == "hard":
            out.append(ot.emd(u, u, c, numItermax=10_000_000))
        else:
            out.append(ot.sinkhorn(u, u, c, cfg.reg, method="sinkhorn_log", numItermax=cfg.max_iter,
                                   stopThr=cfg.tol))
    return torch.as_tensor(np.stack(out), dtype=cost.dtype, device=cost.device)


def aligning_map(plan: torch.Tensor) -> torch.Tensor:
    """R = T diag(1 / Tᵀ1): the plan with each column divided by its actual mass (columns sum to 1)."""
    return plan / plan.sum(-2, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)


# ----------------------------------------------------------------------------------------------------------------
# Architecture checks and state dicts
# ----------------------------------------------------------------------------------------------------------------

def visual_state(model) -> dict[str, torch.Tensor]:
    """The image tower's parameters as a detached state dict, from a CLIP bundle, an open_clip CLIP, a
    ``VisionTransformer`` or a state dict."""
    if isinstance(model, dict):
        return {k: v.detach() for k, v in model.items()}
    module = getattr(model, "model", model)          # a CLIPBundle
    module = getattr(module, "visual", module)       # an open_clip CLIP
    if not isinstance(module, nn.Module):
        raise RClipError(f"cannot take an image tower from a {type(model).__name__}; pass a CLIP bundle, an "
                         "open_clip model, its .visual or a state dict")
    return {k: v.detach() for k, v in module.state_dict().items()}


def num_heads(model) -> int | None:
    """Attention heads per block of a CLIP bundle, open_clip CLIP or VisionTransformer (None for a state dict)."""
    module = getattr(getattr(model, "model", model), "visual", getattr(model, "model", model))
    try:
        return int(module.transformer.resblocks[0].attn.num_heads)
    except AttributeError:
        return None


def check_architecture(states: Sequence[dict[str, torch.Tensor]]) -> int:
    """Refuse state dicts that are not one and the same supported open_clip ViT; return its number of blocks."""
    if len(states) < 1:
        raise RClipError("fusion needs at least one model")
    first = states[0]
    blocks = sorted({int(k.split(".")[2]) for k in first if k.startswith("transformer.resblocks.")})
    expected = set(_TOP_KEYS) | {f"transformer.resblocks.{i}.{s}" for i in blocks for s in _BLOCK_KEYS}
    unknown, missing = sorted(set(first) - expected), sorted(expected - set(first))
    if unknown or missing or blocks != list(range(len(blocks))) or not blocks:
        raise RClipError(
            "fusion supports open_clip VisionTransformers with class-token pooling, packed attention and a GELU MLP "
            f"(parameters {', '.join(_TOP_KEYS)} and per block {', '.join(_BLOCK_KEYS)}); this model has "
            f"unsupported parameters {unknown[:4]} and lacks {missing[:4]}")
    for i, s in enumerate(states[1:], start=1):
        if set(s) != set(first):
            diff = sorted(set(s) ^ set(first))
            raise RClipError(f"cannot fuse models of different architectures: model {i} differs from model 0 in "
                             f"its parameters ({diff[:4]}); fuse only towers built from the same config")
        shapes = [f"{k}: {tuple(first[k].shape)} vs {tuple(s[k].shape)}" for k in first if first[k].shape != s[k].shape]
        if shapes:
            raise RClipError(f"cannot fuse models of different architectures: model {i} differs from model 0 in "
                             f"shape ({'; '.join(shapes[:3])}); fuse only towers built from the same config")
    return len(blocks)


def _weights(weights, k: int, device, dtype) -> torch.Tensor:
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=dtype, device=device)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != k:
        raise RClipError(f"{w.numel()} fusion weights for {k} models; give one weight per model")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise RClipError(f"fusion weights must be finite, non-negative and not all zero; got {w.tolist()}")
    return (w / w.sum()).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------------------------

class _Aligner:
    """Solves and records the maps that align a stack of K models (leading dim K) to one anchor."""

    def __init__(self, cfg: FusionConfig, solver: str, heads: int):
        self.cfg, self.solver, self.heads = cfg, solver, heads
        self.maps: dict[str, torch.Tensor] = {}
        self.plans: dict[str, torch.Tensor | None] = {}
        self.ot = ConvergenceTally()

    def solve(self, name: str, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Map R (K, n, n) for neurons described by ``parts``: pairs (features (K, n, f), anchor's (n, f)).

        Each part is ℓ2-normalised on its own and the cost is the mean of the parts' costs (the squared distance
        between the concatenations of the normalised parts, each scaled by 1/√parts), so it stays in [0, 4].
        """
        cost = neuron_cost(*parts[0])
        for f, fa in parts[1:]:
            cost.add_(neuron_cost(f, fa))                    # in place: no cost-sized temporary per part
        return self.solve_cost(name, cost.div_(len(parts)) if len(parts) > 1 else cost)

    def solve_cost(self, name: str, cost: torch.Tensor) -> torch.Tensor:
        """Map R (K, n, n) for a cost (K, n, n); records it and its plan under ``name``."""
        plan = transport_plans(cost, self.cfg, self.solver, self.ot)
        r = self.solved(aligning_map(plan))
        self.plans[name], self.maps[name] = plan, r
        return r

    def solved(self, r: torch.Tensor) -> torch.Tensor:
        """Mark a map made from this aligner's plans with the mass its columns may carry off their largest entries and
        still be gathered (see :func:`_one_hot_columns`): soft plans are solved to a row-marginal error of ``tol``
        (L1), so ``tol`` / 2 per column, which moves at most ``tol`` of the plan's mass; hard plans: none."""
        if self.cfg.alignment == "soft":
            r._rclip_mass_tol = self.cfg.tol / 2
        return r

    def combine(self, name: str, main: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        g = self.cfg.residual_gamma
        r = (1 - g) * main + g * skip
        self.plans[name], self.maps[name] = None, r
        return r

    def features(self, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """Incoming weight vectors (..., n, f), with the bias appended when ``with_bias``."""
        if b is None or not self.cfg.with_bias:
            return w
        return torch.cat([w, b[..., None]], dim=-1)


def rows(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Align the first (neuron) axis after K of x (K, n, ...) by R (K, n, n): Rᵀ x."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    source = _one_hot_columns(r)
    if source is not None:        # a permutation: gather the rows instead of multiplying by a 0/1 matrix
        return torch.gather(flat, 1, source[..., None].expand(-1, -1, flat.shape[-1])).reshape(x.shape)
    return (r.mT @ flat).reshape(x.shape)


def cols(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Align the last (input) axis of x (K, ..., n) by R (K, n, n): x R."""
    source = _one_hot_columns(r)
    if source is not None:
        index = source.reshape(source.shape[0], *([1] * (x.ndim - 2)), -1).expand(*x.shape[:-1], -1)
        return torch.gather(x, -1, index)
    return x @ r


#: A map's column acts as a permutation's when its largest entry is within this many units of R's precision (eps)
#: of 1 and its other entries add up to at most as many: gathering the largest entry's row then differs from
#: multiplying by the column by at most 2 · ONE_HOT_ULPS · eps · max|x| (a few float32 roundings). Hard maps are
#: exact permutations. A soft map solved by fusion allows more: the mass its solve's tolerance covers
#: (:meth:`_Aligner.solved`).
ONE_HOT_ULPS = 4


def _one_hot_columns(r: torch.Tensor) -> torch.Tensor | None:
    """For R each of whose columns is one-hot to within δ, the row index of each column's largest entry (K, n); else
    None. δ is :data:`ONE_HOT_ULPS` units of R's precision, or the mass a soft fusion map may move within its
    solve's tolerance (``R._rclip_mass_tol``, set by :meth:`_Aligner.solved`), whichever is larger. Gathering by it
    gives what multiplying by R gives to within 2 δ max|x| (exactly for a hard map), in O(n) instead of O(n²) per
    vector: column j's gather misses (1 − its peak) of x's row and the off-peak mass. The mass off the largest
    entries is summed apart from them, so that float32's rounding of a column sum near 1 cannot hide it; a map with
    a negative entry is never taken for one-hot. The answer is kept on the tensor (maps are never changed in place),
    so a map used many times is read once."""
    known = getattr(r, "_rclip_one_hot", False)
    if known is not False and getattr(r, "_rclip_one_hot_version", None) == r._version:
        return known
    out = None
    tol = max(ONE_HOT_ULPS * torch.finfo(r.dtype).eps, getattr(r, "_rclip_mass_tol", 0.0))

    def one_hot(peak, off):                   # float64 (..., n): every column's largest entry, the rest of its mass
        return bool(((peak - 1).abs() <= tol).all()) and bool((off <= tol).all())

    first = r[..., 0].double()                # a soft map is almost always refused on its first column, in O(n)
    first_peak = first.amax(-1)
    if one_hot(first_peak, first.sum(-1) - first_peak) and bool(r.amin() >= 0):
        # each row's largest entry (a contiguous reduction); one-hot columns of unit mass make these a permutation,
        # whose inverse names each column's row
        n = r.shape[-1]
        target = r.max(-1).indices
        order = torch.arange(n, device=r.device)
        source = torch.zeros_like(target).scatter_(-1, target, order.expand_as(target))
        if bool((torch.gather(target, -1, source) == order).all()):
            peak = torch.gather(r, -2, source[..., None, :])[..., 0, :]
            # the mass off the peaks, summed without them (float32 resolves it: all its terms are small), a block
            # of columns at a time (no copy of R)
            w = max(1, CPU_CHUNK_ENTRIES // max(1, r[..., 0].numel()))
            off = torch.cat([r[..., :, j:j + w].scatter(-2, source[..., None, j:j + w], 0.0).sum(-2)
                             for j in range(0, n, w)], -1)
            out = source if one_hot(peak.double(), off.double()) else None
    r._rclip_one_hot, r._rclip_one_hot_version = out, r._version
    return out


def _embedding_parts(models, anchor):
    """Per residual dimension: the patch embedding's row and [class embedding; positional embedding column]."""
    k, d = models["conv1.weight"].shape[:2]
    conv = (models["conv1.weight"].reshape(k, d, -1), anchor["conv1.weight"].reshape(d, -1))
    emb = (torch.cat([models["class_embedding"][..., None], models["positional_embedding"].mT], dim=-1),
           torch.cat([anchor["class_embedding"][:, None], anchor["positional_embedding"].T], dim=-1))
    return conv, emb


def _attention_maps(al: _Aligner, models, anchor, i: int, r_in: torch.Tensor, tag: str = ""):
    """Block i's maps (r_qk, r_v), its attention inputs aligned by ``r_in``. Q and K share one map (T_Q = T_K, so
    it cancels in QKᵀ), solved on the rows [W_Q | b_Q | W_K | b_K]; V's map on [W_V | b_V]. ``cfg.heads``:
    ``"cross"`` solves each over all heads' rows at once; ``"within"`` keeps heads whole (see :func:`_head_maps`)."""
    p = f"transformer.resblocks.{i}."
    (wq, wk, wv), (bq, bk, bv) = cols(models[p + "attn.in_proj_weight"], r_in).chunk(3, dim=1), \
        models[p + "attn.in_proj_bias"].chunk(3, dim=1)
    (aq, ak, av), (abq, abk, abv) = anchor[p + "attn.in_proj_weight"].chunk(3), anchor[p + "attn.in_proj_bias"].chunk(3)
    f = al.features
    qk = (torch.cat([f(wq, bq), f(wk, bk)], -1), torch.cat([f(aq, abq), f(ak, abk)], -1))
    v = (f(wv, bv), f(av, abv))
    if al.cfg.heads == "cross":
        return al.solve(f"{tag}block{i}.qk", [qk]), al.solve(f"{tag}block{i}.v", [v])
    return _head_maps(al, f"{tag}block{i}", qk, v, al.heads)


def _head_maps(al: _Aligner, name: str, qk, v, heads: int):
    """Head-respecting maps: heads are matched to heads as wholes, and dimensions to dimensions inside each pair.

    For every pair (head h of model k, head g of the anchor) the Q/K dimensions and the V dimensions are matched
    exactly (dh × dh assignments, one batch); the pair's cost is the mean of the two matched costs; a head-level plan
    (hard or soft) over these H × H costs says which heads correspond. Inside the pairs that carry mass (for soft
    alignment: at least 0.1 % of a head's), the dimensions get their own plans (hard: the assignments; soft: one
    batched Sinkhorn). The plan is the blockwise product T[(h, i), (g, j)] = T_head[h, g] · dh · T_pair(h, g)[i, j],
    so a hard map permutes whole heads (one head order for Q, K and V) and dimensions within them, which leaves
    the attention function unchanged."""
    fqk = qk[0]
    k, d = fqk.shape[:2]
    if d % heads:
        raise RClipError(f"width {d} is not divisible by {heads} heads")
    dh = d // heads
    costs = [_head_pair_costs(x, xa, heads) for x, xa in (qk, v)]
    hard = FusionConfig(**{**vars(al.cfg), "alignment": "hard"})
    exact = [transport_plans(c.reshape(-1, dh, dh), hard, al.solver).reshape(c.shape) for c in costs]
    pair_cost = sum((p * c).sum((-2, -1)) for p, c in zip(exact, costs)) / 2           # (K, H, H)
    head_plan = transport_plans(pair_cost, al.cfg, al.solver, al.ot)
    plans = exact
    if al.cfg.alignment == "soft":
        keep = head_plan >= 1e-3 / heads**2
        plans = []
        for c in costs:
            p = torch.zeros_like(c)
            p[keep] = transport_plans(c[keep], al.cfg, al.solver, al.ot)
            plans.append(p)
    out = []
    for tag, pair_plans in zip(("qk", "v"), plans):
        full_plan = torch.einsum("khg,khgij->khigj", head_plan, pair_plans * dh).reshape(k, d, d)
        al.plans[f"{name}.{tag}"], al.maps[f"{name}.{tag}"] = full_plan, al.solved(aligning_map(full_plan))
        out.append(al.maps[f"{name}.{tag}"])
    al.plans[f"{name}.heads"], al.maps[f"{name}.heads"] = head_plan, al.solved(aligning_map(head_plan))
    return tuple(out)


def _head_pair_costs(x: torch.Tensor, xa: torch.Tensor, heads: int) -> torch.Tensor:
    """Every (head h of model k, anchor head g) pair's dh x dh neuron cost (K, H, H, dh, dh), for neurons x (K, d, f)
    and the anchor's xa (d, f) grouped into ``heads`` heads of dh = d / H rows: cut from the one d x d cost (a single
    matrix product; H x H small products took 10x longer at ViT-B-32's width)."""
    k, d = x.shape[:2]
    dh = d // heads
    return neuron_cost(x, xa).reshape(k, heads, dh, heads, dh).transpose(2, 3).contiguous()


def _mlp_map(al: _Aligner, models, anchor, i: int, r_in: torch.Tensor, tag: str = "") -> torch.Tensor:
    """Block i's MLP-unit map r_fc, the MLP's inputs aligned by ``r_in``."""
    p = f"transformer.resblocks.{i}."
    f = al.features
    return al.solve(f"{tag}block{i}.fc", [(f(cols(models[p + "mlp.c_fc.weight"], r_in), models[p + "mlp.c_fc.bias"]),
                                           f(anchor[p + "mlp.c_fc.weight"], anchor[p + "mlp.c_fc.bias"]))])


def _qkv_rows(w_in: torch.Tensor, r_qk: torch.Tensor, r_v: torch.Tensor) -> torch.Tensor:
    """The packed (K, 3d, ...) Q/K/V rows aligned: Q and K by r_qk, V by r_v."""
    q, k, v = w_in.chunk(3, dim=1)
    return torch.cat([rows(r_qk, q), rows(r_qk, k), rows(r_v, v)], dim=1)


def _align_block_inputs(out, models, i, r_attn_in, r_qk, r_v, r_mlp_in, r_fc):
    """Write block i's aligned Q/K/V (rows by r_qk / r_v, columns by ``r_attn_in``) and MLP input layer (rows by
    r_fc, columns by ``r_mlp_in``) into ``out``."""
    p = f"transformer.resblocks.{i}."
    out[p + "attn.in_proj_weight"] = _qkv_rows(cols(models[p + "attn.in_proj_weight"], r_attn_in), r_qk, r_v)
    out[p + "attn.in_proj_bias"] = _qkv_rows(models[p + "attn.in_proj_bias"], r_qk, r_v)
    out[p + "mlp.c_fc.weight"] = rows(r_fc, cols(models[p + "mlp.c_fc.weight"], r_mlp_in))
    out[p + "mlp.c_fc.bias"] = rows(r_fc, models[p + "mlp.c_fc.bias"])


def align_visual(models: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], n_blocks: int, heads: int,
                 cfg: FusionConfig, solver: str = "rclip", acts=None) -> tuple[dict[str, torch.Tensor], _Aligner]:
    """Align K stacked models (state dict of tensors with a leading K) to ``anchor`` (a state dict) by the
    residual policy ``cfg.residual``; ``acts`` = (stacked, anchor's) :func:`neuron_activations` for
    ``cfg.features="activations"``. Returns the aligned stack and the aligner holding every map and plan."""
    al = _Aligner(cfg, solver, heads)
    if cfg.residual == "combine":
        if acts is not None:
            raise RClipError("activation-based alignment needs residual='shared' (one map for the stream)")
        return _align_combine(al, models, anchor, n_blocks), al
    return _align_shared(al, models, anchor, n_blocks, acts), al


def _align_shared(al: _Aligner, models, anchor, n_blocks: int, acts=None) -> dict[str, torch.Tensor]:
    """One map for the whole residual stream, every reader and writer aligned by it (function-preserving for
    hard alignment with ``heads="within"``).

    From weights, the residual map's cost is the mean over everything that writes or reads the stream: the
    embeddings, ``proj``'s rows, the LayerNorms, and per block the attention output's and MLP output's rows and the
    Q/K/V and MLP input columns (the last four seen through the block's inner maps, from the previous pass;
    ``cfg.residual_passes`` passes). From activations (``acts``: stacked and anchor's, see
    :func:`neuron_activations`), every map is solved on its neurons' activations directly."""
    if acts is not None:
        stack, ref = acts
        r_res = al.solve("residual", [(stack["residual"], ref["residual"])])
        inner = []
        for i in range(n_blocks):
            qk, v = (stack[f"qk{i}"], ref[f"qk{i}"]), (stack[f"v{i}"], ref[f"v{i}"])
            if al.cfg.heads == "cross":
                r_qk, r_v = al.solve(f"block{i}.qk", [qk]), al.solve(f"block{i}.v", [v])
            else:
                r_qk, r_v = _head_maps(al, f"block{i}", qk, v, al.heads)
            inner.append((r_qk, r_v, al.solve(f"block{i}.fc", [(stack[f"fc{i}"], ref[f"fc{i}"])])))
        return _write_shared(models, r_res, inner)
    conv, emb = _embedding_parts(models, anchor)
    ln_keys = [k for k in anchor if ".ln_" in k or k.startswith("ln_")]
    static = [conv, emb, (models["proj"], anchor["proj"]),
              (torch.stack([models[k] for k in ln_keys], -1), torch.stack([anchor[k] for k in ln_keys], -1))]
    r_res, last = al.solve("residual.0", static), "residual.0"
    f = al.features
    inner = None                                          # the inner maps solved with the current r_res, if any
    for t in range(1, al.cfg.residual_passes + 1):
        cost = sum(neuron_cost(x, xa) for x, xa in static)
        inner = []
        for i in range(n_blocks):
            p = f"transformer.resblocks.{i}."
            r_qk, r_v = _attention_maps(al, models, anchor, i, r_res, tag=f"pass{t}.")
            r_fc = _mlp_map(al, models, anchor, i, r_res, tag=f"pass{t}.")
            inner.append((r_qk, r_v, r_fc))
            parts = [
                (f(cols(models[p + "attn.out_proj.weight"], r_v), models[p + "attn.out_proj.bias"]),
                 f(anchor[p + "attn.out_proj.weight"], anchor[p + "attn.out_proj.bias"])),
                (f(cols(models[p + "mlp.c_proj.weight"], r_fc), models[p + "mlp.c_proj.bias"]),
                 f(anchor[p + "mlp.c_proj.weight"], anchor[p + "mlp.c_proj.bias"])),
                (_qkv_rows(models[p + "attn.in_proj_weight"], r_qk, r_v).mT, anchor[p + "attn.in_proj_weight"].T),
                (rows(r_fc, models[p + "mlp.c_fc.weight"]).mT, anchor[p + "mlp.c_fc.weight"].T),
            ]
            cost = cost + sum(neuron_cost(x, xa) for x, xa in parts)   # accumulated block by block
        previous, last = r_res, f"residual.{t}"
        r_res = al.solve_cost(last, cost / (len(static) + 4 * n_blocks))
        if al.cfg.alignment == "hard" and torch.equal(r_res, previous):
            break                                         # a fixed point: this pass's inner maps stay valid
        inner = None
    al.maps["residual"], al.plans["residual"] = r_res, al.plans[last]
    if inner is not None:                                 # keep the fixed point's inner maps under their own names
        for name in [n for n in al.maps if n.startswith(f"pass{t}.")]:
            al.maps[name.split(".", 1)[1]], al.plans[name.split(".", 1)[1]] = al.maps[name], al.plans[name]
    for name in [n for n in al.maps if n.startswith("pass")]:   # the inner maps of the passes
        del al.maps[name], al.plans[name]
    if inner is None:
        inner = [(*_attention_maps(al, models, anchor, i, r_res), _mlp_map(al, models, anchor, i, r_res))
                 for i in range(n_blocks)]
    return _write_shared(models, r_res, inner)


def _write_shared(models, r_res, inner) -> dict[str, torch.Tensor]:
    """Align every tensor by the residual map and each block's (r_qk, r_v, r_fc)."""
    out = {"conv1.weight": rows(r_res, models["conv1.weight"]),
           "class_embedding": rows(r_res, models["class_embedding"]),
           "positional_embedding": cols(models["positional_embedding"], r_res)}
    for key in [k for k in models if ".ln_" in k or k.startswith("ln_")] + ["proj"]:
        out[key] = rows(r_res, models[key])
    for i, (r_qk, r_v, r_fc) in enumerate(inner):
        p = f"transformer.resblocks.{i}."
        _align_block_inputs(out, models, i, r_res, r_qk, r_v, r_res, r_fc)
        out[p + "attn.out_proj.weight"] = rows(r_res, cols(models[p + "attn.out_proj.weight"], r_v))
        out[p + "attn.out_proj.bias"] = rows(r_res, models[p + "attn.out_proj.bias"])
        out[p + "mlp.c_proj.weight"] = rows(r_res, cols(models[p + "mlp.c_proj.weight"], r_fc))
        out[p + "mlp.c_proj.bias"] = rows(r_res, models[p + "mlp.c_proj.bias"])
    return out


@torch.no_grad()
def neuron_activations(visual: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every neuron's activations on a batch, for activation-based alignment: an open_clip VisionTransformer run
    on ``images`` (B, 3, S, S), already normalised. With S_ = B · tokens samples, returns ``residual`` (d, S_ · (L+1):
    the stream after ``ln_pre`` and after each block), and per block i ``qk<i>`` (d, 2 S_: queries and keys),
    ``v<i>`` (d, S_) and ``fc<i>`` (mlp units, S_: after the GELU). Each neuron's activations are centred (each
    part on its own), so the cost 2 - 2 cos of two neurons is 2 - 2 × their correlation over the batch."""
    out: dict[str, list] = {"residual": []}
    hooks = []

    def flat(x):                                   # (..., n) -> (n, samples), centred per neuron
        x = x.reshape(-1, x.shape[-1]).T.float()
        return x - x.mean(-1, keepdim=True)

    def on_stream(_, __, y):
        out["residual"].append(flat(y))

    hooks.append(visual.ln_pre.register_forward_hook(on_stream))
    for i, block in enumerate(visual.transformer.resblocks):
        hooks.append(block.register_forward_hook(on_stream))

        def on_ln1(_, __, y, i=i, attn=block.attn):
            q, k, v = (y @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
            out[f"qk{i}"] = torch.cat([flat(q), flat(k)], dim=-1)
            out[f"v{i}"] = flat(v)

        def on_hidden(_, args, i=i):
            out[f"fc{i}"] = flat(args[0])

        hooks.append(block.ln_1.register_forward_hook(on_ln1))
        hooks.append(block.mlp.c_proj.register_forward_pre_hook(on_hidden))
    was_training = visual.training
    try:
        visual.eval()
        visual(images)
    finally:
        visual.train(was_training)
        for h in hooks:
            h.remove()
    out["residual"] = torch.cat(out["residual"], dim=-1)
    return out


def _align_combine(al: _Aligner, models, anchor, n_blocks: int) -> dict[str, torch.Tensor]:
    """The reference's policy: every layer's rows aligned by its own map; the residual stream's map flowing on is
    (1 - γ) · the branch's map + γ · the skip connection's."""
    out: dict[str, torch.Tensor] = {}
    f = al.features
    conv, emb = _embedding_parts(models, anchor)
    r_conv = al.solve("embed.conv", [conv])
    out["conv1.weight"] = rows(r_conv, models["conv1.weight"])
    r_pos = al.solve("embed.pos", [emb])
    out["class_embedding"] = rows(r_pos, models["class_embedding"])
    out["positional_embedding"] = cols(models["positional_embedding"], r_pos)
    r_res = al.combine("residual.embed", r_conv, r_pos)
    for key in ("ln_pre.weight", "ln_pre.bias"):
        out[key] = rows(r_res, models[key])
    for i in range(n_blocks):
        p = f"transformer.resblocks.{i}."
        for s in ("ln_1.weight", "ln_1.bias"):
            out[p + s] = rows(r_res, models[p + s])
        r_qk, r_v = _attention_maps(al, models, anchor, i, r_res)
        w_o = cols(models[p + "attn.out_proj.weight"], r_v)
        r_o = al.solve(f"block{i}.out", [(f(w_o, models[p + "attn.out_proj.bias"]),
                                          f(anchor[p + "attn.out_proj.weight"], anchor[p + "attn.out_proj.bias"]))])
        out[p + "attn.out_proj.weight"] = rows(r_o, w_o)
        out[p + "attn.out_proj.bias"] = rows(r_o, models[p + "attn.out_proj.bias"])
        r_attn_in, r_res = r_res, al.combine(f"residual.block{i}.attn", r_o, r_res)
        for s in ("ln_2.weight", "ln_2.bias"):
            out[p + s] = rows(r_res, models[p + s])
        r_fc = _mlp_map(al, models, anchor, i, r_res)
        _align_block_inputs(out, models, i, r_attn_in, r_qk, r_v, r_res, r_fc)
        w_p = cols(models[p + "mlp.c_proj.weight"], r_fc)
        r_p = al.solve(f"block{i}.proj", [(f(w_p, models[p + "mlp.c_proj.bias"]),
                                           f(anchor[p + "mlp.c_proj.weight"], anchor[p + "mlp.c_proj.bias"]))])
        out[p + "mlp.c_proj.weight"] = rows(r_p, w_p)
        out[p + "mlp.c_proj.bias"] = rows(r_p, models[p + "mlp.c_proj.bias"])
        r_res = al.combine(f"residual.block{i}.mlp", r_p, r_res)
    for key in ("ln_post.weight", "ln_post.bias", "proj"):
        out[key] = rows(r_res, models[key])           # proj (d, e): its rows are its input side
    return out


def fuse_visual(models: Sequence, weights: Sequence[float] | torch.Tensor | None = None, *, anchor: int = 0,
                cfg: FusionConfig = FusionConfig(), heads: int | None = None, images: torch.Tensor | None = None,
                solver: str = "rclip", device=None, dtype: torch.dtype = torch.float32) -> FusionResult:
    """Fuse K image towers of one architecture: align each to ``models[anchor]``, then average.

    Args:
        models: K CLIP bundles, open_clip CLIPs, VisionTransformers or their state dicts.
        weights: K non-negative averaging weights (normalised to sum 1; default uniform). Every parameter of the
            fused model is Σ_k w_k · (model k aligned to the anchor), the anchor's own weight included.
        anchor: the index of the model the others are aligned to.
        cfg: alignment settings (:class:`FusionConfig`). heads: attention heads per block (read from the models
            when they are modules; required for state dicts). images: (B, 3, S, S) normalised model inputs, for
            ``cfg.features="activations"`` (the models must then be modules). solver: ``"rclip"`` or ``"pot"`` (see
            :func:`transport_plans`).
        device, dtype: where and in which precision to compute (default: the models' device, float32).
    Returns: :class:`FusionResult` with the fused state dict and every layer's maps and plans.
    """
    states = [visual_state(m) for m in models]
    n_blocks = check_architecture(states)
    found = {h for h in (num_heads(m) for m in models) if h is not None}
    if len(found) > 1:
        raise RClipError(f"cannot fuse models of different architectures: attention heads {sorted(found)}")
    if heads is None:
        if not found:
            raise RClipError("give heads= (attention heads per block): state dicts do not say how many there are")
        heads = found.pop()
    elif found and heads not in found:
        raise RClipError(f"heads={heads} contradicts the models, which have {found.pop()} attention heads per block: "
                         f"leave heads out (it is read from the models) or give the true count")
    k = len(states)
    if not 0 <= anchor < k:
        raise RClipError(f"anchor {anchor} is not an index of the {k} models")
    device = torch.device(device) if device is not None else states[anchor]["conv1.weight"].device
    w = _weights(weights, k, device, dtype)
    ref = {n: t.to(device, dtype) for n, t in states[anchor].items()}
    others = [i for i in range(k) if i != anchor]
    fused = {n: w[anchor] * t for n, t in ref.items()}
    maps: Mapping[str, torch.Tensor] = {}
    plans: Mapping[str, torch.Tensor | None] = {}
    if others:
        stack = {n: torch.stack([states[i][n].to(device, dtype) for i in others]) for n in ref}
        if cfg.alignment == "none":
            aligned, al = stack, None
        else:
            acts = None
            if cfg.features == "activations":
                acts = _stacked_activations(models, images, anchor, others, device, dtype)
            aligned, al = align_visual(stack, ref, n_blocks, heads, cfg, solver, acts)
        for n in fused:
            fused[n] = fused[n] + torch.einsum("k,k...->...", w[others], aligned[n])
        if al is not None:
            maps, plans = _WithAnchor(al.maps, anchor, plans=False), _WithAnchor(al.plans, anchor, plans=True)
    return FusionResult(state=fused, maps=maps, plans=plans, weights=w, anchor=anchor,
                        ot=(al.ot if others and al is not None else ConvergenceTally()).summary())


def _stacked_activations(models, images, anchor, others, device, dtype):
    """(stacked activations of ``others``, the anchor's), each model run on the same ``images``."""
    modules = [getattr(getattr(m, "model", m), "visual", getattr(m, "model", m)) for m in models]
    if images is None or not all(isinstance(m, nn.Module) for m in modules):
        raise RClipError("activation-based alignment needs images= (a normalised batch) and the models as CLIP "
                         "bundles, open_clip CLIPs or VisionTransformers, not state dicts")
    acts = [{k: v.to(device, dtype) for k, v in neuron_activations(m, images.to(next(m.parameters()).device)).items()}
            for m in modules]
    return {k: torch.stack([acts[i][k] for i in others]) for k in acts[anchor]}, acts[anchor]


class _WithAnchor(Mapping):
    """Layer name -> the (K, n, n) maps (or plans) of all K models, built when read from the K - 1 solved ones with
    the anchor's own (the identity; for plans, times 1/n) inserted at its index. Stacking every layer's K maps up
    front cost a large 3 072 × 3 072 copy per layer and model, and most callers read a few layers (one that reads
    every layer, such as :func:`self_match_share`, pays what the stacking cost before). Read-only: each read builds a
    fresh tensor, except that the last layer read is kept and returned again to a repeated read."""

    def __init__(self, solved: dict[str, torch.Tensor | None], anchor: int, plans: bool):
        self._solved, self._anchor, self._plans = solved, anchor, plans
        self._last: tuple[str | None, torch.Tensor | None] = (None, None)

    def __getitem__(self, name: str) -> torch.Tensor | None:
        x = self._solved[name]
        last = self._last
        if x is None or last[0] == name:
            return None if x is None else last[1]
        n = x.shape[-1]
        own = torch.eye(n, dtype=x.dtype, device=x.device)[None] * (1.0 / n if self._plans else 1.0)
        full = torch.cat([x[:self._anchor], own, x[self._anchor:]])
        self._last = (name, full)
        return full

    def __contains__(self, name) -> bool:
        return name in self._solved

    def __iter__(self):
        return iter(self._solved)

    def __len__(self) -> int:
        return len(self._solved)


def fuse_clips(bundles: Sequence, weights=None, *, anchor: int = 0, cfg: FusionConfig = FusionConfig(),
               solver: str = "rclip"):
    """Fuse the image towers of K CLIP bundles that share one text tower. Returns (fused bundle, FusionResult).

    The fused bundle is a copy of ``bundles[anchor]`` with the fused image tower; its text tower, temperature and
    preprocessing are the anchor's. Bundles whose text towers differ are refused: an image tower only shares an
    embedding space with the text tower it was trained against.
    """
    if not bundles:
        raise RClipError("fuse_clips needs at least one CLIP bundle")
    ref = {k: v for k, v in bundles[anchor].model.state_dict().items() if not k.startswith("visual.")}
    for i, b in enumerate(bundles):
        other = {k: v for k, v in b.model.state_dict().items() if not k.startswith("visual.")}
        if set(other) != set(ref) or any(other[k].shape != ref[k].shape or not torch.equal(other[k].to(ref[k]),
                                                                                          ref[k]) for k in ref):
            raise RClipError(f"bundle {i} has a different text tower from bundle {anchor}; fused image towers only "
                             "work with the text tower they were trained against (fine-tune image towers with the "
                             "text tower frozen, then fuse them)")
    res = fuse_visual(bundles, weights, anchor=anchor, cfg=cfg, solver=solver)
    fused = bundles[anchor].copy()
    own = fused.model.visual.state_dict()
    fused.model.visual.load_state_dict({k: v.to(own[k]) for k, v in res.state.items()})
    fused.meta = {**fused.meta, "sha256": None, "fused": {"models": len(bundles), "alignment": cfg.alignment}}
    return fused, res


def self_match_share(result: FusionResult, layers: Sequence[str] | None = None) -> float:
    """How much of the alignment is the identity: the mean over the non-anchor models and the given layers (default:
    every recorded map) of trace(R) / n, the share of each anchor neuron's weight that comes from the same-index
    neuron. 1 means no neuron moved (plain averaging would have done the same); about 1/n means unrelated maps."""
    names = list(layers) if layers is not None else [n for n in result.maps if not n.endswith(".heads")]
    others = [i for i in range(len(result.weights)) if i != result.anchor]
    if not names or not others:
        raise RClipError("no maps to measure: fuse at least two models with an alignment other than 'none'")
    vals = [torch.diagonal(result.maps[n][i], dim1=-2, dim2=-1).mean().item() for n in names for i in others]
    return float(np.mean(vals))


# ----------------------------------------------------------------------------------------------------------------
# A functionally identical permuted copy (the test of exactness)
# ----------------------------------------------------------------------------------------------------------------

def permute_visual(state: dict[str, torch.Tensor], heads: int, *, seed: int = 0,
                   within_heads: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A neuron-permuted copy of an image tower that computes exactly the same function.

    Permuted: the residual stream (one permutation everywhere it is read or written), the attention heads (the same
    head order for Q, K, V and the output projection's columns), the dimensions within each head (one permutation
    shared by Q and K, which cancels in QKᵀ, and another for V and the output projection's columns) when
    ``within_heads``, and every block's MLP units. ``proj``'s output side is left alone.

    Returns (permuted state dict, the permutations: ``residual`` and per block ``qk<i>``, ``v<i>``, ``mlp<i>``,
    each mapping new position -> old index).
    """
    n_blocks = check_architecture([state])
    g = torch.Generator().manual_seed(seed)
    d = state["conv1.weight"].shape[0]
    if d % heads:
        raise RClipError(f"width {d} is not divisible by {heads} heads")
    dh = d // heads

    def head_perm(head_order):
        inner = [torch.randperm(dh, generator=g) if within_heads else torch.arange(dh) for _ in range(heads)]
        return torch.cat([head_order[h] * dh + inner[h] for h in range(heads)])

    res = torch.randperm(d, generator=g)
    perms = {"residual": res}
    out = {k: v.clone() for k, v in state.items()}
    out["conv1.weight"] = state["conv1.weight"][res]
    out["class_embedding"] = state["class_embedding"][res]
    out["positional_embedding"] = state["positional_embedding"][:, res]
    for key in ("ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias", "proj"):
        out[key] = state[key][res]
    for i in range(n_blocks):
        p = f"transformer.resblocks.{i}."
        order = torch.randperm(heads, generator=g)
        qk, v = head_perm(order), head_perm(order)
        mlp = torch.randperm(state[p + "mlp.c_fc.weight"].shape[0], generator=g)
        perms.update({f"qk{i}": qk, f"v{i}": v, f"mlp{i}": mlp})
        packed = torch.cat([qk, qk + d, v + 2 * d])
        for s in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.out_proj.bias", "mlp.c_proj.bias"):
            out[p + s] = state[p + s][res]
        out[p + "attn.in_proj_weight"] = state[p + "attn.in_proj_weight"][packed][:, res]
        out[p + "attn.in_proj_bias"] = state[p + "attn.in_proj_bias"][packed]
        out[p + "attn.out_proj.weight"] = state[p + "attn.out_proj.weight"][res][:, v]
        out[p + "mlp.c_fc.weight"] = state[p + "mlp.c_fc.weight"][mlp][:, res]
        out[p + "mlp.c_fc.bias"] = state[p + "mlp.c_fc.bias"][mlp]
        out[p + "mlp.c_proj.weight"] = state[p + "mlp.c_proj.weight"][res][:, mlp]
    return out, perms


def relative_weight_error(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest relative difference, over parameters, of ``state`` from ``reference``:
    max_k ‖state[k] − reference[k]‖ / ‖reference[k]‖ (Frobenius norms; 0 when they are equal)."""
    return max(((state[k].float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
               for k, ref in reference.items())


def permuted_copy_check(bundle, task, configs: dict[str, FusionConfig], *, seed: int = 0) -> dict[str, dict]:
    """Fusion where the answer is known: ``bundle``'s image tower and a randomly neuron-permuted copy of it
    (:func:`permute_visual`: the same function, other weights) are fused with each configuration; a fusion that
    aligns exactly returns the original. Returns ``{row: {"weight_error", "top1"}}`` for the original, the permuted
    copy and each configuration: the largest relative weight error against the original
    (:func:`relative_weight_error`; None for the copy, whose weights are a permutation) and the clean zero-shot
    top-1 (%) on ``task`` (template prompts)."""
    from rclip.zeroshot import evaluate

    state = visual_state(bundle)
    heads = num_heads(bundle)
    permuted, _ = permute_visual(state, heads, seed=seed)
    rows = {"original": {"weight_error": 0.0, "top1": evaluate(bundle, task)["templates"]},
            "permuted copy": {"weight_error": None, "top1": evaluate(bundle.with_visual(permuted), task)["templates"]}}
    for name, cfg in configs.items():
        fused = fuse_visual([state, permuted], cfg=cfg, heads=heads).state
        rows[name] = {"weight_error": relative_weight_error(fused, state),
                      "top1": evaluate(bundle.with_visual(fused), task)["templates"]}
    return rows
