"""Real zero-shot classification sets behind the :class:`~rclip.data.base.ZeroShotTask` interface.

Supported: CIFAR-10, CIFAR-100 and STL-10 in torchvision's on-disk layout (``cifar-10-batches-py/``,
``cifar-100-python/``, ``stl10_binary/``) and an ImageNet-style folder (``root/<class>/<image>``). Files are read
directly: the CIFAR pickles with an unpickler that only admits numpy arrays and plain containers, STL-10 as raw
bytes. Roots are checked before anything is read; a missing root says how to get the data (``download=True``
fetches with torchvision where the machine has network).
"""
from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rclip.data.base import TransformedImages, ZeroShotTask, read_json_file
from rclip.errors import RClipError

#: Generic photo templates (used for every real dataset unless a dataset-specific list is given).
PHOTO_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a dark photo of a {}.", "a good photo of a {}.", "a photo of the small {}.",
    "a photo of the big {}.", "a cropped photo of a {}.", "a pixelated photo of a {}.", "a jpeg photo of a {}.",
    "this is a photo of a {}.",
]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

_LAYOUT = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
}


class _SafeUnpickler(pickle.Unpickler):
    """Admits only what CIFAR pickles hold: numpy arrays, dtypes and builtin containers."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_cifar_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = _SafeUnpickler(f, encoding="latin1").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _missing(name: str, root: Path, expect: Path) -> RClipError:
    split_arg = ", split='test'" if name == "stl10" else ""
    return RClipError(
        f"{name} not found: expected {expect} under root {root}. Put the dataset there in torchvision's layout, "
        f"or fetch it on a machine with network: torchvision.datasets.{_TV_NAME[name]}(root='{root}', "
        f"download=True{split_arg}) (or rclip.data.zeroshot_dataset('{name}', root, transform, download=True))."
    )


_TV_NAME = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}


def _download(name: str, root: Path, split: str) -> None:
    import torchvision.datasets as tvd

    if name == "stl10":
        tvd.STL10(str(root), split="test" if split == "test" else "train", download=True)
    else:
        getattr(tvd, _TV_NAME[name])(str(root), train=split == "train", download=True)


def _load_arrays(name: str, root: Path, split: str) -> tuple[np.ndarray, list[int], list[str]]:
    """(N, H, W, 3) uint8 images, labels and class names of a torchvision-layout dataset."""
    base = root / _LAYOUT[name]
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        if not all((base / f).is_file() for f in files):
            raise _missing(name, root, base / files[0])
        parts = [_read_cifar_pickle(base / f) for f in files]
        data = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts])
        labels = [int(v) for p in parts for v in p["labels"]]
        meta = base / "batches.meta"
        classes = list(_read_cifar_pickle(meta)["label_names"]) if meta.is_file() else list(CIFAR10_CLASSES)
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels, classes
    if name == "cifar100":
        f = base / ("train" if split == "train" else "test")
        if not f.is_file():
            raise _missing(name, root, f)
        obj = _read_cifar_pickle(f)
        meta = base / "meta"
        if not meta.is_file():
            raise _missing(name, root, meta)
        classes = [c.replace("_", " ") for c in _read_cifar_pickle(meta)["fine_label_names"]]
        data = np.asarray(obj["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return data, [int(v) for v in obj["fine_labels"]], classes
    if name == "stl10":
        prefix = "train" if split == "train" else "test"
        xf, yf = base / f"{prefix}_X.bin", base / f"{prefix}_y.bin"
        if not (xf.is_file() and yf.is_file()):
            raise _missing(name, root, xf)
        raw = np.fromfile(xf, dtype=np.uint8).reshape(-1, 3, 96, 96)
        data = raw.transpose(0, 3, 2, 1)  # STL-10 stores images column-major
        labels = [int(v) - 1 for v in np.fromfile(yf, dtype=np.uint8)]
        names = base / "class_names.txt"
        classes = names.read_text().split() if names.is_file() else list(STL10_CLASSES)
        return data, labels, classes
    raise AssertionError(name)


def load_descriptions(path: str | Path, classnames: list[str]) -> list[list[str]]:
    """Class descriptions from a CuPL/AWT-format JSON ``{classname: [sentence, ...]}``, in class order."""
    path = Path(path)
    table = read_json_file(path, "descriptions file", "a JSON {classname: [sentence, ...]} (the CuPL/AWT format), "
                           "or leave descriptions out to use templates only.")
    if not isinstance(table, dict):
        raise RClipError(f"{path} must hold a JSON object {{classname: [sentence, ...]}}, not {type(table).__name__}")
    bad = [k for k, v in table.items() if not isinstance(v, list) or not all(isinstance(x, str) for x in v)]
    if bad:
        raise RClipError(f"{path}: the descriptions of {bad[:3]} are not a list of sentences (a single string would be "
                         f"read as its characters); write {{\"{bad[0]}\": [\"...\", \"...\"]}}")
    lower = {k.lower().replace("_", " "): v for k, v in table.items()}
    missing = [c for c in classnames if c.lower() not in lower]
    if missing:
        raise RClipError(f"{path} has no descriptions for {len(missing)} classes (e.g. {missing[:3]}); "
                         "its keys must be the dataset's class names")
    out = [list(lower[c.lower()]) for c in classnames]
    if any(not d for d in out):
        raise RClipError(f"{path}: some class has an empty description list")
    return out


def zeroshot_dataset(name: str, root: str | Path, transform: Callable, *, split: str = "test",
                     descriptions: str | Path | None = None, templates: list[str] | None = None,
                     download: bool = False, limit: int | None = None) -> ZeroShotTask:
    """A real zero-shot task: ``cifar10``, ``cifar100``, ``stl10``, or ``imagefolder`` (an ImageNet-style tree).

    Args:
        root: dataset root (for ``imagefolder``: the folder whose sub-folders are the classes).
        transform: PIL image -> (3, S, S) tensor in [0, 1]; use the model bundle's ``preprocess``.
        descriptions: optional CuPL/AWT JSON; without it the task has templates only.
        download: fetch missing torchvision datasets (needs network).
        limit: keep ``limit`` evenly spaced images (for quick runs).
    """
    root = Path(root)
    if name == "imagefolder":
        return _imagefolder(root, transform, descriptions, templates, limit)
    if name not in _LAYOUT:
        raise RClipError(f"unknown dataset {name!r}; choose one of cifar10, cifar100, stl10, imagefolder")
    if not root.is_dir():
        if download:
            root.mkdir(parents=True, exist_ok=True)
        else:
            raise _missing(name, root, root / _LAYOUT[name])
    try:
        data, labels, classes = _load_arrays(name, root, split)
    except RClipError:
        if not download:
            raise
        _download(name, root, split)
        data, labels, classes = _load_arrays(name, root, split)
    keep = _subset(len(labels), limit)
    n = len(keep)
    ds = TransformedImages(n, lambda i: Image.fromarray(data[keep[i]]), transform, [labels[k] for k in keep])
    desc = load_descriptions(descriptions, classes) if descriptions else []
    return ZeroShotTask(name=name, dataset=ds, classnames=classes, templates=list(templates or PHOTO_TEMPLATES),
                        descriptions=desc, scale="paper", meta=dict(root=str(root), split=split, n=n))


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG"}


def _imagefolder(root: Path, transform: Callable, descriptions, templates, limit) -> ZeroShotTask:
    if not root.is_dir():
        raise RClipError(f"image folder not found: {root}. Give a folder with one sub-folder of images per class "
                         "(e.g. ImageNet's val/ sorted into n01440764/...); an optional classnames.json "
                         "{folder: name} beside the sub-folders names the classes.")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not folders:
        raise RClipError(f"{root} has no class sub-folders")
    names_file = root / "classnames.json"
    mapping = (read_json_file(names_file, "class names file", "a JSON {folder: class name}, or remove it to "
                              "name classes by their folders") if names_file.is_file() else {})
    if not isinstance(mapping, dict):
        raise RClipError(f"{names_file} must hold a JSON object {{folder: class name}}, not {type(mapping).__name__}")
    classes = [mapping.get(f, f.replace("_", " ")) for f in folders]
    files, labels = [], []
    for y, f in enumerate(folders):
        for p in sorted((root / f).iterdir()):
            if p.suffix in _IMAGE_SUFFIXES:
                files.append(p)
                labels.append(y)
    if not files:
        raise RClipError(f"{root} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    keep = _subset(len(files), limit)
    n = len(keep)
    ds: Dataset = TransformedImages(n, lambda i: Image.open(files[keep[i]]).convert("RGB"), transform,
                                    [labels[k] for k in keep])
    desc = load_descriptions(descriptions, classes) if descriptions else []
    return ZeroShotTask(name=f"imagefolder:{root.name}", dataset=ds, classnames=classes,
                        templates=list(templates or PHOTO_TEMPLATES), descriptions=desc, scale="paper",
                        meta=dict(root=str(root), n=n))


def _subset(n: int, limit: int | None) -> list[int]:
    """All indices, or ``limit`` evenly spaced ones (so class-sorted folders stay balanced)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise RClipError(f"limit must be positive, got {limit}")
    return np.linspace(0, n - 1, limit).round().astype(int).tolist()


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A minimal transform: PIL -> (3, H, W) float tensor in [0, 1] (no resizing)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
