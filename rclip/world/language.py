"""The world's language: captions with exact meaning, a synonym lexicon, prompt templates and class descriptions.

A caption is a pair (text, :class:`CaptionSpec`). The spec is what the text asserts about the scene's subject
group (and, optionally, its distractors); ``spec.matches(scene)`` is the ground truth of "is this caption a true
description of that image", and ``spec.scene_constraints()`` turns the caption back into a fresh scene (the world's
analog of text-to-image generation). :func:`realise` writes a spec as text with random wording and word order, so
the same spec has many captions (the world's analog of paraphrasing).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

from rclip.world.attributes import COLOURS, COUNT_WORDS, MAX_OBJECTS, POSITIONS, SHAPES, SIZES, TEXTURES
from rclip.world.scenes import Scene

# ----------------------------------------------------------------------------------------------------------------
# Lexicon
# ----------------------------------------------------------------------------------------------------------------

#: Meaning-preserving substitutes of the world's content words (one word each, so they substitute token-for-word).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc",), "square": ("block",), "triangle": ("wedge",), "diamond": ("rhombus", "lozenge"),
    "star": ("pentagram",), "cross": ("plus",), "ring": ("hoop", "donut"), "heart": ("valentine",),
    "hexagon": ("hex",), "crescent": ("moon",),
    "red": ("crimson", "scarlet"), "orange": ("tangerine", "amber"), "yellow": ("golden", "lemon"),
    "green": ("emerald", "lime"), "teal": ("turquoise", "cyan"), "blue": ("azure", "cobalt"),
    "purple": ("violet", "lilac"), "pink": ("rose", "magenta"),
    "small": ("little", "tiny"), "large": ("big", "huge"),
    "plain": ("blank", "solid"), "striped": ("stripy", "lined"), "checkered": ("chequered", "checked"),
    "dotted": ("spotted", "speckled"), "wavy": ("rippled", "squiggly"), "gradient": ("shaded", "fading"),
    "background": ("backdrop",), "photo": ("picture", "image", "snapshot"), "picture": ("photo", "image"),
    "image": ("photo", "picture"), "object": ("shape", "thing", "item"), "shape": ("object", "figure"),
    "thing": ("object", "item"), "center": ("middle",), "middle": ("center",), "beside": ("near",),
    "rendering": ("drawing",), "drawing": ("sketch", "rendering"), "shows": ("depicts", "contains"),
}

CATEGORIES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": COLOURS, "size": SIZES, "texture": TEXTURES,
}

_IRREGULAR_PLURALS = {"plus": "pluses", "valentine": "valentines"}


def plural(noun: str) -> str:
    """English plural of a world noun."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "sh", "ch")):
        return noun + "es"
    return noun + "s"


@dataclass(frozen=True)
class Lexicon:
    """Synonyms and word categories of the world, the offline substitute source for text attacks and EDA.

    ``synonyms(w)`` keeps the meaning; ``related(w)`` gives words of the same category with a *different* meaning
    (the analog of a masked language model's in-context substitutes, e.g. another colour).
    """

    synonyms_of: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(SYNONYMS))

    def __post_init__(self) -> None:
        canon: dict[str, str] = {}
        for word, syns in self.synonyms_of.items():
            canon.setdefault(word, word)
            for s in syns:
                canon.setdefault(s, word)
        object.__setattr__(self, "_canonical", canon)

    @property
    def words(self) -> list[str]:
        return sorted(self._canonical)

    def canonical(self, word: str) -> str:
        return self._canonical.get(word, word)

    def synonyms(self, word: str) -> tuple[str, ...]:
        """Other words with the same meaning as ``word`` (empty if it has none)."""
        base = self.canonical(word)
        group = (base, *self.synonyms_of.get(base, ()))
        return tuple(w for w in group if w != word)

    def category(self, word: str) -> str | None:
        base = self.canonical(word)
        for name, members in CATEGORIES.items():
            if base in members:
                return name
        return None

    def related(self, word: str) -> tuple[str, ...]:
        """Same-category words that change the meaning (canonical forms and their synonyms)."""
        cat = self.category(word)
        if cat is None:
            return ()
        base = self.canonical(word)
        out = []
        for other in CATEGORIES[cat]:
            if other != base:
                out += [other, *self.synonyms_of.get(other, ())]
        return tuple(out)


LEXICON = Lexicon()

# ----------------------------------------------------------------------------------------------------------------
# Caption specs
# ----------------------------------------------------------------------------------------------------------------

PLURAL = frozenset({2, 3, 4})


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asserts. ``None`` means "not mentioned".

    ``count`` is always constrained, because English marks number: a singular noun phrase says {1}, a number word
    says {k}, a bare plural says {2, 3, 4}. ``distractors`` lists (shape, colour) pairs said to be present besides
    the subject group.
    """

    count: frozenset[int]
    shape: int | None = None
    colour: int | None = None
    size: int | None = None
    texture: int | None = None
    position: int | None = None
    distractors: tuple[tuple[int, int], ...] = ()

    def matches(self, scene: Scene) -> bool:
        """Is a caption with this spec a true description of ``scene``?"""
        if scene.count not in self.count:
            return False
        for name in ("shape", "colour", "size", "texture"):
            want = getattr(self, name)
            if want is not None and want != getattr(scene, name):
                return False
        if self.position is not None and scene.position != self.position:
            return False
        have = [(o.shape, o.colour) for o in scene.distractors]
        for pair in self.distractors:
            if pair not in have:
                return False
            have.remove(pair)
        return True

    def scene_constraints(self, rng: np.random.Generator) -> dict:
        """Keyword arguments of :func:`~rclip.world.scenes.sample_scene` for a new scene this caption describes.

        The subject count is drawn among the caption's counts that leave room for the distractors it mentions
        (a vague count such as "several" allows 2 to 4 objects, not all of them beside two distractors)."""
        counts = [c for c in sorted(self.count) if c + len(self.distractors) <= MAX_OBJECTS]
        if not counts:
            raise ValueError(f"no scene has {sorted(self.count)} subject objects and {len(self.distractors)} "
                             f"distractors (at most {MAX_OBJECTS} objects)")
        count = int(rng.choice(counts))
        kw = dict(count=count, shape=self.shape, colour=self.colour, size=self.size, texture=self.texture,
                  position=self.position, distractors=self.distractors)
        if self.distractors:
            kw["n_distractors"] = len(self.distractors)
        return kw


@dataclass(frozen=True)
class Caption:
    text: str
    spec: CaptionSpec


# ----------------------------------------------------------------------------------------------------------------
# Realisation: spec -> text
# ----------------------------------------------------------------------------------------------------------------

_POSITION_PHRASES = (
    ("in the top left corner", "at the top left"), ("at the top", "near the top"),
    ("in the top right corner", "at the top right"), ("on the left", "at the left side"),
    ("in the center", "in the middle"), ("on the right", "at the right side"),
    ("in the bottom left corner", "at the bottom left"), ("at the bottom", "near the bottom"),
    ("in the bottom right corner", "at the bottom right"),
)
assert len(_POSITION_PHRASES) == len(POSITIONS)

_PREFIXES = ("", "", "", "a photo of", "a picture of", "an image of", "a rendering of", "a drawing of",
             "this image shows", "a close-up of", "a photo with")
_GENERIC_NOUNS = ("shape", "object", "thing")


def _word(word: str, rng: np.random.Generator, synonym_p: float) -> str:
    syns = LEXICON.synonyms_of.get(word, ())
    if syns and rng.random() < synonym_p:
        return str(rng.choice(syns))
    return word


def _fix_articles(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\ba ([aeiou])", r"an \1", text)
    text = re.sub(r"\ban ([^aeiou\W])", r"a \1", text)
    return re.sub(r"\s+", " ", text).strip(" ,")


def _subject_phrase(spec: CaptionSpec, rng: np.random.Generator, synonym_p: float) -> str:
    many = spec.count != frozenset({1})
    if spec.shape is not None:
        noun = _word(SHAPES[spec.shape], rng, synonym_p)
    else:
        noun = _word(str(rng.choice(_GENERIC_NOUNS)), rng, synonym_p)
    noun = plural(noun) if many else noun
    if len(spec.count) == 1:
        k = next(iter(spec.count))
        det = COUNT_WORDS[k - 1] if k > 1 else str(rng.choice(["a", "a", "one"]))
    else:
        det = str(rng.choice(["", "some", "several"]))
    size = _word(SIZES[spec.size], rng, synonym_p) if spec.size is not None else ""
    if spec.colour is None:
        return f"{det} {size} {noun}"
    colour = _word(COLOURS[spec.colour], rng, synonym_p)
    style = rng.integers(0, 4)
    if style <= 1:
        return f"{det} {size} {colour} {noun}"
    if style == 2:
        return f"{det} {size} {noun} in {colour}"
    return f"{det} {size} {noun} coloured {colour}"


def _background_phrase(texture: int, rng: np.random.Generator, synonym_p: float) -> str:
    prep = str(rng.choice(["on", "on", "against", "over"]))
    return f"{prep} a {_word(TEXTURES[texture], rng, synonym_p)} {_word('background', rng, synonym_p)}"


def _distractor_phrase(pairs: tuple[tuple[int, int], ...], rng: np.random.Generator, synonym_p: float) -> str:
    items = [f"a {_word('small', rng, synonym_p)} {_word(COLOURS[c], rng, synonym_p)} {_word(SHAPES[s], rng, synonym_p)}"
             for s, c in pairs]
    return " and ".join(items)


def realise(spec: CaptionSpec, rng: np.random.Generator, synonym_p: float = 0.25) -> str:
    """Write ``spec`` as an English caption, choosing wording, synonyms and word order at random."""
    subject = _subject_phrase(spec, rng, synonym_p)
    pos = str(rng.choice(_POSITION_PHRASES[spec.position])) if spec.position is not None else ""
    bg = _background_phrase(spec.texture, rng, synonym_p) if spec.texture is not None else ""
    distr = _distractor_phrase(spec.distractors, rng, synonym_p) if spec.distractors else ""
    link = str(rng.choice(["and", "next to", "beside", "with"])) if distr else ""

    orders = ["np_first", "np_first"]
    if bg:
        orders += ["bg_with", "bg_first"]
    if distr:
        orders += ["distr_first"]
    order = str(rng.choice(orders))
    if order == "bg_with":
        tex = _word(TEXTURES[spec.texture], rng, synonym_p)
        text = f"a {tex} {_word('background', rng, synonym_p)} with {subject} {pos} {link} {distr}"
    elif order == "bg_first":
        text = f"{bg}, {subject} {pos} {link} {distr}"
    elif order == "distr_first":
        text = f"{distr} {str(rng.choice(['next to', 'beside']))} {subject} {pos} {bg}"
    else:
        prefix = str(rng.choice(_PREFIXES))
        if prefix == "" and rng.random() < 0.3:
            prefix = "there are" if spec.count != frozenset({1}) else "there is"
        tail = [pos, bg, f"{link} {distr}"] if rng.random() < 0.5 else [pos, f"{link} {distr}", bg]
        text = " ".join([prefix, subject, *tail])
    return _fix_articles(text)


# ----------------------------------------------------------------------------------------------------------------
# Captions of a scene
# ----------------------------------------------------------------------------------------------------------------

def _count_spec(scene: Scene, rng: np.random.Generator) -> frozenset[int]:
    if scene.count > 1 and rng.random() < 0.2:
        return PLURAL
    return frozenset({scene.count})


def _styles(scene: Scene) -> list[tuple[str, ...]]:
    styles = [
        ("size", "colour", "shape", "texture", "position"),
        ("colour", "shape"),
        ("shape", "texture"),
        ("colour",),
        ("size", "shape"),
        ("colour", "shape", "texture"),
        ("size", "colour", "shape"),
    ]
    if scene.distractors:
        styles += [("colour", "shape", "distractors"), ("size", "colour", "shape", "texture", "distractors")]
    if scene.count == 1:
        styles += [("colour", "shape", "position"), ("shape", "position")]
    return styles


def spec_of(scene: Scene, mentions: tuple[str, ...], rng: np.random.Generator) -> CaptionSpec:
    """The spec that mentions the attributes in ``mentions`` of ``scene`` (position only for a single subject)."""
    spec = CaptionSpec(count=_count_spec(scene, rng))
    values = {"shape": scene.shape, "colour": scene.colour, "size": scene.size, "texture": scene.texture,
              "position": scene.position}
    for name in mentions:
        if name == "distractors":
            pairs = tuple((o.shape, o.colour) for o in scene.distractors)
            keep = int(rng.integers(1, len(pairs) + 1))
            spec = replace(spec, distractors=pairs[:keep])
        elif name == "position":
            if scene.position is not None and spec.count == frozenset({1}):
                spec = replace(spec, position=scene.position)
        else:
            spec = replace(spec, **{name: values[name]})
    return spec


def caption_scene(scene: Scene, rng: np.random.Generator, mentions: tuple[str, ...] | None = None,
                  synonym_p: float = 0.25) -> Caption:
    """One true caption of ``scene`` (the world's ideal captioner). ``mentions`` picks the attributes to say."""
    if mentions is None:
        styles = _styles(scene)
        mentions = styles[int(rng.integers(len(styles)))]
    spec = spec_of(scene, mentions, rng)
    return Caption(realise(spec, rng, synonym_p), spec)


def captions_for(scene: Scene, rng: np.random.Generator, n: int = 5, synonym_p: float = 0.25) -> list[Caption]:
    """``n`` distinct true captions of ``scene``, cycling through different mention sets and word orders."""
    styles = _styles(scene)
    order = list(rng.permutation(len(styles)))
    out: list[Caption] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        mentions = styles[order[tries % len(order)]]
        cap = caption_scene(scene, rng, mentions, synonym_p)
        tries += 1
        if cap.text not in seen:
            seen.add(cap.text)
            out.append(cap)
        if tries > 50 * n:
            raise RuntimeError(f"could not write {n} distinct captions for {scene.describe()}")
    return out


def paraphrase(caption: Caption, rng: np.random.Generator, synonym_p: float = 0.35, tries: int = 20) -> Caption:
    """Rewrite a caption with the same meaning (same spec) and different wording, when the grammar allows."""
    for _ in range(tries):
        text = realise(caption.spec, rng, synonym_p)
        if text != caption.text:
            return Caption(text, caption.spec)
    return caption
