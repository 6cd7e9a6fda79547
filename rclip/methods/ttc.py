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
from rclip.errors import RClipError


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

    def start(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random start δ0 (drawn from the config's seed), the clean embedding f(x) and τ (B,), for one batch x
        of fp32 pixels. Call under ``torch.no_grad()`` and :func:`rclip.attacks.image.fp32_eval`."""
        gen = torch.Generator().manual_seed(self.config.seed)
        f0 = self._embed(x)
        delta0 = ((torch.rand(x.shape, generator=gen) * 2 - 1) * self.config.eps).to(x.device)
        delta0 = (x + delta0).clamp(0, 1) - x
        return delta0, f0, (self._embed(x + delta0) - f0).norm(dim=-1) / f0.norm(dim=-1)

    def counterattack(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The counterattacked images (B, 3, S, S) and τ (B,) per image."""
        cfg = self.config
        x = images.detach().float()
        with torch.enable_grad(), fp32_eval(self.classifier):
            with torch.no_grad():
                delta0, f0, tau = self.start(x)
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


def tau_statistic(classifier: nn.Module, images: torch.Tensor, config: TTCConfig | None = None,
                  batch_size: int = 256) -> torch.Tensor:
    """TTC's τ (B,) of each image: ‖f(x + δ0) − f(x)‖ / ‖f(x)‖ for its random δ0 ~ U[−ε, ε] (the counterattack's
    budget and seed), without the counterattack itself."""
    ttc = TTC(classifier, config or TTCConfig())
    device = next(classifier.buffers()).device
    with torch.no_grad(), fp32_eval(classifier):   # TTC is called batch by batch, each call drawing from its seed
        return torch.cat([ttc.start(x.float().to(device))[2].cpu() for x in images.split(batch_size)])


@dataclass
class TTCSweep:
    """The result of :func:`tune`: one row per candidate setting (mean top-1 over the validation tasks, clean and
    under the attack tuned for, and the share of clean images TTC counterattacks), the chosen setting and the rule
    that chose it."""
    table: "object"       # pandas DataFrame
    chosen: TTCConfig
    chosen_label: str
    rule: str
    tau: dict             # median τ of clean and of attacked validation images, per task


def tune(validation: dict, grid, *, condition: str, tau_quantiles=(None,), tolerance: float = 0.5,
         seed: int = 0) -> TTCSweep:
    """Choose TTC's counterattack budget, steps, step size and τ threshold on validation images.

    validation: task -> (zero-shot classifier, {"clean": (x, y), condition: (x_adv, y), ...}), e.g. from
    :func:`rclip.robustness.transfer_sets` on a validation split — never the test split. grid: dicts with ``eps``
    and ``alpha`` in 1/255 units and ``steps``. tau_quantiles: thresholds to try, each ``None`` (TTC's own 0.2) or
    a quantile q of τ over the clean validation images of all tasks (q = 1 counterattacks every image).
    Rule: the highest mean top-1 under ``condition`` (the attack TTC is meant to withstand); among settings within
    ``tolerance`` points of it, the highest clean top-1. Returns a :class:`TTCSweep`.
    """
    import pandas as pd

    from rclip.zeroshot import correct

    if not validation or not grid:
        raise RClipError("TTC tuning needs validation sets and at least one candidate setting")
    for g in grid:
        if not isinstance(g, dict) or set(g) != {"eps", "steps", "alpha"}:
            raise RClipError(f"each TTC setting to try is a dict of eps, steps and alpha (eps and alpha x 1/255); "
                             f"got {g!r}")
    for task, (_, sets) in validation.items():
        if "clean" not in sets or condition not in sets:
            raise RClipError(f"validation sets of {task} need 'clean' and {condition!r}; got {sorted(sets)}")
    rows, configs, clean_taus, tau_medians = {}, {}, {}, {}
    for g in grid:
        eps, steps, alpha = g["eps"] / 255, int(g["steps"]), g["alpha"] / 255
        base = TTCConfig(eps=eps, steps=steps, alpha=alpha, seed=seed)
        taus = {t: tau_statistic(clf, sets["clean"][0], base) for t, (clf, sets) in validation.items()}
        pooled = torch.cat(list(taus.values()))
        for q in tau_quantiles:
            threshold = TTCConfig.tau_threshold if q is None else (
                float("inf") if q >= 1 else float(torch.quantile(pooled, q)))
            cfg = TTCConfig(eps=eps, steps=steps, alpha=alpha, tau_threshold=threshold, seed=seed)
            label = (f"ε {g['eps']:g}, {steps} × {g['alpha']:g}, τ "
                     + ("0.2 (TTC's)" if q is None else "all" if q >= 1 else f"q{q:g} ({threshold:.3f})"))
            acc = {c: [] for c in ("clean", condition)}
            for t, (clf, sets) in validation.items():
                for c in acc:
                    acc[c].append(100.0 * correct(TTC(clf, cfg), *sets[c]).float().mean().item())
            rows[label] = {"ε (/255)": g["eps"], "steps": steps, "step (/255)": g["alpha"], "τ threshold": threshold,
                           "counterattacked (%)": 100.0 * float((pooled < threshold).float().mean()),
                           "clean": sum(acc["clean"]) / len(acc["clean"]),
                           condition: sum(acc[condition]) / len(acc[condition])}
            configs[label], clean_taus[label] = cfg, taus        # τ depends on the budget and seed, not the threshold
    table = pd.DataFrame(rows).T
    best = table[condition].max()
    near = table[table[condition] >= best - tolerance]
    label = near["clean"].astype(float).idxmax()
    for t, (clf, sets) in validation.items():
        cfg = configs[label]
        tau_medians[t] = {"clean": float(clean_taus[label][t].median()),
                          condition: float(tau_statistic(clf, sets[condition][0], cfg).median())}
    rule = (f"highest mean validation top-1 under {condition}; among settings within {tolerance:g} points of it, "
            f"the highest clean top-1")
    return TTCSweep(table, configs[label], label, rule, tau_medians)
