"""TTC, test-time counterattacks (Xing et al., CVPR 2025): the test-time defense COLA compares against.

Before classifying x, TTC pushes it *away* from its own embedding with a small PGD "counterattack" and classifies
the result. An adversarial image is a point where the embedding is unusually insensitive to random noise, which TTC
measures with τ = ‖f(x + δ0) - f(x)‖ / ‖f(x)‖ for a random δ0; only images with τ below a threshold get the
counterattack, the rest keep δ0. The settings follow TTC's paper (the book page *Settings the papers leave open*):
δ0 ~ U[-4/255, 4/255], two sign-ascent steps of 1/255 on ‖f(x + δ) - f(x)‖² within 4/255, τ threshold 0.2, and δ =
Σ_k softmax(β k)_k δ_k over the steps k = 1..K with β = 2 (weights that favour the later steps; our reading of the
protocol).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rclip.attacks.image import fp32_eval


@dataclass
class TTCConfig:
    eps: float = 4 / 255        # counterattack budget, [0, 1] pixel units
    steps: int = 2
    alpha: float = 1 / 255      # step size
    tau_threshold: float = 0.2  # below it the input is judged adversarial and counterattacked
    beta: float = 2.0
    seed: int = 0


class TTC(nn.Module):
    """[0, 1] pixels (B, 3, S, S) -> logits (B, K) of the counterattacked images, for a zero-shot classifier with
    ``features`` (unit image embeddings) and ``forward`` (logits), e.g. :class:`rclip.zeroshot.ZeroShotClassifier`.
    The counterattack needs gradients, so TTC runs them even when called under ``torch.no_grad()``."""

    def __init__(self, classifier: nn.Module, config: TTCConfig | None = None):
        super().__init__()
        self.classifier = classifier
        self.config = config or TTCConfig()

    @property
    def num_classes(self) -> int | None:
        return getattr(self.classifier, "num_classes", None)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        clf = self.classifier
        return clf.clip.encode_image(clf.normalize(images), normalize=False)

    def counterattack(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The counterattacked images (B, 3, S, S) and τ (B,) per image."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        x = images.detach().float()
        with torch.enable_grad(), fp32_eval(self.classifier):
            with torch.no_grad():
                f0 = self._embed(x)
                delta0 = ((torch.rand(x.shape, generator=gen) * 2 - 1) * cfg.eps).to(x.device)
                delta0 = (x + delta0).clamp(0, 1) - x
                tau = (self._embed(x + delta0) - f0).norm(dim=-1) / f0.norm(dim=-1)
            delta, steps = delta0, []
            for _ in range(cfg.steps):
                delta = delta.detach().requires_grad_(True)
                loss = (self._embed(x + delta) - f0).pow(2).sum()
                grad, = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + cfg.alpha * grad.sign()).clamp(-cfg.eps, cfg.eps)
                delta = (x + delta).clamp(0, 1) - x
                steps.append(delta)
        weights = torch.softmax(cfg.beta * torch.arange(1, cfg.steps + 1, dtype=x.dtype), 0).to(x.device)
        counter = sum(w * d for w, d in zip(weights, steps)) if steps else delta0
        attacked = (tau < cfg.tau_threshold).view(-1, 1, 1, 1)
        return (x + torch.where(attacked, counter, delta0)).clamp(0, 1), tau

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        countered, _ = self.counterattack(images)
        with torch.no_grad():
            return self.classifier(countered)
