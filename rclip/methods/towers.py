"""The book's own check of OTFusion's claim: image towers trained from different random initialisations against one
frozen text tower, fused by OT or averaged, and the straight line between them.

OTFusion {Singh & Jaggi, NeurIPS 2020} claims that aligning neurons by optimal transport before averaging fuses
two networks trained from different initialisations far better than averaging their weights as they are. Image
towers only share an embedding space if they were trained against the same text tower, so here two image towers
of the base CLIP's architecture are trained from scratch, LiT-style, against the base's **frozen** text tower
(:func:`independent_tower`: symmetric InfoNCE between the tower's image embeddings and the frozen caption
embeddings, only the image tower trainable), on the same pre-rendered world image-caption pairs, then fused with
:func:`rclip.methods.fusion.fuse_visual` (:func:`fuse_variants`). Every evaluation is per image
(:func:`evaluate`: a :class:`rclip.robustness.Scores` of clean zero-shot correctness), so a claim about them is
decided by :mod:`rclip.claims`. :func:`interpolation_curve` and :func:`barrier` walk the straight line between two
towers' weights (the loss barrier of linear mode connectivity).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from rclip.errors import RClipError
from rclip.methods.fusion import FusionConfig, fuse_visual
from rclip.methods.robust_finetune import freeze_all_but_image_encoder
from rclip.train import LossFn, TrainConfig, fit, train_cached
from rclip.zeroshot import zeroshot_classifier

#: The row name of the plain weight average (:func:`label` of the variant ``"none"``).
AVERAGE = "plain average"
#: The initialisation seeds of the two towers, A and B.
SEEDS = (1, 2)
#: The towers' LiT learning rate (AdamW; fine-tuning after fusion uses a tenth of it).
LR = 1e-3


def variants(reg: float = 0.08) -> dict[str, FusionConfig]:
    """The fusions the chapter compares, by name: plain averaging (``"none"``), OT with neurons described by their
    weights (the paper's choice) or by their activations (OTFusion's other option), hard or soft (Sinkhorn τ =
    ``reg``), and the reference implementation's policies (cross-head alignment, residual maps mixed with γ)."""
    return {"none": FusionConfig("none"),
            "weights, hard": FusionConfig("hard"), "weights, soft": FusionConfig("soft", reg=reg),
            "activations, hard": FusionConfig("hard", features="activations"),
            "activations, soft": FusionConfig("soft", reg=reg, features="activations"),
            "weights, hard, reference policies": FusionConfig("hard", heads="cross", residual="combine")}


def label(variant: str) -> str:
    """The row name of a fusion variant: ``"none"`` -> ``"plain average"``, else ``"OT fusion (<variant>)"``."""
    return AVERAGE if variant == "none" else f"OT fusion ({variant})"


def schedule(steps: int, batch_size: int, lr: float = LR, *, min_lr: float | None = None, seed: int = 0) -> TrainConfig:
    """The LiT schedule of the experiment: AdamW, weight decay 0.1, 10 % warm-up, cosine to ``min_lr``
    (default lr / 100), four checkpoints."""
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 100 if min_lr is None else min_lr,
                       warmup_steps=max(1, steps // 10), weight_decay=0.1, ckpt_every=max(1, steps // 4), seed=seed)


@dataclass(frozen=True)
class TowerConfig:
    """LiT-style training of an image tower from scratch against the base's frozen text tower.

    pairs: pre-rendered world image-caption pairs (train split, ``data_seed``), reused for every tower; the loss
    is symmetric InfoNCE between the tower's embeddings and the captions' frozen text embeddings at the base's
    temperature. train: the schedule (``train.seed`` is not used: each tower's seed sets its initialisation and
    data order)."""
    pairs: int = 4096
    resolution: int = 64
    data_seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, batch_size=64, lr=1e-3, min_lr=1e-5,
                                                                   warmup_steps=40, weight_decay=0.1, ckpt_every=100))


class _FrozenTextPairs(torch.utils.data.Dataset):
    """Pre-rendered images with their captions' frozen text embeddings: batches {"images", "text", "index"}."""

    def __init__(self, images: torch.Tensor, text: torch.Tensor):
        self.images, self.text = images, text

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return {"images": self.images[idx], "text": self.text[idx], "index": idx}


def _lit_pairs(base, cfg: TowerConfig) -> _FrozenTextPairs:
    """The experiment's pre-rendered pairs (the artefact cache's ``corpora``, :func:`rclip.data.pairs.cached_corpus`:
    rendered once, checksummed, read back bit for bit) with their captions' frozen text embeddings."""
    from rclip import world
    from rclip.data.pairs import cached_corpus

    pairs = world.WorldPairs(cfg.pairs, split="train", resolution=cfg.resolution, seed=cfg.data_seed)
    corpus = cached_corpus(pairs, {"kind": "world_pairs", "n": cfg.pairs, "split": "train",
                                   "resolution": cfg.resolution, "seed": cfg.data_seed})
    return _FrozenTextPairs(corpus.images(), base.encode_texts(corpus.texts))


def lit_step(bundle) -> LossFn:
    """Symmetric InfoNCE between image embeddings and frozen caption embeddings, at the bundle's temperature."""
    scale = float(bundle.model.logit_scale.detach().exp())

    def loss_fn(visual, batch):
        img = F.normalize(visual(bundle.normalize(batch["images"].to(bundle.device))).float(), dim=-1)
        logits = scale * img @ batch["text"].to(bundle.device).float().T
        labels = torch.arange(len(img), device=img.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return loss_fn


def independent_tower(base, seed: int, cfg: TowerConfig = TowerConfig(), *, progress: bool = False):
    """An image tower of the base's architecture from a fresh random initialisation (``seed``), trained against
    the base's frozen text tower; cached under ``$RCLIP_CACHE/towers``. Returns (bundle, training log)."""
    arch = base.meta.get("model_cfg")
    if not arch:
        raise RClipError("the base bundle carries no model config; load it with rclip.models.load")

    def init():
        import open_clip

        torch.manual_seed(seed)
        return open_clip.model.CLIP(**arch).visual.state_dict()

    key = {"base": base.meta.get("sha256") or base.meta.get("name"), "seed": seed, "cfg": asdict(cfg)}
    tower, log = _lit_trained(base, init, cfg, replace(cfg.train, seed=seed), key, f"tower {seed}", progress)
    tower.meta["tower_seed"] = seed
    return tower, log


def tune_tower(base, state: dict, key: dict, cfg: TowerConfig, train: TrainConfig, *, progress: bool = False):
    """Continue LiT training of image tower ``state`` (e.g. a fused one) for ``train.steps`` steps on the pairs of
    ``cfg``; cached by ``key`` (what made ``state``) and the schedule. Returns (bundle, training log)."""
    return _lit_trained(base, lambda: state, cfg, train, {"tuned": key, "cfg": asdict(cfg), "train": asdict(train)},
                        "tuning", progress)


def tune_fused(base, state: dict, seeds: Sequence[int], cfg: TowerConfig, fusion: FusionConfig, train: TrainConfig):
    """:func:`tune_tower` for the fusion (``fusion``) of the towers of ``seeds``: the bundle after ``train``."""
    key = {"towers": list(seeds), "tower_cfg": str(cfg), "fusion": str(fusion)}
    return tune_tower(base, state, key, cfg, train)[0]


def _lit_trained(base, init, cfg: TowerConfig, train: TrainConfig, key: dict, desc: str, progress: bool):
    """A copy of ``base`` whose image tower starts from ``init()`` and is trained by :func:`lit_step`; cached."""
    def run(run_dir):
        tower = base.with_visual(init())
        freeze_all_but_image_encoder(tower.model)
        return tower, fit(tower, _lit_pairs(base, cfg), train, run_dir, lit_step(tower), module=tower.model.visual,
                          progress=progress, desc=desc)

    tower, log, _ = train_cached("towers", key, run, base=base, part="visual")
    return tower, log


def activation_images(bundle, n: int = 64, *, resolution: int, seed: int = 0) -> torch.Tensor:
    """``n`` normalised world images (validation split) on which ``features="activations"`` describes neurons."""
    from rclip import world

    batch = world.WorldPairs(n, split="val", resolution=resolution, seed=seed).__getitems__(list(range(n)))
    return bundle.normalize(batch["images"]).to(bundle.device)


def fuse_variants(a, b, configs: dict[str, FusionConfig], images: torch.Tensor | None = None):
    """Fuse towers ``a`` and ``b`` (bundles) with every configuration, B the anchor, equal weights.

    Returns ``(fused, aligned)``: ``fused`` maps each variant to its :class:`rclip.methods.fusion.FusionResult`;
    ``aligned`` maps each variant with an alignment to tower A aligned to B *alone* (weights 1, 0: A's function if
    the alignment preserves it), as a state dict."""
    fused, aligned = {}, {}
    for name, cfg in configs.items():
        fused[name] = fuse_visual([a, b], anchor=1, cfg=cfg, images=images)
        if cfg.alignment != "none":
            aligned[name] = fuse_visual([a, b], [1, 0], anchor=1, cfg=cfg, images=images).state
    return fused, aligned


@torch.no_grad()
def _logits(bundle, task) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot logits (N, K) of ``bundle`` (template prompts) on ``task``'s clean images, and the labels (CPU)."""
    x, y = task.tensors()
    clf = zeroshot_classifier(bundle, task)
    return torch.cat([clf(x[i:i + 256].to(bundle.device)).float().cpu() for i in range(0, len(x), 256)]), y.cpu()


def zeroshot_loss_accuracy(bundle, tasks: dict) -> dict[str, float]:
    """Mean over ``tasks`` of the zero-shot cross-entropy (nats) and top-1 (%) of ``bundle`` (template prompts)."""
    losses, accs = [], []
    for task in tasks.values():
        logits, y = _logits(bundle, task)
        losses.append(F.cross_entropy(logits, y).item())
        accs.append(100.0 * (logits.argmax(-1) == y).float().mean().item())
    return {"loss": float(np.mean(losses)), "top1": float(np.mean(accs))}


def evaluate(models: dict, tasks: dict, *, condition: str = "clean"):
    """Per-image clean zero-shot correctness of every model (name -> bundle) on every task, and its zero-shot loss
    (nats, mean over the tasks). Returns ``(scores, losses)``: a :class:`rclip.robustness.Scores` and
    ``{model: loss}``."""
    from rclip.robustness import Scores

    scores = Scores({t: task.num_classes for t, task in tasks.items()}, clean=condition)
    losses = {}
    for name, bundle in models.items():
        per_task = []
        for t, task in tasks.items():
            logits, y = _logits(bundle, task)
            scores.add(name, t, condition, logits.argmax(-1) == y)
            per_task.append(F.cross_entropy(logits, y).item())
        losses[name] = float(np.mean(per_task))
    return scores, losses


def pooled_top1(scores, model: str, condition: str = "clean") -> float:
    """Top-1 (%) of ``model`` over every item of every task of ``scores`` (items pooled)."""
    return float(scores.items(model, condition, scores.tasks).mean())


def relative_top1(scores, model: str, reference: str, condition: str = "clean") -> float | None:
    """Pooled top-1 of ``model`` as a percentage of ``reference``'s (None when the reference gets nothing right)."""
    ref = pooled_top1(scores, reference, condition)
    return None if ref == 0 else 100.0 * pooled_top1(scores, model, condition) / ref


def table(scores, losses: dict[str, float], aligned: dict[str, float] | None = None):
    """The experiment's table: per model its mean zero-shot loss, its top-1 over the pooled test images and, for
    OT variants, the top-1 of tower A aligned to B alone (``aligned``: model name -> top-1)."""
    import pandas as pd

    rows = {m: {"zero-shot loss": losses[m], "top-1, pooled (%)": pooled_top1(scores, m),
                "A aligned, alone (%)": (aligned or {}).get(m, float("nan"))} for m in scores.models}
    return pd.DataFrame(rows).T


def interpolate(a: dict, b: dict, lam: float) -> dict:
    """(1 - λ) a + λ b, parameter by parameter."""
    return {k: (1 - lam) * a[k].float() + lam * b[k].float() for k in a}


def interpolation_curve(base, a: dict, b: dict, tasks: dict, lambdas: Sequence[float]) -> list[dict]:
    """Zero-shot loss and top-1 of the image towers on the straight line from ``a`` (λ = 0) to ``b`` (λ = 1), each
    used with the base's text tower. Returns [{"mix" (λ), "loss", "top1"}, ...]."""
    probe = base.copy()
    out = []
    for lam in lambdas:
        probe.model.visual.load_state_dict(interpolate(a, b, float(lam)))
        out.append({"mix": float(lam), **zeroshot_loss_accuracy(probe, tasks)})
    return out


def barrier(curve: list[dict], key: str = "loss") -> float:
    """Loss barrier max_λ L(λ) - ((1 - λ) L(0) + λ L(1)) of an interpolation curve (for top-1 pass key="top1":
    the largest drop below the straight line between the end points, as a positive number)."""
    lo, hi = curve[0][key], curve[-1][key]
    gaps = [p[key] - ((1 - p["mix"]) * lo + p["mix"] * hi) for p in curve]
    return float(max(gaps) if key == "loss" else -min(gaps))


def barriers(curves: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """The loss barrier (nats) and top-1 barrier (points) of each named curve."""
    return {k: {"loss barrier (nats)": barrier(c, "loss"), "top-1 barrier (points)": barrier(c, "top1")}
            for k, c in curves.items()}
