"""Word-substitution attacks on CLIP's text encoder: BERT-Attack as the retrieval attacks (Co-Attack, SGA) use it.

For a batch of captions:

1. **Importance.** Each word is replaced in turn by a mask token (``[UNK]``) and scored by how far the caption's
   embedding moves: KL(softmax(e) ‖ softmax(e_masked)) over the unit-norm text embedding e. All masked variants of
   all captions go through the text encoder together (one batched forward, chunked by ``batch_size``).
2. **Substitution.** Words are visited in decreasing importance; stopwords and words without substitutes are
   skipped. At a word, the caption as it stands and one copy per substitute (at most ``top_k``) are scored, again in
   one forward for the whole batch, and the best is kept; a change counts against the word ``budget`` (default 1).
   Criteria, each to be maximised:

   * ``"kl"``    KL(softmax(e_orig) ‖ softmax(e')) - BERT-Attack / Co-Attack's shift of the text embedding;
   * ``"l2"``    ‖e' - e_orig‖ - MA²T's Eq. 4 (adversarial texts for multimodal adversarial training);
   * ``"guide"`` -cos(e', g) for a guiding image embedding g per caption - SGA (lowest similarity to the image).

Substitute sources are pluggable (:class:`LexiconSubstitutes`, the default and offline; :class:`UnseenSubstitutes`,
the world's meaning-preserving forms its CLIP never read; :class:`WordNetSubstitutes`
when nltk's WordNet data is installed; :class:`MaskedLMSubstitutes` with local ``transformers`` weights). A source
maps a batch of word lists to candidate lists per word, computed once from the original captions (as BERT-Attack
reads its masked-LM predictions once from the clean text).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from rclip.errors import RClipError

#: English function words never substituted (pronouns, determiners, prepositions, auxiliaries, conjunctions,
#: negations, quantifiers and common adverbs), after the ~250-word filter list of BERT-Attack's retrieval uses.
STOPWORDS: frozenset[str] = frozenset("""
a an the this that these those some any each every either neither both all no none another other others such own
same several few many much more most less least enough only just also even still yet already again ever never
not nor no
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves one ones someone something somebody anyone anything
anybody everyone everything everybody nobody nothing noone whoever whatever whichever whom whose who which what
when where why how whence whither wherever whenever whether whereas whereby wherein whereupon whereafter
am is are was were be been being have has had having do does did doing done will would shall should can cannot
could may might must ought need used
and or but if then else than because as since unless until while although though so thus hence therefore
however moreover nevertheless otherwise meanwhile instead besides indeed namely
of at by for with without within about above across after afterwards against along among amongst around before
behind below beneath beside besides between beyond during except from in inside into near of off on onto out
outside over per through throughout thru to toward towards under underneath up upon via down
here there thereby therein thereafter thereupon hereby herein hereafter hereupon now once very too quite rather
almost alone always often perhaps please sometime sometimes somehow somewhere anywhere everywhere nowhere
elsewhere anyhow anyway s t d ll m o re ve y ain aren isn wasn weren hasn haven hadn doesn don didn won wouldn
shan shouldn couldn mustn mightn needn
""".split())

_PUNCT = ",.;:!?\"'()"


def _split_word(token: str) -> tuple[str, str, str]:
    """(leading punctuation, core word, trailing punctuation) of a whitespace token."""
    core = token.strip(_PUNCT)
    if not core:
        return token, "", ""
    lead = token[:token.index(core)]
    return lead, core, token[len(lead) + len(core):]


# ----------------------------------------------------------------------------------------------------------------
# Substitute sources
# ----------------------------------------------------------------------------------------------------------------

class SubstituteSource:
    """Candidate replacement words. ``__call__(captions_words, top_k)`` -> for each caption, for each word, a list
    of at most ``top_k`` candidate core words (lower case, single words, never the word itself)."""

    name = "source"

    def __call__(self, captions_words: Sequence[Sequence[str]], top_k: int) -> list[list[list[str]]]:
        return [[self.candidates(list(words), j)[:top_k] for j in range(len(words))] for words in captions_words]

    def candidates(self, words: list[str], position: int) -> list[str]:
        raise NotImplementedError


class LexiconSubstitutes(SubstituteSource):
    """The world's lexicon (:data:`rclip.world.LEXICON`): ``synonyms`` keep the meaning, ``related`` words of the same
    category change it (another colour, shape, size or texture: what a masked LM would also propose in context).

    Order: synonyms, then the other canonical members of the category, then their synonyms (so the first ``top_k``
    cover every alternative meaning before spelling variants). Plurals ("circles") map to their singular and the
    candidates are pluralised back.
    """

    name = "lexicon"

    def __init__(self, lexicon=None, synonyms: bool = True, related: bool = True):
        from rclip.world import LEXICON
        from rclip.world.language import CATEGORIES, plural

        self.lexicon = lexicon or LEXICON
        self.use_synonyms, self.use_related = synonyms, related
        self._plural = plural
        words = set(self.lexicon.words)
        for members in CATEGORIES.values():
            words.update(members)
        self._singular = {plural(w): w for w in words if plural(w) != w}

    def synonyms(self, word: str) -> list[str]:
        """Meaning-preserving substitutes of ``word`` (plural-aware)."""
        base, many = self._base(word)
        return [self._inflect(s, many) for s in self.lexicon.synonyms(base)]

    def _base(self, word: str) -> tuple[str, bool]:
        if word in self._singular and self.lexicon.canonical(word) == word and not self.lexicon.synonyms(word):
            return self._singular[word], True
        return word, False

    def _inflect(self, word: str, many: bool) -> str:
        return self._plural(word) if many else word

    def candidates(self, words: list[str], position: int) -> list[str]:
        word = words[position].lower()
        base, many = self._base(word)
        out = list(self.lexicon.synonyms(base)) if self.use_synonyms else []
        if self.use_related:
            related = list(self.lexicon.related(base))
            canonical = [w for w in related if self.lexicon.canonical(w) == w]
            out += canonical + [w for w in related if w not in canonical]
        seen, result = {word}, []
        for w in out:
            w = self._inflect(w, many)
            if w not in seen and " " not in w:
                seen.add(w)
                result.append(w)
        return result


class UnseenSubstitutes(SubstituteSource):
    """Meaning-preserving forms the world's captions never use (:func:`rclip.world.language.held_out_forms`):
    held-out synonyms ("ruby" for red, "disk" for circle), digits for count words, then readable one-slip
    misspellings ("cirlce"). The world CLIP never saw their tokens in pre-training, so it has not learned to read
    them as their word - the attacker's analog of rare words and typos - yet every one still names the same thing,
    so an adversarial caption made of them stays true of its image (:func:`substitution_kinds` checks it)."""

    name = "unseen"

    def candidates(self, words: list[str], position: int) -> list[str]:
        from rclip.world.language import held_out_forms

        return held_out_forms(words[position])


class WordNetSubstitutes(SubstituteSource):
    """WordNet synonyms (the lemmas of every synset of the word), as EDA and MLM-free text attacks use them.

    Needs ``nltk`` and its ``wordnet`` corpus installed locally (``python -m nltk.downloader wordnet`` on a machine
    with network); :meth:`available` says whether they are, and the constructor raises :class:`RClipError` if not.
    """

    name = "wordnet"

    @staticmethod
    def available() -> bool:
        try:
            from nltk.corpus import wordnet

            wordnet.synsets("dog")
            return True
        except Exception:  # nltk missing, or its corpus not downloaded (LookupError)
            return False

    def __init__(self):
        if not self.available():
            raise RClipError("WordNet is not available: install nltk (pip install nltk) and its corpus "
                             "(python -m nltk.downloader wordnet) on a machine with network, or use the lexicon "
                             "source (rclip.attacks.text.LexiconSubstitutes)")
        from nltk.corpus import wordnet

        self.wordnet = wordnet

    def synonyms(self, word: str) -> list[str]:
        out: list[str] = []
        for syn in self.wordnet.synsets(word):
            for lemma in syn.lemma_names():
                w = lemma.replace("_", " ").replace("-", " ").lower()
                if w != word and " " not in w and w.isalpha() and w not in out:
                    out.append(w)
        return out

    def candidates(self, words: list[str], position: int) -> list[str]:
        return self.synonyms(words[position].lower())


class MaskedLMSubstitutes(SubstituteSource):
    """A masked language model's top predictions at each word of the clean caption (BERT-Attack's source).

    ``model``: a local directory (or a Hugging Face id already in the local cache) of a ``transformers`` masked LM,
    e.g. ``bert-base-uncased``. Nothing is downloaded: missing ``transformers`` or weights raise
    :class:`RClipError` naming the fix. Words split into several word pieces get no candidates (BERT-Attack's
    sub-word combinations are not reproduced); predicted sub-word pieces (``##...``) are dropped.
    """

    name = "mlm"

    def __init__(self, model: str | Path = "bert-base-uncased", device: str | torch.device = "cpu",
                 batch_size: int = 64):
        try:
            from transformers import AutoModelForMaskedLM, AutoTokenizer
        except ImportError as exc:
            raise RClipError("the masked-LM substitute source needs `transformers` (pip install transformers) and "
                             "local weights; or use the lexicon source (LexiconSubstitutes)") from exc
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
            self.mlm = AutoModelForMaskedLM.from_pretrained(str(model), local_files_only=True).to(device).eval()
        except (OSError, ValueError) as exc:
            raise RClipError(f"masked-LM weights {model!r} are not available locally: give a local directory that "
                             f"holds them, or copy a Hugging Face cache that has them to this machine "
                             f"(nothing is downloaded)") from exc
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, captions_words, top_k):
        out = []
        for i in range(0, len(captions_words), self.batch_size):
            chunk = [list(w) for w in captions_words[i:i + self.batch_size]]
            enc = self.tokenizer(chunk, is_split_into_words=True, return_tensors="pt", padding=True,
                                 truncation=True)
            logits = self.mlm(**{k: v.to(self.device) for k, v in enc.items()}).logits
            top = logits.topk(top_k + 5, dim=-1).indices.cpu()
            for b, words in enumerate(chunk):
                pieces: dict[int, list[int]] = {}
                for t, w in enumerate(enc.word_ids(b)):
                    if w is not None:
                        pieces.setdefault(w, []).append(t)
                per_word = []
                for j, word in enumerate(words):
                    toks = pieces.get(j, [])
                    if len(toks) != 1:
                        per_word.append([])
                        continue
                    cands = [self.tokenizer.convert_ids_to_tokens(int(c)) for c in top[b, toks[0]]]
                    per_word.append([c for c in cands if c.isalpha() and c != word.lower()][:top_k])
                out.append(per_word)
        return out


# ----------------------------------------------------------------------------------------------------------------
# The attack
# ----------------------------------------------------------------------------------------------------------------

CRITERIA = ("kl", "l2", "guide")


@lru_cache(maxsize=8)
def substitute_source(name: str) -> SubstituteSource:
    """A source by name: ``"lexicon"`` (synonyms + related words, the default), ``"synonyms"`` (the lexicon's
    meaning-preserving substitutes only), ``"unseen"`` (meaning-preserving forms held out of the world's captions:
    :class:`UnseenSubstitutes`), ``"wordnet"``, or ``"mlm:<local model dir or cached id>"``."""
    if name == "lexicon":
        return LexiconSubstitutes()
    if name == "synonyms":
        return LexiconSubstitutes(related=False)
    if name == "unseen":
        return UnseenSubstitutes()
    if name == "wordnet":
        return WordNetSubstitutes()
    if name.startswith("mlm:"):
        return MaskedLMSubstitutes(name.removeprefix("mlm:"))
    raise RClipError(f"unknown substitute source {name!r}; use 'lexicon', 'synonyms', 'unseen', 'wordnet' or "
                     f"'mlm:<path>'")


@dataclass
class TextAttackConfig:
    """budget: words changed per caption (the papers' 1). top_k: substitutes tried per word (10). criterion: see the
    module docstring. source: the substitute source by name (:func:`substitute_source`). mask: the token that hides
    a word when ranking importance. stopwords: never substituted. batch_size: texts per forward."""
    budget: int = 1
    top_k: int = 10
    criterion: str = "kl"
    source: str = "lexicon"
    mask: str = "[UNK]"
    stopwords: frozenset[str] = field(default_factory=lambda: STOPWORDS)
    batch_size: int = 512


def _kl_shift(reference: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) ‖ softmax(emb)) per row. reference, emb: (N, D)."""
    p = reference.log_softmax(-1)
    return (p.exp() * (p - emb.log_softmax(-1))).sum(-1)


def _can_trim(model) -> bool:
    """True for open_clip's CLIP text tower with a causal mask and end-of-text (argmax) pooling: its embedding of a
    caption depends only on the tokens up to the end-of-text token, so the padding after it can be cut."""
    return (getattr(model, "text_pool_type", None) == "argmax" and getattr(model, "attn_mask", None) is not None
            and hasattr(model, "token_embedding") and hasattr(model, "positional_embedding"))


def trimmed_text_features(bundle, tokens: torch.Tensor) -> torch.Tensor:
    """Unit-norm text embeddings (N, D) of ``tokens`` (N, L), computed on the first ``l`` positions only, ``l`` the
    batch's longest caption (end-of-text included). Equal to ``bundle.text_features(tokens)`` for open_clip's causal,
    argmax-pooled text towers (open_clip's ``encode_text`` restricted to those positions); other models fall back."""
    from open_clip.transformer import text_global_pool

    model = bundle.model
    length = int(tokens.argmax(-1).max()) + 1
    if not _can_trim(model) or length >= tokens.shape[1]:
        return bundle.text_features(tokens)
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, "argmax")
    x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1)


@torch.no_grad()
def _embed(bundle, texts: list[str], batch_size: int) -> torch.Tensor:
    """Unit-norm fp32 text embeddings (N, D) on the bundle's device (the model must already be in eval mode).

    Texts are encoded shortest first, ``batch_size`` at a time, each batch cut to its longest caption
    (:func:`trimmed_text_features`)."""
    if not texts:
        return torch.zeros(0, bundle.meta["embed_dim"], device=bundle.device)
    tokens = bundle.tokenizer(texts)
    order = tokens.argmax(-1).argsort(stable=True)
    out = torch.empty(len(texts), bundle.meta["embed_dim"], device=bundle.device)
    for i in range(0, len(texts), batch_size):
        idx = order[i:i + batch_size]
        out[idx.to(out.device)] = trimmed_text_features(bundle, tokens[idx].to(bundle.device)).float()
    return out


def _embed_memo(bundle, texts: list[str], batch_size: int, memo: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`_embed` of ``texts`` (N, D), encoding only the distinct texts not yet in ``memo`` (which it extends)."""
    from rclip.attacks.image import fp32_eval

    new = [t for t in dict.fromkeys(texts) if t not in memo]
    if new:
        with fp32_eval(bundle.model):
            memo.update(zip(new, _embed(bundle, new, batch_size)))
    if not texts:
        return torch.zeros(0, bundle.meta["embed_dim"], device=bundle.device)
    return torch.stack([memo[t] for t in texts])


def _score(criterion: str, reference: torch.Tensor, guide: torch.Tensor | None, emb: torch.Tensor) -> torch.Tensor:
    """The attacker's objective (higher is better) of each row of ``emb`` against its row of reference / guide."""
    if criterion == "kl":
        return _kl_shift(reference, emb)
    if criterion == "l2":
        return (emb - reference).norm(dim=-1)
    return -(emb * guide).sum(-1)


def _importance(bundle, captions: list[str], mask: str, batch_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the captions' embeddings (N, D), per caption the (n_words,) KL shift when each word is masked)."""
    from rclip.attacks.image import fp32_eval

    words = [c.split() for c in captions]
    variants = [" ".join(w[:j] + [mask] + w[j + 1:]) for w in words for j in range(len(w))]
    with fp32_eval(bundle.model):
        orig = _embed(bundle, captions, batch_size)
        masked = _embed(bundle, variants, batch_size)
    owner = torch.repeat_interleave(torch.arange(len(words)), torch.tensor([len(w) for w in words], dtype=torch.long))
    scores = _kl_shift(orig[owner.to(orig.device)], masked).cpu()
    return orig, list(scores.split([len(w) for w in words]))


def rank_words(bundle, captions: Sequence[str], cfg: TextAttackConfig) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the captions' embeddings (N, D), per caption its words' importance): what :func:`text_attack` ranks words
    by, reusable across attacks on the same captions with the same model (``ranked=``)."""
    return _importance(bundle, list(captions), cfg.mask, cfg.batch_size)


def word_importance(bundle, captions: Sequence[str], mask: str = "[UNK]", batch_size: int = 512
                    ) -> list[torch.Tensor]:
    """Per caption, the KL shift of its embedding when each whitespace word is masked: a list of (n_words,) CPU
    tensors. All masked variants of all captions are encoded together, ``batch_size`` texts per forward."""
    return _importance(bundle, list(captions), mask, batch_size)[1]


def text_attack(bundle, captions: Sequence[str], cfg: TextAttackConfig | None = None, *,
                guide: torch.Tensor | None = None, source: SubstituteSource | None = None,
                ranked: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
                memo: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Adversarial captions by word substitution (see the module docstring).

    Args:
        bundle: the victim CLIP bundle.
        captions: N captions (words are whitespace-separated; punctuation stays attached to its word).
        cfg: budget, top_k, criterion, mask token, stopwords, text batch size.
        guide: (N, D) image embeddings, one per caption, for ``criterion="guide"`` (SGA); unit-normalised here.
        source: a substitute source object; default ``substitute_source(cfg.source)``.
        ranked: the captions' embeddings and word importances when already computed (:func:`rank_words` of the
            same model, captions and ``cfg``); they depend on neither the criterion nor the guide, so SGA's two
            guided passes share one.
        memo: text -> embedding of texts this model has already encoded, read and extended here; a text is encoded
            once whatever its round or pass. Always seeded with the captions themselves (their embeddings are the
            reference), so the caption as it stands is not encoded again each round; SGA shares one between its two
            guided passes, whose candidate captions mostly coincide (only the guide, hence the choice, differs).
    Returns: N adversarial captions; a caption with no substitutable word comes back unchanged.
    """
    cfg = cfg or TextAttackConfig()
    if cfg.criterion not in CRITERIA:
        raise RClipError(f"unknown text attack criterion {cfg.criterion!r}; choose one of {CRITERIA}")
    if cfg.budget < 0 or cfg.top_k < 1:
        raise RClipError(f"text attack needs budget >= 0 and top_k >= 1 (got {cfg.budget}, {cfg.top_k})")
    captions = list(captions)
    if cfg.criterion == "guide":
        if guide is None or len(guide) != len(captions):
            raise RClipError("criterion 'guide' needs guide=(N, D) image embeddings, one per caption")
        guide = F.normalize(guide.detach().float(), dim=-1).to(bundle.device)
    if not captions or cfg.budget == 0:
        return captions
    source = source or substitute_source(cfg.source)
    tokens = [c.split() for c in captions]
    parts = [[_split_word(t) for t in ws] for ws in tokens]
    cores = [[p[1] for p in ps] for ps in parts]
    candidates = source(cores, cfg.top_k)
    reference, importance = ranked if ranked is not None else rank_words(bundle, captions, cfg)
    memo = {} if memo is None else memo
    for c, e in zip(captions, reference):
        memo.setdefault(c, e)

    def eligible(i: int, j: int) -> list[str]:
        core = cores[i][j].lower()
        if not core or core in cfg.stopwords:
            return []
        return [c for c in candidates[i][j] if c != core and c not in cfg.stopwords and not c.startswith("##")]

    # visiting order: decreasing importance, ties by position; only words with substitutes
    queues = []
    for i, imp in enumerate(importance):
        order = sorted(range(len(imp)), key=lambda j: (-float(imp[j]), j))
        queues.append([(j, subs) for j in order if (subs := eligible(i, j))])
    current = [list(ws) for ws in tokens]
    changes = [0] * len(captions)
    active = [i for i in range(len(captions)) if queues[i]]
    while active:
        texts, owners, spans = [], [], []
        for i in active:
            j, subs = queues[i].pop(0)
            lead, _, trail = parts[i][j]
            options = [current[i][j]] + [lead + s + trail for s in subs]
            spans.append((i, j, options, len(texts)))
            for opt in options:
                texts.append(" ".join(current[i][:j] + [opt] + current[i][j + 1:]))
                owners.append(i)
        emb = _embed_memo(bundle, texts, cfg.batch_size, memo)
        idx = torch.tensor(owners, device=emb.device)
        scores = _score(cfg.criterion, reference[idx], None if guide is None else guide[idx], emb).cpu()
        for i, j, options, start in spans:
            best = int(scores[start:start + len(options)].argmax())  # ties keep the caption as it stands
            if best > 0:
                current[i][j] = options[best]
                changes[i] += 1
        active = [i for i in active if queues[i] and changes[i] < cfg.budget]
    return [" ".join(ws) for ws in current]


KINDS = ("meaning kept", "meaning changed", "other", "unchanged")


def substitution_kinds(originals: Sequence[str], adversarial: Sequence[str]) -> list[str]:
    """What each attack did to its caption, read by the world's ground truth of word meaning
    (:func:`rclip.world.language.word_meaning`): ``"unchanged"``; ``"meaning kept"`` (every changed word reads as
    the same shape, colour, size, texture, count or other world word as the one it replaced - a synonym, seen in
    pre-training or held out of it, a digit, or an unambiguous misspelling: the caption stays true of its image);
    ``"meaning changed"`` (some word now names a different member of the world's vocabulary, e.g. another colour:
    the caption is false of its image); ``"other"`` (a word the world does not read). Captions are compared word by
    word; a caption whose word count changed is ``"other"``."""
    from rclip.world.language import word_meaning

    kinds = []
    for orig, adv in zip(originals, adversarial):
        o, a = orig.split(), adv.split()
        if len(o) != len(a):
            kinds.append("other")
            continue
        pairs = [(word_meaning(_split_word(x)[1]), word_meaning(_split_word(y)[1])) for x, y in zip(o, a) if x != y]
        if not pairs:
            kinds.append("unchanged")
        elif all(m is not None and m == n for m, n in pairs):
            kinds.append("meaning kept")
        elif all(m is not None and n is not None for m, n in pairs):
            kinds.append("meaning changed")
        else:
            kinds.append("other")
    return kinds


def meaning_kept_share(originals: Sequence[str], adversarial: Sequence[str]) -> float:
    """Percent of adversarial captions still true of their image: unchanged, or every change keeps its word's
    meaning (:func:`substitution_kinds`)."""
    kinds = substitution_kinds(originals, adversarial)
    return 100.0 * sum(k in ("meaning kept", "unchanged") for k in kinds) / max(1, len(kinds))
