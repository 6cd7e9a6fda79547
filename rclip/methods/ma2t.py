"""MA²T: multimodal (augmented) adversarial training of CLIP for image-text retrieval, and its baselines.

Methods (``MA2TConfig.method``), all fine-tuned on 1:1 image-caption pairs (the first caption of each image):

* ``finetune``  clean fine-tuning of the whole CLIP with the symmetric InfoNCE loss L_CLIP(I, T).
* ``tecoa``     TeCoA's loss for retrieval: the image encoder only, I' = argmax L_CLIP_I(I', T) by PGD, loss
                L_CLIP_I(I', T) (Eq. 3; the text tower and temperature stay frozen).
* ``mat_img``   the whole CLIP, image attack only: I' = argmin cos(Φ(I'), Ψ(T)) (Eq. 5 with T' = T),
                loss L_CLIP(I', T).
* ``mat``       multimodal adversarial training: T' = argmax ‖Ψ(T') − Ψ(T)‖ over one-word substitutions
                (Eq. 4, :func:`rclip.attacks.text.text_attack` with the ``l2`` criterion), then
                I' = argmin cos(Φ(I'), Ψ(T')) (Eq. 5), loss L_CLIP(I', T') (Eq. 6).

MA²T is ``mat`` or ``mat_img`` trained on :class:`rclip.augment.AugmentedPairs` (``MA2TConfig.augment``): every
pair plus ``n_aug`` augmented pairs (I, T_aug) or (I_aug, T) (Algorithm 1). Training runs through
:func:`rclip.train.fit` (checkpoints, resume, ``torchrun``); :func:`ma2t_clip` caches the result by its settings.

Training pairs: :class:`WorldRetrievalPairs` (the world's retrieval split, rendered on demand) and
:class:`RetrievalSetPairs` (any :class:`~rclip.data.base.RetrievalSet`, e.g. Flickr30k's Karpathy train split).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from rclip.attacks.image import fp32_eval, ascend
from rclip.attacks.text import TextAttackConfig, text_attack
from rclip.errors import RClipError
from rclip.methods.robust_finetune import _generator, freeze_all_but_image_encoder
from rclip.train import LossFn, TrainConfig, contrastive_loss, fit

METHODS = ("finetune", "tecoa", "mat_img", "mat")


# ----------------------------------------------------------------------------------------------------------------
# Training pairs
# ----------------------------------------------------------------------------------------------------------------

class WorldRetrievalPairs(Dataset):
    """The world's 1:1 training pairs: image ``i`` of the retrieval split ``split`` with its first caption.

    The images and captions are exactly those of ``rclip.world.retrieval_set(split=split, seed=seed)`` (same
    stream), rendered on demand. Ground truth per pair: :meth:`scene` (the image), :meth:`spec` (the first
    caption's meaning), :meth:`captions` (all ``captions_per_image`` true captions; the first is the training one).
    Batches via ``__getitems__``: ``{"images" (B, 3, R, R) in [0, 1], "texts" [B], "index" (B,)}``.
    """

    def __init__(self, n: int, *, split: str = "train", resolution: int = 64, seed: int = 0,
                 captions_per_image: int = 5):
        from rclip.world.tasks import _check_split

        _check_split(split)
        if n < 1:
            raise RClipError(f"n must be positive, got {n}")
        self.n, self.split, self.resolution, self.seed = int(n), split, int(resolution), int(seed)
        self.captions_per_image = int(captions_per_image)
        self._truth = lru_cache(maxsize=None)(self._make)

    def __len__(self) -> int:
        return self.n

    def _make(self, i: int):
        from rclip.world import captions_for, sample_scene, scene_rng

        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = scene_rng(self.seed, f"retrieval/{self.split}", i)
        scene = sample_scene(rng)
        return scene, captions_for(scene, rng, self.captions_per_image)

    def scene(self, i: int):
        return self._truth(int(i))[0]

    def spec(self, i: int):
        return self._truth(int(i))[1][0].spec

    def captions(self, i: int) -> list[str]:
        return [c.text for c in self._truth(int(i))[1]]

    def images(self, indices) -> torch.Tensor:
        from rclip.world import render

        return render([self.scene(int(i)) for i in indices], self.resolution)

    def __getitems__(self, indices) -> dict:
        idx = [int(i) for i in indices]
        return {"images": self.images(idx), "texts": [self.captions(i)[0] for i in idx],
                "index": torch.as_tensor(idx, dtype=torch.long)}

    def __getitem__(self, i: int) -> dict:
        b = self.__getitems__([i])
        return {"images": b["images"][0], "texts": b["texts"][0], "index": b["index"][0]}


class RetrievalSetPairs(Dataset):
    """1:1 training pairs of a real :class:`~rclip.data.base.RetrievalSet`: image ``i`` with its first caption;
    :meth:`captions` gives all of them (the rest are the "human" augmentation). ``synonyms`` (word -> list) is what
    EDA uses on this data (e.g. WordNet's)."""

    def __init__(self, rset, synonyms=None):
        self.rset, self.synonyms = rset, synonyms

    def __len__(self) -> int:
        return len(self.rset.images)

    def captions(self, i: int) -> list[str]:
        return [self.rset.captions[t] for t in self.rset.img2txt[int(i)]]

    def images(self, indices) -> torch.Tensor:
        return torch.stack([self.rset.images[int(i)] for i in indices])

    def __getitems__(self, indices) -> dict:
        idx = [int(i) for i in indices]
        return {"images": self.images(idx), "texts": [self.captions(i)[0] for i in idx],
                "index": torch.as_tensor(idx, dtype=torch.long)}


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class MA2TConfig:
    """method: one of :data:`METHODS`. augment / n_aug / select: MA²T's augmentation (``None`` = none), points per
    pair, and which made points are used (``"first"``, or ``"aligned"``: the most aligned in the starting CLIP's
    space, the paper's "top" of Figure 3). eps / attack_steps / alpha: the inner L-inf PGD ([0, 1] units; alpha
    default 2.5 eps / attack_steps, i.e. eps / 4 at 10 steps). text: the inner text attack of ``mat`` (Eq. 4: criterion ``l2``, one word). train: optimiser
    and schedule (the paper: 5000 steps, batch 128, SGD, lr 1e-4 cosine, weight decay 1e-4)."""
    method: str
    augment: str | None = None
    n_aug: int = 4
    select: str = "first"
    eps: float = 2 / 255
    attack_steps: int = 10
    alpha: float | None = None
    text: TextAttackConfig = field(default_factory=lambda: TextAttackConfig(criterion="l2"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=5000, batch_size=128, optimizer="sgd", lr=1e-4, min_lr=0.0, warmup_steps=0, weight_decay=1e-4,
        grad_clip=None, ckpt_every=500))

    def label(self) -> str:
        base = {"finetune": "Fine-tune", "tecoa": "TeCoA", "mat_img": "MAT_Img", "mat": "MAT"}[self.method]
        if not self.augment:
            return base
        from rclip.augment import PAPER_NAMES

        return f"{base} + {PAPER_NAMES[self.augment]}" + (f" x{self.n_aug}" if self.n_aug != 4 else "")


def _adversarial_images(bundle, cfg: MA2TConfig, batch: dict, x: torch.Tensor, objective) -> torch.Tensor:
    alpha = cfg.alpha or 2.5 * cfg.eps / max(1, cfg.attack_steps)  # eps / 4 at 10 steps, as the evaluation's PGD
    with fp32_eval(bundle.model):
        return ascend(objective, x, cfg.eps, steps=cfg.attack_steps, alpha=alpha,
                      generator=_generator(cfg.train.seed, batch))


def _away_from(bundle, text_features: torch.Tensor):
    """PGD objective lowering cos(Φ(x'), t_i) for each pair (Eq. 5). text_features: (B, D) unit, fixed."""
    t = text_features.detach().float()
    return lambda adv: -(bundle.image_features(adv).float() * t).sum()


def ma2t_step(bundle, cfg: MA2TConfig, rank: int = 0, world: int = 1) -> LossFn:
    """The loss of one batch ``{"images", "texts", "index"}`` for ``cfg.method`` (see the module docstring)."""
    if cfg.method not in METHODS:
        raise RClipError(f"unknown method {cfg.method!r}; choose one of {METHODS}")
    device = bundle.device

    def tokens(texts):
        return bundle.tokenizer(list(texts)).to(device)

    def clip_loss(net, images, texts):
        img_f, txt_f, scale = net(bundle.normalize(images), tokens(texts))[:3]
        with torch.autocast(device_type=device.type, enabled=False):
            return contrastive_loss(img_f.float(), txt_f.float(), scale.float(), rank, world)

    def loss_fn(net, batch):
        x = batch["images"].to(device).float()
        texts = list(batch["texts"])
        if cfg.method == "finetune":
            return clip_loss(net, x, texts)
        if cfg.method == "tecoa":
            with torch.no_grad(), fp32_eval(bundle.model):
                t = bundle.text_features(tokens(texts)).float()
            scale = bundle.model.logit_scale.detach().exp().float()
            labels = torch.arange(len(x), device=device)

            def image_side(visual, images):  # L_CLIP_I: each image against the batch's captions
                return F.cross_entropy(scale * F.normalize(visual(bundle.normalize(images)).float(), dim=-1) @ t.T,
                                       labels, reduction="sum")
            x_adv = _adversarial_images(bundle, cfg, batch, x, lambda a: image_side(bundle.model.visual, a))
            return image_side(net, x_adv) / len(x)
        if cfg.method == "mat":
            with torch.no_grad():
                texts = text_attack(bundle, texts, cfg.text)
        with torch.no_grad(), fp32_eval(bundle.model):
            t = bundle.text_features(tokens(texts)).float()
        x_adv = _adversarial_images(bundle, cfg, batch, x, _away_from(bundle, t))
        return clip_loss(net, x_adv, texts)
    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# Training and the cache
# ----------------------------------------------------------------------------------------------------------------

def training_set(bundle, pairs, cfg: MA2TConfig):
    """The dataset ``cfg`` trains on: ``pairs`` itself, or :class:`~rclip.augment.AugmentedPairs` over it."""
    from rclip.augment import AugmentedPairs, aligned_order

    if not cfg.augment:
        return pairs
    if cfg.select not in ("first", "aligned"):
        raise RClipError(f"select must be 'first' or 'aligned', got {cfg.select!r}")
    order = aligned_order(bundle, pairs, cfg.augment, 4, cfg.train.seed) if cfg.select == "aligned" else None
    return AugmentedPairs(pairs, cfg.augment, cfg.n_aug, seed=cfg.train.seed, order=order, n_aug_made=4)


def train_ma2t(bundle, pairs, cfg: MA2TConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Train ``bundle`` in place with ``cfg`` on ``pairs`` (a pair dataset); returns :func:`rclip.train.fit`'s log."""
    from rclip.train import init_distributed

    rank, world = init_distributed()
    data = training_set(bundle, pairs, cfg)
    if cfg.method == "tecoa":
        freeze_all_but_image_encoder(bundle.model)
        module = bundle.model.visual
    else:
        bundle.model.requires_grad_(True)
        module = None
    log = fit(bundle, data, cfg.train, out_dir, ma2t_step(bundle, cfg, rank, world), module=module,
              progress=progress, desc=cfg.label())
    log["method"] = asdict(cfg)
    log["train_pairs"] = len(data)
    return log


def paper_retrieval_inputs(inputs: dict | None, dataset: str) -> tuple[str, str]:
    """(annotations JSON, image root) of ``inputs.datasets.<dataset>`` (``flickr30k`` or ``coco``), or an
    :class:`RClipError` naming what to set in ``profiles/paper.yml``."""
    if not inputs:
        raise RClipError("scale='paper' needs the profile's inputs: run `rclip book --profile paper --only 03_ma2t`")
    entry = (inputs.get("datasets") or {}).get(dataset) or {}
    missing = [k for k in ("annotations", "images") if not entry.get(k)]
    if missing:
        raise RClipError(f"inputs.datasets.{dataset}.{' and .'.join(missing)} not set in profiles/paper.yml: give the "
                         f"Karpathy split JSON (dataset_{dataset}.json) or an ALBEF-style JSON and the image folder")
    for k in ("annotations", "images"):
        if not Path(entry[k]).exists():
            raise RClipError(f"inputs.datasets.{dataset}.{k}: {entry[k]} does not exist")
    return str(entry["annotations"]), str(entry["images"])


def ma2t_clip(bundle, cfg: MA2TConfig, pairs, data_key: dict, *, progress: bool = True):
    """A copy of ``bundle`` trained with ``cfg`` on ``pairs``, cached under ``$RCLIP_CACHE/ma2t`` by the base
    weights, the settings and ``data_key`` (what identifies ``pairs``); an interrupted run resumes.

    Returns ``(bundle, log)``.
    """
    from rclip.train import train_cached

    def train(run_dir):
        tuned = bundle.copy()
        return tuned, train_ma2t(tuned, pairs, cfg, run_dir, progress=progress)

    key = {"base": bundle.meta.get("sha256") or bundle.meta.get("name"), "cfg": cfg, "data": data_key}
    tuned, log, _ = train_cached("ma2t", key, train, base=bundle)
    return tuned, log
