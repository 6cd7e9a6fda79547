"""The two dataset interfaces every scale implements: zero-shot classification tasks and retrieval sets.

World tasks (:mod:`rclip.world.tasks`) and real datasets (:mod:`rclip.data`) return these same objects, so a
notebook switches scale by a parameter. Images are always float tensors in [0, 1] of shape (3, H, W); the model
bundle's differentiable ``normalize`` is applied inside the model call, never here, so attacks work in pixel space.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from rclip.errors import RClipError


def read_json_file(path, what: str, expected: str):
    """The JSON value in ``path`` (UTF-8, with or without a BOM). ``what`` names the file in words
    ("descriptions file"), ``expected`` says what it must hold or what to give instead; both errors (no such file,
    not JSON) name the file and say it."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise RClipError(f"{what} not found: {path}. Give {expected}")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RClipError(f"{path} is not UTF-8 JSON ({exc}); give {expected}") from None


class TransformedImages(Dataset):
    """Images read lazily by ``load(i) -> PIL.Image`` and turned into [0, 1] tensors by ``transform``."""

    def __init__(self, n: int, load: Callable[[int], object], transform: Callable[[object], torch.Tensor],
                 labels: Sequence[int] | None = None):
        self.n, self.load, self.transform = n, load, transform
        self.labels = None if labels is None else list(labels)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img = self.transform(self.load(i))
        return img if self.labels is None else (img, self.labels[i])


def _prefix(ds: Dataset, n: int) -> Dataset:
    """The first ``n`` items of ``ds`` (a sliced :class:`TensorDataset`, else a :class:`Subset`)."""
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[:n] for t in ds.tensors))
    from torch.utils.data import Subset

    return Subset(ds, range(n))


@dataclass
class ZeroShotTask:
    """A zero-shot classification task.

    Attributes:
        name: e.g. ``"world/colour_shape"`` or ``"cifar10"``.
        dataset: yields ``(image (3, H, W) in [0, 1], label int)``.
        classnames: K names, inserted into templates.
        templates: prompt templates with one ``{}`` each.
        descriptions: K lists of class descriptions (the role of CuPL/AWT LLM descriptions); may be empty lists.
        scale: ``"world"`` or ``"paper"``.
        meta: provenance (split, seed, resolution, root path, ...).
    """

    name: str
    dataset: Dataset
    classnames: list[str]
    templates: list[str]
    descriptions: list[list[str]] = field(default_factory=list)
    scale: str = "world"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.classnames:
            raise RClipError(f"task {self.name!r} has an empty class list: give at least two class names")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise RClipError(f"task {self.name!r}: every template needs exactly one '{{}}' placeholder")
        if self.descriptions and len(self.descriptions) != len(self.classnames):
            raise RClipError(f"task {self.name!r}: {len(self.descriptions)} description lists for "
                             f"{len(self.classnames)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __len__(self) -> int:
        return len(self.dataset)

    def loader(self, batch_size: int = 256, num_workers: int = 0) -> DataLoader:
        return DataLoader(self.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    def first(self, n: int) -> "ZeroShotTask":
        """The same task on its first ``n`` images (all of them when it has fewer): a smaller evaluation whose
        images are a prefix of the full one's, so per-image results of the two can be paired. A world task's
        labels cycle through the classes, so a prefix stays balanced; a paper-scale task's evenly spaced images of
        class-sorted folders do not (use all of them there)."""
        from dataclasses import replace

        if n < 1:
            raise RClipError(f"a task needs at least one image; got n={n}")
        if n >= len(self):
            return self
        meta = {**self.meta, "n": n}
        if isinstance(meta.get("scenes"), list):
            meta["scenes"] = meta["scenes"][:n]
        return replace(self, dataset=_prefix(self.dataset, n), meta=meta)

    def tensors(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All (or the first ``limit``) images and labels as two tensors: (N, 3, H, W), (N,)."""
        ds = self.dataset
        if isinstance(ds, TensorDataset):
            x, y = ds.tensors
            return (x, y) if limit is None else (x[:limit], y[:limit])
        n = len(ds) if limit is None else min(limit, len(ds))
        xs, ys = zip(*(ds[i] for i in range(n)))
        return torch.stack(xs), torch.as_tensor(ys)


@dataclass
class RetrievalSet:
    """Images with several captions each.

    Attributes:
        images: yields image tensors (3, H, W) in [0, 1].
        captions: all captions, grouped by image.
        txt2img: (T,) index of the image each caption belongs to.
        img2txt: for each image, the indices of its captions.
    """

    name: str
    images: Dataset
    captions: list[str]
    txt2img: torch.Tensor
    img2txt: list[list[int]]
    scale: str = "world"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.txt2img) != len(self.captions):
            raise RClipError(f"{self.name}: {len(self.captions)} captions but {len(self.txt2img)} owner indices")
        if len(self.img2txt) != len(self.images):
            raise RClipError(f"{self.name}: {len(self.images)} images but {len(self.img2txt)} caption groups")

    def image_tensor(self) -> torch.Tensor:
        ds = self.images
        if isinstance(ds, TensorDataset):
            return ds.tensors[0]
        return torch.stack([ds[i] for i in range(len(ds))])

    def first(self, n: int) -> "RetrievalSet":
        """The gallery of its first ``n`` images with all their captions (itself when it has no more): a smaller
        gallery whose images are a prefix of the full one's, so per-image results on the two line up by index."""
        if n < 1:
            raise RClipError(f"a gallery needs at least one image; got n={n}")
        if n >= len(self.images):
            return self
        sub = _prefix(self.images, n)
        groups = [[self.captions[t] for t in self.img2txt[i]] for i in range(n)]
        meta = {**self.meta, "n": n}
        n_caps = sum(len(g) for g in groups)
        for key, size in (("scenes", n), ("specs", n_caps)):
            if isinstance(meta.get(key), list):
                meta[key] = meta[key][:size]
        return RetrievalSet.from_groups(self.name, sub, groups, scale=self.scale, meta=meta)

    @staticmethod
    def from_groups(name: str, images: Dataset, groups: Sequence[Sequence[str]], **kw) -> "RetrievalSet":
        """Build from one list of captions per image."""
        captions, owner, img2txt = [], [], []
        for i, group in enumerate(groups):
            img2txt.append(list(range(len(captions), len(captions) + len(group))))
            captions += list(group)
            owner += [i] * len(group)
        return RetrievalSet(name, images, captions, torch.tensor(owner, dtype=torch.long), img2txt, **kw)
