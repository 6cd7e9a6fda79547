"""Accuracy under attack over a range of budgets, and the world's reference budget."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rclip.attacks.image import pgd
from rclip.zeroshot import accuracy


def pgd_sweep(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps_list: Sequence[float], *,
              steps: int = 10, seed: int = 0, batch_size: int = 128) -> dict[float, float]:
    """Top-1 (%) under L-inf PGD-``steps`` (CE loss, random start, step eps/4) for each eps ([0, 1] units).

    ``eps = 0`` gives the clean accuracy.
    """
    device = next(classifier.buffers()).device
    x, y = images.to(device), labels.to(device)
    out = {}
    for eps in eps_list:
        adv = pgd(classifier, x, y, eps, steps=steps, seed=seed, batch_size=batch_size) if eps > 0 else x
        out[float(eps)] = accuracy(classifier, adv, y)
    return out


def collapse_radius(sweep: dict[float, float], threshold: float = 10.0) -> float | None:
    """The smallest eps > 0 at which one task's accuracy (%) is below ``threshold`` (``None`` if it never is)."""
    return next((eps for eps in sorted(sweep) if eps > 0 and sweep[eps] < threshold), None)


def reference_budget(sweeps: dict[str, dict[float, float]], threshold: float = 10.0) -> float | None:
    """The smallest eps at which *every* task's accuracy is below ``threshold`` percent (``None`` if none is)."""
    eps_values = sorted(set.intersection(*(set(s) for s in sweeps.values())))
    for eps in eps_values:
        if eps > 0 and all(s[eps] < threshold for s in sweeps.values()):
            return eps
    return None


def accuracy_table(defenses: dict[str, nn.Module], inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]
                   ) -> dict[str, dict[str, float]]:
    """Top-1 (%) of every defense (name -> [0, 1] pixels -> logits) on every input set (name -> (images, labels)).

    Returns ``{defense: {input set: accuracy}}``."""
    return {d: {s: accuracy(model, x, y) for s, (x, y) in inputs.items()} for d, model in defenses.items()}
