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
def fp32_eval(model: nn.Module):
    """Run ``model`` in eval mode with autocast off (CPU and CUDA): attacks and evaluation are always fp32."""
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


def check_eps(eps: float) -> float:
    """An ℓ∞ radius in [0, 1] pixel units, or a clear error (NaN, negative, or given in units of 1/255)."""
    eps = float(eps)
    if eps != eps:
        raise RClipError("eps is NaN: give an ℓ∞ radius in [0, 1] pixel units, e.g. 4/255")
    if eps < 0:
        raise RClipError(f"eps must be non-negative, got {eps}")
    if eps > 1:
        raise RClipError(f"eps = {eps:g} is outside [0, 1]: radii are in [0, 1] pixel units; did you mean "
                         f"{eps:g}/255?")
    return eps


def _check(images: torch.Tensor, eps: float, labels: torch.Tensor | None = None,
           num_classes: int | None = None) -> None:
    check_eps(eps)
    if len(images) == 0:
        raise RClipError("no images to attack: the batch is empty")
    if labels is not None and len(labels) != len(images):
        raise RClipError(f"{len(images)} images but {len(labels)} labels")
    if labels is not None and num_classes is not None and len(labels) and \
            (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise RClipError(f"labels must lie in [0, {num_classes - 1}] for a {num_classes}-class model; got "
                         f"{int(labels.min())}..{int(labels.max())}")
    if torch.isnan(images).any():
        raise RClipError("the images contain NaN")
    if images.min() < 0 or images.max() > 1:
        raise RClipError("attacks work on [0, 1] pixels; pass images before normalisation")


def _num_classes(model: nn.Module) -> int | None:
    k = getattr(model, "num_classes", None)
    return int(k) if isinstance(k, int) else None


def per_batch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
              batch_size: int | None, attack_batch) -> torch.Tensor:
    """Validate, then run ``attack_batch(x, y, start) -> adversarial x`` over batches of ``batch_size`` (default:
    all at once) with ``model`` in fp32 eval mode; x is a detached fp32 batch, y its labels on x's device, start
    the batch's offset. Returns the concatenated adversarial images; eps 0 returns a copy of the input.
    """
    _check(images, eps, labels, _num_classes(model))
    if eps == 0:
        return images.detach().clone()
    bs = batch_size or len(images)
    out = []
    with fp32_eval(model):
        for i in range(0, len(images), bs):
            x = images[i:i + bs].detach().float()
            out.append(attack_batch(x, labels[i:i + bs].to(x.device), i).detach())
    return torch.cat(out)


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
    if loss not in ("ce", "margin"):
        raise RClipError(f"unknown PGD loss {loss!r}; use 'ce' or 'margin'")
    alpha = eps / 4 if alpha is None else alpha
    gen = torch.Generator().manual_seed(seed)

    def attack_batch(x, y, _):
        if loss == "ce":
            objective = lambda adv: F.cross_entropy(model(adv), y, reduction="sum")  # noqa: E731
        else:
            objective = lambda adv: -margin_loss(model(adv), y, kappa)  # noqa: E731
        return ascend(objective, x, eps, steps=steps, alpha=alpha, random_start=random_start, generator=gen)

    return per_batch(model, images, labels, eps if steps else 0.0, batch_size, attack_batch)


def ascend(objective, images: torch.Tensor, eps: float, *, steps: int, alpha: float, random_start: bool = True,
           generator: torch.Generator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """The PGD loop for any objective: ``steps`` sign-gradient ascent steps of size ``alpha`` on
    ``objective(adv) -> scalar``, each projected to the L-inf ``eps``-ball around ``images`` and to [0, 1].

    images: one batch (B, 3, H, W) in [0, 1]; the random start (uniform in the ball) is drawn on the CPU from
    ``generator``. ``start``: an explicit starting point instead (e.g. Co-Attack's one-sided start), projected to
    the ball and [0, 1]. Returns the detached adversarial batch. Callers set eval mode / fp32 (see :func:`pgd`).
    """
    x = images.detach()
    adv = x.clone()
    if start is not None:
        adv = (x + (start.detach().to(x.device, x.dtype) - x).clamp(-eps, eps)).clamp(0, 1)
    elif random_start:
        noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
        adv = (x + noise.to(x.device, x.dtype)).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        grad, = torch.autograd.grad(objective(adv), adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1)
    return adv.detach()


def cw(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *, steps: int = 10,
       alpha: float | None = None, kappa: float = 50.0, seed: int = 0,
       batch_size: int | None = None) -> torch.Tensor:
    """The L-infinity "CW" attack of the TTC/COLA protocol: PGD on the CW margin with confidence ``kappa``.

    Not Carlini-Wagner's L2 optimisation: the same projected sign-gradient loop as :func:`pgd`, descending
    ``max(logit_y - max_{j != y} logit_j, -kappa)`` on the classifier's scaled logits. Shapes as in :func:`pgd`.
    """
    return pgd(model, images, labels, eps, steps=steps, alpha=alpha, loss="margin", kappa=kappa, seed=seed,
               batch_size=batch_size)


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *,
         batch_size: int | None = None) -> torch.Tensor:
    """FGSM (Goodfellow et al.): one signed-gradient step of size ``eps`` on the cross-entropy, clipped to [0, 1]."""
    return pgd(model, images, labels, eps, steps=1, alpha=eps, random_start=False, batch_size=batch_size)


def mim(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *, steps: int = 10,
        alpha: float | None = None, decay: float = 1.0, batch_size: int | None = None) -> torch.Tensor:
    """MI-FGSM (Dong et al., 2018): sign steps along an accumulated, L1-normalised gradient (momentum ``decay``).

    ``alpha`` defaults to ``eps / steps``; no random start. Shapes as in :func:`pgd`.
    """
    alpha = eps / max(steps, 1) if alpha is None else alpha

    def attack_batch(x, y, _):
        adv, momentum = x.clone(), torch.zeros_like(x)
        for _ in range(steps):
            adv.requires_grad_(True)
            grad, = torch.autograd.grad(F.cross_entropy(model(adv), y, reduction="sum"), adv)
            grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            momentum = decay * momentum + grad
            adv = adv.detach() + alpha * momentum.sign()
            adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1)
        return adv

    return per_batch(model, images, labels, eps if steps else 0.0, batch_size, attack_batch)


def autoattack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *, steps: int = 100,
               seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """APGD-CE then APGD-DLR (the two untargeted attacks of AutoAttack's protocol in TTC and COLA), worst case.

    Uses torchattacks' maintained APGD. A sample keeps the first adversarial image that fools ``model``; the DLR
    attack runs only on those the CE attack did not fool. DLR needs at least 3 classes. Shapes as in :func:`pgd`.
    """
    import torchattacks

    def attack_batch(x, y, _):
        adv = torchattacks.APGD(model, eps=eps, steps=steps, seed=seed, loss="ce")(x, y)
        with torch.no_grad():
            robust = model(adv).argmax(1) == y
        if robust.any():
            adv[robust] = torchattacks.APGD(model, eps=eps, steps=steps, seed=seed, loss="dlr")(x[robust], y[robust])
        return adv

    return per_batch(model, images, labels, eps, batch_size, attack_batch)
