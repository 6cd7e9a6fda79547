"""Image attacks in [0, 1] pixel space against any differentiable ``model(images) -> logits``.

All attacks run in fp32 with autocast disabled (attacks under fp16 autocast are weaker than intended), put the
model in eval mode, and are deterministic under ``seed`` (the random start is drawn on the CPU).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from rclip.errors import RClipError


@contextlib.contextmanager
def _fp32_eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        model.train(was_training)


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """CW margin, summed: max(logit_y - max_{j != y} logit_j, -kappa), to be *minimised* by the attacker."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return torch.clamp(true - other, min=-kappa).sum()


def _check(images: torch.Tensor, eps: float) -> None:
    if eps < 0:
        raise RClipError(f"eps must be non-negative, got {eps}")
    if torch.isnan(images).any():
        raise RClipError("the images contain NaN")
    if images.min() < 0 or images.max() > 1:
        raise RClipError("attacks work on [0, 1] pixels; pass images before normalisation")


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *, steps: int = 10,
        alpha: float | None = None, random_start: bool = True, loss: str = "ce", kappa: float = 0.0,
        seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """L-infinity PGD (Madry et al.): sign-gradient ascent, projected to the eps-ball and [0, 1].

    Args:
        model: [0, 1] pixels (B, 3, H, W) -> logits (B, K).
        images: (N, 3, H, W) in [0, 1]; labels: (N,) true classes.
        eps: radius in [0, 1] pixel units (e.g. 1/255).
        steps: iterations; ``alpha``: step size, default ``eps / 4`` (2.5 eps over 10 steps).
        random_start: start uniformly in the eps-ball.
        loss: ``"ce"`` (cross-entropy, ascended) or ``"margin"`` (the CW margin with ``kappa``, descended).
        seed: seeds the random start.
    Returns: adversarial images (N, 3, H, W), detached, on the input's device.
    """
    _check(images, eps)
    if loss not in ("ce", "margin"):
        raise RClipError(f"unknown PGD loss {loss!r}; use 'ce' or 'margin'")
    if eps == 0 or steps == 0:
        return images.detach().clone()
    alpha = eps / 4 if alpha is None else alpha
    bs = batch_size or len(images)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with _fp32_eval(model):
        for i in range(0, len(images), bs):
            x = images[i:i + bs].detach().float()
            y = labels[i:i + bs].to(x.device)
            adv = x.clone()
            if random_start:
                noise = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
                adv = (x + noise.to(x.device)).clamp(0, 1)
            for _ in range(steps):
                adv.requires_grad_(True)
                logits = model(adv)
                if loss == "ce":
                    objective = F.cross_entropy(logits, y, reduction="sum")
                else:
                    objective = -margin_loss(logits, y, kappa)
                grad, = torch.autograd.grad(objective, adv)
                adv = adv.detach() + alpha * grad.sign()
                adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1)
            out.append(adv.detach())
    return torch.cat(out)
