import hashlib

import numpy as np
import pytest
import torch

from rclip import world
from rclip.errors import RClipError
from rclip.world.attributes import COLOUR_RGB, SIZE_RADIUS
from rclip.world.render import scene_tensors, shape_sdf, texture_field, _noise_field


def test_vocabulary_sizes():
    assert len(world.SHAPES) >= 10 and len(world.COLOURS) >= 8 and len(world.SIZES) >= 2
    assert len(world.TEXTURES) >= 4 and len(world.POSITIONS) >= 4


def test_scene_and_image_are_deterministic():
    a = world.sample_scene(world.scene_rng(3, "train", 7))
    b = world.sample_scene(world.scene_rng(3, "train", 7))
    c = world.sample_scene(world.scene_rng(3, "test", 7))
    assert a == b and a != c
    assert torch.equal(world.render([a], 48), world.render([b], 48))


def test_render_is_independent_of_batch_composition():
    scenes = [world.sample_scene(world.scene_rng(0, "x", i)) for i in range(6)]
    together = world.render(scenes, 40)
    alone = torch.cat([world.render([s], 40) for s in scenes])
    assert torch.equal(together, alone)
    assert together.min() >= 0 and together.max() <= 1
    assert torch.equal((together * 255).round(), together * 255)  # exact 8-bit images


def _reference_render(scene, r):
    """Independent full-frame composite of one scene (no windows), straight from the scene fields."""
    coords = (torch.arange(r, dtype=torch.float32) + 0.5) / r
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    p = scene_tensors([scene])
    grey = p["background"][0, 0] + p["background"][0, 1] * texture_field(p["texture"], p["background"], x, y, 1 / r)[0]
    canvas = grey[None] + p["background"][0, 5:8, None, None]
    for o in scene.objects:
        rad = SIZE_RADIUS[o.size]
        cx = (o.cell % 3 + 0.5) / 3 + o.dx
        cy = (o.cell // 3 + 0.5) / 3 + o.dy
        u0, v0 = (x - cx) / rad, (y - cy) / rad
        ca, sa = np.cos(o.angle), np.sin(o.angle)
        u, v = ca * u0 + sa * v0, -sa * u0 + ca * v0
        alpha = (0.5 - shape_sdf(o.shape, u, v) * rad * r).clamp(0, 1)
        rgb = torch.tensor(COLOUR_RGB[o.colour]) + torch.tensor(o.shade)
        canvas = canvas * (1 - alpha) + rgb[:, None, None] * alpha
    light = scene.light
    canvas = canvas * light[0] * torch.tensor(light[1:])[:, None, None]
    canvas = canvas + _noise_field(torch.tensor([scene.noise[1]]), r)[0] * scene.noise[0]
    return (canvas.clamp(0, 1) * 255).round() / 255


@pytest.mark.parametrize("index", range(5))
def test_windowed_render_matches_full_frame_reference(index):
    scene = world.sample_scene(world.scene_rng(1, "ref", index), n_distractors=None)
    got = world.render([scene], 64)[0]
    want = _reference_render(scene, 64)
    assert (got - want).abs().max() <= 1 / 255 + 1e-6
    assert (got != want).float().mean() < 0.002  # only float rounding at an 8-bit boundary may differ


def test_every_shape_is_drawn_and_distinct():
    scenes = [world.sample_scene(world.scene_rng(0, "shapes", s), shape=s, colour=0, size=1, count=1, texture=0,
                                 n_distractors=0, position=4) for s in range(len(world.SHAPES))]
    imgs = world.render(scenes, 64)
    masks = (imgs[:, 0] - imgs[:, 2]).abs() > 0.25  # red object against a grey background
    areas = masks.float().sum((1, 2))
    assert (areas > 60).all(), areas
    for i in range(len(scenes)):
        for j in range(i + 1, len(scenes)):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.92, (world.SHAPES[i], world.SHAPES[j], float(iou))


def test_five_distinct_true_captions_per_image():
    for i in range(40):
        rng = world.scene_rng(0, "cap", i)
        scene = world.sample_scene(rng)
        caps = world.captions_for(scene, rng, 5)
        assert len({c.text for c in caps}) == 5
        assert all(c.spec.matches(scene) for c in caps)
        assert len({(c.spec.shape is None, c.spec.colour is None, c.spec.texture is None, c.spec.size is None)
                     for c in caps}) >= 2  # they differ in which attributes they mention


def test_caption_spec_rejects_other_scenes():
    rng = np.random.default_rng(0)
    scene = world.sample_scene(rng, shape=0, colour=0, count=2, texture=1)
    spec = world.CaptionSpec(count=frozenset({2}), shape=0, colour=0, texture=1)
    assert spec.matches(scene)
    for change in (dict(shape=1), dict(colour=2), dict(count=3), dict(texture=2)):
        kw = {**dict(shape=0, colour=0, count=2, texture=1), **change}
        assert not spec.matches(world.sample_scene(rng, **kw))


def test_generator_renders_what_the_caption_says():
    rng = world.scene_rng(0, "gen", 0)
    specs = [world.caption_scene(world.sample_scene(rng), rng).spec for _ in range(30)]
    images, scenes = world.spec_images(specs, resolution=32)
    assert images.shape == (30, 3, 32, 32)
    assert all(sp.matches(sc) for sp, sc in zip(specs, scenes))
    # a vague count ("several": 2-4) beside two mentioned distractors leaves room for 2 subject objects only
    crowded = [world.caption_scene(world.sample_scene(rng, count=2, n_distractors=2), rng, ("shape", "distractors"))
               for _ in range(60)]
    crowded = [c.spec for c in crowded if len(c.spec.count) > 1 and len(c.spec.distractors) == 2]
    assert crowded, "no caption with a vague count and two distractors was drawn"
    _, scenes = world.spec_images(crowded, resolution=32)
    assert all(sp.matches(sc) and sc.count == 2 for sp, sc in zip(crowded, scenes))


def test_paraphrase_keeps_meaning_and_changes_words():
    rng = world.scene_rng(0, "para", 0)
    scene = world.sample_scene(rng, count=1)
    cap = world.caption_scene(scene, rng, ("size", "colour", "shape", "texture"))
    new = world.paraphrase(cap, rng)
    assert new.spec == cap.spec and new.text != cap.text and new.spec.matches(scene)


def test_lexicon():
    lex = world.LEXICON
    assert "crimson" in lex.synonyms("red") and "red" in lex.synonyms("crimson")
    assert lex.category("scarlet") == "colour"
    assert "blue" in lex.related("red") and "crimson" not in lex.related("red")
    assert lex.related("the") == ()


@pytest.mark.parametrize("name", world.TASK_NAMES)
def test_tasks(name):
    task = world.zeroshot_task(name, n=2 * len(world.TASKS[name].classnames), resolution=32)
    x, y = task.tensors()
    assert x.shape[1:] == (3, 32, 32)
    assert torch.equal(torch.bincount(y), torch.full((task.num_classes,), 2))
    assert len(task.templates) >= 10
    assert all(len(set(d)) >= 20 for d in task.descriptions)
    label_of = world.TASKS[name].label_of
    assert [label_of(s) for s in task.meta["scenes"]] == y.tolist()


def test_colour_shape_task_has_enough_classes():
    assert len(world.TASKS["colour_shape"].classnames) >= 60


def test_descriptions_state_the_class():
    desc = world.class_descriptions("colour_shape", 25)
    names = world.TASKS["colour_shape"].classnames
    lex = world.LEXICON
    for label in (0, 17, 79):
        colour, shape = names[label].split()
        for d in desc[label]:
            words = {lex.canonical(w) for w in d.replace(",", " ").split()}
            words |= {lex.canonical(w[:-2]) for w in d.split() if w.endswith("es")}
            words |= {lex.canonical(w[:-1]) for w in d.split() if w.endswith("s")}
            assert colour in words and shape in words, d


def test_splits_never_overlap():
    def digests(split):
        x, _ = world.zeroshot_task("colour_shape", split=split, n=160, resolution=32).tensors()
        return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x}

    tr, va, te = digests("train"), digests("val"), digests("test")
    assert not (tr & va) and not (tr & te) and not (va & te)


def test_retrieval_split_and_pairs():
    rset = world.retrieval_set(n=12, resolution=32)
    assert len(rset.captions) == 60 and rset.txt2img.tolist() == [i // 5 for i in range(60)]
    assert all(sp.matches(rset.meta["scenes"][i // 5]) for i, sp in enumerate(rset.meta["specs"]))
    pairs = world.WorldPairs(100, resolution=32)
    batch = pairs.__getitems__([3, 5, 3])
    assert batch["images"].shape == (3, 3, 32, 32) and batch["texts"][0] == batch["texts"][2]
    scene, cap = pairs.pair(5)
    assert cap.spec.matches(scene)


def test_bad_task_inputs():
    with pytest.raises(RClipError, match="unknown world task"):
        world.zeroshot_task("weather")
    with pytest.raises(RClipError, match="unknown split"):
        world.zeroshot_task("shape", split="holdout")
