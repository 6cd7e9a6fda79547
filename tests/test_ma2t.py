"""MA²T: EDA's operations from first principles, the other augmentations against the world's ground truth, the
augmented training set, the four training methods (what each trains, that each runs and caches), and the SGD option."""
import json

import numpy as np
import pytest
import torch

from rclip import chapter, world
from rclip.world import LEXICON
from rclip.attacks.text import STOPWORDS, LexiconSubstitutes
from rclip.augment import (AugmentedPairs, alignment_diversity, aligned_order, augment_images, augment_texts, eda,
                           random_deletion, random_insertion, random_swap, randaugment, synonym_replacement)
from rclip.errors import RClipError
from rclip.methods.ma2t import METHODS, MA2TConfig, RetrievalSetPairs, WorldRetrievalPairs, ma2t_clip, ma2t_step
from rclip.train import TrainConfig, make_optimizer

SYN = LexiconSubstitutes().synonyms
WORDS = "a large red circle on a striped background next to a small blue star".split()


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------------------------
# EDA
# ----------------------------------------------------------------------------------------------------------------

def test_synonym_replacement_changes_up_to_n_content_words_to_synonyms():
    for seed in range(20):
        out = synonym_replacement(WORDS, 2, rng(seed), SYN)
        assert len(out) == len(WORDS)
        changed = {(a, b) for a, b in zip(WORDS, out) if a != b}
        assert 1 <= len({a for a, _ in changed}) <= 2
        assert all(b in SYN(a) and a not in STOPWORDS for a, b in changed)


def test_random_insertion_adds_n_synonyms_of_words_in_the_sentence():
    for seed in range(20):
        out = random_insertion(WORDS, 3, rng(seed), SYN)
        assert len(out) == len(WORDS) + 3
        rest = list(out)
        for w in WORDS:  # the original words all stay
            rest.remove(w)
        meanings = {LEXICON.canonical(w) for w in WORDS}
        assert all(LEXICON.canonical(x) in meanings for x in rest)   # synonyms (of synonyms) of its words


def test_random_swap_and_deletion():
    for seed in range(20):
        out = random_swap(WORDS, 2, rng(seed))
        assert sorted(out) == sorted(WORDS) and sum(a != b for a, b in zip(out, WORDS)) <= 4
    assert random_deletion(WORDS, 0.0, rng()) == WORDS
    assert len(random_deletion(WORDS, 1.0, rng())) == 1 and random_deletion(WORDS, 1.0, rng())[0] in WORDS
    assert random_deletion(["circle"], 0.9, rng()) == ["circle"]
    kept = [len(random_deletion(WORDS, 0.3, rng(s))) for s in range(400)]
    assert abs(np.mean(kept) - 0.7 * len(WORDS)) < 0.4     # each word survives with probability 1 - p


def test_eda_recipe():
    out = eda("A large red circle, on a striped background.", rng(3), n_aug=4, alpha=0.3)
    assert len(out) == 4 and all(isinstance(s, str) and s for s in out)
    assert all(s == s.lower() and "," not in s for s in out)
    assert out == eda("A large red circle, on a striped background.", rng(3), n_aug=4, alpha=0.3)
    many = eda(" ".join(WORDS), rng(0), n_aug=8)
    assert len(many) == 8 and len(set(many)) >= 5


# ----------------------------------------------------------------------------------------------------------------
# The other augmentations and the training set
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs():
    return WorldRetrievalPairs(12, split="train", resolution=32)


def test_pairs_are_the_retrieval_split(pairs):
    rset = world.retrieval_set(split="train", n=12, resolution=32)
    assert torch.equal(pairs.images(range(12)), rset.image_tensor())
    assert [pairs.captions(i) for i in range(12)] == [[rset.captions[t] for t in c] for c in rset.img2txt]
    batch = pairs.__getitems__([3, 1])
    assert batch["texts"] == [pairs.captions(3)[0], pairs.captions(1)[0]] and batch["index"].tolist() == [3, 1]
    assert pairs.spec(3).matches(pairs.scene(3))


def test_text_augmentations_against_ground_truth(pairs):
    from rclip.world import Caption, paraphrase, scene_rng

    i = 5
    human = augment_texts(pairs, i, "human", 4)
    assert human == pairs.captions(i)[1:]
    captioned = augment_texts(pairs, i, "captioner", 4)
    assert len(captioned) == 4 and captioned == augment_texts(pairs, i, "captioner", 4)
    para = augment_texts(pairs, i, "paraphrase", 4)
    assert len(para) == 4
    # the paraphraser keeps the caption's meaning: its spec is the original's, which is true of the image
    again = paraphrase(Caption(pairs.captions(i)[0], pairs.spec(i)), scene_rng(0, "augment/paraphrase", i))
    assert again.text == para[0] and again.spec == pairs.spec(i) and again.spec.matches(pairs.scene(i))
    assert len(augment_texts(pairs, i, "eda", 4)) == 4
    with pytest.raises(RClipError, match="not a text augmentation"):
        augment_texts(pairs, i, "randaugment", 4)


def test_image_augmentations(pairs):
    i = 2
    x = pairs.images([i])[0]
    ra = augment_images(pairs, i, "randaugment", 4)
    assert ra.shape == (4, 3, 32, 32) and ra.min() >= 0 and ra.max() <= 1
    assert torch.equal(ra, augment_images(pairs, i, "randaugment", 4))
    assert not torch.allclose(ra, x.expand_as(ra), atol=1e-2)
    gen = augment_images(pairs, i, "generator", 4)
    assert gen.shape == (4, 3, 32, 32) and not torch.allclose(gen[0], x)
    # the generated images depict what the caption says (the world renders them from its meaning)
    for k in range(4):
        again, scenes = world.spec_images([pairs.spec(i)], resolution=32, stream=f"generator/{i}/{k}")
        assert torch.equal(again[0], gen[k]) and pairs.spec(i).matches(scenes[0])
    assert torch.equal(randaugment(x, 2, seed=5), randaugment(x, 2, seed=5))


@pytest.mark.parametrize("augment", ["human", "generator"])
def test_augmented_pairs_never_augment_both_sides(pairs, augment):
    data = AugmentedPairs(pairs, augment, 4)
    assert len(data) == 12 * 5
    batch = data.__getitems__(list(range(10)))
    originals = pairs.__getitems__([0] * 5 + [1] * 5)
    same_image = (batch["images"] == originals["images"]).flatten(1).all(1)
    same_text = torch.tensor([a == b for a, b in zip(batch["texts"], originals["texts"])])
    assert batch["augmented"].tolist() == [False, True, True, True, True] * 2
    assert (same_image | same_text).all()                                  # never (I_aug, T_aug)
    assert (same_image & same_text)[~batch["augmented"]].all()             # originals untouched
    assert not (same_image & same_text)[batch["augmented"]].any()          # every augmented point differs
    with pytest.raises(RClipError, match="exceeds"):
        AugmentedPairs(pairs, augment, 5, n_aug_made=4)
    with pytest.raises(RClipError, match="unknown augmentation"):
        AugmentedPairs(pairs, "mixup")


def test_alignment_and_diversity(tiny, pairs):
    out = alignment_diversity(tiny, pairs, "human", range(4))
    assert out["alignment"].shape == (4, 4) and out["original"].shape == (4,)
    img = tiny.encode_images(pairs.images([1]))
    txt = tiny.encode_texts(augment_texts(pairs, 1, "human", 4))
    assert torch.allclose(out["alignment"][1], (txt @ img[0]), atol=1e-5)
    order = aligned_order(tiny, pairs, "human")
    assert order.shape == (12, 4)
    assert (out["alignment"][1][order[1]].diff() <= 1e-6).all()          # sorted by decreasing alignment


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

def _cfg(method, **kw):
    return MA2TConfig(method, eps=4 / 255, attack_steps=1,
                      train=TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, ckpt_every=1, log_every=1),
                      **kw)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_what_it_should(tiny, pairs, method):
    tuned, log = ma2t_clip(tiny, _cfg(method), pairs, {"n": 12})
    assert log["last_step"] == 2 and np.isfinite([r["loss"] for r in log["records"]]).all()
    before, after = tiny.model.state_dict(), tuned.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("visual.") for k in changed)
    text_changed = any(not k.startswith("visual.") and k != "logit_scale" for k in changed)
    assert text_changed == (method != "tecoa")                              # TeCoA trains the image tower only
    again, _ = ma2t_clip(tiny, _cfg(method), pairs, {"n": 12})              # cached: loaded, not retrained
    assert torch.equal(again.model.visual.conv1.weight, tuned.model.visual.conv1.weight)


def test_mat_attacks_the_text_and_ma2t_uses_the_augmented_set(tiny, pairs):
    calls = []
    import rclip.methods.ma2t as ma2t

    original = ma2t.text_attack

    def spy(bundle, texts, cfg):
        out = original(bundle, texts, cfg)
        calls.append((list(texts), out, cfg.criterion))
        return out
    ma2t.text_attack = spy
    try:
        loss = ma2t_step(tiny, _cfg("mat"))(tiny.model, pairs.__getitems__([0, 1, 2, 3]))
    finally:
        ma2t.text_attack = original
    assert torch.isfinite(loss) and calls and calls[0][2] == "l2"       # Eq. 4: the L2 shift
    assert calls[0][0] != calls[0][1]
    _, log = ma2t_clip(tiny, _cfg("mat", augment="human"), pairs, {"n": 12})
    assert log["train_pairs"] == 12 * 5
    assert json.dumps(log["method"]["augment"]) == '"human"'
    with pytest.raises(RClipError, match="unknown method"):
        ma2t_step(tiny, _cfg("trades"))


def test_real_retrieval_pairs_and_the_sgd_option(tmp_path, tiny):
    from PIL import Image

    from rclip.data import retrieval_dataset

    (tmp_path / "img").mkdir()
    images = []
    for k in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / "img" / f"{k}.png")
        images.append({"filename": f"{k}.png", "split": "train",
                       "sentences": [{"raw": f"Caption {j} of image {k}."} for j in range(5)]})
    (tmp_path / "k.json").write_text(json.dumps({"images": images}))
    rset = retrieval_dataset(tmp_path / "k.json", tmp_path / "img", tiny.preprocess, split="train")
    real = RetrievalSetPairs(rset)
    assert len(real) == 3 and real.captions(1)[0] == "caption 0 of image 1"
    assert augment_texts(real, 1, "human", 4) == real.captions(1)[1:]
    with pytest.raises(RClipError, match="world's ground truth"):
        AugmentedPairs(real, "generator")
    opt = make_optimizer(tiny.model, TrainConfig(steps=1, optimizer="sgd", lr=0.1, momentum=0.5))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.5
    with pytest.raises(RClipError, match="unknown optimizer"):
        make_optimizer(tiny.model, TrainConfig(steps=1, optimizer="lbfgs"))


# ----------------------------------------------------------------------------------------------------------------
# The chapter's orchestrator: each configuration trained once, each evaluation made once, claims from the engine
# ----------------------------------------------------------------------------------------------------------------

STUDY_PARAMS = dict(eps=2, eval_steps=1, text_budget=1, text_top_k=3, text_source="synonyms",
                    attack_sources=["lexicon"], train_steps=1, train_batch=4, train_optimizer="adamw", train_lr=1e-3,
                    train_warmup=1, train_attack_steps=1, bases=["mat_img"], augmentations=["human", "randaugment"],
                    figure3_base="mat_img", figure3_augmentations=["human"], figure3_counts=[0, 4], n_align=4,
                    attack_batch=8, seed=0, seeds=2, gap_steps=2, n_aug_eval=3, aug_steps=2, val_steps=[2, 1],
                    aug_seeds=2, ref_budget_attacks=True)


@pytest.fixture(scope="module")
def study(tiny):
    from rclip.methods.ma2t import RetrievalStudy

    return RetrievalStudy(tiny, world.retrieval_set(split="test", n=4, resolution=32),
                          world.retrieval_set(split="train", n=4, resolution=32),
                          WorldRetrievalPairs(8, split="train", resolution=32), {"n": 8, "test": "study"},
                          STUDY_PARAMS, scale="world", data="stand-ins", reference=("colour", 4 / 255),
                          val=world.retrieval_set(split="val", n=4, resolution=32))


def test_study_trains_and_evaluates_each_configuration_once(study, monkeypatch):
    import rclip.attacks.multimodal as mm
    import rclip.methods.ma2t as m
    from rclip import claims

    evaluated, trained = [], []
    evaluate_attacks, ma2t_clip_ = mm.evaluate_attacks, m.ma2t_clip

    def spy_eval(bundle, rset, attacks, cfg, **kw):
        for a in attacks:
            evaluated.append((id(bundle), id(rset), a, None if a in ("clean", "text") else round(cfg.eps * 255, 4),
                              cfg.text.source if a in ("text", "co-attack", "sga") else None))
        return evaluate_attacks(bundle, rset, attacks, cfg, **kw)

    def spy_train(bundle, cfg, *args, **kw):
        trained.append(study.name(cfg))
        return ma2t_clip_(bundle, cfg, *args, **kw)
    monkeypatch.setattr(mm, "evaluate_attacks", spy_eval)
    monkeypatch.setattr(m, "ma2t_clip", spy_train)
    texts_made, kl_text_attack = [], mm.kl_text_attack     # BERT-Attack's captions: once per model, gallery, source
    monkeypatch.setattr(mm, "kl_text_attack", lambda b, caps, cfg: texts_made.append(
        (id(b), tuple(caps), cfg.text.source)) or kl_text_attack(b, caps, cfg))
    table = study.attack_table()
    t1 = study.table1(study.table1_methods())
    study.table2(), study.table3(), study.figure3()
    sweep = study.schedule_sweep()
    rows = study.claims()
    assert len(evaluated) == len(set(evaluated)) and len(trained) == len(set(trained))
    assert texts_made and len(texts_made) == len(set(texts_made))
    assert set(trained) == {"Fine-tune", "TeCoA", "MAT_Img", "MAT", "TeCoA (seed 1)", "MAT_Img (seed 1)",
                            "MAT (seed 1)", "MAT (4 pairs, 2 steps)", "MAT + I2T(Human) (4 pairs, 2 steps)",
                            "MAT_Img (2 steps)", "MAT (2 steps)",              # the schedule sweep's longer runs,
                            "MAT_Img + I2T(Human) (2 steps)", "MAT_Img + I2I(RA) (2 steps)",    # and aug_steps',
                            "MAT_Img (2 steps) (seed 1)", "MAT_Img + I2T(Human) (2 steps) (seed 1)",  # each at
                            "MAT_Img + I2I(RA) (2 steps) (seed 1)"}                               # aug_seeds
    # the schedule sweep: every step count of val_steps on the validation gallery, Table 1's models reused
    assert list(sweep.index) == [1, 2] and sweep.index.name == "training steps"
    assert study.model(study.train_cfg("mat", steps=1)) is study.model(study.table1_methods()["MAT"])
    val_mat = study.per_image(study.train_cfg("mat"), "text", split="val")
    val_img = study.per_image(study.train_cfg("mat_img"), "text", split="val")
    ref = claims.compare("x", val_mat, val_img, metric="m")
    assert sweep.loc[1, "MAT − MAT_Img"] == pytest.approx(val_mat.mean() - val_img.mean())
    assert (sweep.loc[1, "95 % CI low"], sweep.loc[1, "95 % CI high"]) == pytest.approx((ref["ci_low"], ref["ci_high"]))
    assert sweep.loc[1, "text half changes the model"] == (ref["ci_low"] > 0 or ref["ci_high"] < 0)
    # the augmentation experiments at aug_steps: Table 3's base is not Table 1's MAT_Img
    assert study.table3_models()[0].train.steps == 2 and study.table1_methods()["MAT_Img"].train.steps == 1
    # galleries: Table 2's test side as large as its training gallery; the augmentations on the first 3 test images
    assert [len(study.gallery(s).images) for s in ("train", study.gap_split, study.aug_split)] == [4, 4, 3]
    assert {e[1] for e in evaluated} == {id(study.test), id(study.train_eval), id(study.gallery("test:3")),
                                         id(study.val)}
    n_eval = len(evaluated)
    assert study.claims() == rows and len(evaluated) == n_eval                 # everything shared, nothing redone
    # the tables
    assert ("ref 4/255", "SGA", "synonyms") in table.index and ("2/255", "BERT-Attack", "lexicon") in table.index
    assert ("2/255", "SGA", "lexicon") not in table.index          # other sources: BERT-Attack alone
    assert list(table.columns) == ["TR@1", "TR@5", "IR@1", "IR@5", "ASR TR@1", "ASR IR@1"]
    assert ("MAT", "SGA 2/255") in t1.index and ("Fine-tune", "clean") in t1.index
    assert t1.loc[("MAT", "clean"), "seeds"] == 2 and t1.loc[("Fine-tune", "clean"), "seeds"] == 1
    per_seed = [study.evaluate(c, ["clean"])["clean"].recall()["TR@1"] for c in study.seeded(study.train_cfg("mat"))]
    assert t1.loc[("MAT", "clean"), "TR@1"] == pytest.approx(np.mean(per_seed))
    wide = m.wide(t1.drop(columns="seeds"), ["clean", "SGA 2/255"])
    assert list(wide.index) == ["Fine-tune", "TeCoA", "MAT_Img", "MAT"] and wide.shape[1] == 8
    # the claims: engine records; a failed precondition means untestable; the text-half claims carry the text threat
    for r in rows:
        claims.check(r)
        assert (r["verdict"] == "untestable") == any(not p["holds"] for p in r["preconditions"])
    threat = [r["claim"] for r in rows if any(p["name"].startswith("BERT-Attack") for p in r["preconditions"])]
    assert sorted(threat) == sorted(f"MAT beats {o} under {a} (2/255)" for o in ("TeCoA", "MAT_Img")
                                    for a in ("Co-Attack", "SGA"))
    half = [r for r in rows if any(p["name"].startswith("MAT − MAT_Img") for p in r["preconditions"])]
    assert sorted(r["claim"] for r in half) == sorted(threat)
    seeds = {r["claim"]: r["seeds"] for r in rows if r["claim"].startswith("MAT beats")}
    assert seeds["MAT beats TeCoA under SGA (2/255)"] == 2 and seeds["MAT beats Fine-tune under SGA (2/255)"] == 1
    gap = next(r for r in rows if "train − test gap" in r["claim"])
    assert gap["n"] == 4 and gap["preconditions"][0]["threshold"] == m.GAP_MIN
    names = [r["claim"] for r in rows]
    assert "text augmentations beat image augmentations (pooled robust R@1)" in names
    assert "cross-modal augmentations beat intra-modal ones (pooled robust R@1)" in names
    assert not any("I2T vs T2T" in c for c in names)                     # no T2T augmentation was trained
    aug = [r for r in rows if r["claim"].startswith("MAT_Img + ") or "pooled" in r["claim"]]
    assert len(aug) == 4 and {r["seeds"] for r in aug} == {2} and {r["n"] for r in aug} == {3}
    # seed s of the augmented model against seed s of its base, every seed's base above chance as a precondition
    human = next(r for r in aug if r["claim"].startswith("MAT_Img + I2T(Human) beats"))
    ref = claims.compare("x", study.robust_seeds(study.aug_cfg("mat_img", "human")),
                         study.robust_seeds(study.aug_cfg("mat_img")), metric="m")
    assert (human["estimate"], human["ci_low"], human["ci_high"]) == pytest.approx(
        (ref["estimate"], ref["ci_low"], ref["ci_high"]))
    assert [p["name"].split(" clean")[0] for p in human["preconditions"]] == [
        study.name(c) for c in study.seeded(study.aug_cfg("mat_img"), [0, 1])]
    t3 = study.table3()                  # clean / Co-Attack / SGA over both seeds, PGD and BERT-Attack the run's seed
    assert t3["seeds"].xs("SGA", level="attack").eq(2).all() and t3["seeds"].xs("PGD", level="attack").eq(1).all()
    cfg = study.aug_cfg("mat_img", "human")
    by_seed = [study.evaluate(c, ["sga"], split=study.aug_split)["sga"].recall()["TR@1"]
               for c in study.seeded(cfg, study.aug_seeds)]
    assert t3.loc[(cfg.label(), "SGA"), "TR@1"] == pytest.approx(np.mean(by_seed))
    assert len(evaluated) == n_eval                                      # Table 3 read what the claims made
    assert sum("SGA is at least as strong as Co-Attack" in c for c in names) == 1     # the threat model's source


def test_study_per_image_scores_and_pooling(study):
    ev = study.evaluate(None, ["clean"])["clean"]
    rec = ev.recall()
    assert study.per_image(None, "clean").mean() == pytest.approx((rec["TR@1"] + rec["IR@1"]) / 2)
    robust = study.robust(study.aug_cfg("mat_img", "human"))
    split = study.aug_split
    assert len(robust) == 3
    assert robust == pytest.approx((study.per_image(study.aug_cfg("mat_img", "human"), "co-attack", split=split)
                                    + study.per_image(study.aug_cfg("mat_img", "human"), "sga", split=split)) / 2)
    seeded = study.robust_seeds(study.aug_cfg("mat_img", "human"))          # (aug_seeds, images), seed 0 first
    assert seeded.shape == (2, 3) and seeded[0] == pytest.approx(robust)
    assert seeded[1] == pytest.approx(study.robust(study.seeded(study.aug_cfg("mat_img", "human"), [1])[0]))
    pooled = study.pooled(["human", "randaugment"])
    assert pooled == pytest.approx((seeded + study.robust_seeds(study.aug_cfg("mat_img", "randaugment"))) / 2)
    gains = study.gains()
    assert gains["human"] == pytest.approx(float((seeded - study.robust_seeds(study.aug_cfg("mat_img"))).mean()))


def test_attack_success_and_the_text_threat_precondition(study):
    from rclip.methods.ma2t import Evaluation

    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    clean = Evaluation("clean", torch.zeros(4, dtype=torch.long), torch.zeros(8, dtype=torch.long), groups, [])
    adv = Evaluation("text", torch.tensor([0, 0, 3, 3]), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]), groups, [])
    assert study.asr(clean, adv) == {"ASR TR@1": 50.0, "ASR IR@1": 50.0}
    assert adv.per_image().tolist() == [75.0, 75.0, 25.0, 25.0]
    at_chance = Evaluation("clean", torch.tensor([0, 1, 2, 3]), torch.zeros(8, dtype=torch.long), groups, [])
    assert not at_chance.above_chance()["above"] and np.isnan(study.asr(at_chance, adv)["ASR TR@1"])
    asr, kept = study.text_threat()
    assert asr.threshold == 20.0 and asr.relation == ">="
    assert kept.threshold == 100.0 and kept.value == 100.0      # the synonyms keep every caption true


def test_gallery_prefix_and_pairs_prefix():
    full = world.retrieval_set(split="test", n=5, resolution=16)
    small = full.first(3)
    ref = world.retrieval_set(split="test", n=3, resolution=16)
    assert small.captions == ref.captions and small.img2txt == ref.img2txt
    assert torch.equal(small.image_tensor(), ref.image_tensor()) and small.meta["specs"] == ref.meta["specs"]
    assert full.first(9) is full
    with pytest.raises(RClipError, match="at least one image"):
        full.first(0)
    pairs = WorldRetrievalPairs(8, split="train", resolution=16)
    assert len(pairs.first(3)) == 3 and pairs.first(3).captions(2) == pairs.captions(2)


def test_reference_budget_is_the_largest_of_chapter_0s(tmp_path):
    from rclip.methods.ma2t import alignment_table, rank_correlations, retrieval_reference_budget

    class Run:
        profile = "smoke"

        def __init__(self, budgets):
            self.blob = {"results": {"reference_budgets_255": budgets}}

        def sibling_results(self, notebook):
            assert notebook == "00_world"
            return self.blob, "here"
    assert retrieval_reference_budget(Run({"shape": 2.0, "colour": 6.0, "count": None})) == (
        "colour", 6 / 255, chapter.REFERENCE_SOURCE)
    assert retrieval_reference_budget(Run({"shape": None})) is None
    measured = {a: {"alignment": torch.full((2, 4), float(k)), "diversity": torch.full((2, 4), float(-k)),
                    "original": torch.ones(2)} for k, a in enumerate(["eda", "human", "captioner", "randaugment"])}
    table = alignment_table(measured, {"eda": 0.0, "human": 1.0, "captioner": 2.0, "randaugment": 3.0})
    assert table.loc["Orig.", "alignment"] == 1.0 and table.loc["human", "kind"] == "I2T"
    assert rank_correlations(table) == {"alignment": pytest.approx(1.0), "diversity": pytest.approx(-1.0)}
    assert all(np.isnan(v) for v in rank_correlations(table.loc[["eda", "human", "Orig."]]).values())


# ----------------------------------------------------------------------------------------------------------------
# Paper scale: fail fast, then the chapter end to end on stand-ins
# ----------------------------------------------------------------------------------------------------------------

def test_paper_inputs_fail_fast(tmp_path):
    import time

    from rclip import models
    from rclip.methods.ma2t import paper_retrieval_inputs

    with pytest.raises(RClipError, match="needs the profile's inputs"):
        paper_retrieval_inputs(None, "flickr30k")
    with pytest.raises(RClipError, match=r"inputs.datasets.flickr30k.annotations and .images not set"):
        paper_retrieval_inputs({"datasets": {"flickr30k": {"annotations": None, "images": None}}}, "flickr30k")
    with pytest.raises(RClipError, match="does not exist"):
        paper_retrieval_inputs({"datasets": {"coco": {"annotations": str(tmp_path / "none.json"),
                                                      "images": str(tmp_path)}}}, "coco")
    t0 = time.time()
    with pytest.raises(RClipError, match="offline"):   # the paper's ViT-B/16, not in the local cache
        models.load("ViT-B-16", "openai")
    assert time.time() - t0 < 10


def _paper_stand_ins(tmp_path, tiny) -> dict:
    """A tiny checkpoint, a Karpathy JSON and a few PNGs in place of ViT-B/16 and Flickr30k: the paper-scale
    parameters that point at them."""
    from PIL import Image

    from rclip import models

    (tmp_path / "images").mkdir()
    colours = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 170, 60), "yellow": (230, 215, 40)}
    entries = []
    for k in range(15):
        name, rgb = list(colours.items())[k % 4]
        img = np.zeros((40, 40, 3), np.uint8)
        img[10:30, 10:30] = rgb
        Image.fromarray(img).save(tmp_path / "images" / f"{k}.png")
        shape = ["circle", "square", "star"][k % 3]
        entries.append({"filename": f"{k}.png", "split": "test" if k < 4 else "val" if k >= 12 else "train",
                        "sentences": [{"raw": s} for s in (f"A {name} {shape}.", f"a {shape} coloured {name}",
                                                           f"one {name} thing", f"a picture of a {shape}",
                                                           f"a {name} {shape} on a plain background")]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    ckpt = tmp_path / "tiny.safetensors"
    models.save(tiny, ckpt)
    inputs = {"model": "ViT-B-32", "datasets": {"flickr30k": {"annotations": str(tmp_path / "dataset_flickr30k.json"),
                                                              "images": str(tmp_path / "images")}}}
    return dict(scale="paper", inputs=inputs, model=None, pretrained=None, checkpoint=str(ckpt))


@pytest.mark.slow
def test_chapter3_runs_at_paper_scale_on_stand_ins(tmp_path, tiny):
    """A tiny checkpoint, a Karpathy JSON and a few PNGs in place of ViT-B/16 and Flickr30k."""
    import os
    from pathlib import Path

    import papermill as pm

    from rclip.attacks import WordNetSubstitutes
    from rclip.profiles import notebook_parameters

    root = Path(__file__).resolve().parent.parent
    stand_ins = _paper_stand_ins(tmp_path, tiny)
    params = notebook_parameters("paper", "03_ma2t")
    assert params["scale"] == "paper" and params["model"] == "ViT-B-16"
    results = tmp_path / "03_ma2t.json"
    params.update(notebook_parameters("smoke", "03_ma2t"))
    params.update(**stand_ins, n_eval=4, n_train=8, n_train_eval=4, text_source="synonyms", attack_sources=["synonyms"],
                  augmentations=["eda", "human"], figure3_augmentations=["human"],
                  figure3_counts=[0, 4], results_path=str(results))
    os.environ.setdefault("RCLIP_ROOT", str(root))
    wordnet = WordNetSubstitutes.available()
    if not wordnet:  # EDA at paper scale needs WordNet: the notebook stops, naming the fix
        with pytest.raises(pm.PapermillExecutionError, match="WordNet is not available"):
            pm.execute_notebook(str(root / "notebooks" / "03_ma2t.ipynb"), str(tmp_path / "fail.ipynb"),
                                parameters=params, kernel_name="python3", cwd=str(root / "notebooks"),
                                progress_bar=False)
        params["augmentations"] = ["human"]
    pm.execute_notebook(str(root / "notebooks" / "03_ma2t.ipynb"), str(tmp_path / "out.ipynb"), parameters=params,
                        kernel_name="python3", cwd=str(root / "notebooks"), progress_bar=False)
    res = json.loads(results.read_text())["results"]
    assert res["scale"] == "paper" and res["n_eval"] == 4 and res["budgets_255"] == {"2/255": 2.0}
    assert res["reference_budget"] is None
    assert res["n_val"] == 3 and len(res["schedule_sweep"]) == 2       # Karpathy's val split; smoke's 1 and 2 steps
    assert {"Fine-tune | clean", "MAT | SGA 2/255"} <= set(res["table1"])
    assert set(res["augmentation_gain"]) == ({"eda", "human"} if wordnet else {"human"})
    assert "MAT_Img + I2T(Human) | Co-Attack" in res["table3"] and "Diff" in res["table2"]
    from rclip import claims
    names = [claims.check(r)["claim"] for r in res["claims"]]
    assert "MAT beats TeCoA under SGA (2/255)" in names and any("train − test gap" in c for c in names)
    assert set(res["spearman_gain"]) == {"alignment", "diversity"}


@pytest.mark.slow
@pytest.mark.parametrize("notebook, base, label, reads_ch3", [("03b_ma2t_mat", "mat", "MAT", False),
                                                              ("03c_ma2t_mat_img", "mat_img", "MAT_Img", True)])
def test_augmentation_pages_run_at_paper_scale_on_stand_ins(tmp_path, tiny, notebook, base, label, reads_ch3):
    """Chapters 3b and 3c (the augmentation experiments on MAT, on MAT_Img) at paper scale: no Table 2 gallery, the
    claims on the page's base; 3c sets chapter 3's gains beside its own (and records reading them)."""
    import os
    from pathlib import Path

    import papermill as pm

    from rclip import claims
    from rclip.profiles import notebook_parameters

    root = Path(__file__).resolve().parent.parent
    params = notebook_parameters("paper", notebook)
    assert params["scale"] == "paper" and params["bases"] == [base] and "n_train_eval" not in params
    params.update(notebook_parameters("smoke", notebook))
    results = tmp_path / f"{notebook}.json"
    params.update(**_paper_stand_ins(tmp_path, tiny), n_eval=4, n_train=8, text_source="synonyms",
                  augmentations=["human", "randaugment"], aug_seeds=2, results_path=str(results))
    os.environ.setdefault("RCLIP_ROOT", str(root))
    pm.execute_notebook(str(root / "notebooks" / f"{notebook}.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters=params, kernel_name="python3", cwd=str(root / "notebooks"), progress_bar=False)
    blob = json.loads(results.read_text())
    res = blob["results"]
    assert ("03_ma2t" in blob["inputs"]) == reads_ch3
    assert res["scale"] == "paper" and res["n_eval"] == 4 and res["n_train_eval"] == 0
    assert res["budgets_255"] == {"2/255": 2.0}
    assert {f"{label} | Co-Attack", f"{label} + I2T(Human) | SGA", f"{label} + I2I(RA) | clean"} <= set(res["table3"])
    assert set(res["augmentation_gain"]) == {"human", "randaugment"}
    names = [claims.check(r)["claim"] for r in res["claims"]]
    assert names[:2] == [f"{label} + I2T(Human) beats {label} (robust R@1)",
                         f"{label} + I2I(RA) beats {label} (robust R@1)"]
    assert all(r["seeds"] == 2 and r["n"] == 4 for r in res["claims"])     # every claim scored, at both seeds


def test_augmentation_study_runs_without_table2s_gallery(study):
    """A study of the augmentation experiments alone (chapter 3b): no training gallery, no further text sources, no
    reference budget unless asked for; Table 2 names what is missing."""
    from rclip.methods.ma2t import RetrievalStudy

    keep = ("eps", "eval_steps", "text_budget", "text_top_k", "text_source", "train_steps", "train_batch",
            "train_optimizer", "train_lr", "train_warmup", "train_attack_steps", "augmentations", "attack_batch",
            "seed", "aug_seeds")
    params = {**{k: STUDY_PARAMS[k] for k in keep}, "bases": ["mat"]}
    s = RetrievalStudy(study.bundle, study.test, None, study.pairs, study.data_key, params, scale="world",
                       data="stand-ins", reference=("colour", 4 / 255))
    assert s.sources == [params["text_source"]] and list(s.budgets) == ["2/255"]
    assert s.header()["n_train_eval"] == 0 and s.aug_split == "test"
    for attempt in (lambda: s.gallery("train"), lambda: s.gap_split, s.table2):
        with pytest.raises(RClipError, match="n_train_eval"):
            attempt()
    summary = s.summary(augmentations_only=True)["this run"]
    assert summary["bases"] == "MAT" and summary["augmentations"] == "I2T(Human), I2I(RA)"
    assert summary["training seeds"] == "2 per model (0, 1)"
    assert summary["test gallery"] == f"{len(study.test.images)} images, {len(study.test.captions)} captions"
    assert [c.label() for c in s.table3_models()] == ["MAT", "MAT + I2T(Human)", "MAT + I2I(RA)"]
    with pytest.raises(RClipError, match="gap_steps.*n_train_eval"):     # Table 2 asked for, no gallery: at once
        RetrievalStudy(study.bundle, study.test, None, study.pairs, study.data_key, {**params, "gap_steps": 5},
                       scale="world", data="stand-ins")


def test_study_names_tell_configurations_apart(study):
    from dataclasses import replace

    from rclip.methods.ma2t import RetrievalStudy

    assert study.name(study.train_cfg("mat", adversary="lexicon")) == "MAT (lexicon adversary)"
    assert study.name(study.train_cfg("mat", steps=7)) == "MAT (7 steps)"
    assert study.name(study.aug_cfg("mat_img", "human", n_false=2)) == "MAT_Img + I2T(Human) (2 of 4 false) (2 steps)"
    assert study.aug_cfg("mat_img", "human", distinct=4) == study.aug_cfg("mat_img", "human")
    with pytest.raises(RClipError, match="distinct_counts"):
        study.aug_cfg("mat_img", "human", distinct=5)
    fresh = RetrievalStudy(study.bundle, study.test, study.train_eval, study.pairs, study.data_key, STUDY_PARAMS,
                           scale="world", data="stand-ins")
    cfg = fresh.train_cfg("mat")
    fresh._cfgs[fresh.name(cfg)] = replace(cfg, eps=1 / 255)          # another configuration under the same name
    with pytest.raises(RClipError, match="share the name"):
        fresh.model(cfg)
    for key, bad in (("aug_seeds", 0), ("aug_seeds", 2.5), ("seeds", -1), ("aug_seeds", True), ("seeds", "3")):
        with pytest.raises(RClipError, match=f"{key} is a number of training seeds.*got {bad!r}"):
            RetrievalStudy(study.bundle, study.test, study.train_eval, study.pairs, study.data_key,
                           {**STUDY_PARAMS, key: bad}, scale="world", data="stand-ins")


def test_study_without_validation_gallery_names_the_fix(tiny):
    from rclip.methods.ma2t import RetrievalStudy

    s = RetrievalStudy(tiny, world.retrieval_set(split="test", n=2, resolution=32),
                       world.retrieval_set(split="train", n=4, resolution=32),
                       WorldRetrievalPairs(4, split="train", resolution=32), {"n": 4}, STUDY_PARAMS, scale="world",
                       data="stand-ins")
    with pytest.raises(RClipError, match="n_val"):
        s.schedule_sweep()


def test_false_captions_are_false_and_distinct_points_repeat():
    from rclip.augment import false_captions

    pairs = WorldRetrievalPairs(12, split="train", resolution=32)
    firsts = {pairs.captions(j)[0]: j for j in range(len(pairs))}
    for i in range(4):
        got = false_captions(pairs, i, 3, seed=1)
        assert len(got) == 3 and got == false_captions(pairs, i, 3, seed=1)          # a pure function of (seed, i)
        for c in got:                                                # another pair's caption, false of image i
            assert firsts[c] != i and not pairs.spec(firsts[c]).matches(pairs.scene(i))
    mixed = AugmentedPairs(pairs, "human", 4, n_false=2, seed=1)
    plain = AugmentedPairs(pairs, "human", 4, seed=1)
    texts = mixed.__getitems__(list(range(5)))["texts"]
    assert texts[1:3] == false_captions(pairs, 0, 2, seed=1)                      # the first two points: false
    assert texts[3:5] == plain.__getitems__([3, 4])["texts"] == pairs.captions(0)[3:5]     # the rest: Human's
    once = AugmentedPairs(pairs, "human", 4, distinct=1)
    assert once.__getitems__(list(range(5)))["texts"][1:] == [pairs.captions(0)[1]] * 4
    for bad, match in ((dict(n_false=5), "n_false=5"), (dict(distinct=0), "distinct=0")):
        with pytest.raises(RClipError, match=match):
            AugmentedPairs(pairs, "human", 4, **bad)
    with pytest.raises(RClipError, match="not a text augmentation"):
        AugmentedPairs(pairs, "randaugment", 4, n_false=1)
    rset = world.retrieval_set(split="train", n=4, resolution=32)
    with pytest.raises(RClipError, match="world-scale"):
        AugmentedPairs(RetrievalSetPairs(rset), "human", 4, n_false=1)


def test_used_points_measure_what_the_controls_change(tiny):
    from rclip.augment import false_captions, used_points_alignment_diversity

    pairs = WorldRetrievalPairs(8, split="train", resolution=32)
    idx = range(6)
    m = {k: used_points_alignment_diversity(tiny, AugmentedPairs(pairs, "human", 4, **kw), idx)
         for k, kw in {"plain": {}, "false": dict(n_false=4), "once": dict(distinct=1)}.items()}
    assert m["once"]["spread"].abs().max() < 1e-5 and (m["plain"]["spread"] > 1e-3).all()
    assert torch.allclose(m["once"]["alignment"][:, 0], m["plain"]["alignment"][:, 0], atol=1e-5)
    # brute force: point 0 of the all-false set is the first false caption's cosine with its image
    img = tiny.encode_images(pairs.images([0]))
    ref = (tiny.encode_texts(false_captions(pairs, 0, 4)[:1]) * img).sum(-1)
    assert m["false"]["alignment"][0, 0] == pytest.approx(float(ref[0]), abs=1e-5)


def test_study_controls_of_alignment_and_diversity(tiny):
    from rclip import claims
    from rclip.methods.ma2t import RetrievalStudy

    params = {**STUDY_PARAMS, "false_counts": [0, 4], "distinct_counts": [1, 4], "n_align": 4}
    s = RetrievalStudy(tiny, world.retrieval_set(split="test", n=4, resolution=32),
                       world.retrieval_set(split="train", n=4, resolution=32),
                       WorldRetrievalPairs(8, split="train", resolution=32), {"n": 8, "test": "controls"}, params,
                       scale="world", data="stand-ins")
    cfgs = s.control_cfgs()
    assert cfgs[("false", 0)] == cfgs[("distinct", 4)] == s.aug_cfg("mat_img", "human")     # Table 3's model
    table = s.controls()
    assert list(table.index) == [("false", 0), ("false", 4), ("distinct", 1), ("distinct", 4)]
    assert table.loc[("distinct", 1), "spread"] < 1e-5 < table.loc[("distinct", 4), "spread"]
    assert table.loc[("false", 4), "robust R@1"] == pytest.approx(float(s.robust(cfgs[("false", 4)]).mean()))
    rows = s.control_claims()
    assert [r["sides"] for r in rows] == [["0 false", "4 false"], ["4 distinct", "1 distinct"]]
    for r in rows:
        claims.check(r)
        assert r["n"] == 3                                                          # the aug_split's images
