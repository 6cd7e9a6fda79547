"""Zero-shot tasks, retrieval splits and pre-training pairs over the world.

Every sample is a pure function of ``(seed, stream, index)`` (see :func:`~rclip.world.scenes.scene_rng`); the
streams of different splits are disjoint, so train, val and test never share a sample.

Tasks:

============== ======= =================================================== ===========================
task           classes label                                               images
============== ======= =================================================== ===========================
shape          10      the subject's shape                                 one object (+ distractors)
colour         8       the subject's colour                                one object (+ distractors)
colour_shape   80      colour x shape of the subject                       one object (+ distractors)
texture        6       the background texture                              any subject group
count          4       number of objects (1-4)                             one group, no distractors
============== ======= =================================================== ===========================

Distractors are off by default in the classification tasks (``distractors=0``), because a distractor is itself an
object of another class; ``distractors>0`` makes the task harder and stays well defined (the label is the subject,
which is the larger or more numerous group only by convention, so expect lower accuracy).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.data import Dataset, TensorDataset

from rclip.data.base import RetrievalSet, ZeroShotTask
from rclip.errors import RClipError
from rclip.world.attributes import COLOURS, COUNT_WORDS, SHAPES, TEXTURES
from rclip.world.language import Caption, CaptionSpec, caption_scene, captions_for
from rclip.world.render import render
from rclip.world.scenes import Scene, sample_scene, scene_rng

TASK_NAMES = ("shape", "colour", "texture", "count", "colour_shape")
SPLITS = ("train", "val", "test")

_OBJECT_TEMPLATES = [
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a rendering of a {}.", "a drawing of a {}.",
    "a close-up of a {}.", "this image shows a {}.", "there is a {}.", "a {}.", "a photo with a {}.",
    "a photo of one {}.",
]
_COLOUR_TEMPLATES = [
    "a photo of a {} object.", "a picture of a {} shape.", "an image of a {} thing.", "a rendering of a {} object.",
    "a drawing of a {} shape.", "a close-up of a {} thing.", "this image shows a {} object.",
    "there is a {} shape.", "a {} object.", "a photo with a {} item.", "a photo of an object in {}.",
    "a shape coloured {}.",
]
_TEXTURE_TEMPLATES = [
    "a {} background.", "a photo of a {} background.", "a picture of a {} background.",
    "an image of a {} background.", "on a {} background.", "a {} backdrop.", "a shape on a {} background.",
    "an object against a {} background.", "a thing over a {} background.", "a rendering of a {} background.",
    "a drawing on a {} background.",
]
_COUNT_TEMPLATES = [
    "a photo of {}.", "a picture of {}.", "an image of {}.", "a rendering of {}.", "a drawing of {}.",
    "a close-up of {}.", "this image shows {}.", "{}.", "a photo with {}.", "a snapshot of {}.",
]


@dataclass(frozen=True)
class TaskDef:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    mentions: tuple[str, ...]  # attributes every description of a class must state

    def constraints(self, label: int, distractors: int) -> dict:
        """``sample_scene`` keyword arguments for an image of class ``label``."""
        if self.name == "shape":
            return dict(shape=label, count=1, n_distractors=distractors)
        if self.name == "colour":
            return dict(colour=label, count=1, n_distractors=distractors)
        if self.name == "colour_shape":
            return dict(colour=label // len(SHAPES), shape=label % len(SHAPES), count=1, n_distractors=distractors)
        if self.name == "texture":
            return dict(texture=label, n_distractors=None if distractors else 0, max_distractors=distractors)
        if self.name == "count":
            return dict(count=label + 1, n_distractors=0)
        raise AssertionError(self.name)

    def label_of(self, scene: Scene) -> int:
        return {
            "shape": scene.shape, "colour": scene.colour, "texture": scene.texture, "count": scene.count - 1,
            "colour_shape": scene.colour * len(SHAPES) + scene.shape,
        }[self.name]


TASKS: dict[str, TaskDef] = {
    "shape": TaskDef("shape", SHAPES, tuple(_OBJECT_TEMPLATES), ("shape",)),
    "colour": TaskDef("colour", COLOURS, tuple(_COLOUR_TEMPLATES), ("colour",)),
    "colour_shape": TaskDef("colour_shape", tuple(f"{c} {s}" for c in COLOURS for s in SHAPES),
                            tuple(_OBJECT_TEMPLATES), ("colour", "shape")),
    "texture": TaskDef("texture", TEXTURES, tuple(_TEXTURE_TEMPLATES), ("texture",)),
    "count": TaskDef("count", tuple(f"{w} {'object' if i == 0 else 'objects'}" for i, w in enumerate(COUNT_WORDS)),
                     tuple(_COUNT_TEMPLATES), ("count",)),
}


def _task_def(name: str) -> TaskDef:
    if name not in TASKS:
        raise RClipError(f"unknown world task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return TASKS[name]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise RClipError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


@lru_cache(maxsize=64)
def class_descriptions(task: str, n: int = 25, seed: int = 0) -> tuple[tuple[str, ...], ...]:
    """``n`` distinct descriptions per class: captions of typical images of the class, each stating the class.

    They play the role of the LLM-written class descriptions of CuPL/AWT/COLA: varied sentences about what an image
    of the class looks like (its other attributes, background, placement), in the world's language.
    """
    spec_def = _task_def(task)
    out = []
    for label in range(len(spec_def.classnames)):
        rng = scene_rng(seed, f"descriptions/{task}", label)
        found: list[str] = []
        seen = set()
        tries = 0
        while len(found) < n:
            scene = sample_scene(rng, **spec_def.constraints(label, distractors=0))
            extra = [a for a in ("size", "colour", "shape", "texture", "position") if rng.random() < 0.5]
            mentions = tuple(dict.fromkeys([*spec_def.mentions, *extra]))
            cap = caption_scene(scene, rng, tuple(m for m in mentions if m != "count"))
            if spec_def.name == "count" and len(cap.spec.count) != 1:
                continue
            tries += 1
            if cap.text not in seen:
                seen.add(cap.text)
                found.append(cap.text)
            if tries > 100 * n:
                raise RuntimeError(f"could not write {n} distinct descriptions for {task}/{label}")
        out.append(tuple(found))
    return tuple(out)


def zeroshot_task(name: str, *, split: str = "test", n: int = 500, resolution: int = 64, seed: int = 0,
                  distractors: int = 0, n_descriptions: int = 25) -> ZeroShotTask:
    """A balanced world zero-shot task of ``n`` images (image ``j`` has label ``j % K``).

    Returns a :class:`~rclip.data.base.ZeroShotTask` whose ``meta["scenes"]`` holds the ground-truth scenes.
    """
    _check_split(split)
    spec_def = _task_def(name)
    if n < 1:
        raise RClipError(f"n must be positive, got {n}")
    k = len(spec_def.classnames)
    scenes = []
    for j in range(n):
        rng = scene_rng(seed, f"task/{name}/{split}", j)
        scenes.append(sample_scene(rng, **spec_def.constraints(j % k, distractors)))
    labels = torch.tensor([spec_def.label_of(s) for s in scenes])
    assert torch.equal(labels, torch.arange(n) % k)
    images = render(scenes, resolution)
    return ZeroShotTask(
        name=f"world/{name}", dataset=TensorDataset(images, labels), classnames=list(spec_def.classnames),
        templates=list(spec_def.templates),
        descriptions=[list(d) for d in class_descriptions(name, n_descriptions, seed)],
        scale="world",
        meta=dict(split=split, n=n, resolution=resolution, seed=seed, distractors=distractors, scenes=scenes),
    )


def retrieval_set(*, split: str = "test", n: int = 1000, resolution: int = 64, seed: int = 0,
                  captions_per_image: int = 5) -> RetrievalSet:
    """``n`` images with ``captions_per_image`` distinct true captions each (meta holds scenes and specs)."""
    _check_split(split)
    scenes, groups, specs = [], [], []
    for j in range(n):
        rng = scene_rng(seed, f"retrieval/{split}", j)
        scene = sample_scene(rng)
        caps = captions_for(scene, rng, captions_per_image)
        scenes.append(scene)
        groups.append([c.text for c in caps])
        specs += [c.spec for c in caps]
    images = render(scenes, resolution)
    return RetrievalSet.from_groups(
        "world/retrieval", TensorDataset(images), groups, scale="world",
        meta=dict(split=split, n=n, resolution=resolution, seed=seed, scenes=scenes, specs=specs),
    )


class WorldPairs(Dataset):
    """Image-caption pairs for contrastive pre-training, generated on demand.

    Pair ``i`` is scene ``i`` of stream ``pairs/<split>`` with one of its true captions, chosen by the same
    generator, so a pair depends only on ``(seed, split, i)``. The dataset renders whole batches at once:
    fetch with a list of indices (``__getitems__``, which ``DataLoader`` uses with a batch sampler).

    Returns per batch a dict: ``images`` (B, 3, R, R) in [0, 1], ``texts`` (B captions), ``index`` (B,).
    """

    def __init__(self, n: int, *, split: str = "train", resolution: int = 64, seed: int = 0):
        _check_split(split)
        self.n, self.split, self.resolution, self.seed = int(n), split, int(resolution), int(seed)

    def __len__(self) -> int:
        return self.n

    def pair(self, i: int) -> tuple[Scene, Caption]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = scene_rng(self.seed, f"pairs/{self.split}", i)
        scene = sample_scene(rng)
        return scene, caption_scene(scene, rng)

    def __getitems__(self, indices: list[int]) -> dict:
        pairs = [self.pair(int(i)) for i in indices]
        return {
            "images": render([s for s, _ in pairs], self.resolution),
            "texts": [c.text for _, c in pairs],
            "index": torch.as_tensor(indices, dtype=torch.long),
        }

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {"images": batch["images"][0], "texts": batch["texts"][0], "index": batch["index"][0]}


def spec_images(specs: list[CaptionSpec], *, resolution: int = 64, seed: int = 0, stream: str = "generator"
                ) -> tuple[torch.Tensor, list[Scene]]:
    """Render one new image per caption spec (the world's analog of text-to-image generation)."""
    scenes = []
    for j, spec in enumerate(specs):
        rng = scene_rng(seed, stream, j)
        scenes.append(sample_scene(rng, **spec.scene_constraints(rng)))
    return render(scenes, resolution), scenes


__all__ = ["TASKS", "TASK_NAMES", "SPLITS", "zeroshot_task", "retrieval_set", "WorldPairs", "class_descriptions",
           "spec_images"]


class WorldLabelled(Dataset):
    """The images of a world zero-shot task with their labels, generated on demand (for fine-tuning).

    Item ``j`` is image ``j`` of ``zeroshot_task(task, split=split, seed=seed)`` (label ``j % K``), rendered only
    when asked for, so a large training split costs no memory. Fetch batches with ``__getitems__``: a dict with
    ``images`` (B, 3, R, R) in [0, 1], ``labels`` (B,) and ``index`` (B,).
    """

    def __init__(self, task: str, n: int, *, split: str = "train", resolution: int = 64, seed: int = 0):
        _check_split(split)
        self.task = _task_def(task)
        self.n, self.split, self.resolution, self.seed = int(n), split, int(resolution), int(seed)

    def __len__(self) -> int:
        return self.n

    def scene(self, j: int) -> Scene:
        if not 0 <= j < self.n:
            raise IndexError(j)
        rng = scene_rng(self.seed, f"task/{self.task.name}/{self.split}", j)
        return sample_scene(rng, **self.task.constraints(j % len(self.task.classnames), 0))

    def __getitems__(self, indices: list[int]) -> dict:
        idx = [int(i) for i in indices]
        return {"images": render([self.scene(j) for j in idx], self.resolution),
                "labels": torch.as_tensor([j % len(self.task.classnames) for j in idx], dtype=torch.long),
                "index": torch.as_tensor(idx, dtype=torch.long)}

    def __getitem__(self, j: int) -> dict:
        batch = self.__getitems__([j])
        return {k: v[0] for k, v in batch.items()}
