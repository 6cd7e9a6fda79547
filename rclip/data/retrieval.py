"""Real retrieval sets (Flickr30k, COCO) behind the :class:`~rclip.data.base.RetrievalSet` interface.

Two annotation formats are read:

* Karpathy split JSON: ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...]}, ...]}``
  (``dataset_flickr30k.json``, ``dataset_coco.json``); ``split`` selects ``train``/``val``/``test``
  (``restval`` counts as ``train``).
* ALBEF-style lists: ``[{"image": relative path, "caption": [str, ...] or str}, ...]`` (a file per split).

Captions are lower-cased and stripped of punctuation, as the retrieval attacks' reference code does.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from rclip.data.base import RetrievalSet, TransformedImages, read_json_file
from rclip.errors import RClipError


def clean_caption(text: str, max_words: int = 30) -> str:
    """Lower-case, strip punctuation, collapse spaces, keep at most ``max_words`` words."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(text.split()[:max_words])


def _entries(annotations: Path, split: str) -> list[tuple[str, list[str]]]:
    data = read_json_file(annotations, "retrieval annotations", "the Karpathy split JSON (dataset_flickr30k.json / "
                          "dataset_coco.json) or an ALBEF-style test JSON.")
    out = []
    if isinstance(data, dict) and "images" in data:
        for k, im in enumerate(data["images"]):
            s = "train" if im.get("split") == "restval" else im.get("split")
            if s != split:
                continue
            if "filename" not in im or "sentences" not in im:
                raise RClipError(f"{annotations}: images[{k}] lacks 'filename' or 'sentences' (the Karpathy format "
                                 f"has both for every image)")
            rel = str(Path(im.get("filepath", "")) / im["filename"])
            if not all(isinstance(sen, dict) and ("raw" in sen or "tokens" in sen) for sen in im["sentences"]):
                raise RClipError(f"{annotations}: a sentence of images[{k}] ({im['filename']}) has neither 'raw' "
                                 f"nor 'tokens' (the Karpathy format gives each sentence both)")
            caps = [sen["raw"] if "raw" in sen else " ".join(sen["tokens"]) for sen in im["sentences"]]
            out.append((rel, caps))
    elif isinstance(data, list):
        for k, im in enumerate(data):
            if not isinstance(im, dict) or "image" not in im or "caption" not in im:
                raise RClipError(f"{annotations}: entry {k} lacks 'image' or 'caption' (the ALBEF-style format is a "
                                 f"list of {{\"image\": path, \"caption\": [captions]}})")
            caps = im["caption"] if isinstance(im["caption"], list) else [im["caption"]]
            out.append((im["image"], caps))
    else:
        raise RClipError(f"{annotations}: neither a Karpathy JSON (with 'images') nor an ALBEF-style list")
    if not out:
        raise RClipError(f"{annotations} has no images in split {split!r}")
    return out


def retrieval_dataset(annotations: str | Path, image_root: str | Path, transform: Callable, *,
                      split: str = "test", name: str | None = None, limit: int | None = None,
                      max_words: int = 30) -> RetrievalSet:
    """Images under ``image_root`` with their captions from ``annotations`` (see the module docstring)."""
    annotations, image_root = Path(annotations), Path(image_root)
    if not image_root.is_dir():
        raise RClipError(f"image root not found: {image_root}. Point it at the folder the annotation paths are "
                         "relative to (e.g. flickr30k-images/).")
    entries = _entries(annotations, split)[:limit]
    missing = [rel for rel, _ in entries if not (image_root / rel).is_file()]
    if missing:
        raise RClipError(f"{len(missing)} of {len(entries)} images are missing under {image_root} "
                         f"(e.g. {missing[0]}); check image_root")
    files = [image_root / rel for rel, _ in entries]
    images = TransformedImages(len(files), lambda i: Image.open(files[i]).convert("RGB"), transform)
    groups = [[clean_caption(c, max_words) for c in caps] for _, caps in entries]
    return RetrievalSet.from_groups(name or annotations.stem, images, groups, scale="paper",
                                    meta=dict(annotations=str(annotations), image_root=str(image_root), split=split))
