"""Pre-training on image-caption pairs, the part every poisoning defense shares: the :class:`Trainer` base (plain
CLIP's symmetric InfoNCE, run by :func:`rclip.train.fit` as its hooks), the schedule :class:`PretrainConfig`, the
image and caption augmentations the defenses draw from seeded generators, and the masked contrastive loss.

The defenses themselves subclass :class:`Trainer`: RoCLIP and SafeCLIP in :mod:`rclip.methods.poison_defenses`,
OTCCLIP in :mod:`rclip.methods.otcclip`. This module imports neither, so they can import it without a cycle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rclip.augment import eda as augment_eda
from rclip.errors import RClipError
from rclip.train import TrainConfig, TrainHooks, _gather_with_grad

# ----------------------------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------------------------


def augment_images(images: torch.Tensor, generator: torch.Generator, *, scale: tuple[float, float] = (0.5, 1.0),
                   flip_p: float = 0.5, jitter: float = 0.2) -> torch.Tensor:
    """Random resized crop (area fraction in ``scale``, reflection padding), horizontal flip and brightness /
    contrast jitter (factors in 1 ± ``jitter``) of [0, 1] images (B, 3, S, S), batched; no hue change or grey-scale,
    because colour is a class of the world. Randomness comes from ``generator`` (CPU)."""
    if images.ndim != 4:
        raise RClipError(f"images must have shape (B, 3, S, S); got {tuple(images.shape)}")
    b = len(images)
    u = torch.rand(b, 6, generator=generator).to(images.device, images.dtype)
    side = (scale[0] + (scale[1] - scale[0]) * u[:, 0]).sqrt()
    flip = torch.where(u[:, 3] < flip_p, -1.0, 1.0).to(images.dtype)
    theta = images.new_zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, 0, 2], theta[:, 1, 2] = (1 - side) * (2 * u[:, 1] - 1), (1 - side) * (2 * u[:, 2] - 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright = (1 + jitter * (2 * u[:, 4] - 1))[:, None, None, None]
    contrast = (1 + jitter * (2 * u[:, 5] - 1))[:, None, None, None]
    mean = out.mean((1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean).mul(bright).clamp(0, 1)


def eda(text: str, rng: np.random.Generator, *, alpha: float = 0.1) -> str:
    """One EDA edit (Wei & Zou 2019) of a caption, as RoCLIP and SafeCLIP use it: one of synonym replacement,
    insertion of a synonym, random swap or random deletion, chosen at random, touching ``alpha`` × (number of
    words) words (at least one); synonyms from the world's lexicon. The operations are :mod:`rclip.augment`'s."""
    return augment_eda(text, rng, n_aug=1, alpha=alpha)[0]


def augment_texts(texts, rng: np.random.Generator, *, alpha: float = 0.1) -> list[str]:
    """:func:`eda` of each caption."""
    return [eda(t, rng, alpha=alpha) for t in texts]


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------

def masked_contrastive(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor | None = None,
                       rank: int = 0, world: int = 1) -> torch.Tensor:
    """Symmetric InfoNCE between unit features a, b (B, D) of this rank, gathered over ranks, restricted to the
    pairs with ``keep`` (B,) True (the others are neither anchors nor negatives). Returns 0 (with a graph) when no
    pair is kept anywhere."""
    keep = torch.ones(len(a), dtype=torch.bool, device=a.device) if keep is None else keep.to(a.device)
    all_a, all_b = _gather_with_grad(a, world), _gather_with_grad(b, world)
    all_keep = _gather_with_grad(keep.float(), world).bool() if world > 1 else keep
    n = len(a)
    rows = torch.arange(n, device=a.device) + rank * n
    logits_ab = scale * a @ all_b.T
    logits_ba = scale * b @ all_a.T
    blocked = ~all_keep[None, :]
    logits_ab, logits_ba = logits_ab.masked_fill(blocked, -1e4), logits_ba.masked_fill(blocked, -1e4)
    if not keep.any():
        return 0.0 * (logits_ab.sum() + logits_ba.sum())
    loss = F.cross_entropy(logits_ab[keep], rows[keep]) + F.cross_entropy(logits_ba[keep], rows[keep])
    return 0.5 * loss


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class PretrainConfig:
    """The schedule every method shares: epochs over the corpus, global batch, AdamW with warm-up + cosine;
    num_workers: DataLoader processes reading the corpus (for corpora read from disk)."""
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    ckpt_every_epochs: int = 1
    num_workers: int = 0

    def steps_per_epoch(self, n: int) -> int:
        if n < self.batch_size:
            raise RClipError(f"the corpus has {n} pairs, fewer than one batch of {self.batch_size}")
        return n // self.batch_size

    def train_config(self, n: int) -> TrainConfig:
        """The :class:`~rclip.train.TrainConfig` for a corpus of ``n`` pairs."""
        spe = self.steps_per_epoch(n)
        return TrainConfig(steps=self.epochs * spe, batch_size=self.batch_size, lr=self.lr, min_lr=self.min_lr,
                           warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                           seed=self.seed, log_every=max(1, spe // 2), ckpt_every=max(1, self.ckpt_every_epochs * spe),
                           num_workers=self.num_workers)


# ----------------------------------------------------------------------------------------------------------------
# Trainers
# ----------------------------------------------------------------------------------------------------------------

class Trainer(TrainHooks):
    """Plain CLIP; the base of every defense. ``loss(net, batch)`` is the loss of one batch of ``corpus``
    (``index`` says which pairs), ``start_epoch(e)`` the work between epochs, ``report()`` what the run measured."""

    name = "clip"
    augment = False

    def __init__(self, bundle, corpus, schedule: PretrainConfig, rank: int = 0, world: int = 1):
        self.bundle, self.corpus, self.schedule, self.rank, self.world = bundle, corpus, schedule, rank, world
        self.steps_per_epoch = schedule.steps_per_epoch(len(corpus))
        self.step, self.epoch_done = 0, -1

    # hooks ----------------------------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        self.step = step
        epoch = step // self.steps_per_epoch
        if epoch != self.epoch_done:
            model = self.bundle.model
            was_training = model.training
            model.eval()
            try:
                self.start_epoch(epoch)
            finally:
                model.train(was_training)
            self.epoch_done = epoch

    def start_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"epoch_done": self.epoch_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_done = int(state["epoch_done"])

    def report(self) -> dict:
        return {}

    # helpers --------------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def generators(self) -> tuple[torch.Generator, np.random.Generator]:
        """This step's (torch, numpy) random generators: a pure function of (seed, step, rank)."""
        key = (self.schedule.seed * 1_000_003 + self.step) * 1009 + self.rank
        return torch.Generator().manual_seed(key), np.random.default_rng(key)

    def inputs(self, batch: dict, texts=None, augment: bool | None = None):
        """(normalised images, token ids) of a batch on the model's device, augmented when asked."""
        device = self.bundle.device
        images = batch["images"].to(device, non_blocking=True)
        texts = list(batch["texts"] if texts is None else texts)
        if self.augment if augment is None else augment:
            gen, rng = self.generators()
            images, texts = augment_images(images, gen), augment_texts(texts, rng)
        return self.bundle.normalize(images), self.bundle.tokenizer(texts).to(device, non_blocking=True)

    def loss(self, net, batch: dict) -> torch.Tensor:
        img, tok = self.inputs(batch)
        img_f, txt_f, scale = net(img, tok)[:3]
        return masked_contrastive(img_f.float(), txt_f.float(), scale.float(), None, self.rank, self.world)


__all__ = ["augment_images", "eda", "augment_texts", "masked_contrastive", "PretrainConfig", "Trainer"]
