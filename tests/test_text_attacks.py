"""The word-substitution attack against first principles: a one-text-at-a-time brute force of the same procedure,
the word budget, stopwords, the criteria, and the substitute sources (lexicon; WordNet / masked LM skip cleanly)."""
import pytest
import torch
import torch.nn.functional as F

from rclip.attacks.text import (STOPWORDS, LexiconSubstitutes, MaskedLMSubstitutes, TextAttackConfig,
                                WordNetSubstitutes, text_attack, word_importance)
from rclip.errors import RClipError

CAPTIONS = ["a photo of a red circle on a striped background", "two large blue squares",
            "a small pink star in the middle", "there is a green triangle near the top, on a dotted backdrop",
            "a photo of the object"]


def embed(bundle, text):
    """One text through the encoder on its own (no batching), fp32."""
    with torch.no_grad():
        return bundle.text_features(bundle.tokenizer([text])).float()[0]


def kl(p_emb, q_emb):
    return float((p_emb.softmax(-1) * (p_emb.log_softmax(-1) - q_emb.log_softmax(-1))).sum())


def brute_force(bundle, caption, score, top_k=10, budget=1):
    """BERT-Attack's procedure written out one text at a time: mask each word, rank by the KL shift, then at each
    eligible word (decreasing importance) try the caption as it stands and every substitute, keep the best."""
    src = LexiconSubstitutes()
    words = caption.split()
    e0 = embed(bundle, caption)
    imp = [kl(e0, embed(bundle, " ".join(words[:j] + ["[UNK]"] + words[j + 1:]))) for j in range(len(words))]
    order = sorted(range(len(words)), key=lambda j: (-imp[j], j))
    current, changes = list(words), 0
    for j in order:
        if changes >= budget:
            break
        if words[j] in STOPWORDS:
            continue
        subs = [s for s in src.candidates(words, j)[:top_k] if s not in STOPWORDS]
        if not subs:
            continue
        options = [current[j]] + subs
        scores = [score(e0, embed(bundle, " ".join(current[:j] + [o] + current[j + 1:]))) for o in options]
        best = max(range(len(options)), key=lambda k: (scores[k], -k))
        if best > 0:
            current[j] = options[best]
            changes += 1
    return " ".join(current), imp


def test_importance_matches_one_at_a_time(tiny):
    batched = word_importance(tiny, CAPTIONS[:2])
    for cap, imp in zip(CAPTIONS[:2], batched):
        _, ref = brute_force(tiny, cap, lambda a, b: 0.0, budget=0)
        assert torch.allclose(imp, torch.tensor(ref), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("criterion", ["kl", "l2"])
def test_batched_attack_equals_brute_force(tiny, criterion):
    score = kl if criterion == "kl" else (lambda a, b: float((b - a).norm()))
    adv = text_attack(tiny, CAPTIONS, TextAttackConfig(criterion=criterion))
    for cap, got in zip(CAPTIONS, adv):
        want, _ = brute_force(tiny, cap, score)
        assert got == want
    # batching is an implementation detail: one caption at a time gives the same captions
    assert [text_attack(tiny, [c], TextAttackConfig(criterion=criterion))[0] for c in CAPTIONS] == adv


def test_guided_attack_picks_lowest_similarity_to_the_guide(tiny):
    g = F.normalize(torch.randn(len(CAPTIONS), tiny.meta["embed_dim"], generator=torch.Generator().manual_seed(0)),
                    dim=-1)
    adv = text_attack(tiny, CAPTIONS, TextAttackConfig(criterion="guide"), guide=g)
    for i, (cap, got) in enumerate(zip(CAPTIONS, adv)):
        want, _ = brute_force(tiny, cap, lambda _, e: -float(e @ g[i]))
        assert got == want
        assert float(embed(tiny, got) @ g[i]) <= float(embed(tiny, cap) @ g[i]) + 1e-6


@pytest.mark.parametrize("budget", [1, 2])
def test_memo_encodes_each_text_once_and_changes_nothing(tiny, monkeypatch, budget):
    """SGA's two guided passes share a memo of encoded texts: the captions come out as without it (the brute force
    above pins those), no text is encoded twice, and a pass that meets only known texts encodes nothing."""
    import rclip.attacks.text as text_mod

    cfg = TextAttackConfig(criterion="guide", budget=budget)
    gen = torch.Generator().manual_seed(1)
    g1, g2 = (F.normalize(torch.randn(len(CAPTIONS), tiny.meta["embed_dim"], generator=gen), dim=-1) for _ in "ab")
    want = [text_attack(tiny, CAPTIONS, cfg, guide=g) for g in (g1, g2)]
    ranked = text_mod.rank_words(tiny, CAPTIONS, cfg)
    encoded, real = [], text_mod._embed
    monkeypatch.setattr(text_mod, "_embed", lambda b, texts, bs: encoded.extend(texts) or real(b, texts, bs))
    memo = {}
    assert text_attack(tiny, CAPTIONS, cfg, guide=g1, ranked=ranked, memo=memo) == want[0]
    n1 = len(encoded)
    assert text_attack(tiny, CAPTIONS, cfg, guide=g2, ranked=ranked, memo=memo) == want[1]
    n = len(encoded)
    assert n1 and len(encoded) == len(set(encoded))                   # nothing encoded twice, across both passes
    assert not set(encoded) & set(CAPTIONS)                           # the captions' embeddings are the ranking's
    assert text_attack(tiny, CAPTIONS, cfg, guide=g1, ranked=ranked, memo=memo) == want[0]
    assert len(encoded) == n                                          # every text known: no new encodes
    text_attack(tiny, CAPTIONS, cfg, guide=g2, ranked=ranked)         # the second pass alone, no shared memo:
    alone = encoded[n:]
    assert set(alone) <= set(encoded[:n]) and len(alone) > n - n1     # the shared memo held all it needs and saved


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_budget_and_stopwords(tiny, budget):
    adv = text_attack(tiny, CAPTIONS, TextAttackConfig(budget=budget))
    changed_any = False
    for cap, got in zip(CAPTIONS, adv):
        a, b = cap.split(), got.split()
        assert len(a) == len(b)
        diff = [j for j in range(len(a)) if a[j] != b[j]]
        assert len(diff) <= budget
        assert all(a[j].strip(",") not in STOPWORDS for j in diff)     # stopwords untouched
        changed_any |= bool(diff)
    assert changed_any
    if budget == 1:
        assert adv == text_attack(tiny, CAPTIONS)  # the default budget is one word


def test_punctuation_stays_attached():
    src = LexiconSubstitutes()
    words = "on a striped background, a red circle".split()
    assert "backdrop" in src.candidates([w.strip(",") for w in words], 3)


def test_lexicon_source_proposes_synonyms_and_related_words():
    src = LexiconSubstitutes()
    cands = src.candidates("a red circle".split(), 1)
    assert cands[:2] == ["crimson", "scarlet"]                       # meaning kept first
    assert {"orange", "blue", "pink"} <= set(cands[:10])              # then every other colour
    assert "red" not in cands
    plural = src.candidates("two large circles".split(), 2)
    assert plural[0] == "discs" and "squares" in plural               # plurals stay plural
    assert src.candidates("a photo".split(), 0) == []                  # no lexicon entry
    assert LexiconSubstitutes(related=False).candidates("a red circle".split(), 1) == ["crimson", "scarlet"]
    assert src.synonyms("circles") == ["discs"]


def test_bad_inputs_raise(tiny):
    with pytest.raises(RClipError, match="criterion"):
        text_attack(tiny, CAPTIONS, TextAttackConfig(criterion="bleu"))
    with pytest.raises(RClipError, match="guide"):
        text_attack(tiny, CAPTIONS, TextAttackConfig(criterion="guide"))
    assert text_attack(tiny, CAPTIONS, TextAttackConfig(budget=0)) == CAPTIONS
    assert text_attack(tiny, []) == []


def test_optional_sources_fail_cleanly():
    if WordNetSubstitutes.available():
        assert "auto" in WordNetSubstitutes().synonyms("car")
    else:
        with pytest.raises(RClipError, match="nltk"):
            WordNetSubstitutes()
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(RClipError, match="transformers"):
            MaskedLMSubstitutes("bert-base-uncased")
    else:
        with pytest.raises(RClipError, match="not available locally"):
            MaskedLMSubstitutes("/nonexistent/masked-lm")


def test_trimmed_text_encoder_equals_open_clip(tiny):
    from rclip.attacks.text import _embed, trimmed_text_features

    tokens = tiny.tokenizer(CAPTIONS)
    with torch.no_grad():
        full = tiny.text_features(tokens)
        assert torch.allclose(trimmed_text_features(tiny, tokens), full, atol=1e-5)
        assert torch.allclose(_embed(tiny, CAPTIONS, batch_size=2), full, atol=1e-5)  # sorted by length, batched


# ----------------------------------------------------------------------------------------------------------------
# The held-out ("unseen") substitutes: never in the world's captions, always read back as the same word
# ----------------------------------------------------------------------------------------------------------------

def test_unseen_forms_are_held_out_of_pretraining_and_keep_their_meaning():
    from rclip.world.language import HELD_OUT_SYNONYMS, held_out_forms, typos, word_meaning
    from rclip.world.tasks import WorldPairs

    pretraining = WorldPairs(3000, split="train", resolution=16)
    seen = {w.strip(",").lower() for i in range(len(pretraining)) for w in pretraining.pair(i)[1].text.split()}
    assert {"circle", "crimson", "two", "background"} <= seen               # the sample covers the vocabulary
    for word in ["circle", "circles", "red", "crimson", "two", "large", "checkered", "background", "hexagons"]:
        forms = held_out_forms(word)
        assert forms and not set(forms) & seen, word                        # none of them ever written
        assert all(word_meaning(f) == word_meaning(word) for f in forms), word
    assert held_out_forms("red")[:3] == list(HELD_OUT_SYNONYMS["red"])        # held-out synonyms first
    assert held_out_forms("circles")[:2] == ["disks", "orbs"]                 # plurals stay plural
    assert word_meaning("disks") == "circles" and word_meaning("disk") == "circle" and word_meaning("3") == "three"
    assert held_out_forms("left") == [] and word_meaning("left") is None      # words the world does not read
    assert typos("blue") == ["bule"] and typos("red") == []                   # first and last letters kept
    # a slip that spells an English word, or that two world words share, is not a readable misspelling
    assert "pulses" not in held_out_forms("pluses") and word_meaning("pulses") is None


def test_substitution_kinds_read_meaning_by_the_worlds_ground_truth():
    from rclip.attacks.text import meaning_kept_share, substitution_kinds

    orig = ["a red circle", "two large squares", "a red circle", "a red circle", "a red circle", "a red circle"]
    adv = ["a ruby cirlce", "2 giant squares", "a blue circle", "a red circle", "a red zebra", "a red big circle"]
    assert substitution_kinds(orig, adv) == ["meaning kept", "meaning kept", "meaning changed", "unchanged",
                                             "other", "other"]
    assert meaning_kept_share(orig, adv) == pytest.approx(50.0)


def test_unseen_source_attack_keeps_every_caption_true(tiny):
    from rclip.attacks.text import meaning_kept_share, rank_words, substitute_source

    assert substitute_source("unseen").name == "unseen"
    cfg = TextAttackConfig(source="unseen", budget=2)
    adv = text_attack(tiny, CAPTIONS, cfg)
    assert adv != CAPTIONS and meaning_kept_share(CAPTIONS, adv) == 100.0
    # the word ranking depends on neither criterion nor guide: computed once, SGA's two passes give the same captions
    g = F.normalize(torch.randn(len(CAPTIONS), tiny.meta["embed_dim"], generator=torch.Generator().manual_seed(1)),
                    dim=-1)
    guided = TextAttackConfig(source="unseen", criterion="guide")
    assert text_attack(tiny, CAPTIONS, guided, guide=g, ranked=rank_words(tiny, CAPTIONS, guided)) == \
        text_attack(tiny, CAPTIONS, guided, guide=g)
