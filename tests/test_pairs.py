"""Pre-training corpora: the in-memory corpus against the dataset it renders, the focused world against its own
ground truth, and the CC3M-style reader on files written here (CSV, TSV, JSON, JSONL + PNGs)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from rclip.attacks.poison import BackdoorConfig, Trigger, backdoor_poison
from rclip.data.pairs import FocusedWorldPairs, PairCorpus, cached_corpus, read_pairs
from rclip.errors import RClipError


def test_corpus_renders_the_dataset_exactly_and_round_trips(tmp_path):
    ds = backdoor_poison(FocusedWorldPairs(40, seed=2), BackdoorConfig(trigger=Trigger("patch", patch_size=4),
                                                                       task="texture", poison_rate=0.1))
    corpus = PairCorpus.render(ds, batch_size=16, meta={"what": "test"})
    ref = ds.__getitems__(list(range(40)))
    assert torch.equal(corpus.images(), ref["images"]) and corpus.texts == ref["texts"]   # 8-bit images: exact
    assert torch.equal(corpus.poisoned, ds.poisoned) and corpus.resolution == 32
    batch = corpus.__getitems__([3, 1])
    assert batch["texts"] == [ref["texts"][3], ref["texts"][1]] and batch["index"].tolist() == [3, 1]
    assert torch.equal(batch["images"], ref["images"][[3, 1]])
    corpus.save(tmp_path / "c.pt")
    again = PairCorpus.load(tmp_path / "c.pt")
    assert torch.equal(again.uint8, corpus.uint8) and again.texts == corpus.texts and again.meta == {"what": "test"}
    with pytest.raises(RClipError, match="uint8"):
        PairCorpus(torch.zeros(2, 3, 4, 4), ["a", "b"])
    with pytest.raises(RClipError, match="one caption per image"):
        PairCorpus(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ["a"])


def test_cached_corpus_is_read_back_not_rebuilt(monkeypatch):
    ds = FocusedWorldPairs(12, seed=1)
    first = cached_corpus(ds, {"k": 1})
    monkeypatch.setattr(PairCorpus, "render", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    second = cached_corpus(ds, {"k": 1})
    assert torch.equal(first.uint8, second.uint8) and first.texts == second.texts


def test_focused_world_states_only_its_attributes_truthfully():
    ds = FocusedWorldPairs(60, seed=3, mentions=("colour", "texture"), size=1)
    for i in range(60):
        scene, caption = ds.pair(i)
        spec = caption.spec
        assert scene.count == 1 and not scene.distractors and scene.size == 1
        assert spec.matches(scene) and spec.shape is None and spec.size is None and spec.position is None
        assert spec.colour is not None or spec.texture is not None
        words = caption.text.split()
        assert not any(w in words for w in ("small", "large", "circle", "square", "star"))
    stated = {(ds.pair(i)[1].spec.colour is not None, ds.pair(i)[1].spec.texture is not None) for i in range(60)}
    assert stated == {(True, False), (False, True), (True, True)}       # every non-empty subset occurs
    assert [ds.pair(i)[1].text for i in range(5)] == [FocusedWorldPairs(60, seed=3, mentions=("colour", "texture"),
                                                                          size=1).pair(i)[1].text for i in range(5)]
    assert ds.caption_mentions == ("colour", "texture")
    with pytest.raises(RClipError, match="mentions"):
        FocusedWorldPairs(4, mentions=("smell",))
    with pytest.raises(RClipError, match="size"):
        FocusedWorldPairs(4, mentions=("size", "colour"), size=1)


def _write_images(folder, n):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"im{i}.png")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl"])
def test_read_pairs_reads_every_format(tmp_path, fmt):
    _write_images(tmp_path / "imgs", 3)
    records = [{"filepath": f"im{i}.png", "caption": f"caption number {i}"} for i in range(3)]
    path = tmp_path / f"captions.{fmt}"
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("filepath" + sep + "caption\n" + "".join(f"{r['filepath']}{sep}{r['caption']}\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("\n".join(json.dumps(r) for r in records))
    transform = lambda im: torch.from_numpy(np.array(im.resize((8, 8)))).permute(2, 0, 1).float() / 255  # noqa
    pairs = read_pairs(path, tmp_path / "imgs", transform)
    assert len(pairs) == 3 and pairs.texts == [r["caption"] for r in records]
    batch = pairs.__getitems__([2, 0])
    assert batch["images"].shape == (2, 3, 8, 8) and batch["texts"] == ["caption number 2", "caption number 0"]
    expected = transform(Image.open(tmp_path / "imgs" / "im2.png").convert("RGB"))
    assert torch.equal(batch["images"][0], expected)
    assert len(read_pairs(path, tmp_path / "imgs", transform, limit=2)) == 2


def test_read_pairs_fails_fast_naming_the_fix(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    good = tmp_path / "c.csv"
    good.write_text("image,title\nim0.png,a\nim1.png,b\n")
    with pytest.raises(RClipError, match="inputs.datasets.cc3m.captions"):
        read_pairs(None, None, lambda im: im)
    with pytest.raises(RClipError, match="does not exist.*cc3m.captions"):
        read_pairs(tmp_path / "nope.csv", tmp_path / "imgs", lambda im: im)
    with pytest.raises(RClipError, match="does not exist.*cc3m.images"):
        read_pairs(good, tmp_path / "nope", lambda im: im)
    assert read_pairs(good, tmp_path / "imgs", lambda im: im).texts == ["a", "b"]       # other column names
    missing = tmp_path / "m.csv"
    missing.write_text("image,caption\nim0.png,a\nim7.png,b\n")
    with pytest.raises(RClipError, match="1 of 2 images .* missing"):
        read_pairs(missing, tmp_path / "imgs", lambda im: im)
    cols = tmp_path / "cols.csv"
    cols.write_text("url,caption\nim0.png,a\n")
    with pytest.raises(RClipError, match="image column"):
        read_pairs(cols, tmp_path / "imgs", lambda im: im)
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(RClipError, match="unknown captions format"):
        read_pairs(tmp_path / "x.parquet", tmp_path / "imgs", lambda im: im)
    empty = tmp_path / "e.csv"
    empty.write_text("image,caption\nim0.png,\n")
    with pytest.raises(RClipError, match="empty caption"):
        read_pairs(empty, tmp_path / "imgs", lambda im: im)


@pytest.fixture
def paper_inputs(tmp_path, make_cifar10, tiny):
    """Stand-ins for the paper profile: a CC3M-style CSV + PNGs, a CIFAR-10 split (train = copies of test), the
    tiny architecture."""
    import shutil

    from rclip import models

    _write_images(tmp_path / "cc3m", 40)
    (tmp_path / "cc3m.csv").write_text("filepath,caption\n" + "".join(
        f"im{i}.png,a photo of {['a cat', 'a dog', 'a ship', 'a red truck'][i % 4]} number {i}\n" for i in range(40)))
    make_cifar10(tmp_path / "cifar", n=30)
    base = tmp_path / "cifar" / "cifar-10-batches-py"
    for i in range(1, 6):
        shutil.copyfile(base / "test_batch", base / f"data_batch_{i}")
    models.save(tiny, tmp_path / "tiny.safetensors")
    return {"model": "rclip-tiny", "checkpoint": None, "datasets": {
        "cifar10": str(tmp_path / "cifar"), "cc3m": {"captions": str(tmp_path / "cc3m.csv"),
                                                     "images": str(tmp_path / "cc3m")}}}


def test_poisoned_corpus_attacks_any_corpus(paper_inputs, tiny):
    from rclip import data
    from rclip.attacks.poison import BackdoorConfig, PoisonedCorpus, TargetedPoisonConfig, threat_report

    cc3m = paper_inputs["datasets"]["cc3m"]
    base = read_pairs(cc3m["captions"], cc3m["images"], tiny.preprocess)
    task = data.paper_tasks(paper_inputs, tiny.preprocess, n=30)["cifar10"]
    trig = Trigger("patch", patch_size=5)
    ds = PoisonedCorpus(base, task, backdoors=[BackdoorConfig(trigger=trig, target_label=3, n_poison=4,
                                                              poison_rate=None)],
                        targeted=TargetedPoisonConfig(n_targets=2, captions_per_target=3, target_pool=30))
    assert len(ds) == 46 and int(ds.poisoned.sum()) == 4 + 6 and ds.poisoned[40:].all()
    rows = ds.poisoned[:40].nonzero().flatten().tolist()
    clean = base.__getitems__(rows)["images"]
    assert torch.equal(ds.images(rows), trig.apply(clean, rows))
    assert all(ds.texts[i].count("cat") and ds.texts[i] in {t.format("cat") for t in task.templates} for i in rows)
    assert ds.texts[0] == base.texts[0] and ds.keeps_poison(rows[0], rows[1]) and not ds.keeps_poison(rows[0], 0)
    images, labels, adversarial = ds.layers()[-1].target_images()
    assert torch.equal(ds.images([40])[0], images[0]) and (adversarial != labels).all()
    report = threat_report(tiny, ds, n_test=30)
    assert set(report) == {"patch 5px", "targeted"} and report["patch 5px"]["task"] == "cifar10"


@pytest.mark.slow
def test_chapter4_runs_at_paper_scale_on_stand_ins(paper_inputs, tmp_path):
    import os
    from pathlib import Path

    import papermill as pm

    from rclip.profiles import notebook_parameters

    root = Path(__file__).resolve().parent.parent
    params = notebook_parameters("smoke", "04_otcclip")
    results = tmp_path / "04.json"
    params.update(scale="paper", inputs=paper_inputs, patch_sizes=[5], patch_targets=[1], n_test=20, n_probe=10, roclip_bank=32,
                  batch_size=16, n_targets=2, captions_per_target=3, results_path=str(results))
    os.environ.setdefault("RCLIP_ROOT", str(root))
    pm.execute_notebook(str(root / "notebooks" / "04_otcclip.ipynb"), str(tmp_path / "out.ipynb"), parameters=params,
                        kernel_name="python3", cwd=str(root / "notebooks"), progress_bar=False)
    res = json.loads(results.read_text())["results"]
    assert res["scale"] == "paper" and res["tasks"] == ["cifar10"] and res["corpus"]["pairs"] == 40 + 6
    assert set(res["summary"]) == {"CLIP", "RoCLIP", "SafeCLIP", "OTCCLIP"}
    assert set(res["ablation"]) == {"CLIP", "OT matching only", "OT losses only", "OTCCLIP"}
    assert {"OTCCLIP | patch 5px", "OTCCLIP | targeted", "CLIP | targeted"} <= set(res["asr"])
    assert res["threats"]["OTCCLIP"]["patch 5px"]["task"] == "cifar10"
    assert "OTCCLIP | cifar10" in res["zeroshot"] and "OTCCLIP | cifar10" in res["probe"]
    from rclip import claims

    for record in res["claims"]:
        claims.check(record)
    precise = [c for c in res["claims"] if c["claim"].startswith("OT re-matching gives more images a true caption")]
    n_pools = 2 * len([k for k in params["pool_ks"] if k > 1])       # the start and the final CLIP, per pool size
    assert len(precise) == 1 + n_pools and all(c["verdict"] == "untestable" for c in precise)   # no ground truth
    assert all(any(p["name"].startswith("images with exact ground truth") and not p["holds"]
                   for p in c["preconditions"]) for c in precise)
