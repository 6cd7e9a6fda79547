"""Linear probes: multinomial logistic regression on fixed features (raw pixels or CLIP embeddings).

Fit with L-BFGS (at most ``iters`` iterations) on the full training set for each L2 strength in a grid, strongest
first, each fit warm-starting the next; the strength with the best validation accuracy (ties: the stronger) is refit
on train + val and scored on test. Features are standardised with the training statistics.

Fits run in float64 on one CPU thread, whatever the caller's thread count: L-BFGS (at most 60 iterations, its
line search making discrete accept/reject decisions) on ill-conditioned features such as raw pixels amplifies the
last-bit differences of a matrix product summed in another order. Measured on the world tasks (1000 training
images each): in float32 a probe's test top-1 moved by 0.5-0.75 points between 1 and 2 threads (raw pixels, count
and texture), in float64 still by 0.25 points (CLIP features, colour x shape); one thread makes it bit-identical.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from rclip.errors import RClipError


def _fit(x: torch.Tensor, y: torch.Tensor, k: int, l2: float, iters: int, init: torch.Tensor | None = None
         ) -> torch.Tensor:
    w = (torch.zeros(x.shape[1] + 1, k, dtype=x.dtype) if init is None else init.clone()).requires_grad_(True)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iters, history_size=10, tolerance_grad=1e-5,
                            tolerance_change=1e-7, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


@contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _correct(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return (xb @ w).argmax(1) == y


def _acc(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * _correct(w, x, y).float().mean().item()


def pooled_pixels(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Raw-pixel features: (N, 3, H, W) images average-pooled to ``size`` x ``size`` and flattened."""
    return F.adaptive_avg_pool2d(images, size).flatten(1)


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                 l2_grid: Sequence[float] = (1e-2, 1e-3, 1e-4), iters: int = 60) -> dict:
    """Top-1 (%) of a linear classifier on features.

    Args:
        train, val, test: (features (N, D) or images (N, 3, H, W), flattened; labels (N,)).
    Returns: ``{"test": acc, "val": best val acc, "l2": chosen strength, "test_correct": (N_test,) bool}``.
    """
    xs = [t[0].reshape(len(t[0]), -1).double() for t in (train, val, test)]
    ys = [t[1].long() for t in (train, val, test)]
    if any(len(x) == 0 for x in xs):
        raise RClipError("linear probe needs non-empty train, val and test sets")
    mean, std = xs[0].mean(0), xs[0].std(0).clamp_min(1e-6)
    xs = [(x - mean) / std for x in xs]
    scores, fits, w = {}, {}, None
    with _one_thread():  # bit-identical whatever the caller's thread count (module docstring)
        for l2 in sorted(l2_grid, reverse=True):  # strongest first, each fit warm-starts the next
            w = fits[l2] = _fit(xs[0], ys[0], num_classes, l2, iters, w)
            scores[l2] = _acc(w, xs[1], ys[1])
        best = max(scores, key=lambda l2: (scores[l2], l2))
        w = _fit(torch.cat(xs[:2]), torch.cat(ys[:2]), num_classes, best, iters, fits[best])
        hits = _correct(w, xs[2], ys[2])
    return {"test": 100.0 * hits.float().mean().item(), "val": scores[best], "l2": best, "test_correct": hits}
