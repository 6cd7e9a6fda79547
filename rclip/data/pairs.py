"""Image–caption pre-training corpora behind one interface: in memory (the world's, rendered once) or on disk
(a CC3M-style CSV/TSV/JSON of image paths and captions, at paper scale).

Both are map-style datasets whose ``__getitems__(indices)`` returns a batch dict ``images`` (B, 3, S, S) float in
[0, 1], ``texts`` (B str) and ``index`` (B,) long — what :func:`rclip.train.fit` and the poisoning defenses read —
and both expose every caption as ``texts`` (the pool that caption re-matching searches).

* :class:`PairCorpus` holds uint8 images and captions in memory: :meth:`PairCorpus.render` fills it from any
  dataset with ``__getitems__`` (e.g. a poisoned :class:`~rclip.attacks.poison.PoisonedPairs`), and
  :func:`cached_corpus` stores it in the artefact cache, keyed by what made it, so every run reads the same bytes.
* :class:`FilePairs` reads a captions file at paper scale (:func:`read_pairs`); images are decoded lazily.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from rclip.cache import artefact_path, atomic_path
from rclip.errors import RClipError

IMAGE_KEYS = ("filepath", "image", "image_path", "file", "path", "img")
CAPTION_KEYS = ("caption", "title", "text", "sentence")


class PairCorpus(Dataset):
    """Image–caption pairs held in memory.

    images: (N, 3, S, S) uint8. texts: N captions. poisoned: (N,) bool, which pairs an attacker made (all False
    when unknown). meta: provenance (what made the corpus).
    """

    def __init__(self, images: torch.Tensor, texts: Sequence[str], poisoned: torch.Tensor | None = None,
                 meta: dict | None = None):
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise RClipError(f"images must be uint8 of shape (N, 3, S, S); got {images.dtype} {tuple(images.shape)}")
        if len(texts) != len(images):
            raise RClipError(f"{len(images)} images but {len(texts)} captions; a corpus needs one caption per image")
        if len(images) == 0:
            raise RClipError("the corpus is empty")
        self.uint8, self.texts = images, list(texts)
        self.poisoned = torch.zeros(len(images), dtype=torch.bool) if poisoned is None else \
            torch.as_tensor(poisoned, dtype=torch.bool)
        if len(self.poisoned) != len(images):
            raise RClipError(f"poisoned has {len(self.poisoned)} entries for {len(images)} pairs")
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def resolution(self) -> int:
        return int(self.uint8.shape[-1])

    def images(self, indices=None) -> torch.Tensor:
        """Float images (B, 3, S, S) in [0, 1] of pairs ``indices`` (default all)."""
        x = self.uint8 if indices is None else self.uint8[torch.as_tensor(indices, dtype=torch.long)]
        return x.float() / 255

    def __getitems__(self, indices) -> dict:
        idx = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
        return {"images": self.images(idx), "texts": [self.texts[i] for i in idx.tolist()], "index": idx,
                "poisoned": self.poisoned[idx]}

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}

    @staticmethod
    def render(dataset, batch_size: int = 512, meta: dict | None = None) -> "PairCorpus":
        """Materialise ``dataset`` (``__getitems__`` -> ``images`` in [0, 1] on the 1/255 grid, ``texts``; an
        optional ``poisoned`` attribute) into memory, ``batch_size`` pairs at a time."""
        n = len(dataset)
        if n == 0:
            raise RClipError("the dataset to render is empty")
        images, texts = [], []
        for lo in range(0, n, batch_size):
            batch = dataset.__getitems__(list(range(lo, min(n, lo + batch_size))))
            images.append((batch["images"].clamp(0, 1) * 255).round().to(torch.uint8))
            texts += list(batch["texts"])
        return PairCorpus(torch.cat(images), texts, getattr(dataset, "poisoned", None), meta)

    def save(self, path: str | Path) -> None:
        """Write the corpus atomically (a torch file of tensors, strings and plain metadata)."""
        with atomic_path(path) as tmp:
            torch.save({"images": self.uint8, "texts": self.texts, "poisoned": self.poisoned,
                        "meta": json.loads(json.dumps(self.meta, default=str))}, tmp)

    @staticmethod
    def load(path: str | Path) -> "PairCorpus":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return PairCorpus(blob["images"], blob["texts"], blob["poisoned"], blob["meta"])


class FocusedWorldPairs(Dataset):
    """World pre-training pairs restricted to what a small, low-resolution CLIP can learn in minutes.

    Like :class:`rclip.world.WorldPairs` (pair ``i`` a pure function of ``(seed, split, i)``), but every scene has
    ``count`` subject objects of size ``size`` (None = either) and no distractors, and every caption mentions a random non-empty subset of
    ``mentions`` (e.g. colour, texture and size, which a 32-px CLIP sees; shape needs about 64 px). The ground truth
    (``spec.matches``) is as strict as the full world's. ``caption_mentions`` tells the poisoning attacks which
    attributes their captions may add, so poison captions speak the corpus's language.
    """

    def __init__(self, n: int, *, split: str = "train", resolution: int = 32, seed: int = 0,
                 mentions: Sequence[str] = ("colour", "texture", "size"), count: int = 1, size: int | None = None):
        from itertools import combinations

        allowed = ("colour", "texture", "size", "shape", "position")
        if not mentions or any(m not in allowed for m in mentions):
            raise RClipError(f"mentions must be a non-empty subset of {allowed}; got {list(mentions)}")
        if not 1 <= count <= 4 or ("position" in mentions and count != 1):
            raise RClipError("count must be in 1..4 (and 1 when captions mention a position)")
        if size is not None and ("size" in mentions or size not in (0, 1)):
            raise RClipError("size pins every object's size (0 small, 1 large); captions then cannot mention it")
        self.n, self.split, self.resolution, self.seed, self.count = int(n), split, int(resolution), int(seed), count
        self.size = size
        self.caption_mentions = tuple(mentions)
        self._styles = [c for r in range(1, len(mentions) + 1) for c in combinations(self.caption_mentions, r)]

    def __len__(self) -> int:
        return self.n

    def pair(self, i: int):
        from rclip.world.language import caption_scene
        from rclip.world.scenes import sample_scene, scene_rng

        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = scene_rng(self.seed, f"focused-pairs/{self.split}", i)
        scene = sample_scene(rng, count=self.count, size=self.size, n_distractors=0)
        return scene, caption_scene(scene, rng, self._styles[int(rng.integers(len(self._styles)))])

    def __getitems__(self, indices) -> dict:
        from rclip.world.render import render

        pairs = [self.pair(int(i)) for i in indices]
        return {"images": render([s for s, _ in pairs], self.resolution), "texts": [c.text for _, c in pairs],
                "index": torch.as_tensor([int(i) for i in indices], dtype=torch.long)}

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}


def cached_corpus(dataset, key: dict, *, batch_size: int = 512) -> PairCorpus:
    """:meth:`PairCorpus.render` of ``dataset``, cached under ``$RCLIP_CACHE/corpora`` by ``key`` (everything that
    determines the dataset's pairs: its class, sizes, seeds, attack configs)."""
    from rclip.models import sha256

    path = artefact_path("corpora", key, ".pt")
    check = path.with_suffix(".sha256")
    if path.is_file() and check.is_file():                 # the checksum is written last: its presence marks it whole
        if sha256(path) != check.read_text().strip():
            raise RClipError(f"cached corpus {path} does not match its checksum {check} (corrupted or replaced): "
                             f"delete {path.with_suffix('')}.* and re-run to rebuild it")
        return PairCorpus.load(path)
    corpus = PairCorpus.render(dataset, batch_size, meta=key)
    corpus.save(path)
    with atomic_path(check) as tmp:
        tmp.write_text(sha256(path) + "\n")
    return corpus


# ----------------------------------------------------------------------------------------------------------------
# Paper scale: a CC3M-style captions file
# ----------------------------------------------------------------------------------------------------------------

class FilePairs(Dataset):
    """Pairs read from image files: ``paths`` (N absolute paths), ``texts`` (N captions), decoded lazily by
    ``transform`` (PIL -> (3, S, S) in [0, 1], e.g. a bundle's ``preprocess``)."""

    def __init__(self, paths: Sequence[str | Path], texts: Sequence[str], transform: Callable, meta: dict | None = None):
        self.paths, self.texts, self.transform = [Path(p) for p in paths], list(texts), transform
        self.poisoned = torch.zeros(len(self.texts), dtype=torch.bool)   # unknown at paper scale
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.texts)

    def images(self, indices) -> torch.Tensor:
        from PIL import Image

        out = []
        for i in indices:
            with Image.open(self.paths[int(i)]) as im:
                out.append(self.transform(im.convert("RGB")))
        return torch.stack(out)

    def __getitems__(self, indices) -> dict:
        idx = [int(i) for i in indices]
        return {"images": self.images(idx), "texts": [self.texts[i] for i in idx],
                "index": torch.as_tensor(idx, dtype=torch.long), "poisoned": self.poisoned[idx]}

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}


def _rows(path: Path) -> list[tuple[str, dict]]:
    """The records of a captions file, each with where it is (``"line 3"``, ``"record 3"``) for error messages.
    Read with the standard parsers: ``csv`` on the file object (so quoted multi-line captions keep their newlines),
    ``utf-8-sig`` (a byte-order mark is not part of the first header)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                out = []
                for row in reader:
                    if None in row or any(v is None for v in row.values()):
                        raise RClipError(f"{path}, line {reader.line_num}: the record has "
                                         f"{'more' if None in row else 'fewer'} fields than the header "
                                         f"{reader.fieldnames}")
                    out.append((f"line {reader.line_num}", row))
                return out
        text = path.read_text(encoding="utf-8-sig")
        if suffix == ".json":
            rows = json.loads(text)
            if isinstance(rows, dict):      # {"annotations": [...]} or {"images": [...]}
                rows = next((v for v in rows.values() if isinstance(v, list)), None)
            if not isinstance(rows, list):
                raise RClipError(f"{path}: a JSON captions file must hold a list of {{image, caption}} records")
            return [(f"record {i}", r) for i, r in enumerate(rows)]
        if suffix == ".jsonl":
            return [(f"line {i + 1}", json.loads(line)) for i, line in enumerate(text.splitlines()) if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise RClipError(f"{path} cannot be parsed as {suffix[1:].upper()} ({exc})") from None
    raise RClipError(f"{path}: unknown captions format {suffix!r}; use .csv, .tsv, .json or .jsonl with an image "
                     f"column ({'/'.join(IMAGE_KEYS)}) and a caption column ({'/'.join(CAPTION_KEYS)})")


def read_pairs(captions: str | Path | None, images: str | Path | None, transform: Callable, *,
               limit: int | None = None) -> FilePairs:
    """The CC3M-style corpus named by ``inputs.datasets.cc3m: {captions, images}``.

    captions: a .csv/.tsv/.json/.jsonl file of records with an image path (column ``filepath``, ``image``, ...;
    relative to ``images`` or absolute) and a caption (``caption``, ``title``, ...). images: the folder the paths
    are relative to. limit: keep the first ``limit`` records. Every image file is checked before anything runs.
    """
    if not captions or not images:
        raise RClipError("the pre-training corpus is not set: fill in inputs.datasets.cc3m.captions (a CSV/TSV/JSON "
                         "of image paths and captions) and inputs.datasets.cc3m.images (their folder) in "
                         "profiles/paper.yml")
    captions, root = Path(captions), Path(images)
    if not captions.is_file():
        raise RClipError(f"captions file {captions} does not exist (inputs.datasets.cc3m.captions)")
    if not root.is_dir():
        raise RClipError(f"image folder {root} does not exist (inputs.datasets.cc3m.images)")
    rows = _rows(captions)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise RClipError(f"{captions} holds no records")
    first = rows[0][1]
    keys = set(first) if isinstance(first, dict) else set()
    img_key = next((k for k in IMAGE_KEYS if k in keys), None)
    cap_key = next((k for k in CAPTION_KEYS if k in keys), None)
    if img_key is None or cap_key is None:
        raise RClipError(f"{captions}: records have columns {sorted(keys)}; need an image column (one of "
                         f"{', '.join(IMAGE_KEYS)}) and a caption column (one of {', '.join(CAPTION_KEYS)})")
    for where, r in rows:
        for key in (img_key, cap_key):
            if not isinstance(r, dict) or not isinstance(r.get(key), str):
                raise RClipError(f"{captions}, {where}: column {key!r} is missing or not text "
                                 f"({(r.get(key) if isinstance(r, dict) else r)!r}); every record needs an image "
                                 f"path and a caption")
    paths = [(root / r[img_key]) for _, r in rows]
    texts = [r[cap_key].strip() for _, r in rows]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RClipError(f"{len(missing)} of {len(paths)} images listed in {captions} are missing under {root}, "
                         f"e.g. {missing[:3]}; fix the paths or the image folder")
    if any(not t for t in texts):
        raise RClipError(f"{captions}: {sum(not t for t in texts)} records have an empty caption")
    return FilePairs(paths, texts, transform, meta={"captions": str(captions), "images": str(root), "n": len(texts)})


__all__ = ["PairCorpus", "FocusedWorldPairs", "cached_corpus", "FilePairs", "read_pairs"]
