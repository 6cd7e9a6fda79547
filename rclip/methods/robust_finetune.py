"""Adversarial fine-tuning of CLIP's image encoder: the robust baselines TeCoA, FARE and PMG-AFT.

* **TeCoA** (Mao et al., ICLR 2023): supervised. Minimise the cross-entropy of the zero-shot logits
  ``scale * cos(f_θ(x_adv), w_y)`` against fixed class text embeddings ``w``, where ``x_adv`` is PGD on that same
  loss.
* **FARE** (Schlarmann et al., ICML 2024): unsupervised. Minimise ``‖f_θ(x_adv) - f_orig(x)‖²`` (unnormalised
  embeddings; ``f_orig`` the frozen original encoder), where ``x_adv`` maximises the same distance.
* **PMG-AFT** (Wang et al., CVPR 2024): TeCoA's loss plus two KL terms on the zero-shot class distributions,
  ``CE(p_θ(x_adv), y) + α KL(p_orig(x_adv) ‖ p_θ(x_adv)) + β KL(p_θ(x) ‖ p_θ(x_adv))``: the adversarial
  prediction is pulled toward the frozen pre-trained model's prediction on the same adversarial image (keeping
  its generalisation) and toward the model's own clean prediction. ``x_adv`` is PGD on the cross-entropy, as in
  TeCoA. α = β = 1 here (an assumption: the COLA paper does not restate PMG-AFT's weights).

Only the image encoder is trained; the text tower and temperature stay frozen, so the fine-tuned encoder can be
used with the original class text embeddings (and stacked under COLA or TTC). Training runs through
:func:`rclip.train.fit` (checkpoints, resume, ``torchrun``); the result is cached by its settings.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from rclip.attacks.image import fp32_eval, ascend
from rclip.errors import RClipError
from rclip.train import LossFn, TrainConfig, fit

METHODS = ("tecoa", "fare", "pmg")


@dataclass
class AdvFinetuneConfig:
    """method: ``"tecoa"``, ``"fare"`` or ``"pmg"``. eps / attack_steps / alpha: the inner L-inf PGD ([0, 1] pixel
    units; alpha defaults to eps / 4). pmg_alpha / pmg_beta: PMG-AFT's weights of its KL terms to the pre-trained
    model and to the clean prediction. train: the optimiser schedule (steps, batch, lr ...)."""
    method: str
    eps: float = 4 / 255
    attack_steps: int = 10
    alpha: float | None = None
    pmg_alpha: float = 1.0
    pmg_beta: float = 1.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=500, batch_size=128, lr=1e-5,
                                                                   min_lr=1e-6, warmup_steps=50, weight_decay=1e-4,
                                                                   grad_clip=1.0, ckpt_every=100))


def freeze_all_but_image_encoder(model: torch.nn.Module) -> None:
    """requires_grad only on ``model.visual``."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))


def _generator(seed: int, batch: dict) -> torch.Generator:
    """A random-start generator fixed by the batch (its first index), so a resumed run repeats the same attacks."""
    return torch.Generator().manual_seed(seed * 1_000_003 + int(batch["index"][0]))


def _zero_shot_logits(bundle, class_weights: torch.Tensor):
    """``logits(visual, images)`` -> (B, K) = scale * cos(visual(images), w_k), for any copy of the image encoder."""
    weights = F.normalize(class_weights.float(), dim=-1).to(bundle.device)
    scale = float(bundle.model.logit_scale.detach().exp())

    def logits(visual, images):
        return scale * F.normalize(visual(bundle.normalize(images)), dim=-1) @ weights.T
    return logits


def _ce_adversary(bundle, logits, cfg: AdvFinetuneConfig, seed: int, batch: dict, x, y):
    """x_adv: L-inf PGD on the cross-entropy of the current encoder's zero-shot logits (TeCoA's and PMG's)."""
    with fp32_eval(bundle.model):
        return ascend(lambda a: F.cross_entropy(logits(bundle.model.visual, a), y, reduction="sum"), x, cfg.eps,
                      steps=cfg.attack_steps, alpha=cfg.alpha or cfg.eps / 4, generator=_generator(seed, batch))


def tecoa_step(bundle, class_weights: torch.Tensor, cfg: AdvFinetuneConfig, seed: int = 0) -> LossFn:
    """TeCoA's loss for batches ``{"images", "labels", "index"}``; ``class_weights`` (K, D) unit text embeddings."""
    logits = _zero_shot_logits(bundle, class_weights)

    def loss_fn(visual, batch):
        x = batch["images"].to(bundle.device).float()
        y = batch["labels"].to(bundle.device)
        x_adv = _ce_adversary(bundle, logits, cfg, seed, batch, x, y)
        return F.cross_entropy(logits(visual, x_adv).float(), y)
    return loss_fn


def _kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) ‖ softmax(logits)), averaged over the batch."""
    return F.kl_div(logits.log_softmax(-1), target_logits.log_softmax(-1), log_target=True, reduction="batchmean")


def pmg_step(bundle, class_weights: torch.Tensor, cfg: AdvFinetuneConfig, seed: int = 0) -> LossFn:
    """PMG-AFT's loss for batches ``{"images", "labels", "index"}``, against a frozen copy of the encoder as it is
    now (the pre-trained model); ``class_weights`` (K, D) unit text embeddings."""
    logits = _zero_shot_logits(bundle, class_weights)
    original = copy.deepcopy(bundle.model.visual).eval().requires_grad_(False)

    def loss_fn(visual, batch):
        x = batch["images"].to(bundle.device).float()
        y = batch["labels"].to(bundle.device)
        x_adv = _ce_adversary(bundle, logits, cfg, seed, batch, x, y)
        adv = logits(visual, x_adv).float()
        with torch.no_grad(), fp32_eval(original):
            guide = logits(original, x_adv).float()
        clean = logits(visual, x).float()
        return F.cross_entropy(adv, y) + cfg.pmg_alpha * _kl(guide, adv) + cfg.pmg_beta * _kl(clean, adv)
    return loss_fn


def fare_step(bundle, cfg: AdvFinetuneConfig, seed: int = 0) -> LossFn:
    """FARE's loss for batches ``{"images", "index"}``, against a frozen copy of the encoder as it is now."""
    original = copy.deepcopy(bundle.model.visual).eval().requires_grad_(False)
    alpha = cfg.alpha or cfg.eps / 4

    def loss_fn(visual, batch):
        x = batch["images"].to(bundle.device).float()
        with torch.no_grad(), fp32_eval(original):
            target = original(bundle.normalize(x)).float()
        with fp32_eval(bundle.model):
            x_adv = ascend(lambda a: (bundle.model.visual(bundle.normalize(a)) - target).pow(2).sum(), x,
                           cfg.eps, steps=cfg.attack_steps, alpha=alpha, generator=_generator(seed, batch))
        return (visual(bundle.normalize(x_adv)).float() - target).pow(2).sum(-1).mean()
    return loss_fn


def adversarial_finetune(bundle, dataset, cfg: AdvFinetuneConfig, out_dir: str | Path, *,
                         class_weights: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Fine-tune ``bundle.model.visual`` in place with TeCoA, FARE or PMG-AFT; returns the training log.

    dataset: batches ``{"images" (B, 3, S, S) in [0, 1], "labels" (B,), "index" (B,)}`` via ``__getitems__``
    (e.g. :class:`rclip.world.WorldLabelled`). class_weights: (K, D), required for TeCoA and PMG-AFT.
    """
    if cfg.method not in METHODS:
        raise RClipError(f"unknown adversarial fine-tuning method {cfg.method!r}; choose one of {METHODS}")
    if cfg.method in ("tecoa", "pmg") and class_weights is None:
        raise RClipError(f"{cfg.method} needs class_weights: the (K, D) text embeddings of the training classes")
    freeze_all_but_image_encoder(bundle.model)
    seed = cfg.train.seed
    if cfg.method == "fare":
        step = fare_step(bundle, cfg, seed)
    else:
        step = (tecoa_step if cfg.method == "tecoa" else pmg_step)(bundle, class_weights, cfg, seed)
    log = fit(bundle, dataset, cfg.train, out_dir, step, module=bundle.model.visual, progress=progress,
              desc=cfg.method)
    log["method"] = asdict(cfg)
    return log


def finetuned_clip(bundle, cfg: AdvFinetuneConfig, dataset, data_key: dict, *,
                   class_weights: torch.Tensor | None = None, progress: bool = True):
    """A copy of ``bundle`` fine-tuned with ``cfg``, cached under ``$RCLIP_CACHE/finetuned`` by the base weights,
    the settings and ``data_key`` (what identifies ``dataset``); an interrupted run resumes from its checkpoint.

    Returns ``(bundle, log)``: the fine-tuned bundle (loaded from the cache when it exists) and the training log.
    """
    from rclip.train import train_cached

    def train(run_dir):
        tuned = bundle.copy()
        return tuned, adversarial_finetune(tuned, dataset, cfg, run_dir, class_weights=class_weights,
                                           progress=progress)

    key = {"base": bundle.meta.get("sha256") or bundle.meta.get("name"), "cfg": cfg, "data": data_key}
    tuned, log, _ = train_cached("finetuned", key, train, base=bundle)
    return tuned, log
