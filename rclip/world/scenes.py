"""Scenes: the exact ground truth behind every world image.

A :class:`Scene` is a background texture, lighting, and 1-4 objects. The first ``count`` objects form the
*subject group* (same shape, colour and size); the remaining objects are *distractors*, always small and always of
a different shape **and** colour than the subject. Captions describe the subject group and sometimes the
distractors; zero-shot labels are read off the subject group (or the background, for the texture task).

Scenes are sampled from a ``numpy.random.Generator``; every field may be pinned, which is how tasks draw class-
conditional images and how a caption's partial description is turned into a fresh scene
(:func:`sample_scene` with the caption's constraints).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from rclip.world.attributes import COLOURS, MAX_OBJECTS, POSITIONS, SHAPES, SIZES, TEXTURES


@dataclass(frozen=True)
class WorldObject:
    """One object: attribute indices plus continuous nuisance parameters.

    ``dx, dy`` jitter the centre inside its grid cell (fractions of the image side), ``angle`` is the rotation in
    radians, ``shade`` an additive RGB jitter in [0, 1] units.
    """

    shape: int
    colour: int
    size: int
    cell: int
    dx: float = 0.0
    dy: float = 0.0
    angle: float = 0.0
    shade: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image.

    Attributes:
        objects: subject group first (``count`` identical-attribute objects), then distractors.
        count: size of the subject group, 1..4.
        texture: index into :data:`~rclip.world.attributes.TEXTURES`.
        background: (grey level, contrast, period, angle, phase, r-tint, g-tint, b-tint), units of [0, 1] pixels,
            image sides and radians.
        light: (brightness, r-gain, g-gain, b-gain) applied to the whole image.
        noise: (standard deviation in [0, 1] pixel units, integer seed of the noise field).
    """

    objects: tuple[WorldObject, ...]
    count: int
    texture: int
    background: tuple[float, ...] = (0.5, 0.08, 0.15, 0.0, 0.0, 0.0, 0.0, 0.0)
    light: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    noise: tuple[float, int] = (0.02, 0)
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def shape(self) -> int:
        """Shape index of the subject group."""
        return self.objects[0].shape

    @property
    def colour(self) -> int:
        """Colour index of the subject group."""
        return self.objects[0].colour

    @property
    def size(self) -> int:
        """Size index of the subject group."""
        return self.objects[0].size

    @property
    def position(self) -> int | None:
        """Grid cell of the subject when it is a single object, else ``None`` (groups have no one position)."""
        return self.objects[0].cell if self.count == 1 else None

    @property
    def distractors(self) -> tuple[WorldObject, ...]:
        return self.objects[self.count:]

    def describe(self) -> str:
        """A terse, unambiguous summary for debugging and figure titles."""
        head = f"{self.count}x {SIZES[self.size]} {COLOURS[self.colour]} {SHAPES[self.shape]}"
        extra = "".join(f" + {COLOURS[o.colour]} {SHAPES[o.shape]}" for o in self.distractors)
        return f"{head}{extra} on {TEXTURES[self.texture]}"


def _pick(rng: np.random.Generator, n: int, fixed: int | None, exclude: set[int] = frozenset()) -> int:
    if fixed is not None:
        return int(fixed)
    choices = [i for i in range(n) if i not in exclude]
    return int(rng.choice(choices))


def sample_scene(
    rng: np.random.Generator,
    *,
    shape: int | None = None,
    colour: int | None = None,
    size: int | None = None,
    count: int | None = None,
    texture: int | None = None,
    position: int | None = None,
    n_distractors: int | None = None,
    max_distractors: int = 2,
    p_distractors: float = 0.5,
    distractors: tuple[tuple[int, int], ...] = (),
) -> Scene:
    """Sample a scene, pinning any attribute that is given.

    Args:
        rng: the generator every random choice is drawn from (the scene is a pure function of its state).
        shape, colour, size, count, texture: attribute indices of the subject group (``count`` in 1..4).
        position: grid cell of the subject; only meaningful with ``count == 1``.
        n_distractors: exact number of distractors; if ``None``, with probability ``p_distractors`` draw 1 to
            ``max_distractors`` (capped so that there are at most 4 objects), else none.
        distractors: (shape, colour) pairs that must appear among the distractors (a caption mentioned them).
    """
    if count is None:
        count = int(rng.choice([1, 2, 3, 4], p=[0.4, 0.25, 0.2, 0.15]))
    if not 1 <= count <= MAX_OBJECTS:
        raise ValueError(f"count must be in 1..{MAX_OBJECTS}, got {count}")
    if position is not None and count != 1:
        raise ValueError("a position can only be pinned for a single subject object (count == 1)")
    # a free subject attribute avoids the required distractors' (a distractor differs in both shape and colour)
    shape = _pick(rng, len(SHAPES), shape, {s for s, _ in distractors})
    colour = _pick(rng, len(COLOURS), colour, {c for _, c in distractors})
    size = _pick(rng, len(SIZES), size)
    texture = _pick(rng, len(TEXTURES), texture)

    room = MAX_OBJECTS - count
    if n_distractors is None:
        n_distractors = 0
        if room > 0 and max_distractors > 0 and rng.random() < p_distractors:
            n_distractors = int(rng.integers(1, min(room, max_distractors) + 1))
    n_distractors = max(n_distractors, len(distractors))
    if n_distractors > room:
        raise ValueError(f"{count} subject objects leave room for {room} distractors, not {n_distractors}")

    cells = list(rng.permutation(9)[: count + n_distractors])
    if position is not None:
        if position in cells:
            cells.remove(position)
        cells = [int(position)] + cells[: count + n_distractors - 1]

    def make(shp: int, col: int, siz: int, cell: int) -> WorldObject:
        return WorldObject(
            shape=shp, colour=col, size=siz, cell=int(cell),
            dx=float(rng.uniform(-0.035, 0.035)), dy=float(rng.uniform(-0.035, 0.035)),
            angle=float(rng.uniform(-0.3, 0.3)),
            shade=tuple(float(v) for v in rng.uniform(-0.05, 0.05, size=3)),
        )

    objects = [make(shape, colour, size, cells[i]) for i in range(count)]
    wanted = list(distractors)
    for j in range(n_distractors):
        if wanted:
            d_shape, d_colour = wanted.pop(0)
        else:
            d_shape = _pick(rng, len(SHAPES), None, {shape})
            d_colour = _pick(rng, len(COLOURS), None, {colour})
        if d_shape == shape or d_colour == colour:
            raise ValueError("a distractor must differ from the subject in both shape and colour")
        objects.append(make(d_shape, d_colour, 0, cells[count + j]))

    background = (
        float(rng.uniform(0.32, 0.62)),  # grey level
        float(rng.uniform(0.07, 0.13)),  # texture contrast
        float(rng.uniform(0.11, 0.2)),  # texture period, fraction of the side
        float(rng.uniform(0.0, np.pi)),  # texture orientation
        float(rng.uniform(0.0, 1.0)),  # texture phase
        *(float(v) for v in rng.uniform(-0.05, 0.05, size=3)),  # background tint
    )
    light = (float(rng.uniform(0.75, 1.15)), *(float(v) for v in rng.uniform(0.88, 1.12, size=3)))
    noise = (float(rng.uniform(0.01, 0.03)), int(rng.integers(0, 2**31 - 1)))
    return Scene(objects=tuple(objects), count=count, texture=texture, background=background, light=light,
                 noise=noise)


def scene_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of a named stream (a split or a task): independent for every triple.

    Streams are told apart by the CRC-32 of their name, so ``("train", i)`` and ``("test", i)`` never share a
    state, whatever the seed.
    """
    return np.random.default_rng([int(seed), zlib.crc32(stream.encode("utf-8")), int(index)])


__all__ = ["Scene", "WorldObject", "sample_scene", "scene_rng", "POSITIONS"]
