"""Poisoning threats on the world's pre-training pairs: targeted poisoning and backdoors, with exact ground truth.

Both attacks wrap a clean :class:`~rclip.world.WorldPairs` (pairs generated on demand) in a
:class:`PoisonedPairs` dataset that is just as lazy: pair ``i`` is a pure function of ``(base, config, i)``, so the
same seed gives the same poisoned corpus, and ``poisoned`` (N,) says which pairs the attacker touched.

* **Targeted poisoning** (Carlini & Terzis 2021): ``n_targets`` target images, taken from the *test* split of a
  world zero-shot task (image ``j`` of ``zeroshot_task(task, split="test")``), are each paired with many captions
  stating an adversarial class; the poison pairs are *appended* after the clean ones (the attacker adds data).
  ASR = fraction of target images that zero-shot classify top-1 as their adversarial class.
* **Backdoor** (BadNets patch or blended noise): a random ``poison_rate`` fraction of the clean pairs get a trigger
  on their image and their caption *replaced* by a caption stating the target class (the corpus keeps its size).
  ASR = fraction of triggered test images of other classes classified as the target class
  (:func:`backdoor_test_images` builds them).

A caption of the adversarial/target class is a true caption of a fresh scene of that class that states the class
(:func:`class_captions`), so its wording is as varied as the clean captions'. Ground truth for defenses:
``describes(i, j)`` (does caption ``j`` truly describe image ``i``'s scene; a trigger does not change the scene) and
``keeps_poison(i, j)`` (would pairing poisoned image ``i`` with caption ``j`` still teach the attack).

Attacks stack: the ``base`` of an attack may itself be a poisoned corpus (e.g. a BadNets backdoor, then a blended
one on other pairs, then targeted poison appended), so one pre-training run faces every threat at once. Each layer
poisons only pairs the layers below left clean; :meth:`PoisonedPairs.layers` lists them, innermost first.
:class:`GroundTruth` reads a corpus's truth once for scoring whole re-matchings; :func:`threat_items` measures
every layer's outcome per item against a model (:func:`threat_report`: their means, the ASRs). At paper scale,
:class:`PoisonedCorpus` mounts the same attacks on any image–caption corpus (no scene ground truth).

One code path for both scales: which pairs a backdoor takes and which test images a targeted attack aims at, with
every check on the configs, come from :func:`plan_backdoor` and :func:`plan_targeted`, and each poison caption from
its own seeded generator (:func:`backdoor_caption_rng`, :func:`targeted_caption_rng`) fed to a pluggable caption
source — :class:`WorldClassCaptions` (a true caption of a fresh scene of the class) or :class:`TemplateClassCaptions`
(a zero-shot template filled with the class name). The world and paper corpora differ only in where images and
captions come from.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from rclip.errors import RClipError
from rclip.world.language import Caption, CaptionSpec, caption_scene
from rclip.world.render import render
from rclip.world.scenes import Scene, sample_scene, scene_rng
from rclip.world.tasks import TASKS, TaskDef, WorldLabelled, WorldPairs

# ----------------------------------------------------------------------------------------------------------------
# Captions of a class
# ----------------------------------------------------------------------------------------------------------------


def spec_label(task: str, spec: CaptionSpec) -> int | None:
    """The class of world task ``task`` that a caption states, or ``None`` if it does not state one.

    A caption states a colour_shape class only if it names both; it states a count only if its number is exact.
    """
    t = _task(task)
    if t.name == "colour_shape":
        return None if spec.colour is None or spec.shape is None else spec.colour * len(TASKS["shape"].classnames) \
            + spec.shape
    if t.name == "count":
        return next(iter(spec.count)) - 1 if len(spec.count) == 1 else None
    return getattr(spec, t.name)


#: The attributes a class caption may mention besides its class, unless the corpus says otherwise.
EXTRA_MENTIONS = ("size", "colour", "shape", "texture", "position")


def class_caption(task: str, label: int, rng: np.random.Generator, max_tries: int = 100,
                  extras: tuple[str, ...] = EXTRA_MENTIONS) -> Caption:
    """One caption stating class ``label`` of ``task``: a true caption of a fresh scene of that class, mentioning
    the class attribute(s) and, at random, some of ``extras`` (a corpus's own caption vocabulary)."""
    t = _task(task)
    if not 0 <= label < len(t.classnames):
        raise RClipError(f"label {label} is not a class of world task {task!r} (0..{len(t.classnames) - 1})")
    for _ in range(max_tries):
        scene = sample_scene(rng, **t.constraints(label, distractors=0))
        extra = [a for a in extras if rng.random() < 0.5]
        mentions = tuple(m for m in dict.fromkeys([*t.mentions, *extra]) if m != "count")
        caption = caption_scene(scene, rng, mentions)
        if spec_label(task, caption.spec) == label:
            return caption
    raise RuntimeError(f"no caption stating {task}/{label} in {max_tries} tries")


def class_captions(task: str, label: int, n: int, *, seed: int = 0, stream: str = "poison/captions",
                   extras: tuple[str, ...] = EXTRA_MENTIONS) -> list[Caption]:
    """``n`` captions stating class ``label`` (caption ``c`` from its own generator: random access, seeded)."""
    return [class_caption(task, label, scene_rng(seed, f"{stream}/{task}/{label}", c), extras=extras)
            for c in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Triggers
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger on [0, 1] images (B, 3, R, R).

    kind: ``"patch"`` (BadNets: a fixed random-noise square pasted on the image) or ``"blend"`` (the whole image
        mixed with a fixed uniform-noise image: x' = (1 - alpha) x + alpha · noise).
    patch_size: side of the patch in pixels; None = 16/224 of the image side (the papers' 16 px at 224 px), at
        least 3 px. location: ``"corner"`` (bottom right, as BadNets) or ``"random"`` (per image, drawn from the
        image's key). alpha: the blend weight (the papers' 0.2). seed: the noise pattern (and random locations).
    Results are rounded to multiples of 1/255, like every world image.
    """
    kind: str = "patch"
    patch_size: int | None = None
    location: str = "corner"
    alpha: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("patch", "blend"):
            raise RClipError(f"trigger kind must be 'patch' (BadNets) or 'blend'; got {self.kind!r}")
        if self.location not in ("corner", "random"):
            raise RClipError(f"trigger location must be 'corner' or 'random'; got {self.location!r}")
        if not 0 < self.alpha <= 1:
            raise RClipError(f"the blend weight alpha must be in (0, 1]; got {self.alpha}")
        if self.patch_size is not None and self.patch_size < 1:
            raise RClipError(f"patch_size must be >= 1 pixel (or None for 16/224 of the side); got {self.patch_size}")

    def side(self, resolution: int) -> int:
        """The patch side in pixels at ``resolution``."""
        side = max(3, round(resolution * 16 / 224)) if self.patch_size is None else self.patch_size
        if side > resolution:
            raise RClipError(f"a {side}-px patch does not fit a {resolution}-px image; use a smaller patch_size")
        return side

    def pattern(self, resolution: int) -> torch.Tensor:
        """The trigger's noise: (3, s, s) for a patch of side s, (3, R, R) for a blend; uniform in [0, 1]."""
        size = self.side(resolution) if self.kind == "patch" else resolution
        gen = torch.Generator().manual_seed(int(self.seed))
        return (torch.rand(3, size, size, generator=gen) * 255).round() / 255

    def apply(self, images: torch.Tensor, keys: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Triggered copies of ``images`` (B, 3, R, R) in [0, 1]. ``keys`` (B,) ints pick random patch locations
        (e.g. the pairs' indices; default 0..B-1), so an image's trigger does not depend on its batch."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise RClipError(f"images must have shape (B, 3, R, R); got {tuple(images.shape)}")
        r = images.shape[-1]
        noise = self.pattern(r).to(images.device, images.dtype)
        if self.kind == "blend":
            out = (1 - self.alpha) * images + self.alpha * noise
        else:
            out = images.clone()
            s = noise.shape[-1]
            keys = list(range(len(images))) if keys is None else [int(k) for k in keys]
            if len(keys) != len(images):
                raise RClipError(f"{len(keys)} keys for {len(images)} images; give one key per image")
            for i, key in enumerate(keys):
                top, left = self._corner(r, s, key)
                out[i, :, top:top + s, left:left + s] = noise
        return (out.clamp(0, 1) * 255).round() / 255

    def _corner(self, resolution: int, side: int, key: int) -> tuple[int, int]:
        if self.location == "corner":
            return resolution - side, resolution - side
        rng = np.random.default_rng([int(self.seed), 0x7219, int(key)])
        return int(rng.integers(0, resolution - side + 1)), int(rng.integers(0, resolution - side + 1))


# ----------------------------------------------------------------------------------------------------------------
# What both scales share: which pairs and targets an attack takes, and where a poison caption comes from
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetPlan:
    """The targets of a targeted attack: test-image ``index`` (T,) of the attacked task (sorted), their ``true``
    and ``adversarial`` classes (T,), and ``per_target`` poison pairs each."""
    index: np.ndarray
    true: np.ndarray
    adversarial: np.ndarray
    per_target: int


def plan_targeted(config: "TargetedPoisonConfig", n_clean: int, task_name: str, n_classes: int,
                  label_of: Callable[[np.ndarray], np.ndarray], n_test: int | None = None) -> TargetPlan:
    """Validate a targeted attack on a corpus of ``n_clean`` pairs and choose its targets, for either scale.

    label_of(indices): the true classes of test images ``indices`` of the attacked task; n_test: how many test
    images the task has (None: unlimited, the world's). Targets are drawn from the first ``config.target_pool``
    test images, skipping those already of a fixed ``adversarial_label`` (a target of that class is no attack).
    """
    k = n_classes
    if config.n_targets < 1:
        raise RClipError(f"n_targets must be >= 1; got {config.n_targets}")
    if (config.captions_per_target is None) == (config.poison_rate is None):
        raise RClipError("give exactly one of captions_per_target (poison pairs per target) and poison_rate "
                         "(poison pairs per clean pair); set the other to None")
    if config.poison_rate is not None:
        if not 0 < config.poison_rate < 1:
            raise RClipError(f"poison_rate must be in (0, 1); got {config.poison_rate}")
        per = max(1, round(config.poison_rate * n_clean / config.n_targets))
    else:
        per = int(config.captions_per_target)
        if per < 1:
            raise RClipError(f"captions_per_target must be >= 1; got {per}")
    if config.adversarial_label is not None and not 0 <= config.adversarial_label < k:
        raise RClipError(f"adversarial_label {config.adversarial_label} is not a class of {task_name} (0..{k - 1})")
    rng = np.random.default_rng([int(config.seed), 0x7A26])
    pool = np.arange(config.target_pool if n_test is None else min(config.target_pool, n_test))
    if config.adversarial_label is not None:
        pool = pool[np.asarray(label_of(pool)) != config.adversarial_label]
    if len(pool) < config.n_targets:
        raise RClipError(f"target_pool={config.target_pool} gives {len(pool)} eligible test images of {task_name} "
                         f"for {config.n_targets} targets; raise target_pool or lower n_targets")
    index = np.sort(rng.choice(pool, config.n_targets, replace=False))
    true = np.asarray(label_of(index), dtype=np.int64)
    adv = np.full_like(true, config.adversarial_label) if config.adversarial_label is not None else \
        (true + rng.integers(1, k, size=len(true))) % k
    return TargetPlan(index, true, adv, per)


def plan_backdoor(config: "BackdoorConfig", n_pairs: int, eligible: np.ndarray, task_name: str, n_classes: int,
                  resolution: int) -> np.ndarray:
    """Validate a backdoor on a corpus of ``n_pairs`` pairs whose pairs ``eligible`` are still clean, for either
    scale, and choose the pairs it poisons (sorted indices)."""
    if not 0 <= config.target_label < n_classes:
        raise RClipError(f"target_label {config.target_label} is not a class of {task_name} (0..{n_classes - 1})")
    if (config.poison_rate is None) == (config.n_poison is None):
        raise RClipError("give exactly one of poison_rate (a fraction of the pairs) and n_poison (a count); "
                         "set the other to None")
    if config.n_poison is not None:
        n_poison = int(config.n_poison)
    else:
        if not 0 < config.poison_rate < 1:
            raise RClipError(f"poison_rate must be in (0, 1); got {config.poison_rate}")
        n_poison = max(1, round(config.poison_rate * n_pairs))
    if not 1 <= n_poison <= len(eligible):
        raise RClipError(f"n_poison={n_poison} must be between 1 and the {len(eligible)} clean pairs of the corpus")
    config.trigger.side(resolution)  # fails early if the patch does not fit
    rng = np.random.default_rng([int(config.seed), 0xBAD])
    return np.sort(rng.choice(eligible, n_poison, replace=False))


def targeted_caption_rng(config: "TargetedPoisonConfig", task: str, target: int, c: int) -> np.random.Generator:
    """The generator of poison caption ``c`` of target ``target`` (a pure function of the attack and the pair)."""
    return scene_rng(config.seed, f"poison/targeted/{task}/{target}", c)


def backdoor_caption_rng(config: "BackdoorConfig", task: str, i: int) -> np.random.Generator:
    """The generator of the caption that replaces pair ``i``'s in a backdoor."""
    return scene_rng(config.seed, f"poison/backdoor/{task}", i)


class WorldClassCaptions:
    """The world's caption source: a true caption of a fresh scene of the class (:func:`class_caption`), mentioning
    only what the corpus's captions may mention; returns a :class:`~rclip.world.language.Caption` (text and spec)."""

    def __init__(self, task: str, extras: tuple[str, ...] = EXTRA_MENTIONS):
        self.task, self.extras = task, tuple(extras)

    def __call__(self, label: int, rng: np.random.Generator) -> Caption:
        return class_caption(self.task, label, rng, extras=self.extras)


class TemplateClassCaptions:
    """The paper-scale caption source: one of a zero-shot task's templates filled with the class name (the papers'
    "a photo of a <class>"); returns the text."""

    def __init__(self, zeroshot):
        self.templates, self.classnames = list(zeroshot.templates), list(zeroshot.classnames)

    def __call__(self, label: int, rng: np.random.Generator) -> str:
        return self.templates[int(rng.integers(len(self.templates)))].format(self.classnames[label])

    def texts(self, label: int) -> set[str]:
        """Every caption this source can give class ``label``."""
        return {t.format(self.classnames[label]) for t in self.templates}


# ----------------------------------------------------------------------------------------------------------------
# Poisoned corpora
# ----------------------------------------------------------------------------------------------------------------

class PoisonedPairs(Dataset):
    """A poisoned view of a :class:`~rclip.world.WorldPairs` corpus, generated on demand like it.

    Attributes:
        base: the corpus attacked: a clean :class:`~rclip.world.WorldPairs` or another poisoned corpus (stacked
            attacks). task: the world task whose classes this attack uses.
        poisoned: (N,) bool, which pairs any attacker made (this layer's and the base's). own: (N,) bool, which
            pairs this layer made. adversarial_label: (N,) long, the class a poisoned pair teaches (-1 for clean
            pairs).
    Batches (``__getitems__``) are dicts: ``images`` (B, 3, R, R) in [0, 1], ``texts`` (B str), ``index`` (B,),
    ``poisoned`` (B,) bool, so :func:`rclip.train.pretrain` trains on it unchanged.
    """

    base: "WorldPairs | PoisonedPairs"
    task: str
    poisoned: torch.Tensor
    own: torch.Tensor
    adversarial_label: torch.Tensor

    def __len__(self) -> int:
        return len(self.poisoned)

    @property
    def resolution(self) -> int:
        return self.base.resolution

    @property
    def seed(self) -> int:
        return self.base.seed

    @property
    def caption_mentions(self) -> tuple[str, ...]:
        """What the corpus's captions may mention (poison captions add only these to their class)."""
        return tuple(getattr(self.base, "caption_mentions", EXTRA_MENTIONS))

    def layers(self) -> list["PoisonedPairs"]:
        """The attacks of this corpus, innermost (applied first) to outermost (this one)."""
        inner = self.base.layers() if isinstance(self.base, PoisonedPairs) else []
        return [*inner, self]

    def _mark(self, own: torch.Tensor, labels: torch.Tensor) -> None:
        """Set ``own``, ``poisoned`` and ``adversarial_label`` from this layer's pairs and the base's (the base's
        pairs are the first ``len(base)``; a layer that appends pairs passes longer tensors)."""
        n = len(self.base)
        below = self.base.poisoned if isinstance(self.base, PoisonedPairs) else torch.zeros(n, dtype=torch.bool)
        below_labels = self.base.adversarial_label if isinstance(self.base, PoisonedPairs) else \
            torch.full((n,), -1, dtype=torch.long)
        extra = len(own) - n
        below = torch.cat([below, torch.zeros(extra, dtype=torch.bool)])
        below_labels = torch.cat([below_labels, torch.full((extra,), -1, dtype=torch.long)])
        if (own & below).any():
            raise AssertionError("a layer poisoned a pair that an attack below it had already poisoned")
        self.own, self.poisoned = own, own | below
        self.adversarial_label = torch.where(own, labels, below_labels)

    def pair(self, i: int) -> tuple[Scene, Caption]:
        """(scene, caption) of pair ``i``; for a backdoored pair the image also carries the trigger."""
        raise NotImplementedError

    def captions(self, indices=None) -> list[Caption]:
        """The captions of pairs ``indices`` (default all), with their specs."""
        return [self.pair(int(i))[1] for i in (range(len(self)) if indices is None else indices)]

    def images(self, indices) -> torch.Tensor:
        """Rendered images (B, 3, R, R) of pairs ``indices``, triggers included."""
        idx = [int(i) for i in indices]
        return self._finish(render([self.pair(i)[0] for i in idx], self.resolution), idx)

    def __getitems__(self, indices) -> dict:
        idx = [int(i) for i in indices]
        pairs = [self.pair(i) for i in idx]
        return {"images": self._finish(render([s for s, _ in pairs], self.resolution), idx),
                "texts": [c.text for _, c in pairs],
                "index": torch.as_tensor(idx, dtype=torch.long),
                "poisoned": self.poisoned[idx]}

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}

    def _finish(self, images: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """Post-render edits of the base's pairs among ``indices`` (their triggers); subclasses add their own."""
        if not isinstance(self.base, PoisonedPairs):
            return images
        rows = [r for r, i in enumerate(indices) if i < len(self.base)]
        if not rows:
            return images
        images = images.clone()
        images[rows] = self.base._finish(images[rows], [indices[r] for r in rows])
        return images

    def _check(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i

    def describes(self, image: int, caption: int) -> bool:
        """Does the caption of pair ``caption`` truly describe the scene of pair ``image``?"""
        return self.pair(caption)[1].spec.matches(self.pair(image)[0])

    def keeps_poison(self, image: int, caption: int) -> bool:
        """Would pairing image ``image`` with caption ``caption`` still teach the attack? False for a clean image;
        for a poisoned one, True iff the caption states the pair's adversarial class (in the task of the attack
        that poisoned it)."""
        owner = self.owner(image)
        if owner is None:
            return False
        return spec_label(owner.task, self.pair(caption)[1].spec) == int(self.adversarial_label[image])

    def owner(self, i: int) -> "PoisonedPairs | None":
        """The attack layer that poisoned pair ``i`` (None for a clean pair)."""
        for layer in self.layers():
            if i < len(layer.own) and layer.own[i]:
                return layer
        return None


class GroundTruth:
    """The ground truth of a poisoned corpus, read once: ``describes(i, j)`` and ``keeps_poison(i, j)`` as in
    :class:`PoisonedPairs`, without re-generating pairs on every call (for scoring whole re-matchings)."""

    def __init__(self, dataset: PoisonedPairs):
        pairs = [dataset.pair(i) for i in range(len(dataset))]
        self.scenes = [scene for scene, _ in pairs]
        self.specs = [caption.spec for _, caption in pairs]
        self.adversarial_label = dataset.adversarial_label.tolist()
        owners = [dataset.owner(i) if dataset.poisoned[i] else None for i in range(len(dataset))]
        self.task = [o.task if o is not None else None for o in owners]
        self._labels: dict[tuple[str, int], int | None] = {}

    def describes(self, image: int, caption: int) -> bool:
        return self.specs[caption].matches(self.scenes[image])

    def keeps_poison(self, image: int, caption: int) -> bool:
        task = self.task[image]
        if task is None:
            return False
        key = (task, caption)
        if key not in self._labels:
            self._labels[key] = spec_label(task, self.specs[caption])
        return self._labels[key] == self.adversarial_label[image]


@dataclass(frozen=True)
class TargetedPoisonConfig:
    """Carlini–Terzis targeted poisoning.

    task: the world zero-shot task whose test images are the targets and whose classes are the adversarial ones.
    n_targets: number of target images. captions_per_target: poison pairs per target (the papers: ~100), or
    poison_rate: poison pairs / clean pairs, split evenly over the targets (give exactly one of the two).
    adversarial_label: one class for every target (None = a random class other than each target's own).
    target_pool: targets are drawn from test images 0..target_pool-1. seed: every random choice.
    """
    task: str = "shape"
    n_targets: int = 4
    captions_per_target: int | None = 100
    poison_rate: float | None = None
    adversarial_label: int | None = None
    target_pool: int = 500
    seed: int = 0


class TargetedPoisonPairs(PoisonedPairs):
    """Clean pairs 0..n-1, then for target t the poison pairs n + t·c .. n + (t+1)·c - 1 (c captions per target).

    ``target_index`` (T,): the targets' indices in ``zeroshot_task(task, split="test")``; ``target_label`` (T,)
    their true classes; ``target_adversarial`` (T,) the classes the attack wants (see :meth:`target_images`).
    """

    kind = "targeted"

    def __init__(self, base: "WorldPairs | PoisonedPairs", config: TargetedPoisonConfig):
        t = _task(config.task)
        k = len(t.classnames)
        plan = plan_targeted(config, len(base), t.name, k, lambda j: np.asarray(j) % k)   # test image j: class j % k
        self.base, self.task, self.config, self.per_target = base, t.name, config, plan.per_target
        self.target_index = torch.as_tensor(plan.index, dtype=torch.long)
        self.target_label = torch.as_tensor(plan.true, dtype=torch.long)
        self.target_adversarial = torch.as_tensor(plan.adversarial, dtype=torch.long)
        self.source = WorldClassCaptions(t.name, self.caption_mentions)
        n, n_poison = len(base), plan.per_target * config.n_targets
        self._mark(torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n_poison, dtype=torch.bool)]),
                   torch.cat([torch.full((n,), -1, dtype=torch.long),
                              self.target_adversarial.repeat_interleave(plan.per_target)]))
        self._targets = WorldLabelled(t.name, int(plan.index.max()) + 1, split="test", resolution=base.resolution,
                                      seed=base.seed)

    def pair(self, i: int) -> tuple[Scene, Caption]:
        i = self._check(int(i))
        n = len(self.base)
        if i < n:
            return self.base.pair(i)
        t, c = divmod(i - n, self.per_target)
        caption = self.source(int(self.target_adversarial[t]), targeted_caption_rng(self.config, self.task, t, c))
        return self._targets.scene(int(self.target_index[t])), caption

    def target_images(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The targets for ASR: images (T, 3, R, R), true labels (T,), adversarial labels (T,)."""
        images = self._targets.__getitems__(self.target_index.tolist())["images"]
        return images, self.target_label.clone(), self.target_adversarial.clone()


@dataclass(frozen=True)
class BackdoorConfig:
    """A backdoor: ``trigger`` on a random fraction of the pairs, whose captions then state ``target_label``.

    task, target_label: the class the trigger should evoke. poison_rate: fraction of the clean pairs poisoned, or
    n_poison: their number (give exactly one). seed: which pairs, and their new captions.
    """
    trigger: Trigger = Trigger()
    task: str = "shape"
    target_label: int = 0
    poison_rate: float | None = 0.01
    n_poison: int | None = None
    seed: int = 0


class BackdoorPairs(PoisonedPairs):
    """The clean corpus with ``poison_index`` (P,) pairs replaced: triggered image, caption of the target class."""

    kind = "backdoor"

    def __init__(self, base: "WorldPairs | PoisonedPairs", config: BackdoorConfig):
        t = _task(config.task)
        n = len(base)
        eligible = np.arange(n) if not isinstance(base, PoisonedPairs) else (~base.poisoned).nonzero().flatten().numpy()
        index = plan_backdoor(config, n, eligible, t.name, len(t.classnames), base.resolution)
        self.base, self.task, self.config, self.trigger = base, t.name, config, config.trigger
        self.source = WorldClassCaptions(t.name, self.caption_mentions)
        self.poison_index = torch.as_tensor(index, dtype=torch.long)
        own = torch.zeros(n, dtype=torch.bool)
        own[self.poison_index] = True
        self._mark(own, torch.full((n,), config.target_label, dtype=torch.long))

    def pair(self, i: int) -> tuple[Scene, Caption]:
        i = self._check(int(i))
        scene, caption = self.base.pair(i)
        if self.own[i]:
            caption = self.source(self.config.target_label, backdoor_caption_rng(self.config, self.task, i))
        return scene, caption

    def _finish(self, images: torch.Tensor, indices: list[int]) -> torch.Tensor:
        images = super()._finish(images, indices)
        rows = [r for r, i in enumerate(indices) if self.own[i]]
        if rows:
            images = images.clone()
            images[rows] = self.trigger.apply(images[rows], [indices[r] for r in rows])
        return images


# ----------------------------------------------------------------------------------------------------------------
# Paper scale: any image–caption corpus
# ----------------------------------------------------------------------------------------------------------------

class CorpusAttack:
    """One attack of a :class:`PoisonedCorpus`, with the attributes a world attack layer has for what reads it
    (:func:`threat_items`, :func:`attack_names`, :func:`poison_counts`): ``kind`` (``"targeted"`` or
    ``"backdoor"``), ``task``, ``config``, ``own`` (the pairs it poisoned), and ``trigger`` (backdoor) or
    :meth:`target_images` (targeted)."""

    def __init__(self, kind: str, task: str, config, own: torch.Tensor, targets: tuple | None = None):
        self.kind, self.task, self.config, self.own = kind, task, config, own
        self.trigger = getattr(config, "trigger", None)
        self._targets = targets

    def target_images(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels, adversarial = self._targets
        return images, labels.clone(), adversarial.clone()


class PoisonedCorpus(Dataset):
    """Targeted poisoning and backdoors on any image–caption corpus (paper scale: no scene ground truth).

    The same attacks as the world's, chosen by the same code (:func:`plan_backdoor`, :func:`plan_targeted`: the
    same pairs, targets, checks and caption generators for the same configs); only where images and captions come
    from differs. base: a corpus with ``texts`` and ``__getitems__`` (e.g. :class:`rclip.data.pairs.FilePairs`);
    task: the zero-shot task whose classes the attacks use (its test images are the targets; captions of a class
    come from :class:`TemplateClassCaptions`, the papers' "a photo of a <class>"). backdoors: configs whose ``task``
    is ignored (the task is ``task``), applied in order to pairs still clean; targeted: appended poison pairs.
    ``poisoned``, ``adversarial_label``, ``layers()`` and ``keeps_poison`` mean what they mean on
    :class:`PoisonedPairs`; ``keeps_poison(i, j)`` is True when caption j is a caption of poisoned image i's
    adversarial class.
    """

    def __init__(self, base, task, *, backdoors=(), targeted: TargetedPoisonConfig | None = None):
        n, k = len(base), len(task.classnames)
        self.base, self.zeroshot = base, task
        self.task = task.name
        self.source = TemplateClassCaptions(task)
        self.poisoned = torch.zeros(n, dtype=torch.bool)
        self.adversarial_label = torch.full((n,), -1, dtype=torch.long)
        self._texts = list(base.texts)
        self._triggers: dict[int, Trigger] = {}
        self._layers: list[CorpusAttack] = []
        side = int(base.__getitems__([0])["images"].shape[-1]) if backdoors and n else self.resolution
        for cfg in backdoors:
            eligible = (~self.poisoned).nonzero().flatten().numpy()
            chosen = plan_backdoor(cfg, n, eligible, task.name, k, side).tolist()   # the trigger fits the corpus
            own = torch.zeros(n, dtype=torch.bool)
            own[chosen] = True
            for i in chosen:
                self._triggers[i] = cfg.trigger
                self._texts[i] = self.source(cfg.target_label, backdoor_caption_rng(cfg, task.name, i))
            self.poisoned |= own
            self.adversarial_label[own] = cfg.target_label
            self._layers.append(CorpusAttack("backdoor", task.name, cfg, own))
        self._targets = torch.zeros(0, dtype=torch.long)
        if targeted is not None:
            plan = plan_targeted(targeted, n, task.name, k,
                                 lambda idx: np.array([int(task.dataset[int(j)][1]) for j in idx], dtype=np.int64),
                                 n_test=len(task))
            self._target_images = torch.stack([task.dataset[int(j)][0] for j in plan.index])
            labels, adversarial = torch.as_tensor(plan.true), torch.as_tensor(plan.adversarial)
            self._targets = torch.arange(targeted.n_targets).repeat_interleave(plan.per_target)
            self._texts += [self.source(int(adversarial[t]), targeted_caption_rng(targeted, task.name, t, c))
                            for t in range(targeted.n_targets) for c in range(plan.per_target)]
            extra = len(self._targets)
            self.poisoned = torch.cat([self.poisoned, torch.ones(extra, dtype=torch.bool)])
            self.adversarial_label = torch.cat([self.adversarial_label, adversarial[self._targets]])
            own = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(extra, dtype=torch.bool)])
            self._layers.append(CorpusAttack("targeted", task.name, targeted, own,
                                             (self._target_images, labels, adversarial)))
        self.texts = self._texts
        self._class_texts = [self.source.texts(c) for c in range(k)]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def resolution(self) -> int:
        return int(self.zeroshot.dataset[0][0].shape[-1])

    def layers(self) -> list:
        return list(self._layers)

    def keeps_poison(self, image: int, caption: int) -> bool:
        label = int(self.adversarial_label[image])
        return label >= 0 and self.texts[caption] in self._class_texts[label]

    def images(self, indices) -> torch.Tensor:
        return self.__getitems__(indices)["images"]

    def __getitems__(self, indices) -> dict:
        idx = [int(i) for i in indices]
        n = len(self.base)
        own = [i for i in idx if i < n]
        loaded = dict(zip(own, self.base.__getitems__(own)["images"])) if own else {}
        images = []
        for i in idx:
            if i >= n:
                images.append(self._target_images[int(self._targets[i - n])])
            elif i in self._triggers:
                images.append(self._triggers[i].apply(loaded[i][None], [i])[0])
            else:
                images.append(loaded[i])
        return {"images": torch.stack(images), "texts": [self.texts[i] for i in idx],
                "index": torch.as_tensor(idx, dtype=torch.long), "poisoned": self.poisoned[idx]}

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}


def targeted_poison(base: "WorldPairs | PoisonedPairs", config: TargetedPoisonConfig | None = None) -> TargetedPoisonPairs:
    """Carlini–Terzis targeted poisoning of ``base`` (see :class:`TargetedPoisonConfig`)."""
    return TargetedPoisonPairs(base, config or TargetedPoisonConfig())


def backdoor_poison(base: "WorldPairs | PoisonedPairs", config: BackdoorConfig | None = None) -> BackdoorPairs:
    """A BadNets-patch or blended backdoor on ``base`` (see :class:`BackdoorConfig`)."""
    return BackdoorPairs(base, config or BackdoorConfig())


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------

def backdoor_test_images(images: torch.Tensor, labels: torch.Tensor, trigger: Trigger, target_label: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triggered test images for backdoor ASR: those of ``images`` (N, 3, R, R) whose label is not the target,
    with the trigger applied (keyed by their index in ``images``). Returns (images (M, 3, R, R), labels (M,))."""
    labels = torch.as_tensor(labels)
    if len(labels) != len(images):
        raise RClipError(f"{len(images)} images but {len(labels)} labels")
    keep = (labels != target_label).nonzero().flatten()
    if keep.numel() == 0:
        raise RClipError(f"every test image is of the target class {target_label}; the ASR needs other classes")
    return trigger.apply(images[keep], keep.tolist()), labels[keep]


def attack_success_rate(predictions: torch.Tensor, adversarial_labels: torch.Tensor | int) -> float:
    """Fraction of ``predictions`` (N,) equal to the adversarial label(s) (an int or (N,))."""
    predictions = torch.as_tensor(predictions)
    if predictions.numel() == 0:
        raise RClipError("no predictions: the attack success rate of an empty set is undefined")
    target = torch.as_tensor(adversarial_labels, device=predictions.device)
    return float((predictions == target).float().mean())


def threat_items(bundle, dataset: "PoisonedPairs | PoisonedCorpus", *, n_test: int = 400, batch_size: int = 256
                 ) -> dict:
    """Per-item outcomes of every attack in ``dataset`` (a poisoned corpus, stacked or not) against ``bundle``, with
    zero-shot classifiers built from each attack task's templates: what every attack success rate is the mean of.

    Per attack layer (named ``targeted``, ``patch <side>px`` or ``blend <alpha>``, with ``_2``… on repeats) a dict:
    ``task``, ``target`` (the backdoor's target class; -1 for targeted), ``hit`` (N,) bool — targeted: each target
    image classified top-1 as its adversarial class; backdoor: each triggered test image (the first ``n_test`` of
    the task's test split, those not of the target class) classified as the target class — and ``base`` (N,) bool,
    on the same items without the attack's effect — targeted: the target classified as its true class; backdoor: the
    same test image *without* the trigger classified as the target class (what the trigger must beat); and
    ``labels`` (N,) the items' true classes.
    """
    from rclip import zeroshot
    from rclip.world.tasks import zeroshot_task

    def test_task(name, n):
        if isinstance(dataset, PoisonedCorpus):           # paper scale: the corpus's own zero-shot task
            return dataset.zeroshot
        return zeroshot_task(name, split="test", n=n, resolution=dataset.resolution, seed=dataset.seed)

    out: dict[str, dict] = {}
    classifiers: dict[str, torch.nn.Module] = {}
    for layer, key in zip(dataset.layers(), attack_names(dataset)):
        if layer.task not in classifiers:
            classifiers[layer.task] = zeroshot.zeroshot_classifier(bundle, test_task(layer.task, 1))
        clf = classifiers[layer.task]
        if layer.kind == "targeted":
            images, labels, adversarial = layer.target_images()
            pred = zeroshot.predict(clf, images, batch_size)
            target = -1
            entry = {"hit": pred == adversarial, "base": pred == labels, "labels": labels}
        else:
            x, y = test_task(layer.task, n_test).tensors(n_test)
            triggered, labels = backdoor_test_images(x, y, layer.trigger, layer.config.target_label)
            clean = x[y != layer.config.target_label]
            target = int(layer.config.target_label)
            entry = {"hit": zeroshot.predict(clf, triggered, batch_size) == target,
                     "base": zeroshot.predict(clf, clean, batch_size) == target, "labels": labels}
        out[key] = {"task": layer.task, "target": target, **entry}
    return out


def attack_names(dataset: "PoisonedPairs | PoisonedCorpus") -> list[str]:
    """The name of each attack layer of ``dataset``, in ``layers()`` order: ``targeted``, ``patch <side>px`` or
    ``blend <alpha>``, with ``_2``, ``_3``… on repeats (the keys of :func:`threat_items`)."""
    names: list[str] = []
    for layer in dataset.layers():
        if layer.kind == "targeted":
            name = "targeted"
        else:
            trig = layer.trigger
            name = f"patch {trig.side(dataset.resolution)}px" if trig.kind == "patch" else f"blend {trig.alpha:g}"
        key, k = name, 2
        while key in names:
            key, k = f"{name}_{k}", k + 1
        names.append(key)
    return names


def poison_counts(dataset: "PoisonedPairs | PoisonedCorpus") -> dict[str, int]:
    """Poisoned pairs each attack of ``dataset`` made, by :func:`attack_names`."""
    return {name: int(layer.own.sum())
            for name, layer in zip(attack_names(dataset), dataset.layers())}


def threat_report(bundle, dataset: "PoisonedPairs | PoisonedCorpus", *, n_test: int = 400, batch_size: int = 256
                  ) -> dict:
    """Attack success rates of every attack in ``dataset`` against ``bundle``: the means of :func:`threat_items`.

    Per attack layer a dict: ``task``, ``target`` (-1 for targeted), ``asr`` (%), ``base_rate`` (%) and ``n``
    (see :func:`threat_items` for what each counts).
    """
    return {name: {"task": t["task"], "target": t["target"], "asr": 100 * t["hit"].float().mean().item(),
                   "base_rate": 100 * t["base"].float().mean().item(), "n": len(t["hit"])}
            for name, t in threat_items(bundle, dataset, n_test=n_test, batch_size=batch_size).items()}


def _task(name: str) -> TaskDef:
    if name not in TASKS:
        raise RClipError(f"unknown world task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["Trigger", "PoisonedPairs", "TargetedPoisonConfig", "TargetedPoisonPairs", "BackdoorConfig",
           "BackdoorPairs", "targeted_poison", "backdoor_poison", "backdoor_test_images", "attack_success_rate",
           "class_caption", "class_captions", "spec_label", "threat_items", "threat_report", "attack_names", "poison_counts",
           "GroundTruth", "PoisonedCorpus", "CorpusAttack", "TargetPlan", "plan_targeted", "plan_backdoor",
           "targeted_caption_rng", "backdoor_caption_rng", "WorldClassCaptions", "TemplateClassCaptions"]
