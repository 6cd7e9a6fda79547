"""Load a CLIP as one bundle: model, pixel preprocessing, differentiable normalisation, tokenizer, metadata.

Sources, all through :func:`load`:

* ``load("world")`` - the world CLIP shipped with the package (``rclip/assets/world_clip/``).
* ``load("rclip-tiny")`` / ``load("rclip-world")`` - the project's own open_clip configs, randomly initialised
  (``rclip/configs/*.json``, registered with open_clip on import).
* ``load("ViT-B-32", "openai")`` - an open_clip name and pretrained tag. Offline and not cached, this fails in
  seconds with a message naming the missing weights and how to supply them; it never waits on the network.
* ``load("ViT-B-32", checkpoint="weights.safetensors")`` - a local checkpoint for a named architecture.
* ``load(checkpoint="model.safetensors")`` - a full model written by :func:`save` (its config travels inside).
* ``load("hf-hub:org/repo")`` - an open_clip model on the Hugging Face Hub (cached, or downloaded when online).

Checkpoints are read as safetensors or with ``torch.load(weights_only=True)``, which cannot run code; nothing is
ever unpickled with the full pickle machinery. Keys and shapes must match exactly.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from torch import nn
from torchvision import transforms as T

from rclip.errors import RClipError

CONFIG_DIR = Path(__file__).parent / "configs"
WORLD_CLIP_DIR = Path(__file__).parent / "assets" / "world_clip"
PROJECT_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: Images per forward of :meth:`CLIPBundle.image_features` on the CPU: a larger batch is cut into pieces of this size
#: (one graph, so gradients flow as before). A forward + input gradient of 1 280 world images (SGA's image step:
#: 256 images x 5 views) ran 1.28x faster in pieces of 128 than at once, with identical gradients
#: (``benchmarks/bench_engine.py``, 2 cores).
CPU_IMAGE_CHUNK = 128

open_clip.add_model_config(CONFIG_DIR)


class Normalize(nn.Module):
    """Differentiable per-channel normalisation: (x - mean) / std, for x of shape (B, 3, H, W) in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


@dataclass
class CLIPBundle:
    """A CLIP and everything needed to use it on [0, 1] pixels.

    Attributes:
        model: an ``open_clip`` CLIP (``encode_image`` expects *normalised* pixels).
        preprocess: PIL image -> (3, S, S) float tensor in [0, 1] (resize, centre crop; no normalisation).
        normalize: differentiable (B, 3, S, S) [0, 1] -> model input.
        tokenizer: list of strings -> (N, context_length) token ids.
        meta: name, pretrained tag or file, image size, mean/std, embed dim, context length, sha256 of weights.
    """

    model: nn.Module
    preprocess: Callable
    normalize: Normalize
    tokenizer: Callable
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def copy(self) -> "CLIPBundle":
        """A copy with its own model and normalisation (weights copied); the tokenizer and preprocessing are shared
        (the tokenizer's tables are large and read-only: deep-copying them costs more than a small model)."""
        import copy

        return CLIPBundle(model=copy.deepcopy(self.model), preprocess=self.preprocess,
                          normalize=copy.deepcopy(self.normalize), tokenizer=self.tokenizer, meta=dict(self.meta))

    def with_visual(self, state: dict) -> "CLIPBundle":
        """A copy whose image tower has the weights ``state`` (e.g. a fused or fine-tuned tower); its ``sha256``
        is cleared, since the weights are no longer the file's."""
        out = self.copy()
        out.model.visual.load_state_dict(dict(state))
        out.meta["sha256"] = None
        return out

    def to(self, device: torch.device | str) -> "CLIPBundle":
        self.model.to(device)
        self.normalize.to(device)
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable unit-norm image embeddings. images: (B, 3, S, S) in [0, 1] -> (B, D). On the CPU a batch
        larger than :data:`CPU_IMAGE_CHUNK` runs in pieces of that size (each image's embedding is its own, so the
        result is the same; large batches run slower there)."""
        return in_cpu_pieces(lambda x: self.model.encode_image(self.normalize(x), normalize=True), images)

    def attack_features(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The image embeddings of :meth:`image_features` (``normalize=False``: ``encode_image``'s, not unit-norm)
        by the leaner forward of :func:`lean_image_forward` where the tower is a plain ViT, for the input-gradient
        steps of the retrieval attacks (fp32, eval mode): equal to open_clip's forward up to float rounding (1.8e-7
        in the world CLIP's unit-norm embeddings) and, for the world CLIP on a 2-thread Xeon, 1.49x faster in forward
        and input gradient (``benchmarks/bench_sga.py``; trimming the last block saves less in deeper towers). Other
        towers, and a tower not wholly in eval mode, take open_clip's forward. Batched on the CPU as
        :meth:`image_features`."""
        visual = self.model.visual
        encode = (lambda x: lean_image_forward(visual, x, normalize)) if lean_forward_covers(visual) else \
            (lambda x: self.model.encode_image(x, normalize=normalize))
        return in_cpu_pieces(lambda x: encode(self.normalize(x)), images)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Differentiable unit-norm text embeddings. tokens: (N, L) -> (N, D)."""
        return self.model.encode_text(tokens, normalize=True)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor | torch.utils.data.Dataset, batch_size: int = 256) -> torch.Tensor:
        """Unit-norm embeddings of many images (a tensor (N, 3, S, S) or a dataset of images) -> (N, D) on CPU."""
        was_training = self.model.training
        self.model.eval()
        out = []
        n = len(images)
        for i in range(0, n, batch_size):
            if isinstance(images, torch.Tensor):
                batch = images[i:i + batch_size]
            else:
                items = [images[j] for j in range(i, min(n, i + batch_size))]
                batch = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
            out.append(self.image_features(batch.to(self.device)).float().cpu())
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.meta["embed_dim"])

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        """Unit-norm embeddings of strings -> (N, D) on CPU."""
        was_training = self.model.training
        self.model.eval()
        out = [self.text_features(self.tokenizer(list(texts[i:i + batch_size])).to(self.device)).float().cpu()
               for i in range(0, len(texts), batch_size)]
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.meta["embed_dim"])


# ----------------------------------------------------------------------------------------------------------------
# Weights on disk
# ----------------------------------------------------------------------------------------------------------------

def in_cpu_pieces(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """``forward(images)``, on the CPU in pieces of :data:`CPU_IMAGE_CHUNK` images concatenated (one graph, so
    gradients flow as through one call; each image's output is its own)."""
    step = CPU_IMAGE_CHUNK if images.device.type == "cpu" else len(images)
    if len(images) <= step:
        return forward(images)
    return torch.cat([forward(images[i:i + step]) for i in range(0, len(images), step)])


def lean_forward_covers(visual: nn.Module) -> bool:
    """Whether :func:`lean_image_forward` reproduces this image tower: an open_clip ``VisionTransformer`` (open_clip 3.x)
    in eval mode throughout, returning the pooled class token alone (no attentional pooler, no tokens), patches cut by
    a plain ``nn.Conv2d`` whose stride is its kernel, and ``ResidualAttentionBlock`` layers with PyTorch's own
    ``nn.MultiheadAttention`` (one in-projection, no extra key/value biases or zero attention, no separate key/value
    norm); no forward hooks on any of its modules, nor global ones (the lean forward skips some modules' calls).
    Exact classes are required: a subclass may keep its weights elsewhere (e.g. torch's quantizable attention). Later
    open_clip versions that replace the blocks' attention module are not covered: they take open_clip's forward."""
    from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer
    from torch.nn.modules import module as torch_module

    conv = getattr(visual, "conv1", None)
    if type(visual) is not VisionTransformer or visual.attn_pool is not None or visual.pool_type != "tok" \
            or visual.output_tokens or type(visual.transformer) is not Transformer or type(conv) is not nn.Conv2d \
            or conv.kernel_size != conv.stride or conv.padding != (0, 0) or conv.groups != 1 \
            or conv.dilation != (1, 1):
        return False
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return False
    for m in visual.modules():
        if m.training or m._forward_hooks or m._forward_pre_hooks:
            return False
    for blk in visual.transformer.resblocks:
        attn = getattr(blk, "attn", None)
        if type(blk) is not ResidualAttentionBlock or type(attn) is not nn.MultiheadAttention \
                or hasattr(blk, "ln_1_kv") or not attn._qkv_same_embed_dim or attn.bias_k is not None \
                or attn.add_zero_attn:
            return False
    return True


def lean_image_forward(visual: nn.Module, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """open_clip's ``VisionTransformer.forward`` (eval mode, a tower :func:`lean_forward_covers`) with less work, for
    attack steps that back-propagate to the pixels: the patch embedding as one matrix product over the cut-out
    patches (its input gradient a matrix product too, not a convolution's backward), attention as one
    ``scaled_dot_product_attention`` on head-split views of the in-projection, and the last block for the class
    token only (the pooled output reads no other row: the other tokens' last attention output and MLP are never
    used). x: normalised pixels (B, 3, H, W) -> (B, D), unit-norm if ``normalize``. Same weights and modules
    (layer norms, MLPs, layer scales) as open_clip's forward; equal to it up to float rounding."""
    conv = visual.conv1
    (ph, pw), width = conv.kernel_size, conv.out_channels
    x = x[..., :x.shape[-2] // ph * ph, :x.shape[-1] // pw * pw]     # the convolution drops a partial last patch
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * ph * pw)
    t = torch.nn.functional.linear(patches, conv.weight.reshape(width, -1), conv.bias)
    t = torch.cat([visual.class_embedding.to(t.dtype).expand(b, 1, width), t], dim=1)
    t = visual.ln_pre(visual.patch_dropout(t + visual.positional_embedding.to(t.dtype)))
    blocks = visual.transformer.resblocks
    for i, blk in enumerate(blocks):
        attn, last = blk.attn, i == len(blocks) - 1
        heads, dim = attn.num_heads, attn.embed_dim // attn.num_heads
        h_in = blk.ln_1(t)
        qkv = torch.nn.functional.linear(h_in, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.unflatten(-1, (3, heads, dim)).permute(2, 0, 3, 1, 4)   # each (B, heads, tokens, dim)
        if last:                                   # only the class token's row reaches the pooled output
            q, t = q[:, :, :1], t[:, :1]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        t = t + blk.ls_1(attn.out_proj(out.transpose(1, 2).flatten(2)))
        t = t + blk.ls_2(blk.mlp(blk.ln_2(t)))
    pooled = visual.ln_post(t[:, 0])
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read weights without running code: safetensors, or a torch file with ``weights_only=True``.

    Returns (state dict, safetensors metadata or {}).
    """
    path = Path(path)
    if not path.is_file():
        raise RClipError(f"checkpoint file not found: {path}. Check the path (relative paths are taken from "
                         f"{Path.cwd()}).")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        tensors = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except SafetensorError as exc:
            raise RClipError(f"{path} is not a readable safetensors file ({exc}): it is truncated or corrupted. "
                             f"Rebuild it (a cached artefact: delete it and re-run) or restore it.") from None
        return tensors, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a TorchScript archive or a pickle that needs code
        raise RClipError(
            f"{path} is not a plain weights file (torch.load with weights_only=True refused it: {exc}). "
            "Convert it to safetensors where you trust it: "
            "`python -c \"import torch, safetensors.torch as s; m = torch.jit.load('in.pt').state_dict(); "
            "s.save_file({k: v.contiguous() for k, v in m.items()}, 'out.safetensors')\"`"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise RClipError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    obj = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return obj, {}


def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, refusing any missing, unexpected or mis-shaped key (never ``strict=False``)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"mismatched shapes ({'; '.join(shapes[:3])})")
        raise RClipError(f"the weights in {source} do not fit this architecture: {', '.join(parts)}. "
                         "Load them with the model name they were trained with.")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def save(bundle: CLIPBundle, path: str | Path, *, dtype: torch.dtype = torch.float32, extra: dict | None = None
         ) -> str:
    """Write a full model as safetensors, its config and metadata inside; atomically. Returns its sha256."""
    from safetensors.torch import save_file

    from rclip.cache import atomic_path

    cfg = bundle.meta.get("model_cfg")
    if cfg is None:
        raise RClipError("this bundle has no model_cfg in its meta; load it through rclip.models.load")
    meta = {"rclip_model_cfg": json.dumps(cfg), "rclip_meta": json.dumps(
        {k: v for k, v in {**bundle.meta, **(extra or {})}.items() if k not in ("model_cfg", "sha256")},
        default=str)}
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in bundle.model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return sha256(path)


# ----------------------------------------------------------------------------------------------------------------
# Pretrained weights: cache lookup and offline detection
# ----------------------------------------------------------------------------------------------------------------

def is_offline(timeout: float = 3.0) -> bool:
    """True if ``HF_HUB_OFFLINE``/``RCLIP_OFFLINE`` is set or huggingface.co cannot be reached within ``timeout``."""
    for var in ("HF_HUB_OFFLINE", "RCLIP_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return True
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return False
    except OSError:
        return True


def _cached_pretrained_file(cfg: dict, cache_dir: str | None) -> str | None:
    """Path of already-downloaded weights for an open_clip pretrained config, without touching the network."""
    if "file" in cfg and os.path.isfile(cfg["file"]):
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [filename] if filename else []
        names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors"]
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    url = cfg.get("url", "")
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
    return None


def _missing_weights_error(name: str, tag: str | None, cfg: dict) -> RClipError:
    where = cfg.get("hf_hub") or cfg.get("url") or "its hub"
    what = f"{name} (pretrained={tag!r})" if tag else name
    tag_arg = f", pretrained='{tag}'" if tag else ""
    return RClipError(
        f"pretrained weights for {what} are not in the local cache and this machine is offline. "
        f"Either (1) pass a local file: rclip.models.load('{name}', checkpoint='/path/to/weights.safetensors') "
        f"(the notebooks' `checkpoint` parameter), (2) point HF_HOME at a Hugging Face cache that holds "
        f"{where}, or (3) on a machine with network run "
        f"python -c \"import open_clip; open_clip.create_model('{name}'{tag_arg})\" and copy its cache here."
    )


# ----------------------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's "no pretrained weights loaded" warning: rclip loads weights itself, strictly."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _pixel_transform(image_size: int, interpolation: str = "bicubic") -> Callable:
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
        interpolation, T.InterpolationMode.BICUBIC)
    return T.Compose([
        T.Resize(image_size, interpolation=mode, antialias=True),
        T.CenterCrop(image_size),
        T.Lambda(lambda im: im.convert("RGB") if hasattr(im, "convert") else im),
        T.ToTensor(),
    ])


def find_pretrained(name: str, pretrained: str | None, cache_dir: str | None = None) -> str | None:
    """The local weights file of ``name``/``pretrained`` (``None`` if no tag), or raise if it cannot be had.

    Never downloads: offline and uncached raises :class:`RClipError` at once; online and uncached returns
    ``None`` for a tag that :func:`load` would download.
    """
    if open_clip.get_model_config(name) is None and not name.startswith("hf-hub:"):
        raise RClipError(f"unknown model {name!r}; see rclip.models.available_models()")
    if pretrained is None:
        return None
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise RClipError(f"unknown pretrained tag {pretrained!r} for {name}; known tags: "
                         f"{open_clip.list_pretrained_tags_by_model(name)}")
    hit = _cached_pretrained_file(cfg, cache_dir)
    if hit is None and is_offline():
        raise _missing_weights_error(name, pretrained, cfg)
    return hit


def available_models() -> list[str]:
    """Names :func:`load` accepts: ``world``, the project configs, and every open_clip architecture."""
    return ["world", *PROJECT_MODELS, *open_clip.list_models()]


def load(name: str | None = "world", pretrained: str | None = None, *, checkpoint: str | Path | None = None,
         device: str | torch.device = "cpu", cache_dir: str | None = None) -> CLIPBundle:
    """Load a CLIP bundle. See the module docstring for the accepted sources.

    Args:
        name: ``"world"``, a project config, an open_clip model name, ``"hf-hub:org/repo"``, or ``None`` with a
            full-model ``checkpoint`` written by :func:`save`.
        pretrained: an open_clip pretrained tag (e.g. ``"openai"``).
        checkpoint: a local weights file (safetensors preferred).
        device: where to put the model.
        cache_dir: open_clip / Hugging Face cache directory to look in.
    """
    meta: dict = {}
    if name == "world":
        if pretrained is not None:
            raise RClipError("the world CLIP has no pretrained tags; use load('world')")
        path = Path(checkpoint) if checkpoint else WORLD_CLIP_DIR / "model.safetensors"
        if not path.is_file():
            raise RClipError(
                f"the shipped world CLIP is missing ({path}). Restore it from git (`git checkout -- "
                f"rclip/assets/world_clip`) or retrain it on a GPU: `rclip world-clip train --profile gpu`.")
        if not checkpoint:                       # the shipped file: it must be the file its checksum names
            want = (WORLD_CLIP_DIR / "SHA256SUMS").read_text().split()[0]
            got = sha256(path)
            if got != want:
                raise RClipError(
                    f"the shipped world CLIP {path} does not match its checksum in {WORLD_CLIP_DIR / 'SHA256SUMS'} "
                    f"(sha256 {got[:12]}..., expected {want[:12]}...): the file is corrupted or was replaced. "
                    f"Restore it with `git checkout -- rclip/assets/world_clip` or retrain it with "
                    f"`rclip world-clip train --profile gpu`.")
        checkpoint, name = path, None
        meta["source"] = "world"

    if name is None:
        if checkpoint is None:
            raise RClipError("give a model name, or checkpoint= a full-model safetensors file written by rclip")
        state, file_meta = read_state_dict(checkpoint)
        if "rclip_model_cfg" not in file_meta:
            raise RClipError(f"{checkpoint} carries no model config; load it as load('<architecture>', "
                             f"checkpoint='{checkpoint}') with the architecture it was trained with")
        model_cfg = json.loads(file_meta["rclip_model_cfg"])
        saved = json.loads(file_meta.get("rclip_meta", "{}"))
        model = open_clip.model.CLIP(**model_cfg)
        load_weights_strict(model, state, str(checkpoint))
        meta = {**saved, **meta, "checkpoint": str(checkpoint), "sha256": sha256(checkpoint)}
        mean, std = tuple(saved.get("mean", OPENAI_MEAN)), tuple(saved.get("std", OPENAI_STD))
        interpolation = saved.get("interpolation", "bicubic")
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
        arch = saved.get("name", "checkpoint")
    else:
        arch = name
        mean, std, interpolation = OPENAI_MEAN, OPENAI_STD, "bicubic"
        force_quick_gelu = False
        weights = None
        if name.startswith("hf-hub:"):
            name, model_cfg, weights = _hf_hub_model(name, cache_dir)
            meta["pretrained"] = arch
        else:
            model_cfg = open_clip.get_model_config(name)
            if model_cfg is None:
                raise RClipError(f"unknown model {name!r}. Known: 'world', {', '.join(PROJECT_MODELS)}, or an "
                                 f"open_clip name such as ViT-B-32 (see rclip.models.available_models()).")
        if pretrained is not None:
            weights = find_pretrained(name, pretrained, cache_dir)
            cfg = open_clip.get_pretrained_cfg(name, pretrained)
            if weights is None:
                weights = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
            mean, std = cfg.get("mean", mean), cfg.get("std", std)
            interpolation = cfg.get("interpolation", interpolation)
            force_quick_gelu = bool(cfg.get("quick_gelu", False))
            meta["pretrained"] = pretrained
        if checkpoint is not None:
            weights = str(checkpoint)
        with _quiet_open_clip():
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=force_quick_gelu, device="cpu")
        if isinstance(model_cfg, dict):
            model_cfg = {**model_cfg, **({"quick_gelu": True} if force_quick_gelu else {})}
        if weights is not None:
            state, _ = read_state_dict(weights)
            load_weights_strict(model, state, str(weights))
            meta.update(checkpoint=str(weights), sha256=sha256(weights))
        tokenizer = open_clip.get_tokenizer(name) if not arch.startswith("hf-hub:") else \
            open_clip.tokenizer.SimpleTokenizer(context_length=int(model.context_length))
        meta.setdefault("source", "open_clip")
        if weights is None:
            meta["source"] = "random-init"

    visual = model.visual
    image_size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    meta.update(name=arch if meta.get("source") != "world" else "world", image_size=int(image_size),
                mean=list(mean), std=list(std), interpolation=interpolation,
                embed_dim=int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else None,
                context_length=int(model.context_length), model_cfg=model_cfg)
    model.eval()
    bundle = CLIPBundle(model=model, preprocess=_pixel_transform(int(image_size), interpolation),
                        normalize=Normalize(mean, std), tokenizer=tokenizer, meta=meta)
    return bundle.to(device)


def _hf_hub_model(name: str, cache_dir: str | None) -> tuple[str, dict, str]:
    """Register an ``hf-hub:org/repo`` open_clip model under a local name; return (local name, config, weights)."""
    repo = name.removeprefix("hf-hub:")
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, "open_clip_config.json", cache_dir=cache_dir)
    weights = _cached_pretrained_file({"hf_hub": repo + "/"}, cache_dir)
    if not (isinstance(hit, str) and os.path.isfile(hit)) or weights is None:
        if is_offline():
            raise _missing_weights_error(name, None, {"hf_hub": repo})
        from huggingface_hub import hf_hub_download

        hit = hf_hub_download(repo, "open_clip_config.json", cache_dir=cache_dir)
        weights = open_clip.download_pretrained({"hf_hub": repo + "/"}, cache_dir=cache_dir)
    with open(hit, encoding="utf-8") as f:
        model_cfg = json.load(f)["model_cfg"]
    local = "hf-hub-" + repo.replace("/", "--")
    from rclip.cache import cache_root

    cfg_path = cache_root() / "open_clip_configs" / f"{local}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(model_cfg), encoding="utf-8")
    open_clip.add_model_config(cfg_path)
    return local, model_cfg, weights
