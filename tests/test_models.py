import pickle
import subprocess
import sys

import pytest
import torch

from rclip import models
from rclip.errors import RClipError


def test_bundle_pieces(tiny):
    assert tiny.meta["name"] == "rclip-tiny" and tiny.meta["source"] == "random-init"
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    f = tiny.image_features(x)
    assert f.shape == (3, 32) and torch.allclose(f.norm(dim=-1), torch.ones(3), atol=1e-5)
    f.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # normalisation is differentiable
    manual = (x.detach() - torch.tensor(models.OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(models.OPENAI_STD).view(1, 3, 1, 1)
    assert torch.allclose(tiny.normalize(x.detach()), manual)
    t = tiny.encode_texts(["a red circle", "two blue hearts", "a striped background"])
    assert t.shape == (3, 32)
    from PIL import Image

    img = tiny.preprocess(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert img.shape == (3, 32, 32) and img.max() <= 1 and img[0].mean() > 0.99


def test_safetensors_roundtrip(tiny, tmp_path):
    path = tmp_path / "m.safetensors"
    models.save(tiny, path)
    again = models.load(None, checkpoint=path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again.image_features(x), tiny.image_features(x))
    assert again.meta["sha256"] == models.sha256(path)
    half = tmp_path / "h.safetensors"
    models.save(tiny, half, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    assert torch.allclose(models.load(None, checkpoint=half).image_features(x), tiny.image_features(x), atol=2e-2)


def test_named_architecture_from_checkpoint(tiny, tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in tiny.model.state_dict().items()}}, path)
    loaded = models.load("rclip-tiny", checkpoint=path)
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded.image_features(x), tiny.image_features(x))


def test_mismatched_architecture_is_refused(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    models.save(tiny, path)
    with pytest.raises(RClipError, match="do not fit this architecture"):
        models.load("rclip-world", checkpoint=path)


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(RClipError, match="not a plain weights file"):
        models.read_state_dict(path)


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(RClipError, match="unknown model"):
        models.load("ViT-Q-99")
    with pytest.raises(RClipError, match="not found"):
        models.load("rclip-tiny", checkpoint=tmp_path / "nope.safetensors")
    with pytest.raises(RClipError, match="unknown pretrained tag"):
        models.load("ViT-B-32", "no-such-tag")


def test_openai_weights_offline_fail_fast():
    code = ("import time, rclip.models as m\nt = time.time()\ntry:\n    m.load('ViT-B-32', 'openai')\n"
            "except m.RClipError as e:\n    print('ERR', e)\nprint('SECONDS', time.time() - t)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_home())})
    assert "ERR pretrained weights for ViT-B-32 (pretrained='openai') are not in the local cache" in out.stdout, out
    assert "checkpoint=" in out.stdout and "HF_HOME" in out.stdout
    # the load itself fails at once; the interpreter's start (importing torch and open_clip, ~10 s in a fresh
    # virtual environment whose bytecode is not yet compiled) is not part of it
    elapsed = float(out.stdout.split("SECONDS")[1])
    assert elapsed < 5, elapsed


def tmp_home():
    import tempfile

    return tempfile.mkdtemp()


def test_shipped_world_clip_matches_its_checksum():
    path = models.WORLD_CLIP_DIR / "model.safetensors"
    want = (models.WORLD_CLIP_DIR / "SHA256SUMS").read_text().split()[0]
    assert models.sha256(path) == want
    bundle = models.load("world")
    assert bundle.meta["source"] == "world" and bundle.meta["name"] == "world"
    assert next(bundle.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("method", ["image_features", "attack_features"])
def test_image_features_in_cpu_pieces_equal_one_batch(tiny, monkeypatch, method):
    """A batch larger than CPU_IMAGE_CHUNK runs in pieces: the same embeddings and the same input gradients."""
    from rclip import models

    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 3, 32, 32, generator=g)
    w = torch.randn(10, tiny.model.text_projection.shape[1], generator=g)
    tiny.model.eval()

    def run():
        xr = x.clone().requires_grad_(True)
        f = getattr(tiny, method)(xr)
        return f.detach(), torch.autograd.grad((f * w).sum(), xr)[0]
    whole = run()
    monkeypatch.setattr(models, "CPU_IMAGE_CHUNK", 3)             # 3 + 3 + 3 + 1
    pieces = run()
    assert torch.allclose(pieces[0], whole[0], atol=1e-6) and torch.allclose(pieces[1], whole[1], atol=1e-7)


@pytest.mark.parametrize("name", ["rclip-tiny", "world", "ViT-B-32"])
def test_lean_image_forward_equals_open_clips(name):
    """The attacks' leaner forward (patches as one matrix product, one attention call per block, the last block for
    the class token only) against open_clip's encode_image on the same pixels: the same embeddings, unit-norm and
    not, and the same input gradients, up to float rounding; the three towers are ones it covers."""
    bundle = models.load(name) if name != "ViT-B-32" else models.load(name, None)
    bundle.model.eval()
    assert models.lean_forward_covers(bundle.model.visual)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, bundle.image_size, bundle.image_size, generator=g)
    for normalize in (True, False):
        outs = []
        for forward in (lambda a: bundle.model.encode_image(bundle.normalize(a), normalize=normalize),
                        lambda a: bundle.attack_features(a, normalize=normalize)):
            a = x.clone().requires_grad_(True)
            f = forward(a)
            w = torch.randn(f.shape, generator=torch.Generator().manual_seed(1))
            outs.append((f.detach(), torch.autograd.grad((f * w).sum(), a)[0]))
        (f0, g0), (f1, g1) = outs
        assert f1.shape == f0.shape and not torch.equal(g0, torch.zeros_like(g0))
        assert (f1 - f0).abs().max() <= 1e-5 * f0.abs().max() + 1e-7
        assert (g1 - g0).abs().max() <= 1e-5 * g0.abs().max() + 1e-9


VARIANTS = {"layer scale": dict(ls_init_value=0.5), "QuickGELU": dict(act="quick"), "no ln_pre": dict(no_ln_pre=True),
            "LN after pool": dict(final_ln_after_pool=True), "no proj": dict(proj=None),
            "conv bias": dict(conv_bias=True), "no attention biases": dict(attn_bias=False),
            "oblong patches": dict(image_size=(32, 48), patch_size=(8, 16)), "partial patches": dict(crop=(35, 37))}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lean_image_forward_on_tower_options(variant):
    """Tiny open_clip VisionTransformers built with each option the lean forward is meant to cover (layer scale,
    QuickGELU, no pre-LN, LN after pooling, no projection, a biased patch convolution, attention without biases,
    oblong patches and images, a size that leaves a partial patch for the convolution to drop): open_clip's forward
    and the lean one agree in embeddings and input gradients."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    opts = dict(VARIANTS[variant])
    act, proj, conv_bias, attn_bias, crop = (opts.pop(k, d) for k, d in
                                             [("act", None), ("proj", 0), ("conv_bias", False), ("attn_bias", True),
                                              ("crop", None)])
    torch.manual_seed(0)
    v = VisionTransformer(**{"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 4,
                             "mlp_ratio": 2.0, "output_dim": 16, **opts, **({"act_layer": QuickGELU} if act else {})})
    if proj is None:
        v.proj = None
    if conv_bias:
        conv = torch.nn.Conv2d(3, 32, v.conv1.kernel_size, v.conv1.stride, bias=True)
        conv.weight.data.copy_(v.conv1.weight)
        v.conv1 = conv
    if not attn_bias:
        for blk in v.transformer.resblocks:
            blk.attn.in_proj_bias, blk.attn.out_proj.bias = None, None
    with torch.no_grad():
        for prm in v.parameters():                  # random everywhere, so that no option is a no-op
            prm.add_(0.3 * torch.randn(prm.shape))
    v.eval()
    assert models.lean_forward_covers(v)
    size = crop or v.image_size
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    outs = []
    for forward in (v, lambda a: models.lean_image_forward(v, a, normalize=False)):
        a = x.clone().requires_grad_(True)
        f = forward(a)
        outs.append((f.detach(), torch.autograd.grad((f * torch.arange(f.shape[-1])).sum(), a)[0]))
    (f0, g0), (f1, g1) = outs
    assert (f1 - f0).abs().max() <= 1e-5 * f0.abs().max() and (g1 - g0).abs().max() <= 1e-5 * g0.abs().max()


def test_attack_features_take_open_clips_forward_where_the_lean_one_does_not_apply(tiny, monkeypatch):
    """A tower the lean forward does not cover (here: average pooling instead of the class token, for which it would
    be wrong), a tower with a module in training mode, a hooked tower and one whose attention is a subclass go
    through open_clip's forward: the lean one is never called."""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    avg = tiny.copy()
    avg.model.eval()
    avg.model.visual.pool_type = "avg"
    with torch.no_grad():
        want = avg.model.encode_image(avg.normalize(x), normalize=True)
        assert not torch.allclose(models.lean_image_forward(avg.model.visual, avg.normalize(x)), want, atol=1e-3)
    mixed = tiny.copy()
    mixed.model.eval()
    mixed.model.visual.transformer.resblocks[0].attn.train()
    hooked = tiny.copy()
    hooked.model.eval()
    hooked.model.visual.transformer.resblocks[-1].register_forward_hook(lambda *_: None)
    sub = tiny.copy()
    sub.model.eval()

    class Attention(torch.nn.MultiheadAttention):
        pass
    sub.model.visual.transformer.resblocks[0].attn.__class__ = Attention

    def never(*_, **__):
        raise AssertionError("the lean forward ran on a tower it does not cover")
    monkeypatch.setattr(models, "lean_image_forward", never)
    for bundle in (avg, mixed, hooked, sub):
        assert not models.lean_forward_covers(bundle.model.visual)
        with torch.no_grad():
            assert torch.equal(bundle.attack_features(x), bundle.model.encode_image(bundle.normalize(x), normalize=True))
    trained = tiny.copy()
    trained.model.train()
    with torch.no_grad():
        trained.attack_features(x)
