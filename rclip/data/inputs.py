"""Paper-scale inputs: the model, zero-shot sets and robust checkpoints a profile's ``inputs`` section names.

A paper-scale profile (``profiles/paper.yml``) holds one ``inputs`` mapping, checked by
:func:`rclip.book.validate_inputs` before anything runs and handed to every notebook as the ``inputs`` parameter::

    inputs:
      model: ViT-B-32            # open_clip architecture ...
      pretrained: openai         # ... and tag (local cache; downloaded only online), or
      checkpoint: null           # a local weights file, which takes precedence
      datasets: {cifar10: /data/cifar, imagenet: /data/imagenet/val, flickr30k: {...}, ...}
      descriptions: {cifar10: cupl/cifar10.json, ...}     # CuPL/AWT JSON per set; absent -> templates only
      robust_checkpoints: {tecoa: /ckpt/tecoa.pt, fare: /ckpt/fare.pt}   # same architecture as ``model``

The functions here turn that mapping into the objects notebooks use, with the same interfaces as the world's.
"""
from __future__ import annotations

import torch

from rclip.data.base import ZeroShotTask
from rclip.data.classification import zeroshot_dataset
from rclip.errors import RClipError

#: The zero-shot classification sets a profile can name under ``inputs.datasets`` (ImageNet as a folder).
CLASSIFICATION_SETS = {"cifar10": "cifar10", "cifar100": "cifar100", "stl10": "stl10", "imagenet": "imagefolder"}


def _require(inputs: dict | None) -> dict:
    if not inputs:
        raise RClipError("scale='paper' needs the profile's inputs (model, datasets, ...): run the notebook through "
                         "`rclip book --profile paper` or pass -p inputs '{...}' to papermill")
    return inputs


def paper_model(inputs: dict | None, device="cpu"):
    """The CLIP bundle ``inputs`` names: ``checkpoint`` if set (with ``model`` as its architecture), else
    ``model`` + ``pretrained`` from the local open_clip cache (downloaded only on a machine with network)."""
    from rclip import models

    inputs = _require(inputs)
    if not inputs.get("model") and not inputs.get("checkpoint"):
        raise RClipError("inputs.model is not set: name an open_clip architecture (e.g. ViT-B-32) in profiles/paper.yml")
    if inputs.get("checkpoint"):
        return models.load(inputs.get("model"), checkpoint=inputs["checkpoint"], device=device)
    return models.load(inputs["model"], inputs.get("pretrained"), device=device)


def paper_tasks(inputs: dict | None, transform, *, names=None, n: int | None = None,
                split: str = "test") -> dict[str, ZeroShotTask]:
    """Zero-shot tasks for the classification sets in ``inputs.datasets`` that have a root.

    Args:
        transform: PIL -> (3, S, S) in [0, 1]; the bundle's ``preprocess``.
        names: which sets (default: every classification set with a root), in this order.
        n: evenly spaced images kept per set (None = all).
    Each task carries the set's CuPL/AWT descriptions when ``inputs.descriptions`` names a JSON for it.
    """
    inputs = _require(inputs)
    roots = {k: v for k, v in (inputs.get("datasets") or {}).items() if k in CLASSIFICATION_SETS and v}
    descriptions = inputs.get("descriptions") or {}
    unknown = sorted(set(descriptions) - set(CLASSIFICATION_SETS))
    if unknown:
        raise RClipError(f"inputs.descriptions names unknown sets {unknown}; use {sorted(CLASSIFICATION_SETS)}")
    names = list(roots) if names is None else list(names)
    if not names:
        raise RClipError("no zero-shot classification set has a root: set inputs.datasets.cifar10 (or cifar100, "
                         "stl10, imagenet) in profiles/paper.yml")
    missing = [x for x in names if x not in roots]
    if missing:
        raise RClipError(f"sets {missing} were asked for but have no root in inputs.datasets "
                         f"(given: {sorted(roots) or 'none'})")
    return {x: zeroshot_dataset(CLASSIFICATION_SETS[x], roots[x], transform, split=split, limit=n,
                                descriptions=descriptions.get(x)) for x in names}


class LabelledImages(torch.utils.data.Dataset):
    """Batches ``{"images" (B, 3, S, S), "labels" (B,), "index" (B,)}`` from a dataset of (image, label) items,
    the form :func:`rclip.train.fit`'s fine-tuning losses read (as :class:`rclip.world.WorldLabelled` gives)."""

    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitems__(self, indices):
        images, labels = zip(*(self.items[int(i)] for i in indices))
        return {"images": torch.stack(list(images)), "labels": torch.as_tensor(labels, dtype=torch.long),
                "index": torch.as_tensor([int(i) for i in indices], dtype=torch.long)}


def paper_finetune_set(inputs: dict | None, transform, *, n: int | None = None, key: str = "imagenet_train"):
    """The labelled training set ``inputs.datasets.<key>`` names (an ImageNet-style folder, ``root/<class>/<img>``,
    with an optional ``classnames.json``), for adversarial fine-tuning at paper scale.

    Returns (dataset of batches {"images", "labels", "index"}, the folder as a ZeroShotTask: class names and
    templates). ``n``: evenly spaced images kept (None = all)."""
    inputs = _require(inputs)
    root = (inputs.get("datasets") or {}).get(key)
    if not root:
        raise RClipError(f"inputs.datasets.{key} is not set: give an ImageNet-style training folder "
                         f"(root/<class>/<image>, e.g. ImageNet's train/) in profiles/paper.yml")
    task = zeroshot_dataset("imagefolder", root, transform, limit=n)
    return LabelledImages(task.dataset), task


def robust_models(inputs: dict | None, device="cpu") -> dict:
    """Adversarially fine-tuned CLIPs named in ``inputs.robust_checkpoints`` ({method: weights file}), each loaded
    with the architecture ``inputs.model``; an empty dict when none are given."""
    from rclip import models

    inputs = _require(inputs)
    ckpts = {k: v for k, v in (inputs.get("robust_checkpoints") or {}).items() if v}
    return {k: models.load(inputs.get("model"), checkpoint=v, device=device) for k, v in ckpts.items()}
