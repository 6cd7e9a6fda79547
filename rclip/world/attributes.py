"""The attribute vocabulary of the offline world: shapes, colours, sizes, positions, textures, counts.

Everything here is plain data. Indices into these tuples are what scenes store; names are what captions say.
Colours are RGB in [0, 1]; several hues are deliberately close (red/orange/pink, green/teal, blue/purple) so that
colour is not a trivially robust cue once illumination and tint vary (see DESIGN.md, calibration facts).
"""
from __future__ import annotations

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "diamond", "star",
    "cross", "ring", "heart", "hexagon", "crescent",
)

#: Plural forms, in the order of :data:`SHAPES`.
SHAPE_PLURALS: tuple[str, ...] = (
    "circles", "squares", "triangles", "diamonds", "stars",
    "crosses", "rings", "hearts", "hexagons", "crescents",
)

COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink")

#: Nominal RGB of each colour in [0, 1] (before per-object jitter, illumination and tint).
COLOUR_RGB: tuple[tuple[float, float, float], ...] = (
    (0.84, 0.18, 0.16),  # red
    (0.93, 0.52, 0.13),  # orange
    (0.90, 0.84, 0.18),  # yellow
    (0.24, 0.66, 0.25),  # green
    (0.15, 0.66, 0.66),  # teal
    (0.18, 0.30, 0.85),  # blue
    (0.55, 0.25, 0.78),  # purple
    (0.93, 0.45, 0.68),  # pink
)

SIZES: tuple[str, ...] = ("small", "large")

#: Object radius as a fraction of the image side, per size.
SIZE_RADIUS: tuple[float, ...] = (0.085, 0.14)

#: Positions are the cells of a 3 x 3 grid, row-major from the top left.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "wavy", "gradient")

#: Counts of the subject group, 1..4, as words.
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
MAX_OBJECTS = 4
