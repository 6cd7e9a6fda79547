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
from functools import lru_cache

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

#: Meaning-preserving forms of the world's words that its pre-training captions never use (:func:`realise` writes
#: only the canonical words and :data:`SYNONYMS`): rarer synonyms and digits for count words. A CLIP pre-trained on
#: the world never saw their tokens, as a web-trained CLIP rarely sees a rare synonym, so they are the words a real
#: attacker would reach for. Each still names exactly the same shape, colour, size, texture or count.
HELD_OUT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disk", "orb"), "square": ("quadrate",), "triangle": ("trigon",), "diamond": ("rhomb",),
    "ring": ("annulus", "loop"), "hexagon": ("sexangle",), "crescent": ("lune",),
    "red": ("ruby", "cherry", "vermilion"), "orange": ("apricot",), "yellow": ("canary", "mustard"),
    "green": ("jade", "verdant"), "teal": ("aqua",), "blue": ("sapphire", "navy", "cerulean"),
    "purple": ("plum", "mauve"), "pink": ("fuchsia", "blush"),
    "small": ("mini", "petite", "wee"), "large": ("giant", "jumbo", "massive"),
    "plain": ("uniform", "unpatterned"), "striped": ("banded", "streaked"), "checkered": ("checkerboard",),
    "dotted": ("polka", "dappled"), "wavy": ("undulating", "curvy"), "gradient": ("ombre", "blended"),
    "two": ("2",), "three": ("3",), "four": ("4",),
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


def typos(word: str) -> list[str]:
    """One-slip misspellings of ``word`` that keep its first and last letters (the ones a reader anchors on): two
    adjacent inner letters swapped, then one inner letter dropped, in that order, without repeats; none shorter than
    four letters (so words of fewer than four letters have none)."""
    if len(word) < 4 or not word.isalpha():
        return []
    out: list[str] = []
    for i in range(1, len(word) - 2):
        out.append(word[:i] + word[i + 1] + word[i] + word[i + 2:])
    for i in range(1, len(word) - 1):
        out.append(word[:i] + word[i + 1:])
    return [w for w in dict.fromkeys(out) if w != word and len(w) >= 4]


@lru_cache(maxsize=1)
def _written_forms() -> dict[str, str]:
    """Every correctly spelt form of a content word the world reads -> its meaning (the canonical word; plural nouns
    -> the canonical plural): the lexicon's words and synonyms, the held-out synonyms and digits, plurals of shapes
    and of the generic nouns."""
    forms: dict[str, str] = {}
    groups = {w: (w,) for members in CATEGORIES.values() for w in members}
    groups.update({w: (w,) for w in COUNT_WORDS[1:]})
    for word, syns in LEXICON.synonyms_of.items():
        groups[word] = tuple(dict.fromkeys([*groups.get(word, (word,)), *syns]))
    for word, syns in HELD_OUT_SYNONYMS.items():
        groups[word] = tuple(dict.fromkeys([*groups.get(word, (word,)), *syns]))
    nouns = set(SHAPES) | set(_GENERIC_NOUNS)
    for word, group in groups.items():
        meaning = LEXICON.canonical(word)
        for form in group:
            forms.setdefault(form, meaning)
            if word in nouns:
                forms.setdefault(plural(form), plural(meaning))
    return forms


@lru_cache(maxsize=1)
def _misspelt_forms() -> dict[str, str]:
    """Misspellings (:func:`typos`) of the written forms that a reader can only read one way: not themselves a
    word of the world, not an English word (a whole word of CLIP's 49 408-entry BPE vocabulary, e.g. "pulses" for
    "pluses"), and not a slip of two words with different meanings."""
    from open_clip.tokenizer import SimpleTokenizer

    english = SimpleTokenizer().encoder
    forms = _written_forms()
    readings: dict[str, set[str]] = {}
    for form, meaning in forms.items():
        for t in typos(form):
            readings.setdefault(t, set()).add(meaning)
    return {t: next(iter(m)) for t, m in readings.items()
            if len(m) == 1 and t not in forms and f"{t}</w>" not in english}


def word_meaning(word: str) -> str | None:
    """What a careful reader takes a written content word to mean: the canonical word (plural nouns: its plural)
    for the world's words, their synonyms (seen or held out of pre-training), digits of count words and unambiguous
    one-slip misspellings of any of these; ``None`` for any other word (function words, position words, unknown
    or ambiguous strings). Case-insensitive."""
    w = word.lower()
    return _written_forms().get(w) or _misspelt_forms().get(w)


def held_out_forms(word: str) -> list[str]:
    """Meaning-preserving forms of ``word`` that the world's captions never use: its held-out synonyms (plural when
    ``word`` is a plural noun), then its readable misspellings (:func:`typos` that :func:`word_meaning` reads back
    as ``word``'s meaning). Empty for words the world does not read."""
    meaning = word_meaning(word)
    if meaning is None or word.lower() not in _written_forms():
        return []
    w = word.lower()
    singular = {plural(k): k for k in (*SHAPES, *_GENERIC_NOUNS)}
    base = singular.get(meaning, meaning)
    many = base != meaning
    out = [plural(s) if many else s for s in HELD_OUT_SYNONYMS.get(base, ())]
    out += [t for t in typos(w) if _misspelt_forms().get(t) == meaning]
    return [f for f in dict.fromkeys(out) if f != w]

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
