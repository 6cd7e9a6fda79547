"""Zero-shot classifiers built from text: class prompts (templates) or class descriptions.

A class's embedding is the re-normalised mean of the unit text embeddings of its prompts (CLIP's prompt
ensembling). :class:`ZeroShotClassifier` maps [0, 1] pixels to logits ``scale * cos(image, class)`` and is
differentiable in its input, so attacks use it directly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rclip.data.base import ZeroShotTask
from rclip.errors import RClipError
from rclip.models import CLIPBundle

SOURCES = ("templates", "descriptions", "both")


def class_prompts(task: ZeroShotTask, source: str = "templates") -> list[list[str]]:
    """The prompts of each class: templates filled with the class name, its descriptions, or both."""
    if source not in SOURCES:
        raise RClipError(f"unknown prompt source {source!r}; choose one of {SOURCES}")
    filled = [[t.format(c) for t in task.templates] for c in task.classnames]
    if source == "templates":
        return filled
    if not task.descriptions or not any(task.descriptions):
        raise RClipError(f"task {task.name} has no class descriptions; use source='templates' or give a "
                         "descriptions JSON ({classname: [sentence, ...]}, the CuPL/AWT format)")
    if source == "descriptions":
        return [list(d) for d in task.descriptions]
    return [f + list(d) for f, d in zip(filled, task.descriptions)]


@torch.no_grad()
def prompt_embeddings(bundle: CLIPBundle, prompts: Sequence[Sequence[str]]) -> list[torch.Tensor]:
    """Unit text embeddings of each class's prompts: a list of K tensors (M_k, D)."""
    flat = [p for group in prompts for p in group]
    feats = bundle.encode_texts(flat)
    out, i = [], 0
    for group in prompts:
        out.append(feats[i:i + len(group)])
        i += len(group)
    return out


def class_embeddings(bundle: CLIPBundle, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """(K, D) unit class embeddings: mean of each class's unit prompt embeddings, re-normalised."""
    if any(len(g) == 0 for g in prompts):
        raise RClipError("every class needs at least one prompt")
    return F.normalize(torch.stack([e.mean(0) for e in prompt_embeddings(bundle, prompts)]), dim=-1)


class ZeroShotClassifier(nn.Module):
    """[0, 1] pixels (B, 3, S, S) -> logits (B, K) = scale * cos(image embedding, class embedding)."""

    def __init__(self, bundle: CLIPBundle, weights: torch.Tensor, scale: float | None = None):
        super().__init__()
        if weights.ndim != 2 or weights.shape[0] < 2:
            raise RClipError(f"a zero-shot classifier needs (K, D) class embeddings with K >= 2 classes; got shape "
                             f"{tuple(weights.shape)}")
        self.bundle = bundle
        self.clip, self.normalize = bundle.model, bundle.normalize  # submodules: .to() and .parameters() see them
        self.register_buffer("weights", weights.to(bundle.device))
        if scale is None:
            scale = float(bundle.model.logit_scale.detach().exp())
        self.scale = float(scale)

    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable unit image embeddings (B, D) of [0, 1] pixels."""
        return self.clip.encode_image(self.normalize(images), normalize=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * self.features(images) @ self.weights.T.to(images.dtype)


def zeroshot_classifier(bundle: CLIPBundle, task: ZeroShotTask, source: str = "templates",
                        scale: float | None = None) -> ZeroShotClassifier:
    """A classifier for ``task`` from its templates, its descriptions, or both."""
    return ZeroShotClassifier(bundle, class_embeddings(bundle, class_prompts(task, source)), scale)


@torch.no_grad()
def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Top-1 predictions (N,) for images (N, 3, S, S) in [0, 1]."""
    device = next(classifier.buffers()).device
    preds = [classifier(images[i:i + batch_size].to(device)).argmax(-1).cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def correct(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
            ) -> torch.Tensor:
    """Per-image top-1 correctness (N,) bool, on CPU: the per-item metric behind every accuracy."""
    if len(images) == 0:
        raise RClipError("cannot measure accuracy on zero images")
    if len(labels) != len(images):
        raise RClipError(f"{len(images)} images but {len(labels)} labels")
    k = getattr(classifier, "num_classes", None)
    if isinstance(k, int) and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise RClipError(f"labels must lie in [0, {k - 1}] for a {k}-class classifier; got "
                         f"{int(labels.min())}..{int(labels.max())}")
    return predict(classifier, images, batch_size) == labels.cpu()


def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * correct(classifier, images, labels, batch_size).float().mean().item()


def evaluate(bundle: CLIPBundle, task: ZeroShotTask, sources: Sequence[str] = ("templates",),
             limit: int | None = None) -> dict[str, float]:
    """Clean top-1 (%) of ``task`` for each prompt source, e.g. ``{"templates": 93.1, "descriptions": 94.0}``."""
    images, labels = task.tensors(limit)
    return {s: accuracy(zeroshot_classifier(bundle, task, s), images, labels) for s in sources}
