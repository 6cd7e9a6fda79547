"""Adaptive attacks: PGD through a randomised defense with expectation over transformation (EOT).

A defense with random views (COLA) changes its logits from call to call; plain PGD on one draw overfits that draw.
EOT-PGD (Athalye et al., 2018) ascends the loss averaged over ``eot`` fresh draws per step, so the perturbation
works against the defense's distribution of views, not one sample of it.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from rclip.attacks.image import ascend, margin_loss, per_batch


def eot_pgd(defense: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *,
            steps: int = 10, alpha: float | None = None, eot: int = 4, loss: str = "ce", kappa: float = 50.0,
            seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """L-inf PGD on the mean loss of ``defense(images, generator)`` over ``eot`` random draws per step.

    defense: [0, 1] pixels (B, 3, H, W) and a ``torch.Generator`` -> logits (B, K), differentiable in the pixels.
    loss: ``"ce"`` (ascend cross-entropy) or ``"margin"`` (descend the CW margin with ``kappa``).
    Returns adversarial images (N, 3, H, W) in the eps-ball, detached; deterministic under ``seed``.
    """
    alpha = eps / 4 if alpha is None else alpha
    start = torch.Generator().manual_seed(seed)

    def attack_batch(x, y, i):
        draws = iter(range(10**9))

        def objective(adv: torch.Tensor) -> torch.Tensor:
            total = 0.0
            for _ in range(eot):
                gen = torch.Generator().manual_seed(seed * 7919 + i * 104729 + next(draws))
                logits = defense(adv, gen)
                total = total + (F.cross_entropy(logits, y, reduction="sum") if loss == "ce"
                                 else -margin_loss(logits, y, kappa))
            return total / eot

        return ascend(objective, x, eps, steps=steps, alpha=alpha, generator=start)

    return per_batch(defense, images, labels, eps if steps else 0.0, batch_size, attack_batch)


