"""Nothing wrong is read or reported as right: verified artefacts, resumes that refuse changed settings, strict
inputs, files others can read. Each test pins a fault that earlier code let through silently."""
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rclip import models, world, zeroshot
from rclip.attacks import autoattack, pgd
from rclip.cache import atomic_path, write_json
from rclip.errors import RClipError
from rclip.train import TrainConfig, fit, train_cached

ROOT = Path(__file__).resolve().parent.parent


def _scale_file(path: Path, factor: float, prefix: str = "visual.") -> None:
    """A finite corruption: multiply the weights under ``prefix`` by ``factor`` and rewrite the file in place."""
    from safetensors.torch import save_file

    state, meta = models.read_state_dict(path)
    save_file({k: (v * factor if k.startswith(prefix) else v).contiguous() for k, v in state.items()}, str(path),
              metadata=meta)


def test_corrupted_shipped_world_clip_is_refused(tmp_path, monkeypatch):
    assets = tmp_path / "world_clip"
    shutil.copytree(models.WORLD_CLIP_DIR, assets)
    monkeypatch.setattr(models, "WORLD_CLIP_DIR", assets)
    models.load("world")                                           # the intact copy loads
    _scale_file(assets / "model.safetensors", 2.0)
    t0 = time.time()
    with pytest.raises(RClipError, match=r"does not match its checksum.*git checkout"):
        models.load("world")
    assert time.time() - t0 < 10


def _tiny_train(base, steps=2):
    def train(run_dir):
        tuned = base.copy()
        data = world.WorldPairs(16, resolution=32)
        from rclip.train import contrastive_step

        cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, ckpt_every=1)
        return tuned, fit(tuned, data, cfg, run_dir, contrastive_step(tuned, 0, 1), progress=False)
    return train


def test_corrupted_cached_model_is_refused(tiny):
    key = {"test": "corruption"}
    _, log, _ = train_cached("integrity", key, _tiny_train(tiny), base=tiny)
    assert "artefact_sha256" in log
    again, log2, _ = train_cached("integrity", key, _tiny_train(tiny), base=tiny)   # read back, verified
    assert log2 == log
    from rclip.cache import artefact_path

    path = artefact_path("integrity", key, ".safetensors")
    _scale_file(path, 0.5)
    t0 = time.time()
    with pytest.raises(RClipError, match=r"does not match the checksum.*delete"):
        train_cached("integrity", key, _tiny_train(tiny), base=tiny)
    assert time.time() - t0 < 10


def test_killed_writer_leaves_nothing_that_is_read_as_whole(tmp_path):
    """A process killed (by its own PID) in the middle of writing an artefact: the next run neither reads the
    partial file nor fails because of it."""
    cache = tmp_path / "cache"
    script = f"""
import os, signal, torch
from rclip import models
from rclip.train import train_cached
import rclip.models as m
real_save = m.save
def dying_save(bundle, path, **kw):
    with open(path, "wb") as f:
        f.write(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)
m.save = dying_save
import tests.test_integrity as t
tiny = models.load("rclip-tiny")
train_cached("integrity", {{"test": "killed"}}, t._tiny_train(tiny), base=tiny)
"""
    env = {**os.environ, "RCLIP_CACHE": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    leftovers = list((cache / "integrity").glob("*"))
    assert not any(p.name.endswith(".log.json") for p in leftovers)          # never marked complete
    proc = subprocess.run([sys.executable, "-c", script.split("import rclip.models as m")[0]
                           + "import tests.test_integrity as t\ntiny = models.load('rclip-tiny')\n"
                           + "b, log, _ = train_cached('integrity', {'test': 'killed'}, t._tiny_train(tiny), base=tiny)\n"
                           + "assert log['artefact_sha256']\n"], env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_resume_refuses_changed_settings(tiny, tmp_path):
    data = world.WorldPairs(32, resolution=32)
    from rclip.train import contrastive_step

    base = dict(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, ckpt_every=2, max_minutes=None)
    b = tiny.copy()
    fit(b, data, TrainConfig(**{**base, "steps": 2}), tmp_path, contrastive_step(b, 0, 1), progress=False)
    b = tiny.copy()
    with pytest.raises(RClipError, match=r"lr: 0\.001 there, 0\.01 now.*delete"):
        fit(b, data, TrainConfig(**{**base, "steps": 2, "lr": 1e-2}), tmp_path, contrastive_step(b, 0, 1),
            progress=False)
    with pytest.raises(RClipError, match="past the 1 steps"):
        fit(b, data, TrainConfig(**{**base, "steps": 1}), tmp_path, contrastive_step(b, 0, 1), progress=False)
    log = fit(b, data, TrainConfig(**{**base, "steps": 2, "log_every": 7}), tmp_path, contrastive_step(b, 0, 1),
              progress=False)                                  # bookkeeping may change
    assert log["last_step"] == 2 and log["config"]["log_every"] == 7   # the log states the settings asked for
    with pytest.raises(RClipError, match="ckpt_every must be at least 1"):
        TrainConfig(steps=2, ckpt_every=0)


def test_attacks_and_classifiers_refuse_impossible_inputs(tiny):
    task = world.zeroshot_task("colour", n=8, resolution=32)
    clf = zeroshot.zeroshot_classifier(tiny, task)
    x, y = task.tensors()
    with pytest.raises(RClipError, match="NaN"):
        pgd(clf, x, y, float("nan"), steps=1)
    with pytest.raises(RClipError, match="did you mean 8/255"):
        pgd(clf, x, y, 8, steps=1)
    with pytest.raises(RClipError, match=r"labels must lie in \[0, 7\]"):
        autoattack(clf, x, torch.full_like(y, 8), 1 / 255, steps=1)
    with pytest.raises(RClipError, match=r"labels must lie"):
        zeroshot.accuracy(clf, x, torch.full_like(y, 9))
    with pytest.raises(RClipError, match="K >= 2"):
        zeroshot.ZeroShotClassifier(tiny, clf.weights[:1])
    from rclip.methods.cola import COLAConfig, cola_classifier

    with pytest.raises(RClipError, match="entropy_temp"):
        cola_classifier(tiny, task, COLAConfig(entropy_temp=0.0))
    with pytest.raises(RClipError, match="crop_scale"):
        cola_classifier(tiny, task, COLAConfig(crop_scale=(0.5, 1.5)))


def test_written_files_are_readable_by_others(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"1")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("a.json", "b.bin"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o666 & ~mask and mode & stat.S_IROTH


def test_recall_refuses_owners_outside_the_gallery():
    from rclip.retrieval import recall_at_k

    sim = torch.eye(2, 3)
    with pytest.raises(RClipError, match=r"owner must lie in \[0, 1\]"):
        recall_at_k(sim, torch.tensor([0, 1, 2]))       # caption 2 "belongs" to an image that does not exist


def test_fusion_refuses_a_head_count_the_models_contradict(tiny):
    from rclip.methods.fusion import fuse_visual

    heads = tiny.model.visual.transformer.resblocks[0].attn.num_heads
    fuse_visual([tiny, tiny.copy()], heads=heads)                 # the true count is accepted
    with pytest.raises(RClipError, match=f"contradicts the models, which have {heads}"):
        fuse_visual([tiny, tiny.copy()], heads=heads * 2)


def test_out_under_a_regular_file_is_a_clear_error(tmp_path):
    from rclip import book

    (tmp_path / "afile").write_text("x")
    with pytest.raises(RClipError, match=f": {tmp_path / 'afile'} is a file, not a directory"):
        book.run_book("smoke", only=["00_world"], out=tmp_path / "afile" / "site", build=False)


def test_empty_batches_are_a_clear_error(tiny):
    task = world.zeroshot_task("colour", n=2, resolution=32)
    clf = zeroshot.zeroshot_classifier(tiny, task)
    with pytest.raises(RClipError, match="empty"):
        pgd(clf, torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long), 1 / 255)
    with pytest.raises(RClipError, match="zero images"):
        zeroshot.accuracy(clf, torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))


def _images(root, n):
    import numpy as np
    from PIL import Image

    root.mkdir()
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / f"{i}.png")


def test_pair_files_are_read_with_the_standard_parsers(tmp_path, tiny):
    from rclip.data.pairs import read_pairs

    _images(tmp_path / "img", 3)
    good = tmp_path / "good.csv"
    good.write_text('\ufeffimage,caption\n0.png,"a dog\non grass"\n1.png,a cat\n2.png,"a, b"\n', encoding="utf-8")
    pairs = read_pairs(good, tmp_path / "img", tiny.preprocess)              # a BOM header is accepted
    assert pairs.texts == ["a dog\non grass", "a cat", "a, b"]              # the quoted newline is kept
    missing = tmp_path / "missing.csv"
    missing.write_text("image,caption\n0.png,a dog\n1.png\n", encoding="utf-8")
    with pytest.raises(RClipError, match="line 3: the record has fewer fields"):
        read_pairs(missing, tmp_path / "img", tiny.preprocess)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"image": "0.png", "caption": "a dog"}\n{"image": "1.png", "caption": null}\n')
    with pytest.raises(RClipError, match="line 2: column 'caption' is missing or not text"):
        read_pairs(jsonl, tmp_path / "img", tiny.preprocess)


def test_description_values_must_be_lists(tmp_path):
    from rclip.data.classification import load_descriptions

    path = tmp_path / "d.json"
    path.write_text('{"cat": "a small animal", "dog": ["a loyal animal"]}')
    with pytest.raises(RClipError, match="not a list of sentences"):
        load_descriptions(path, ["cat", "dog"])
