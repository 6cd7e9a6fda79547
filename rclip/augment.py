"""One-to-many augmentations of image-caption pairs (MA²T's 1:N text and N:1 image augmentations).

Each augmentation makes ``n`` new points from one training pair (I, T); text augmentations give pairs
(I, T_aug), image augmentations (I_aug, T), never (I_aug, T_aug). World analogs are named as such:

============== ====== ===================================================== =====================================
name           kind   what it does                                          the paper's augmentation
============== ====== ===================================================== =====================================
``eda``        T2T    EDA: synonym replacement, random insertion, random    EDA (Wei & Zou, 2019), α = 0.3
                      swap, random deletion (α = 0.3)
``paraphrase`` T2T    the world grammar rewrites T with the same meaning    LangRW (LLM rewriting; analog)
                      (:func:`rclip.world.paraphrase`)
``captioner``  I2T    a new true caption of the image's scene               OFA (an ideal captioner; analog)
                      (:func:`rclip.world.caption_scene`)
``human``      I2T    the image's other true captions                       Human (the other 4 annotations)
``randaugment`` I2I   torchvision RandAugment, 2 ops, magnitude 5           RandAugment (ALBEF's code)
``generator``  T2I    a new image rendered from T's meaning                 Stable Diffusion (analog)
                      (:func:`rclip.world.spec_images`)
============== ====== ===================================================== =====================================

Every augmented point is a pure function of ``(seed, image index, point index)``, made once as in the paper's
"data preparation" step (Algorithm 1), not redrawn per epoch. :class:`AugmentedPairs` is the training set
D ∪ {augmented points}; :func:`alignment_diversity` measures each augmentation in a CLIP's embedding space
(the paper's Figures 1-2).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from rclip.attacks.text import STOPWORDS, LexiconSubstitutes
from rclip.errors import RClipError

KINDS = {"eda": "T2T", "paraphrase": "T2T", "captioner": "I2T", "human": "I2T", "randaugment": "I2I",
         "generator": "T2I"}
PAPER_NAMES = {"eda": "T2T(EDA)", "paraphrase": "T2T(LangRW)", "captioner": "I2T(OFA)", "human": "I2T(Human)",
               "randaugment": "I2I(RA)", "generator": "T2I(SD)"}
TEXT_AUGMENTATIONS = ("eda", "paraphrase", "captioner", "human")
IMAGE_AUGMENTATIONS = ("randaugment", "generator")
#: augmentations that need the world's ground truth (scene / caption meaning); real data has only the others
WORLD_ONLY = ("paraphrase", "captioner", "generator")


def _rng(seed: int, stream: str, i: int) -> np.random.Generator:
    from rclip.world import scene_rng

    return scene_rng(seed, f"augment/{stream}", i)


# ----------------------------------------------------------------------------------------------------------------
# EDA (Wei & Zou, 2019): the four operations and the recipe
# ----------------------------------------------------------------------------------------------------------------

def synonym_replacement(words: list[str], n: int, rng: np.random.Generator,
                        synonyms: Callable[[str], Sequence[str]]) -> list[str]:
    """Replace every occurrence of up to ``n`` distinct non-stopwords (in random order) by one random synonym."""
    out = list(words)
    candidates = [w for w in dict.fromkeys(words) if w not in STOPWORDS]
    replaced = 0
    for k in rng.permutation(len(candidates)):
        word = candidates[k]
        syns = list(synonyms(word))
        if syns:
            new = syns[int(rng.integers(len(syns)))]
            out = [new if w == word else w for w in out]
            replaced += 1
        if replaced >= n:
            break
    return out


def random_insertion(words: list[str], n: int, rng: np.random.Generator,
                     synonyms: Callable[[str], Sequence[str]], tries: int = 10) -> list[str]:
    """``n`` times: insert a synonym of a random word at a random position (up to ``tries`` words tried each)."""
    out = list(words)
    for _ in range(n):
        for _ in range(tries):
            if not out:
                break
            syns = list(synonyms(out[int(rng.integers(len(out)))]))
            if syns:
                out.insert(int(rng.integers(len(out) + 1)), syns[int(rng.integers(len(syns)))])
                break
    return out


def random_swap(words: list[str], n: int, rng: np.random.Generator, tries: int = 3) -> list[str]:
    """``n`` times: swap two words at distinct random positions (``tries`` draws to find a distinct second one)."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        a = int(rng.integers(len(out)))
        for _ in range(tries):
            b = int(rng.integers(len(out)))
            if b != a:
                out[a], out[b] = out[b], out[a]
                break
    return out


def random_deletion(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Delete each word with probability ``p``; keep one random word if all would go; a single word stays."""
    if len(words) <= 1:
        return list(words)
    keep = [w for w in words if rng.random() > p]
    return keep if keep else [words[int(rng.integers(len(words)))]]


def eda(text: str, rng: np.random.Generator, n_aug: int = 4, alpha: float = 0.3,
        synonyms: Callable[[str], Sequence[str]] | None = None) -> list[str]:
    """``n_aug`` EDA rewrites of ``text`` with strength ``alpha`` for all four operations (the reference recipe).

    Each operation makes ``n_aug // 4 + 1`` sentences (replacement, insertion and swap change
    ``max(1, int(alpha * words))`` words; deletion drops each word with probability ``alpha``); the sentences are
    shuffled and the first ``n_aug`` kept. ``synonyms``: word -> synonyms (default: the world's lexicon).
    """
    synonyms = synonyms or LexiconSubstitutes().synonyms
    words = [w for w in "".join(c if c.isalpha() or c == " " else " " for c in text.lower()).split()]
    n = max(1, int(alpha * len(words)))
    per_op = n_aug // 4 + 1
    out = []
    for _ in range(per_op):
        out.append(synonym_replacement(words, n, rng, synonyms))
        out.append(random_insertion(words, n, rng, synonyms))
        out.append(random_swap(words, n, rng))
        out.append(random_deletion(words, alpha, rng))
    order = rng.permutation(len(out))
    return [" ".join(out[k]) for k in order[:n_aug]]


# ----------------------------------------------------------------------------------------------------------------
# RandAugment
# ----------------------------------------------------------------------------------------------------------------

def randaugment(image: torch.Tensor, n: int, seed: int, num_ops: int = 2, magnitude: int = 5) -> torch.Tensor:
    """``n`` RandAugment draws of one image (3, H, W) in [0, 1] -> (n, 3, H, W) in [0, 1], deterministic in
    ``seed`` (torchvision's RandAugment on uint8, under a forked global RNG)."""
    from torchvision.transforms import v2

    op = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    u8 = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([op(u8) for _ in range(n)]).float() / 255


# ----------------------------------------------------------------------------------------------------------------
# Augmenting a pair dataset
# ----------------------------------------------------------------------------------------------------------------

def augment_texts(pairs, i: int, name: str, n: int, seed: int = 0) -> list[str]:
    """``n`` augmented captions of training pair ``i`` (its image stays). ``pairs``: a pair dataset with
    ``captions(i)`` (the first is the training caption) and, in the world, ``scene(i)`` and ``spec(i)``."""
    from rclip.world import Caption, caption_scene, paraphrase

    caps = pairs.captions(i)
    rng = _rng(seed, name, i)
    if name == "eda":
        return eda(caps[0], rng, n_aug=n, synonyms=getattr(pairs, "synonyms", None))
    if name == "human":
        others = list(caps[1:])
        if not others:
            raise RClipError(f"pair {i} has a single caption: the 'human' augmentation needs the others")
        return [others[k % len(others)] for k in range(n)]
    if name == "paraphrase":
        original = Caption(caps[0], pairs.spec(i))
        return [paraphrase(original, rng).text for _ in range(n)]
    if name == "captioner":
        scene = pairs.scene(i)
        return [caption_scene(scene, rng).text for _ in range(n)]
    raise RClipError(f"{name!r} is not a text augmentation; choose one of {TEXT_AUGMENTATIONS}")


def _check_truth(pairs) -> None:
    if not (hasattr(pairs, "scene") and hasattr(pairs, "spec")):
        raise RClipError("false captions need the world's ground truth (a pair dataset with scene() and spec()): "
                         "n_false is a world-scale experiment")
    if len(pairs) < 2:
        raise RClipError("false captions are other pairs' captions: the pair dataset needs at least 2 pairs")


def false_captions(pairs, i: int, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct captions that are *false* of training pair ``i``'s image, by the world's ground truth: the
    training captions of other pairs (visited in an order drawn from ``(seed, i)``) whose meaning does not match
    ``i``'s scene — the controlled misalignment of :class:`AugmentedPairs` (``n_false``). Needs a world pair dataset
    (``scene`` and ``spec``)."""
    _check_truth(pairs)
    scene, out = pairs.scene(i), []
    for j in _rng(seed, "false", i).permutation(len(pairs)):
        if len(out) == n:
            break
        text = pairs.captions(int(j))[0]
        if j != i and text not in out and not pairs.spec(int(j)).matches(scene):
            out.append(text)
    if len(out) < n:
        raise RClipError(f"only {len(out)} of the {len(pairs)} training captions are false of pair {i}'s image, "
                         f"{n} were asked for: lower n_false or train on more pairs")
    return out


def augment_image(pairs, i: int, name: str, point: int, seed: int = 0) -> torch.Tensor:
    """Augmented image number ``point`` (3, H, W) in [0, 1] of training pair ``i`` (its caption stays); each point
    is drawn independently from ``(seed, i, point)``."""
    if name == "randaugment":
        image = pairs.images([i])[0]
        return randaugment(image, 1, seed=int(_rng(seed, f"{name}/{point}", i).integers(2**31)))[0]
    if name == "generator":
        from rclip.world import spec_images

        images, _ = spec_images([pairs.spec(i)], resolution=pairs.resolution, seed=seed,
                                stream=f"generator/{i}/{point}")
        return images[0]
    raise RClipError(f"{name!r} is not an image augmentation; choose one of {IMAGE_AUGMENTATIONS}")


def augment_images(pairs, i: int, name: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` augmented images (n, 3, H, W) in [0, 1] of training pair ``i``: points 0 .. n-1 of
    :func:`augment_image`."""
    return torch.stack([augment_image(pairs, i, name, k, seed) for k in range(n)])


def check_augmentation(name: str | None, pairs=None) -> None:
    if name is None:
        return
    if name not in KINDS:
        raise RClipError(f"unknown augmentation {name!r}; choose one of {', '.join(KINDS)}")
    if pairs is not None and name in WORLD_ONLY and not hasattr(pairs, "spec"):
        raise RClipError(f"the {name!r} augmentation is the world's analog of a generative model and needs the "
                         f"world's ground truth; real data supports {[k for k in KINDS if k not in WORLD_ONLY]}")


class AugmentedPairs(Dataset):
    """The training set D ∪ D_aug of MA²T's Algorithm 1: every original pair (I, T) followed by ``n_aug`` augmented
    pairs (I, T_aug) or (I_aug, T).

    Item ``k`` is pair ``k // (1 + n_aug)``, point ``k % (1 + n_aug)`` (0 = the original). ``order`` (N, n_aug
    indices into ``n_aug_made`` made points, e.g. sorted by alignment) picks which made points are used; the default
    uses the first ``n_aug``. Batches via ``__getitems__``: ``{"images", "texts", "index", "augmented"}``.

    Two controls of the paper's Figures 1-2 reading (augmentations help when aligned and diverse), each changing one
    property at a fixed number of points: ``n_false`` (text augmentations, world only) replaces the first
    ``n_false`` augmented captions of every pair with captions false of its image (:func:`false_captions`) —
    alignment lowered (their distance from the original caption grows too); ``distinct`` uses only that many
    distinct made points, repeated in turn over the ``n_aug`` slots — the spread among a pair's points lowered,
    each point's alignment and distance from the original kept (:func:`used_points_alignment_diversity`).
    """

    def __init__(self, pairs, augment: str | None, n_aug: int = 4, *, seed: int = 0,
                 order: torch.Tensor | None = None, n_aug_made: int | None = None, n_false: int = 0,
                 distinct: int | None = None):
        check_augmentation(augment, pairs)
        self.pairs, self.augment, self.seed = pairs, augment, int(seed)
        self.n_aug = int(n_aug) if augment else 0
        self.n_made = int(n_aug_made or self.n_aug)
        if self.n_aug > self.n_made:
            raise RClipError(f"n_aug={self.n_aug} exceeds the {self.n_made} augmented points made per pair")
        if not 0 <= n_false <= self.n_aug:
            raise RClipError(f"n_false={n_false} must lie between 0 and the {self.n_aug} augmented points per pair")
        if n_false and augment not in TEXT_AUGMENTATIONS:
            raise RClipError(f"n_false replaces augmented captions: {augment!r} is not a text augmentation; choose "
                             f"one of {TEXT_AUGMENTATIONS}")
        if n_false:
            _check_truth(pairs)
        if distinct is not None and not 1 <= distinct <= self.n_aug:
            raise RClipError(f"distinct={distinct} must lie between 1 and the {self.n_aug} augmented points per pair")
        self.n_false, self.distinct = int(n_false), distinct
        self.order = order
        self._texts: dict[int, list[str]] = {}
        self._false: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self.pairs) * (1 + self.n_aug)

    def _point(self, i: int, v: int) -> int:
        v = v % self.distinct if self.distinct else v
        return int(self.order[i, v]) if self.order is not None else v

    def _aug_text(self, i: int, v: int) -> str:
        if v < self.n_false:
            if i not in self._false:
                self._false[i] = false_captions(self.pairs, i, self.n_false, self.seed)
            return self._false[i][v]
        if i not in self._texts:
            self._texts[i] = augment_texts(self.pairs, i, self.augment, self.n_made, self.seed)
        return self._texts[i][self._point(i, v)]

    def __getitems__(self, indices: list[int]) -> dict:
        per = 1 + self.n_aug
        pairs = [divmod(int(k), per) for k in indices]
        images = self.pairs.images([i for i, _ in pairs])
        texts = [self.pairs.captions(i)[0] for i, _ in pairs]
        for b, (i, v) in enumerate(pairs):
            if v == 0:
                continue
            if self.augment in TEXT_AUGMENTATIONS:
                texts[b] = self._aug_text(i, v - 1)
            else:
                images[b] = augment_image(self.pairs, i, self.augment, self._point(i, v - 1), self.seed)
        return {"images": images, "texts": texts, "index": torch.as_tensor([int(k) for k in indices]),
                "augmented": torch.as_tensor([v > 0 for _, v in pairs])}

    def __getitem__(self, k: int) -> dict:
        batch = self.__getitems__([k])
        return {"images": batch["images"][0], "texts": batch["texts"][0], "index": batch["index"][0]}


# ----------------------------------------------------------------------------------------------------------------
# Alignment and diversity (Figures 1-2)
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def alignment_diversity(bundle, pairs, name: str, indices: Sequence[int], n: int = 4, seed: int = 0
                        ) -> dict[str, torch.Tensor]:
    """Alignment and diversity of ``n`` augmented points per pair, in ``bundle``'s embedding space.

    Returns ``alignment`` (len(indices), n): cos(Φ(I), Ψ(T_aug)) or cos(Φ(I_aug), Ψ(T)); ``diversity``
    (len(indices), n): ‖Ψ(T) - Ψ(T_aug)‖ or ‖Φ(I) - Φ(I_aug)‖ (unit-norm embeddings); ``original`` (len,):
    cos(Φ(I), Ψ(T)) of the original pairs.
    """
    check_augmentation(name, pairs)
    indices = [int(i) for i in indices]
    img = bundle.encode_images(pairs.images(indices))
    txt = bundle.encode_texts([pairs.captions(i)[0] for i in indices])
    if name in TEXT_AUGMENTATIONS:
        aug = bundle.encode_texts([t for i in indices for t in augment_texts(pairs, i, name, n, seed)])
        aug = aug.view(len(indices), n, -1)
        alignment = (aug * img[:, None]).sum(-1)
        diversity = (aug - txt[:, None]).norm(dim=-1)
    else:
        aug = bundle.encode_images(torch.cat([augment_images(pairs, i, name, n, seed) for i in indices]))
        aug = aug.view(len(indices), n, -1)
        alignment = (aug * txt[:, None]).sum(-1)
        diversity = (aug - img[:, None]).norm(dim=-1)
    return {"alignment": alignment, "diversity": diversity, "original": (img * txt).sum(-1)}


@torch.no_grad()
def used_points_alignment_diversity(bundle, data: AugmentedPairs, indices: Sequence[int]
                                    ) -> dict[str, torch.Tensor]:
    """What a text-augmented training set actually holds, in ``bundle``'s embedding space: for each pair of
    ``indices``, the ``n_aug`` captions it trains on (false ones and repeats included). ``alignment``
    (len, n_aug): cos(Φ(I), Ψ(T_aug)); ``diversity`` (len, n_aug): ‖Ψ(T) − Ψ(T_aug)‖ (the paper's measure: distance
    from the original caption); ``spread`` (len,): the mean pairwise distance among a pair's augmented captions (0
    when one caption is repeated) — :class:`AugmentedPairs`' ``distinct`` changes this, not ``diversity``."""
    if data.augment not in TEXT_AUGMENTATIONS or not data.n_aug:
        raise RClipError(f"used_points_alignment_diversity measures text augmentations; got {data.augment!r}")
    indices, n = [int(i) for i in indices], data.n_aug
    img = bundle.encode_images(data.pairs.images(indices))
    txt = bundle.encode_texts([data.pairs.captions(i)[0] for i in indices])
    aug = bundle.encode_texts([data._aug_text(i, v) for i in indices for v in range(n)])
    aug = aug.view(len(indices), n, -1)
    pairwise = torch.cdist(aug, aug)
    spread = pairwise.sum((1, 2)) / max(1, n * (n - 1))
    return {"alignment": (aug * img[:, None]).sum(-1), "diversity": (aug - txt[:, None]).norm(dim=-1),
            "spread": spread}


def aligned_order(bundle, pairs, name: str, n: int = 4, seed: int = 0, batch: int = 256) -> torch.Tensor:
    """(N, n): each pair's ``n`` augmented points sorted by decreasing alignment in ``bundle``'s space (the
    paper's "top" selection of Figure 3)."""
    out = []
    for start in range(0, len(pairs), batch):
        idx = range(start, min(len(pairs), start + batch))
        out.append(alignment_diversity(bundle, pairs, name, idx, n, seed)["alignment"].argsort(1, descending=True))
    return torch.cat(out)


__all__ = ["KINDS", "PAPER_NAMES", "TEXT_AUGMENTATIONS", "IMAGE_AUGMENTATIONS", "WORLD_ONLY", "eda",
           "synonym_replacement", "random_insertion", "random_swap", "random_deletion", "randaugment",
           "augment_texts", "false_captions", "augment_image", "augment_images", "AugmentedPairs",
           "alignment_diversity", "used_points_alignment_diversity", "aligned_order"]
