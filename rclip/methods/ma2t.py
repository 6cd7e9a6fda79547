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

The chapter's experiments: :func:`retrieval_study` builds a :class:`RetrievalStudy` from the notebook's parameters;
it trains each configuration once, evaluates each (model, split, budget, text source, attack) once, returns the
recall tables and per-image arrays (:class:`Evaluation`), and decides every claim with :mod:`rclip.claims` on
per-image R@1 (:func:`rclip.retrieval.per_image_recall`) of the same test images.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from rclip.attacks.image import fp32_eval, ascend
from rclip.attacks.text import TextAttackConfig, text_attack
from rclip.claims import Precondition
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

    def first(self, n: int) -> "WorldRetrievalPairs":
        """The first ``n`` pairs (the same images and captions)."""
        if n >= self.n:
            return self
        return WorldRetrievalPairs(n, split=self.split, resolution=self.resolution, seed=self.seed,
                                   captions_per_image=self.captions_per_image)

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

    def first(self, n: int) -> "RetrievalSetPairs":
        """The first ``n`` pairs (the same images and captions)."""
        return self if n >= len(self) else RetrievalSetPairs(self.rset.first(n), self.synonyms)

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
    space, the paper's "top" of Figure 3). n_false / distinct: the controlled misalignment and diversity of
    :class:`~rclip.augment.AugmentedPairs`. n_pairs: train on the first n_pairs pairs only (``None``: all). eps /
    attack_steps / alpha: the inner L-inf PGD ([0, 1] units; alpha default 2.5 eps / attack_steps, i.e. eps / 4 at
    10 steps). text: the inner text attack of ``mat`` (Eq. 4: criterion ``l2``, one word). train: optimiser and
    schedule (the paper: 5000 steps, batch 128, SGD, lr 1e-4 cosine, weight decay 1e-4)."""
    method: str
    augment: str | None = None
    n_aug: int = 4
    select: str = "first"
    n_false: int = 0
    distinct: int | None = None
    n_pairs: int | None = None
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

        return (f"{base} + {PAPER_NAMES[self.augment]}" + (f" x{self.n_aug}" if self.n_aug != 4 else "")
                + (f" ({self.n_false} of {self.n_aug} false)" if self.n_false else "")
                + (f" ({self.distinct} distinct)" if self.distinct else ""))


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
        img_f, txt_f, scale = net(bundle.normalize(images), tokens(texts))[:3]      # fp32 outputs (fit's engine)
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

    if cfg.n_pairs is not None:
        if cfg.n_pairs < 1:
            raise RClipError(f"n_pairs must be positive, got {cfg.n_pairs}")
        pairs = pairs.first(cfg.n_pairs)
    if not cfg.augment:
        return pairs
    if cfg.select not in ("first", "aligned"):
        raise RClipError(f"select must be 'first' or 'aligned', got {cfg.select!r}")
    order = aligned_order(bundle, pairs, cfg.augment, 4, cfg.train.seed) if cfg.select == "aligned" else None
    return AugmentedPairs(pairs, cfg.augment, cfg.n_aug, seed=cfg.train.seed, order=order, n_aug_made=4,
                          n_false=cfg.n_false, distinct=cfg.distinct)


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


# ----------------------------------------------------------------------------------------------------------------
# The chapter's experiments: every configuration trained once, every evaluation made once, every claim decided
# ----------------------------------------------------------------------------------------------------------------

ATTACK_NAMES = {"clean": "clean", "pgd": "PGD", "text": "BERT-Attack", "co-attack": "Co-Attack", "sga": "SGA"}
RECALLS = ("TR@1", "TR@5", "IR@1", "IR@5")
UNDEFENDED = "CLIP"
#: BERT-Attack's success rate (%, at R@1, mean of TR and IR) on the undefended CLIP below which the defenses' text
#: threat does not exist: a claim about the text half of MAT is then untestable
TEXT_THREAT_ASR = 20.0
#: MAT's train − test gap (points, R@5 under Co-Attack, mean of TR and IR) below which there is no overfitting for
#: MA²T to narrow (the paper's is 26.8)
GAP_MIN = 10.0
#: the Table 1 defenses trained with every seed of the ``seeds`` parameter (Fine-tune, the undefended reference
#: point, once)
SEEDED = ("TeCoA", "MAT_Img", "MAT")
#: the evaluations of Tables 3 / 5 made at every one of ``aug_seeds`` (what the robust score and the above-chance
#: precondition read); PGD and BERT-Attack, shown in Table 3 only, at the run's seed
SEEDED_ATTACKS = ("clean", "co-attack", "sga")
#: "SGA is at least as strong as Co-Attack": SGA's per-image R@1 may exceed Co-Attack's by at most this (points)
SGA_TOLERANCE = 2.0
#: the augmentation whose alignment and diversity :meth:`RetrievalStudy.control_cfgs` change: I2T(Human), four
#: true captions of the same image, available at both scales
CONTROL_AUGMENTATION = "human"
R1_METRIC = "per-image R@1 (mean of its TR@1 hit and its captions' IR@1 hits, %)"


@dataclass
class Evaluation:
    """One model on one gallery under one attack: the 0-based rank of every query's truth.

    i2t (N_img,): rank of each image's best-ranked true caption (text retrieval, TR); t2i (N_txt,): rank of each
    caption's image (image retrieval, IR); img2txt: the gallery's caption groups; captions: the captions scored
    (adversarial ones under a text attack)."""
    attack: str
    i2t: torch.Tensor
    t2i: torch.Tensor
    img2txt: list
    captions: list

    def recall(self, ks=(1, 5)) -> dict[str, float]:
        """``{"TR@1", "TR@5", "IR@1", "IR@5"}`` in percent."""
        return {**{f"TR@{k}": 100.0 * float((self.i2t < k).float().mean()) for k in ks},
                **{f"IR@{k}": 100.0 * float((self.t2i < k).float().mean()) for k in ks}}

    def per_image(self, k: int = 1):
        """(N_img,) per-image R@k in points (:func:`rclip.retrieval.per_image_recall`): the claims' items."""
        from rclip.retrieval import per_image_recall

        return per_image_recall(self.i2t, self.t2i, self.img2txt, k)

    def above_chance(self) -> dict:
        """Is TR@1 above chance (1 / N_img, a random ranking's), by the Wilson interval of the per-image hits?"""
        from rclip.claims import above_chance

        return above_chance((self.i2t < 1).numpy(), len(self.i2t))


def wide(long, attacks) -> "pd.DataFrame":
    """A long (model, attack) x recall table as the paper prints it: one row per model (in first-seen order),
    columns (attack, TR@1 / TR@5 / IR@1 / IR@5) for ``attacks``."""
    order = list(dict.fromkeys(long.index.get_level_values(0)))
    df = long[long.index.get_level_values(1).isin(attacks)].unstack(1)
    df.columns = df.columns.swaplevel(0, 1)
    return df.reindex(index=order, columns=[(a, c) for a in attacks for c in RECALLS])


def retrieval_reference_budget(run) -> tuple[str, float, str] | None:
    """The world's reference budget for retrieval: the *largest* of chapter 0's per-task reference budgets
    (:func:`rclip.chapter.reference_budgets`, read from chapter 0's results of the same book run).

    A retrieval query is answered right as long as *any* attribute its captions assert still separates the images,
    so retrieval collapses only where the most robust attribute the world CLIP reads has collapsed: the largest
    per-task radius (tasks that never collapse in chapter 0's grid are left out). Returns ``(task, eps in [0, 1]
    units, where it was read)``, or None when no task collapses."""
    from rclip.chapter import reference_budgets

    blob, _ = run.sibling_results("00_world")
    budgets, where = reference_budgets(run, list(blob["results"].get("reference_budgets_255") or {}))
    if not budgets:
        return None
    task = max(budgets, key=budgets.get)
    return task, budgets[task], where


def _clear_of_zero(record: dict) -> float:
    """How far a comparison's interval lies from 0 (points, either side; 0 when it straddles 0): the text-half
    precondition, on the test split (:meth:`RetrievalStudy.text_half`) and on validation (``schedule_sweep``)."""
    lo, hi = record["ci_low"], record["ci_high"]
    return lo if lo > 0 else (-hi if hi < 0 else 0.0)


class _EvalKey(NamedTuple):
    """Which evaluation a :class:`RetrievalStudy` holds: the model's name, the gallery, the image budget in /255 (None
    for attacks that ignore it), the text attack's substitutes (None for attacks without one) and the attack."""
    model: str
    split: str
    eps: float | None
    source: str | None
    attack: str


class RetrievalStudy:
    """The chapter's experiments on one test gallery: each configuration trained once (:func:`ma2t_clip`, cached on
    disk), each (model, split, budget, text source, attack) evaluated once (kept here), so that every table, figure
    and claim needing the same evaluation shares it; and the claims, each decided by :mod:`rclip.claims` on
    per-image values of the same test images.

    bundle: the undefended CLIP. test / train_eval: :class:`~rclip.data.base.RetrievalSet` galleries (the test
    split; training images with all their captions, for Table 2, or None where Table 2 is not run). pairs /
    data_key: the 1:1 training pairs and what identifies them in the cache. params: the notebook's resolved
    parameters (``eps``, ``eval_steps``, ``text_budget``, ``text_top_k``, ``text_source``, ``attack_sources``
    (optional), ``train_*``, ``aug_steps``, ``val_steps``, ``bases``, ``augmentations``, ``figure3_*``, ``n_align``,
    ``attack_batch``, ``seed``; the reference budget is attacked only where ``ref_budget_attacks`` or
    ``ref_budget_table1`` is set). reference: ``(task, eps)``
    of the world's reference budget, or None. scale, data: what the captions say. val: the validation gallery the
    training schedule is chosen on (:meth:`schedule_sweep`), or None; val_data: what it is.
    """

    def __init__(self, bundle, test, train_eval, pairs, data_key: dict, params: dict, *, scale: str, data: str,
                 reference: tuple[str, float] | None = None, reference_source: str = "", val=None,
                 val_data: str = "the validation split"):
        self.bundle, self.test, self.train_eval, self.pairs, self.data_key = bundle, test, train_eval, pairs, data_key
        self.val, self.val_data = val, val_data
        self.p, self.scale, self.data = dict(params), scale, data
        self.eps = self.p["eps"] / 255
        self.nominal = f"{self.p['eps']:g}/255"
        self.budgets = {self.nominal: self.eps}
        self.reference, self.reference_source = reference, reference_source
        if reference and (self.p.get("ref_budget_attacks") or self.p.get("ref_budget_table1")):
            self.budgets[self.ref_label] = reference[1]     # attacked only where asked for
        self.source = self.p["text_source"]
        self.sources = list(dict.fromkeys([*(self.p.get("attack_sources") or []), self.source]))
        if self.p.get("gap_steps") and train_eval is None:
            raise RClipError(f"gap_steps={self.p['gap_steps']} asks for Table 2's overfitting regime, which trains and "
                             "scores on the training gallery, but there is none: set n_train_eval (at least one "
                             "batch of training images) or gap_steps: null")
        if self.p.get("gap_steps") and len(train_eval.images) < int(self.p["train_batch"]):
            raise RClipError(f"Table 2's overfitting regime trains on the {len(train_eval.images)} images of the "
                             f"training gallery (n_train_eval), fewer than one batch of {self.p['train_batch']}: "
                             f"raise n_train_eval or lower train_batch")
        for key in ("seeds", "aug_seeds"):
            v = self.p.get(key, 1)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise RClipError(f"{key} is a number of training seeds, a whole number of at least 1; got {v!r}: "
                                 f"set {key}: 1 (or more) in the profile or the notebook's parameters")
        self.bases, self.augmentations = list(self.p["bases"]), list(self.p["augmentations"])
        self.trained, self.logs, self._evals, self._galleries, self._cfgs = {}, {}, {}, {}, {}

    # -- settings --------------------------------------------------------------------------------------------------
    @property
    def ref_label(self) -> str | None:
        return f"ref {self.reference[1] * 255:g}/255" if self.reference else None

    @property
    def label(self) -> str:
        return f"{self.scale} scale"

    def attack_cfg(self, eps: float | None = None, source: str | None = None):
        """The evaluation attacks' settings at ``eps`` ([0, 1] units; default the nominal) with ``source``'s
        substitutes (default the defenses' text threat model)."""
        from rclip.attacks.multimodal import RetrievalAttackConfig

        return RetrievalAttackConfig(eps=self.eps if eps is None else eps, steps=self.p["eval_steps"],
                                     seed=self.p["seed"], image_batch=self.p["attack_batch"],
                                     text=TextAttackConfig(budget=self.p["text_budget"], top_k=self.p["text_top_k"],
                                                           source=source or self.source))

    def train_cfg(self, method: str, augment: str | None = None, n_aug: int = 4, select: str = "first",
                  adversary: str | None = None, seed: int | None = None, steps: int | None = None,
                  n_pairs: int | None = None, n_false: int = 0, distinct: int | None = None) -> MA2TConfig:
        """The training settings of ``method`` (+ ``augment``): the ``train_*`` parameters, the inner PGD at the
        nominal budget, MAT's text adversary ``adversary`` (default the text threat model), training seed ``seed``
        (default the run's ``seed``; it orders the batches and starts the inner attacks); ``steps`` / ``n_pairs``
        override ``train_steps`` / train on the first ``n_pairs`` pairs only (Table 2's overfitting regime);
        ``n_false`` / ``distinct``: the controls of :meth:`control_cfgs` (``distinct`` equal to ``n_aug`` is the
        plain augmentation)."""
        p = self.p
        sgd = p["train_optimizer"] == "sgd"
        steps = p["train_steps"] if steps is None else int(steps)
        if distinct is not None and not 1 <= int(distinct) <= n_aug:
            raise RClipError(f"distinct={distinct}: a control keeps 1 to {n_aug} distinct augmented points per pair "
                             f"(distinct_counts)")
        distinct = None if distinct is None or int(distinct) == n_aug else int(distinct)
        return MA2TConfig(method, augment=augment, n_aug=n_aug, select=select, eps=self.eps, n_pairs=n_pairs,
                          n_false=int(n_false), distinct=distinct,
                          attack_steps=p["train_attack_steps"],
                          text=TextAttackConfig(criterion="l2", budget=p["text_budget"], top_k=p["text_top_k"],
                                                source=adversary or self.source),
                          train=TrainConfig(steps=steps, batch_size=p["train_batch"],
                                            optimizer=p["train_optimizer"], lr=p["train_lr"],
                                            min_lr=0.0 if sgd else p["train_lr"] / 10, warmup_steps=p["train_warmup"],
                                            weight_decay=1e-4, grad_clip=None if sgd else 1.0,
                                            ckpt_every=min(steps, 500) or 1, log_every=max(1, steps // 10),
                                            seed=p["seed"] if seed is None else seed))

    @property
    def aug_steps(self) -> int:
        """Training steps of the augmentation experiments: the parameter ``aug_steps``, else ``train_steps``."""
        return int(self.p.get("aug_steps") or self.p["train_steps"])

    def aug_cfg(self, method: str, augment: str | None = None, **kw) -> MA2TConfig:
        """The training settings of the augmentation experiments (Tables 3 / 5, Figures 1–3): :meth:`train_cfg` at
        :attr:`aug_steps` steps."""
        return self.train_cfg(method, augment, steps=self.aug_steps, **kw)

    def name(self, cfg: MA2TConfig | None) -> str:
        """The row label of a configuration (``None``: the undefended CLIP); MAT's text adversary other than the
        threat model, a training seed other than the run's and a step count other than ``train_steps`` are named.
        It also names the trained model and its evaluations here (:meth:`model` refuses two configurations under
        one name)."""
        if cfg is None:
            return UNDEFENDED
        seed = "" if cfg.train.seed == self.p["seed"] else f" (seed {cfg.train.seed})"
        adversary = f" ({cfg.text.source} adversary)" if cfg.method == "mat" and cfg.text.source != self.source else ""
        steps = "" if cfg.n_pairs is None and cfg.train.steps == self.p["train_steps"] else f"{cfg.train.steps} steps"
        regime = f" ({cfg.n_pairs} pairs, {steps})" if cfg.n_pairs is not None else f" ({steps})" if steps else ""
        return cfg.label() + adversary + (" (top-aligned)" if cfg.select == "aligned" else "") + regime + seed

    @property
    def seeds(self) -> list[int]:
        """The training seeds of the Table 1 defenses: ``seeds`` of them from the run's ``seed`` on."""
        return list(range(int(self.p["seed"]), int(self.p["seed"]) + int(self.p.get("seeds", 1))))

    @property
    def aug_seeds(self) -> list[int]:
        """The training seeds of the augmentation experiments (Tables 3 / 5: every base and every base +
        augmentation): ``aug_seeds`` of them from the run's ``seed`` on."""
        return list(range(int(self.p["seed"]), int(self.p["seed"]) + int(self.p.get("aug_seeds", 1))))

    def seeded(self, cfg: MA2TConfig, seeds: list[int] | None = None) -> list[MA2TConfig]:
        """``cfg`` trained with each of ``seeds`` (default :attr:`seeds`)."""
        from dataclasses import replace

        return [replace(cfg, train=replace(cfg.train, seed=s)) for s in (self.seeds if seeds is None else seeds)]

    def per_seed(self, cfg: MA2TConfig | None, attack: str, k: int = 1, **kw) -> np.ndarray:
        """(seeds, N_img) per-image R@k of ``cfg`` trained with each seed (``None``: the undefended CLIP, one row):
        what the claims engine resamples at two levels, seeds and images."""
        cfgs = [None] if cfg is None else self.seeded(cfg)
        return np.stack([np.asarray(self.per_image(c, attack, k, **kw)) for c in cfgs])

    @property
    def model_name(self) -> str:
        return f"{self.bundle.meta['name']} ({self.bundle.image_size} px)"

    def reference_text(self) -> str:
        """The reference budget in words, naming the chapter-0 task it is taken from."""
        if not self.reference:
            return "none (paper scale: the paper's radius only)" if self.scale == "paper" else \
                "none (no task of chapter 0 collapses within its grid)"
        return (f"{self.reference[1] * 255:g}/255, the largest of chapter 0's per-task reference budgets "
                f"({self.reference[0]}'s)")

    def steps_text(self, eps: float | None = None) -> str:
        """The image and text steps the evaluation attacks take: step sizes as fractions of ε, and their value at
        ``eps`` (default the nominal budget)."""
        cfg = self.attack_cfg(eps)
        s, e = cfg.steps, cfg.eps * 255
        return (f"{s} image step{'s' if s != 1 else ''} of 1.25 ε/{s} (Co-Attack, from a one-sided random start in "
                f"[0, ε]; {cfg.step('co-attack') * 255:.3g}/255 at ε = {e:g}/255) or 2.5 ε/{s} (PGD and SGA, from a "
                f"uniform start in the ball; {cfg.step('pgd') * 255:.3g}/255); {cfg.text.budget} word substituted per "
                f"caption, top {cfg.text.top_k} substitutes")

    def budgets_text(self) -> str:
        """The caption's attack field for a table with the reference budget: both budgets, named, and the steps."""
        ref = f" and ref = {self.reference_text()}" if self.ref_label in self.budgets else ""
        return f"ℓ∞ {self.nominal}{ref}; {self.steps_text()}"

    def attack_text(self) -> str:
        """The caption's attack field: budget, steps, words."""
        s = self.p["eval_steps"]
        return (f"ℓ∞ ε = {self.nominal}, {s} image step{'s' if s != 1 else ''}; {self.p['text_budget']} word "
                f"({self.source} substitutes)")

    def sentence(self) -> str:
        return (f"{self.label}: {self.model_name} on {self.data}, fine-tuned on {len(self.pairs)} 1:1 training pairs; "
                f"image budgets {', '.join(self.budgets)}")

    def caption(self, what: str, *, n: str | None = None, attack: str | None = None, model: str | None = None,
                data: str | None = None) -> str:
        """The caption line of a table: what it shows, then scale, model, data, n and attack."""
        parts = [what, self.label, f"model {model or self.model_name}", f"data {data or self.data}",
                 f"n = {n or f'{len(self.test.images)} test images x 5 captions'}"]
        return " · ".join(parts + ([f"attack {attack}"] if attack else []))

    def summary(self, *, augmentations_only: bool = False):
        """What this run is, as a one-column table; ``augmentations_only``: the rows that describe a run of the
        augmentation experiments alone (Tables 3 / 5 on ``bases``, every model at :attr:`aug_seeds`)."""
        import pandas as pd

        p = self.p
        attacks = self.steps_text() + "; SGA scales 0.5/0.75/1.25/1.5, σ 0.05; Co-Attack KL weight 3"
        if augmentations_only:
            from rclip.augment import PAPER_NAMES

            gallery = self.gallery(self.aug_split)
            return pd.Series({
                "scale": self.scale, "model": self.model_name,
                "test gallery": f"{len(gallery.images)} images, {len(gallery.captions)} captions",
                "bases": ", ".join(self.aug_cfg(b).label() for b in self.bases),
                "augmentations": ", ".join(PAPER_NAMES[a] for a in self.augmentations),
                "training seeds": f"{len(self.aug_seeds)} per model ({', '.join(map(str, self.aug_seeds))})",
                "training pairs": f"{len(self.pairs)} (1:1, first caption) + 4 augmented points each",
                "training": f"{self.aug_steps} steps x batch {p['train_batch']}, "
                            f"{p['train_optimizer']} lr {p['train_lr']:g}, inner PGD {p['train_attack_steps']} step(s) "
                            f"at {self.nominal}",
                "evaluation attacks": attacks, "text threat model": self.source}, name="this run").to_frame()
        return pd.Series({
            "scale": self.scale, "model": self.model_name,
            "test gallery": f"{len(self.test.images)} images, {len(self.test.captions)} captions (augmentation "
                            f"experiments: the first {len(self.gallery(self.aug_split).images)})",
            "training seeds": f"{len(self.seeds)} for TeCoA, MAT_Img and MAT; 1 for the others",
            "Table 2": ("not run" if self.train_eval is None else
                        f"MAT and MA²T trained {p['gap_steps']} steps on the {len(self.train_eval.images)} training-"
                        f"gallery images" if p.get("gap_steps") else "Table 1's MAT and MA²T"),
            "training pairs": f"{len(self.pairs)} (1:1, first caption) + 4 augmented points each for MA²T",
            "training": f"{p['train_steps']} steps x batch {p['train_batch']}, {p['train_optimizer']} lr "
                        f"{p['train_lr']:g}, inner PGD {p['train_attack_steps']} step(s) at {self.nominal}"
                        + (f" (augmentation experiments: {self.aug_steps} steps)"
                           if self.aug_steps != p["train_steps"] else ""),
            "schedule chosen on": (f"{len(self.val.images)} validation images (MAT vs MAT_Img under BERT-Attack at "
                                   f"{', '.join(str(s) for s in self.sweep_steps)} steps)"
                                   if self.val is not None else "-"),
            "image budgets": ", ".join(self.budgets),
            "world's reference budget": self.reference_text(),
            "evaluation attacks": attacks, "text threat model": self.source}, name="this run").to_frame()

    def header(self) -> dict:
        """The run's settings for the results JSON."""
        p = self.p
        return {"scale": self.scale, "model": self.bundle.meta["name"], "sha256": self.bundle.meta.get("sha256"),
                "n_eval": len(self.test.images), "n_train": len(self.pairs), "eps_255": p["eps"],
                "budgets_255": {k: v * 255 for k, v in self.budgets.items()},
                "reference_budget": ({"task": self.reference[0], "eps_255": self.reference[1] * 255,
                                      "rule": "largest of chapter 0's per-task reference budgets",
                                      "source": self.reference_source} if self.reference else None),
                "eval_steps": p["eval_steps"], "text_budget": p["text_budget"], "text_top_k": p["text_top_k"],
                "text_source": self.source, "train": {"steps": p["train_steps"], "batch": p["train_batch"],
                                                      "optimizer": p["train_optimizer"], "lr": f"{p['train_lr']:g}",
                                                      "attack_steps": p["train_attack_steps"]},
                "seeds": self.seeds, "gap_steps": p.get("gap_steps"),
                "n_train_eval": len(self.train_eval.images) if self.train_eval is not None else 0,
                "aug_steps": self.aug_steps,
                "n_val": len(self.val.images) if self.val is not None else 0, "val_steps": p.get("val_steps"),
                "n_aug_eval": len(self.gallery(self.aug_split).images)}

    # -- training and evaluation -----------------------------------------------------------------------------------
    def model(self, cfg: MA2TConfig | None):
        """The CLIP trained with ``cfg`` (trained once; ``None``: the undefended CLIP)."""
        from rclip.book import train_summary

        if cfg is None:
            return self.bundle
        name = self.name(cfg)
        if self._cfgs.setdefault(name, cfg) != cfg:
            raise RClipError(f"two training configurations share the name {name!r}: name() must tell them apart "
                             f"({self._cfgs[name]} vs {cfg})")
        if name not in self.trained:
            self.trained[name], log = ma2t_clip(self.bundle, cfg, self.pairs, self.data_key, progress=False)
            self.logs[name] = {**train_summary(log), "pairs": log.get("train_pairs")}
        return self.trained[name]

    def _key(self, cfg, split, eps, source, attack) -> _EvalKey:
        eps_key = None if attack in ("clean", "text") else round(eps * 255, 6)     # these ignore the image budget
        return _EvalKey(self.name(cfg), split, eps_key, source if attack in ("text", "co-attack", "sga") else None,
                        attack)

    def gallery(self, split: str):
        """The gallery named ``split``: ``"test"``, ``"train"`` (Table 2's training images), ``"val"`` or
        ``"test:<m>"`` (the first m test images: :attr:`aug_split`, and Table 2's test side, the size of its training
        gallery)."""
        if split == "test":
            return self.test
        if split == "train":
            if self.train_eval is None:
                raise RClipError("this study has no training gallery (Table 2's): set n_train_eval, the training "
                                 "images to score, to at least one batch")
            return self.train_eval
        if split == "val":
            if self.val is None:
                raise RClipError("this study has no validation gallery: set n_val (validation images) to choose "
                                 "the schedule on")
            return self.val
        if split.startswith("test:"):
            if split not in self._galleries:
                self._galleries[split] = self.test.first(int(split.removeprefix("test:")))
            return self._galleries[split]
        raise RClipError(f"unknown gallery {split!r}: use 'test', 'train', 'val' or 'test:<m>'")

    @property
    def gap_split(self) -> str:
        """Table 2's test gallery: the first test images, as many as its training gallery has (R@5 depends on the
        gallery's size, so the two sides must match)."""
        return f"test:{len(self.gallery('train').images)}"

    @property
    def aug_split(self) -> str:
        """The gallery of the augmentation experiments (Tables 3 / 5, Figure 3): the first ``n_aug_eval`` test
        images (all when unset)."""
        m = self.p.get("n_aug_eval")
        return "test" if not m or int(m) >= len(self.test.images) else f"test:{int(m)}"

    def evaluate(self, cfg: MA2TConfig | None, attacks, *, split: str = "test", eps: float | None = None,
                 source: str | None = None) -> dict[str, Evaluation]:
        """``{attack: Evaluation}`` of the model trained with ``cfg`` on the ``split`` gallery (:meth:`gallery`),
        every image and caption attacked (:func:`rclip.attacks.evaluate_attacks`); made once each."""
        from rclip.attacks.multimodal import evaluate_attacks

        eps, source = self.eps if eps is None else eps, source or self.source
        keys = {a: self._key(cfg, split, eps, source, a) for a in attacks}
        todo = [a for a in attacks if keys[a] not in self._evals]
        if todo:
            rset = self.gallery(split)
            first = keys[todo[0]]            # BERT-Attack's captions ignore the image budget: reuse any made
            made = [ev.captions for k, ev in self._evals.items() if (k.model, k.split) == (first.model, first.split)
                    and k.source == source and k.attack in ("text", "co-attack")]
            got = evaluate_attacks(self.model(cfg), rset, todo, self.attack_cfg(eps, source), ks=(1,),
                                   text_captions=made[0] if made else None)
            for a, r in got.items():
                self._evals[keys[a]] = Evaluation(a, r.i2t_ranks, r.t2i_ranks, [list(c) for c in rset.img2txt],
                                                  r.captions)
        return {a: self._evals[keys[a]] for a in attacks}

    def per_image(self, cfg, attack: str, k: int = 1, **kw):
        """(N_img,) per-image R@k of ``cfg``'s model under ``attack`` (keywords as :meth:`evaluate`)."""
        return self.evaluate(cfg, [attack], **kw)[attack].per_image(k)

    def robust(self, cfg):
        """(N_img,) the per-image robust score of Tables 3 / 5 on :attr:`aug_split`: the mean of the image's R@1
        under Co-Attack and under SGA (nominal budget, the text threat model)."""
        split = self.aug_split
        return (self.per_image(cfg, "co-attack", split=split) + self.per_image(cfg, "sga", split=split)) / 2

    def robust_seeds(self, cfg) -> np.ndarray:
        """(seeds, N_img) :meth:`robust` of ``cfg`` trained with each of :attr:`aug_seeds`: what the augmentation
        claims resample at two levels, seeds and images (seed s of one side paired with seed s of the other: the
        same batch order and inner-attack starts)."""
        return np.stack([self.robust(c) for c in self.seeded(cfg, self.aug_seeds)])

    # -- chance and the preconditions ------------------------------------------------------------------------------
    def chance_text(self, cfgs=(None,), split: str = "test") -> str:
        """The tables' chance line: R@k of a random ranking on the ``split`` gallery, and which of ``cfgs`` (an
        iterable of configurations, or label -> configuration) retrieve at chance there."""
        rset = self.gallery(split)
        n = len(rset.images)
        named = cfgs.items() if isinstance(cfgs, dict) else ((self.name(c), c) for c in cfgs)
        at_chance = [name for name, c in named
                     if not self.evaluate(c, ["clean"], split=split)["clean"].above_chance()["above"]]
        return (f"chance R@1 = {100 / n:.1f} %, R@5 ≈ {min(100.0, 500 / n):.1f} % ({n} {split} images); at chance "
                f"(clean TR@1 not above it): {', '.join(at_chance) or 'none'}")

    def above_chance(self, cfg, split: str = "test") -> Precondition:
        """Precondition: ``cfg``'s model retrieves above chance on the clean ``split`` gallery (the lower end of the
        Wilson interval of its TR@1 above 1 / N_img)."""
        r = self.evaluate(cfg, ["clean"], split=split)["clean"].above_chance()
        where = "" if split == "test" else f" on {split}"
        return Precondition.above(f"{self.name(cfg)} clean TR@1{where}, 95 % lower end (%)", r["ci_low"],
                                  r["chance"])

    def asr(self, clean: Evaluation, adv: Evaluation) -> dict[str, float]:
        """SGA's attack success rate at R@1 (%), TR and IR; NaN where the victim is at chance (nothing to attack)."""
        from rclip.attacks.multimodal import attack_success

        if not clean.above_chance()["above"]:
            return {"ASR TR@1": float("nan"), "ASR IR@1": float("nan")}
        return {"ASR TR@1": attack_success(clean.i2t, adv.i2t, 1), "ASR IR@1": attack_success(clean.t2i, adv.t2i, 1)}

    def text_threat(self) -> list[Precondition]:
        """Preconditions of every claim about the text half of MAT: BERT-Attack with the defenses' substitutes (the
        text threat model) succeeds on the undefended CLIP at least :data:`TEXT_THREAT_ASR` % of the time (mean of
        its TR@1 and IR@1 ASR), and every adversarial caption it makes is still true of its image by the world's
        ground truth (:func:`rclip.attacks.text.meaning_kept_share`; at paper scale there is no ground truth and
        only the first applies)."""
        from rclip.attacks.text import meaning_kept_share

        got = self.evaluate(None, ["clean", "text"])
        asr = self.asr(got["clean"], got["text"])
        value = (asr["ASR TR@1"] + asr["ASR IR@1"]) / 2
        out = [Precondition.at_least(f"BERT-Attack ({self.source}) ASR on CLIP, mean of TR@1 and IR@1 (%)",
                                     None if value != value else value, TEXT_THREAT_ASR)]
        if self.scale == "world":
            out.append(Precondition.at_least(f"BERT-Attack ({self.source}) captions still true of their image (%)",
                                             meaning_kept_share(self.test.captions, got["text"].captions), 100.0))
        return out

    # -- the tables ------------------------------------------------------------------------------------------------
    def attack_table(self):
        """Section 1: the undefended CLIP under every attack — at the nominal budget (and at the reference budget
        when ``ref_budget_attacks``) with the text threat model's substitutes, and BERT-Attack alone with every
        other source of ``attack_sources`` — R@1 / R@5 and the ASR at R@1. Index (budget, attack, text
        substitutes); ``"-"`` where a label does not apply."""
        import pandas as pd

        clean = self.evaluate(None, ["clean"])["clean"]
        rows = {("-", "clean", "-"): {**clean.recall(), "ASR TR@1": float("nan"), "ASR IR@1": float("nan")}}
        for label, eps in self.budgets.items():
            pgd_ = self.evaluate(None, ["pgd"], eps=eps)["pgd"]
            rows[(label, "PGD", "-")] = {**pgd_.recall(), **self.asr(clean, pgd_)}
            for a, ev in self.evaluate(None, ["text", "co-attack", "sga"], eps=eps).items():
                rows[(label, ATTACK_NAMES[a], self.source)] = {**ev.recall(), **self.asr(clean, ev)}
        for src in self.sources:
            if src != self.source:
                ev = self.evaluate(None, ["text"], source=src)["text"]
                rows[(self.nominal, ATTACK_NAMES["text"], src)] = {**ev.recall(), **self.asr(clean, ev)}
        df = pd.DataFrame(rows).T
        df.index.names = ["budget", "attack", "text substitutes"]
        return df.sort_index(level=[0, 1], sort_remaining=False)

    def adversarial_captions(self) -> dict[str, list[str]]:
        """BERT-Attack's captions of the test gallery, per text source (the attack ignores the image budget)."""
        return {s: self.evaluate(None, ["text"], source=s)["text"].captions for s in self.sources}

    def substitution_table(self):
        """Per text source, the share (%) of BERT-Attack's adversarial captions whose changes keep the meaning, change
        it, bring in a word the world does not read, or that are unchanged (:func:`rclip.attacks.substitution_kinds`,
        read by the world's ground truth of word meaning)."""
        import pandas as pd

        from rclip.attacks.text import KINDS, substitution_kinds

        kinds = {s: pd.Series(substitution_kinds(self.test.captions, c)).value_counts(normalize=True) * 100
                 for s, c in self.adversarial_captions().items()}
        df = pd.DataFrame(kinds).fillna(0.0).T.reindex(columns=list(KINDS), fill_value=0.0)
        df.index.name = "text substitutes"
        return df

    def table1(self, methods: dict, *, reference: bool = False):
        """Table 1 (long): per (method, attack) the four recalls, clean and under Co-Attack and SGA at the nominal
        budget (and at the reference budget too when ``reference``), each the mean over the method's training seeds
        (:meth:`cfgs_of`; column ``seeds``). methods: row label -> :class:`MA2TConfig`."""
        import pandas as pd

        rows = {}
        for name, cfg in methods.items():
            cfgs = self.cfgs_of(name, cfg)
            evals = [(ATTACK_NAMES[a] + ("" if a == "clean" else f" {self.nominal}"), a, None)
                     for a in ("clean", "co-attack", "sga")]
            if reference and self.ref_label in self.budgets:
                evals += [(f"{ATTACK_NAMES[a]} {self.ref_label}", a, self.reference[1]) for a in ("co-attack", "sga")]
            for label, a, eps in evals:
                rows[(name, label)] = self._mean_recall(cfgs, a, eps=eps)
        df = pd.DataFrame(rows).T
        df.index.names = ["method", "attack"]
        return df

    def _mean_recall(self, cfgs: list[MA2TConfig], attack: str, **kw) -> dict[str, float]:
        """The four recalls under ``attack`` averaged over the trained copies ``cfgs`` (one per seed), and how many
        (``seeds``); keywords as :meth:`evaluate`."""
        recs = [self.evaluate(c, [attack], **kw)[attack].recall() for c in cfgs]
        return {**{k: float(np.mean([r[k] for r in recs])) for k in recs[0]}, "seeds": len(cfgs)}

    def cfgs_of(self, name: str, cfg: MA2TConfig) -> list[MA2TConfig]:
        """The trained copies behind a Table 1 row: every seed for the defenses of :data:`SEEDED`, one otherwise."""
        return self.seeded(cfg) if name in SEEDED else [cfg]

    def text_half(self) -> Precondition:
        """Precondition of MAT vs MAT_Img / TeCoA: MAT's text half changes the model - MAT's per-image R@1 under
        BERT-Attack (the text threat model) differs from MAT_Img's beyond noise. The value is how far the paired
        95 % interval of MAT − MAT_Img (seeds x images) lies from 0 (0 when it straddles 0)."""
        from rclip.claims import compare

        methods = self.table1_methods()
        r = compare("MAT vs MAT_Img under BERT-Attack", self.per_seed(methods["MAT"], "text"),
                    self.per_seed(methods["MAT_Img"], "text"), metric=R1_METRIC)
        gap = _clear_of_zero(r)
        return Precondition.above(f"MAT − MAT_Img R@1 under BERT-Attack ({self.source}): distance of its 95 % "
                                  f"interval from 0 (points; estimate {r['estimate']:+.1f})", gap, 0.0)

    @property
    def sweep_steps(self) -> list[int]:
        """The step counts :meth:`schedule_sweep` compares: ``val_steps`` and ``train_steps``."""
        return sorted({int(s) for s in [*(self.p.get("val_steps") or []), self.p["train_steps"]]})

    def schedule_sweep(self):
        """How long to train, chosen on validation: at each of ``val_steps`` training steps (the run's seed), MAT's
        and MAT_Img's per-image R@1 under BERT-Attack (the text threat model) on the validation gallery, and the
        paired 95 % interval of MAT − MAT_Img - the :meth:`text_half` precondition, measured on validation images so
        that the schedule is not chosen on the test split. ``train_steps`` is always one of the rows. Index:
        training steps."""
        import pandas as pd

        from rclip.claims import compare

        rows = {}
        for steps in self.sweep_steps:
            mat, img = (self.per_image(self.train_cfg(m, steps=steps), "text", split="val") for m in ("mat", "mat_img"))
            r = compare(f"MAT vs MAT_Img under BERT-Attack, {steps} steps", mat, img, metric=R1_METRIC)
            rows[steps] = {"MAT": r["mean_a"], "MAT_Img": r["mean_b"], "MAT − MAT_Img": r["estimate"],
                           "95 % CI low": r["ci_low"], "95 % CI high": r["ci_high"],
                           "text half changes the model": _clear_of_zero(r) > 0}
        df = pd.DataFrame(rows).T
        df.index.name = "training steps"
        return df

    def table1_methods(self) -> dict[str, MA2TConfig]:
        out = {"Fine-tune": self.train_cfg("finetune"), "TeCoA": self.train_cfg("tecoa"),
               "MAT_Img": self.train_cfg("mat_img"), "MAT": self.train_cfg("mat")}
        if self.p.get("mat_lexicon"):
            out["MAT (lexicon adversary)"] = self.train_cfg("mat", adversary="lexicon")
        return out

    def gap_models(self) -> dict[str, MA2TConfig]:
        """Table 2's MAT and MA²T I2T(Human): with ``gap_steps`` set, trained for that many steps on the first
        ``n_train_eval`` pairs only - exactly the images of the training gallery - the overfitting regime the
        paper's gap comes from; otherwise Table 1's models."""
        steps = self.p.get("gap_steps")
        kw = {} if not steps else {"steps": int(steps), "n_pairs": len(self.gallery("train").images)}
        return {"MAT": self.train_cfg("mat", **kw), "MA²T I2T(Human)": self.train_cfg("mat", "human", **kw)}

    def table2(self):
        """Table 2: TR@5 / IR@5 under Co-Attack on training images and on as many test images (:attr:`gap_split`),
        for MAT and MA²T I2T(Human) (:meth:`gap_models`), with the row ``Diff`` = test − train. Returns ``(table,
        {model: mean of the TR@5 and IR@5 differences})``."""
        import pandas as pd

        rows = {}
        for name, cfg in self.gap_models().items():
            for split, where in (("train", "train"), ("test", self.gap_split)):
                rec = self.evaluate(cfg, ["co-attack"], split=where)["co-attack"].recall(ks=(5,))
                for c in ("TR@5", "IR@5"):
                    rows.setdefault((name, c), {})[split] = rec[c]
        t2 = pd.DataFrame(rows).reindex(["train", "test"])
        t2.loc["Diff"] = t2.loc["test"] - t2.loc["train"]
        gap = {m: float(t2.loc["Diff", m].mean()) for m in self.gap_models()}
        return t2, gap

    def table3_models(self, *, seeded: bool = False) -> list[MA2TConfig]:
        """Every base with and without each augmentation; ``seeded``: each trained with every one of
        :attr:`aug_seeds` (what Table 3's clean, Co-Attack and SGA columns average)."""
        cfgs = [self.aug_cfg(b, a) for b in self.bases for a in [None, *self.augmentations]]
        return [c for cfg in cfgs for c in self.seeded(cfg, self.aug_seeds)] if seeded else cfgs

    def aug_above_chance(self, cfg: MA2TConfig) -> list[Precondition]:
        """Precondition of the augmentation claims: ``cfg`` retrieves above chance on :attr:`aug_split` at every one
        of :attr:`aug_seeds` (one precondition per seed)."""
        return [self.above_chance(c, self.aug_split) for c in self.seeded(cfg, self.aug_seeds)]

    def table3(self):
        """Tables 3 and 5 (long): every base with and without each augmentation, clean and under PGD, BERT-Attack,
        Co-Attack and SGA (nominal budget, the text threat model). Clean, Co-Attack and SGA (what the claims score)
        are the mean over :attr:`aug_seeds`, PGD and BERT-Attack the run's seed alone (column ``seeds``). Index
        (model, attack)."""
        import pandas as pd

        rows = {}
        for cfg in self.table3_models():
            for a in ("clean", "pgd", "text", "co-attack", "sga"):
                cfgs = self.seeded(cfg, self.aug_seeds if a in SEEDED_ATTACKS else self.aug_seeds[:1])
                rows[(cfg.label(), ATTACK_NAMES[a])] = self._mean_recall(cfgs, a, split=self.aug_split)
        df = pd.DataFrame(rows).T
        df.index.names = ["model", "attack"]
        return df

    def gains(self) -> dict[str, float]:
        """Each augmentation's mean robust gain (points) over its base, averaged over the bases: a description; the
        claims test each gain on its own."""
        return {a: float(np.mean([(self.robust_seeds(self.aug_cfg(b, a)) - self.robust_seeds(self.aug_cfg(b))).mean()
                                  for b in self.bases])) for a in self.augmentations}

    def figure3_cfg(self, augment: str, m: int) -> MA2TConfig:
        """``figure3_base`` trained with the ``m`` best-aligned of the four augmented points per pair (m = 0: the base
        alone; m = 4: all four, Table 3's model at the run's seed)."""
        base = self.p["figure3_base"]
        if m == 0:
            return self.aug_cfg(base)
        if m == 4:
            return self.aug_cfg(base, augment)
        return self.aug_cfg(base, augment, n_aug=m, select="aligned")

    def figure3(self):
        """Figure 3: SGA TR@1 / IR@1 of ``figure3_base`` with m = ``figure3_counts`` augmented points of each of
        ``figure3_augmentations``. Index (augmentation's paper name, m)."""
        import pandas as pd

        from rclip.augment import PAPER_NAMES

        rows = {}
        for aug in self.p["figure3_augmentations"]:
            for m in self.p["figure3_counts"]:
                rec = self.evaluate(self.figure3_cfg(aug, m), ["sga"], split=self.aug_split)["sga"].recall(ks=(1,))
                rows[(PAPER_NAMES[aug], m)] = {"SGA TR@1": rec["TR@1"], "SGA IR@1": rec["IR@1"]}
        return pd.DataFrame(rows).T

    def control_cfgs(self) -> dict[tuple[str, int], MA2TConfig]:
        """The controlled experiments behind the reading of Figures 1–2 (augmentations help when aligned and
        diverse), each changing one property of ``figure3_base`` + I2T(Human) (four true captions of the same image,
        at ``aug_steps``) at a fixed number of points: ``("false", k)``: k of the four captions replaced by captions
        false of the image (the world's ground truth says which), for k in ``false_counts`` (world only);
        ``("distinct", d)``: only d distinct captions, repeated over the four slots, for d in ``distinct_counts``.
        k = 0 and d = 4 are Table 3's model at the run's seed."""
        base, out = self.p["figure3_base"], {}
        if self.scale == "world":
            for k in self.p.get("false_counts") or []:
                out[("false", int(k))] = self.aug_cfg(base, CONTROL_AUGMENTATION, n_false=int(k))
        for d in self.p.get("distinct_counts") or []:
            out[("distinct", int(d))] = self.aug_cfg(base, CONTROL_AUGMENTATION, distinct=int(d))
        return out

    def controls(self):
        """The controlled experiments (:meth:`control_cfgs`): per setting, the mean alignment, diversity and spread
        of the captions it trains on (:func:`rclip.augment.used_points_alignment_diversity` in the starting CLIP's
        space, over the first ``n_align`` training pairs) and its clean and robust R@1 on :attr:`aug_split`.
        Index (control, value)."""
        import pandas as pd

        from rclip.augment import used_points_alignment_diversity

        rows, idx = {}, range(min(int(self.p["n_align"]), len(self.pairs)))
        for key, cfg in self.control_cfgs().items():
            m = used_points_alignment_diversity(self.bundle, training_set(self.bundle, self.pairs, cfg), idx)
            rows[key] = {"alignment": float(m["alignment"].mean()), "diversity": float(m["diversity"].mean()),
                         "spread": float(m["spread"].mean()),
                         "clean R@1": float(self.per_image(cfg, "clean", split=self.aug_split).mean()),
                         "robust R@1": float(self.robust(cfg).mean())}
        df = pd.DataFrame(rows).T
        df.index.names = ["control", "value"]
        return df

    def control_claims(self) -> list[dict]:
        """Aligned augmentations help more (no false caption beats the most false of ``false_counts``) and diverse
        ones help more (the most distinct beats the fewest of ``distinct_counts``), on robust R@1."""
        cfgs, rows = self.control_cfgs(), []
        pre = [self.above_chance(self.aug_cfg(self.p["figure3_base"]), self.aug_split)]
        for kind, best_is_low, claim in (("false", True, "aligned augmented captions help more: {a} false beat {b} "
                                                         "false of four (robust R@1)"),
                                         ("distinct", False, "diverse augmented captions help more: {a} distinct beat "
                                                             "{b} distinct of four (robust R@1)")):
            values = sorted(v for k, v in cfgs if k == kind)
            if len(values) < 2:
                continue
            a, b = (values[0], values[-1]) if best_is_low else (values[-1], values[0])
            rows.append(self._r1_compare(
                claim.format(a=a, b=b), self.robust(cfgs[(kind, a)]), self.robust(cfgs[(kind, b)]),
                (f"{a} {kind}", f"{b} {kind}"), preconditions=pre,
                note=f"{cfgs[(kind, a)].label()} vs {cfgs[(kind, b)].label()}: the controlled test of the paper's "
                     "reading of its Figures 1–2"))
        return rows

    def alignment(self) -> dict[str, dict]:
        """Figures 1–2: alignment and diversity of every augmentation in the starting CLIP's space, over four points
        of each of the first ``n_align`` training pairs (:func:`rclip.augment.alignment_diversity`)."""
        from rclip.augment import alignment_diversity

        idx = range(min(self.p["n_align"], len(self.pairs)))
        return {a: alignment_diversity(self.bundle, self.pairs, a, idx, 4, self.p["seed"]) for a in self.augmentations}

    # -- the claims ------------------------------------------------------------------------------------------------
    def _r1_compare(self, claim, a, b, labels, *, source="paper", **kw) -> dict:
        from rclip.claims import compare

        return compare(claim, a, b, metric=R1_METRIC, source=source, labels=labels, items="images", **kw)

    def attack_claims(self, source: str | None = None) -> list[dict]:
        """The attacks on the undefended CLIP with ``source``'s substitutes, nominal budget: the multimodal attacks
        (Co-Attack, SGA) deceive it more than the unimodal ones (PGD, BERT-Attack) — the paper's — and SGA is at
        least as strong as Co-Attack (within :data:`SGA_TOLERANCE` points) — the book's reading of the SGA paper and
        of MA²T's Table 1. Lower R@1 is stronger, so side ``a`` is the weaker attack's R@1."""
        source = source or self.source
        r1 = {a: self.per_image(None, a, source=source) for a in ("pgd", "text", "co-attack", "sga")}
        pre = [self.above_chance(None)]
        tag = f"({source} substitutes, {self.nominal})"
        rows = [self._r1_compare(f"{ATTACK_NAMES[m]} deceives CLIP more than {ATTACK_NAMES[u]} {tag}", r1[u], r1[m],
                                 (ATTACK_NAMES[u], ATTACK_NAMES[m]), preconditions=pre,
                                 note="the paper: Co-Attack and SGA 'are more effective at deceiving VL models than "
                                      "unimodal attacks'")
                for m in ("co-attack", "sga") for u in ("pgd", "text")]
        rows.append(self._r1_compare(f"SGA is at least as strong as Co-Attack {tag}", r1["co-attack"], r1["sga"],
                                     ("Co-Attack", "SGA"), source="book", tolerance=SGA_TOLERANCE, preconditions=pre,
                                     note=f"non-inferiority: SGA's R@1 at most {SGA_TOLERANCE:g} points above "
                                          "Co-Attack's"))
        return rows

    def defense_claims(self) -> list[dict]:
        """Table 1: MAT beats Fine-tune, TeCoA and MAT_Img under Co-Attack and under SGA, on per-image R@1 of every
        training seed (:meth:`per_seed`; Fine-tune has one). Both models must be above chance; against TeCoA and
        MAT_Img (which differ from MAT by its text half) the text threat must exist and MAT's text half must change
        the model (:meth:`text_threat`, :meth:`text_half`)."""
        methods = self.table1_methods()
        mat = methods["MAT"]
        text_pre = [*self.text_threat(), self.text_half()]
        rows = []
        for other in ("Fine-tune", "TeCoA", "MAT_Img"):
            pre = [self.above_chance(mat), self.above_chance(methods[other])] + (text_pre if other != "Fine-tune"
                                                                                   else [])
            seeds = {m: len(self.cfgs_of(m, methods[m])) for m in ("MAT", other)}
            for a in ("co-attack", "sga"):
                rows.append(self._r1_compare(
                    f"MAT beats {other} under {ATTACK_NAMES[a]} ({self.nominal})",
                    self._match(self.per_seed(mat, a), seeds[other]),
                    self._match(self.per_seed(methods[other], a) if seeds[other] > 1
                                else self.per_image(methods[other], a)[None], seeds["MAT"]),
                    ("MAT", other), preconditions=pre,
                    note=f"training seeds: MAT {seeds['MAT']}, {other} {seeds[other]}" + (
                        "; seeds resampled with the images" if min(seeds.values()) > 1 else
                        "; one-seed side compared with the seed-mean of the other")))
        return rows

    @staticmethod
    def _match(values: np.ndarray, other_seeds: int) -> np.ndarray:
        """Per-image values (seeds, N) made comparable with a side of ``other_seeds`` seeds: kept as they are when
        both sides have several seeds (the engine pairs seed s with seed s), else averaged over seeds to one row."""
        return values if (len(values) > 1 and other_seeds > 1) else values.mean(0, keepdims=True)

    def gap_claim(self) -> dict:
        """Table 2: MA²T I2T(Human) narrows MAT's train − test gap (R@5 under Co-Attack). Per item, each model's
        test − train per-image R@5 on index-matched pairs (test image i, training image i): the two samples are
        independent, so pairing them by index is an honest pairing, and the mean difference is the difference of the
        two gaps. Precondition: MAT's train − test gap is at least :data:`GAP_MIN` points."""
        from rclip.claims import compare

        (mat_name, mat), (ma2t_name, ma2t) = self.gap_models().items()
        per = {(m, s): self.per_image(cfg, "co-attack", 5, split=w) for m, cfg in (("mat", mat), ("ma2t", ma2t))
               for s, w in (("train", "train"), ("test", self.gap_split))}
        n = min(len(per[("mat", "train")]), len(per[("mat", "test")]))
        gap = float(per[("mat", "train")].mean() - per[("mat", "test")].mean())
        pre = [Precondition.at_least(f"{mat_name} train − test gap, R@5 under Co-Attack, mean of TR and IR (points)",
                                     gap, GAP_MIN), self.above_chance(mat, self.gap_split)]
        return compare(f"{ma2t_name} narrows {mat_name}'s train − test gap (Co-Attack, R@5)",
                       per[("ma2t", "test")][:n] - per[("ma2t", "train")][:n],
                       per[("mat", "test")][:n] - per[("mat", "train")][:n],
                       metric="test − train per-image R@5 (points)", labels=(ma2t_name, mat_name),
                       items="image pairs", preconditions=pre,
                       note=f"test image i paired with training image i, i < {n}")

    def pooled(self, augs) -> "np.ndarray":
        """(seeds, N_img) the pooled robust score of a group of augmentations: per training seed and test image, the
        mean of :meth:`robust_seeds` over every (base, augmentation) model of the group."""
        return np.mean([self.robust_seeds(self.aug_cfg(b, a)) for b in self.bases for a in augs], axis=0)

    def augmentation_claims(self) -> list[dict]:
        """Tables 3 / 5: each augmentation improves on its base (robust score, decided on its own); then, on pooled
        scores (:meth:`pooled`), text beats image augmentations, I2T beats T2T, T2I vs I2I, and cross-modal beats
        intra-modal — each run only where both groups were trained."""
        from rclip.augment import KINDS, PAPER_NAMES, TEXT_AUGMENTATIONS

        rows, k = [], len(self.aug_seeds)
        seeds_note = (f"{k} training seeds, seed s of each side paired, resampled with the images" if k > 1 else
                      "one training seed")
        for b in self.bases:
            base = self.aug_cfg(b)
            for aug in self.augmentations:
                cfg = self.aug_cfg(b, aug)
                text = aug in TEXT_AUGMENTATIONS
                rows.append(self._r1_compare(
                    f"{cfg.label()} beats {base.label()} (robust R@1)", self.robust_seeds(cfg),
                    self.robust_seeds(base),
                    (cfg.label(), base.label()), source="paper" if text else "book",
                    preconditions=self.aug_above_chance(base),
                    note="robust R@1: per image, the mean of its R@1 under Co-Attack and SGA; " + seeds_note + (
                        "" if text else f"; the paper's Table 3 shows {PAPER_NAMES[aug]} as no or a mixed gain")))
        groups = [("text augmentations beat image augmentations", ("I2T", "T2T"), ("I2I", "T2I"), "paper"),
                  ("cross-modal text augmentations beat intra-modal ones (I2T vs T2T)", ("I2T",), ("T2T",), "paper"),
                  ("cross-modal image augmentation beats intra-modal (T2I vs I2I)", ("T2I",), ("I2I",), "book"),
                  ("cross-modal augmentations beat intra-modal ones", ("I2T", "T2I"), ("T2T", "I2I"), "paper")]
        of = {k: [a for a in self.augmentations if KINDS[a] in k] for _, ka, kb, _ in groups for k in (ka, kb)}
        pre = [p for b in self.bases for p in self.aug_above_chance(self.aug_cfg(b))]
        for claim, ka, kb, src in groups:
            if of[ka] and of[kb]:
                rows.append(self._r1_compare(
                    f"{claim} (pooled robust R@1)", self.pooled(of[ka]), self.pooled(of[kb]),
                    (" + ".join(PAPER_NAMES[a] for a in of[ka]), " + ".join(PAPER_NAMES[a] for a in of[kb])),
                    source=src, preconditions=pre,
                    note="pooled: per test image, the mean robust R@1 of every base trained with each augmentation "
                         "of the group; " + seeds_note))
        return rows

    def figure3_claims(self) -> list[dict]:
        """Figure 3 (SGA, per-image R@1): more Human captions, more robustness (largest m vs m = 0); the generator
        (SD's analog) helps up to two images (m = 2 vs 0) and then degrades (m = 2 vs 4)."""
        counts, augs = list(self.p["figure3_counts"]), list(self.p["figure3_augmentations"])
        base = self.aug_cfg(self.p["figure3_base"])
        pre = [self.above_chance(base, self.aug_split)]
        sga_ = {(a, m): self.per_image(self.figure3_cfg(a, m), "sga", split=self.aug_split) for a in augs
                for m in counts}
        rows = []
        top = max(counts) if counts else 0
        if "human" in augs and 0 in counts and top > 0:
            rows.append(self._r1_compare(f"more Human captions, more robustness: m = {top} beats m = 0 (SGA)",
                                         sga_[("human", top)], sga_[("human", 0)], (f"m={top}", "m=0"),
                                         preconditions=pre, note="Figure 3b"))
        if "generator" in augs and {0, 2, 4} <= set(counts):
            rows.append(self._r1_compare("two generated images beat none: m = 2 beats m = 0 (SGA)",
                                         sga_[("generator", 2)], sga_[("generator", 0)], ("m=2", "m=0"),
                                         preconditions=pre, note="Figure 3a, SD's world analog"))
            rows.append(self._r1_compare("beyond two generated images robustness degrades: m = 2 beats m = 4 (SGA)",
                                         sga_[("generator", 2)], sga_[("generator", 4)], ("m=2", "m=4"),
                                         preconditions=pre, note="Figure 3a, SD's world analog"))
        return rows

    def claims(self) -> list[dict]:
        """Every claim of the chapter, in the order of its sections."""
        rows = self.attack_claims()
        return [*rows, *self.defense_claims(), self.gap_claim(), *self.augmentation_claims(), *self.figure3_claims(),
                *self.control_claims()]


def retrieval_study(run) -> RetrievalStudy:
    """The chapter's set-up from the notebook's resolved parameters (``run.params``).

    World scale: the CLIP named by ``model`` / ``checkpoint``, the world's retrieval test split (``n_eval`` images x
    5 true captions), ``n_train_eval`` training images with all their captions (Table 2; none where the notebook
    does not declare it or sets 0), ``n_train`` 1:1 training
    pairs of the retrieval train split, ``n_val`` images of the validation split
    (:meth:`RetrievalStudy.schedule_sweep`), and the world's reference budget (:func:`retrieval_reference_budget`).
    Paper scale: ``model`` / ``pretrained`` / ``checkpoint`` through ``inputs``, the Karpathy splits of ``dataset``
    (:func:`paper_retrieval_inputs`); the augmentations that need the world's ground truth are dropped."""
    from rclip import data, models, world
    from rclip.augment import WORLD_ONLY

    p = dict(run.params)
    n_eval, n_train, n_te = int(p["n_eval"]), int(p["n_train"]), int(p.get("n_train_eval") or 0)
    n_val = int(p.get("n_val") or 0)
    if p["scale"] == "paper":
        annotations, image_root = paper_retrieval_inputs(p["inputs"], p["dataset"])
        bundle = data.paper_model({**p["inputs"], "model": p["model"], "pretrained": p["pretrained"],
                                   "checkpoint": p["checkpoint"]}, device=run.device)

        def load(split, n):
            return data.retrieval_dataset(annotations, image_root, bundle.preprocess, split=split, limit=n)
        synonyms = None
        if "eda" in p["augmentations"]:
            from rclip.attacks import WordNetSubstitutes
            synonyms = WordNetSubstitutes().synonyms  # EDA's own synonym source; raises naming the fix if absent
        for key in ("augmentations", "figure3_augmentations"):
            if key in p:
                p[key] = [a for a in p[key] if a not in WORLD_ONLY]
        return RetrievalStudy(bundle, load("test", n_eval), load("train", n_te) if n_te else None,
                              RetrievalSetPairs(load("train", n_train), synonyms=synonyms),
                              {"annotations": annotations, "n": n_train}, p, scale="paper",
                              data=f"{p['dataset']}'s Karpathy test split ({n_eval} images x 5 captions)",
                              val=load("val", n_val) if n_val else None,
                              val_data=f"{p['dataset']}'s Karpathy val split")
    if p["scale"] != "world":
        raise RClipError(f"scale must be 'world' or 'paper', got {p['scale']!r}")
    bundle = models.load(p["model"], checkpoint=p["checkpoint"], device=run.device)
    res, seed = int(p["resolution"]), int(p["seed"])
    if bundle.image_size != res:
        raise RClipError(f"{p['model']} takes {bundle.image_size} px images; set resolution={bundle.image_size}")
    ref = retrieval_reference_budget(run)
    return RetrievalStudy(bundle, world.retrieval_set(split="test", n=n_eval, resolution=res, seed=seed),
                          world.retrieval_set(split="train", n=n_te, resolution=res, seed=seed) if n_te else None,
                          WorldRetrievalPairs(n_train, split="train", resolution=res, seed=seed),
                          {"world": "retrieval/train", "n": n_train, "resolution": res, "seed": seed}, p,
                          scale="world", data=f"the world's retrieval test split ({n_eval} images x 5 true captions)",
                          reference=ref[:2] if ref else None, reference_source=ref[2] if ref else "",
                          val=world.retrieval_set(split="val", n=n_val, resolution=res, seed=seed) if n_val else None,
                          val_data="the world's retrieval validation split")


def alignment_table(measured: dict, gains: dict):
    """Figures 1–2 in numbers: per augmentation its kind, mean alignment, mean diversity and mean robust gain, and
    the row ``Orig.`` (the 1:1 pairs' alignment). measured: :meth:`RetrievalStudy.alignment`; gains:
    :meth:`RetrievalStudy.gains`."""
    import pandas as pd

    from rclip.augment import KINDS

    df = pd.DataFrame({a: {"kind": KINDS[a], "alignment": float(m["alignment"].mean()),
                           "diversity": float(m["diversity"].mean()), "robust gain": gains.get(a, float("nan"))}
                       for a, m in measured.items()}).T
    if measured:
        original = next(iter(measured.values()))["original"]
        df.loc["Orig."] = pd.Series({"kind": "-", "alignment": float(original.mean()), "diversity": 0.0,
                                     "robust gain": 0.0})
    return df


def rank_correlations(table) -> dict[str, float]:
    """Spearman's rank correlation of the robust gain with mean alignment and with mean diversity over the
    augmentations of :func:`alignment_table` (``Orig.`` left out): a description of a handful of points, not a test.
    NaN where a column is constant or fewer than three augmentations were measured."""
    import warnings

    from scipy.stats import spearmanr

    rows = table.drop(index="Orig.", errors="ignore")
    out = {}
    for col in ("alignment", "diversity"):
        if len(rows) < 3:
            out[col] = float("nan")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[col] = float(spearmanr(rows[col].astype(float), rows["robust gain"].astype(float)).statistic)
    return out
