"""Pre-training CLIP on poisoned pairs: plain CLIP and the defenses RoCLIP and SafeCLIP (OTCCLIP's trainer is in
:mod:`rclip.methods.otcclip`), each a :class:`Trainer` run by :func:`rclip.train.fit`.

* **CLIP** — symmetric InfoNCE on the pairs as given.
* **RoCLIP** (Yang et al., NeurIPS 2023) — images and captions are augmented (random resized crop, flip,
  brightness/contrast; EDA on captions). A FIFO memory bank holds the text embeddings of past batches. Every
  ``match_every``-th epoch each image is paired with its nearest caption in the bank (queried *before* the batch's
  own captions are pushed) and the contrastive loss is computed between the images and those nearest captions
  (the bank is detached, so in these epochs only the image tower learns from the pairs); the other epochs use the
  plain loss on the augmented pairs.
* **SafeCLIP** (Yang et al., ICML 2024) — ``unimodal_epochs`` of unimodal contrastive warm-up (image ↔ augmented
  image, caption ↔ EDA caption), then ``lowlr_epochs`` of the CLIP loss at ``lowlr_scale`` × the learning rate;
  then at the start of every epoch a 2-component Gaussian mixture is fitted to the image–caption cosine similarities
  of all pairs: the first time the pairs whose posterior of the high-similarity component is ≥ ``safe_p`` are safe
  (a fraction f), afterwards the top f + ``safe_growth`` (capped at ``safe_cap``) by that posterior. Safe pairs get
  the CLIP loss, risky pairs the unimodal losses.

Every trainer's between-epoch state (memory bank, safe set, re-matched captions) lives in its ``state_dict`` and is
checkpointed with the model, so an interrupted run resumes exactly. Augmentations are drawn from generators seeded
by ``(seed, step)``. :func:`defended_clip` caches each pre-trained model by its settings.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rclip.augment import eda as augment_eda
from rclip.errors import RClipError
from rclip.train import TrainConfig, TrainHooks, _gather_with_grad, fit, init_distributed

METHODS = ("clip", "roclip", "safeclip", "otcclip")

# ----------------------------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------------------------


def augment_images(images: torch.Tensor, generator: torch.Generator, *, scale: tuple[float, float] = (0.5, 1.0),
                   flip_p: float = 0.5, jitter: float = 0.2) -> torch.Tensor:
    """Random resized crop (area fraction in ``scale``, reflection padding), horizontal flip and brightness /
    contrast jitter (factors in 1 ± ``jitter``) of [0, 1] images (B, 3, S, S), batched; no hue change or grey-scale,
    because colour is a class of the world. Randomness comes from ``generator`` (CPU)."""
    if images.ndim != 4:
        raise RClipError(f"images must have shape (B, 3, S, S); got {tuple(images.shape)}")
    b = len(images)
    u = torch.rand(b, 6, generator=generator).to(images.device, images.dtype)
    side = (scale[0] + (scale[1] - scale[0]) * u[:, 0]).sqrt()
    flip = torch.where(u[:, 3] < flip_p, -1.0, 1.0).to(images.dtype)
    theta = images.new_zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, 0, 2], theta[:, 1, 2] = (1 - side) * (2 * u[:, 1] - 1), (1 - side) * (2 * u[:, 2] - 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright = (1 + jitter * (2 * u[:, 4] - 1))[:, None, None, None]
    contrast = (1 + jitter * (2 * u[:, 5] - 1))[:, None, None, None]
    mean = out.mean((1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean).mul(bright).clamp(0, 1)


def eda(text: str, rng: np.random.Generator, *, alpha: float = 0.1) -> str:
    """One EDA edit (Wei & Zou 2019) of a caption, as RoCLIP and SafeCLIP use it: one of synonym replacement,
    insertion of a synonym, random swap or random deletion, chosen at random, touching ``alpha`` × (number of
    words) words (at least one); synonyms from the world's lexicon. The operations are :mod:`rclip.augment`'s."""
    return augment_eda(text, rng, n_aug=1, alpha=alpha)[0]


def augment_texts(texts, rng: np.random.Generator, *, alpha: float = 0.1) -> list[str]:
    """:func:`eda` of each caption."""
    return [eda(t, rng, alpha=alpha) for t in texts]


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------

def masked_contrastive(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor | None = None,
                       rank: int = 0, world: int = 1) -> torch.Tensor:
    """Symmetric InfoNCE between unit features a, b (B, D) of this rank, gathered over ranks, restricted to the
    pairs with ``keep`` (B,) True (the others are neither anchors nor negatives). Returns 0 (with a graph) when no
    pair is kept anywhere."""
    keep = torch.ones(len(a), dtype=torch.bool, device=a.device) if keep is None else keep.to(a.device)
    all_a, all_b = _gather_with_grad(a, world), _gather_with_grad(b, world)
    all_keep = _gather_with_grad(keep.float(), world).bool() if world > 1 else keep
    n = len(a)
    rows = torch.arange(n, device=a.device) + rank * n
    logits_ab = scale * a @ all_b.T
    logits_ba = scale * b @ all_a.T
    blocked = ~all_keep[None, :]
    logits_ab, logits_ba = logits_ab.masked_fill(blocked, -1e4), logits_ba.masked_fill(blocked, -1e4)
    if not keep.any():
        return 0.0 * (logits_ab.sum() + logits_ba.sum())
    loss = F.cross_entropy(logits_ab[keep], rows[keep]) + F.cross_entropy(logits_ba[keep], rows[keep])
    return 0.5 * loss


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class PretrainConfig:
    """The schedule every method shares: epochs over the corpus, global batch, AdamW with warm-up + cosine;
    num_workers: DataLoader processes reading the corpus (for corpora read from disk)."""
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    ckpt_every_epochs: int = 1
    num_workers: int = 0

    def steps_per_epoch(self, n: int) -> int:
        if n < self.batch_size:
            raise RClipError(f"the corpus has {n} pairs, fewer than one batch of {self.batch_size}")
        return n // self.batch_size

    def train_config(self, n: int) -> TrainConfig:
        """The :class:`~rclip.train.TrainConfig` for a corpus of ``n`` pairs."""
        spe = self.steps_per_epoch(n)
        return TrainConfig(steps=self.epochs * spe, batch_size=self.batch_size, lr=self.lr, min_lr=self.min_lr,
                           warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                           seed=self.seed, log_every=max(1, spe // 2), ckpt_every=max(1, self.ckpt_every_epochs * spe),
                           num_workers=self.num_workers)


@dataclass
class RoCLIPConfig:
    """RoCLIP: bank_size captions in the FIFO memory bank (the paper: 21 845 for a 1 M corpus); nearest-neighbour
    epochs are those with (epoch + 1) % match_every == 0 (the paper's break_epoch = 2); augment: RoCLIP's image
    augmentation and EDA on the captions."""
    bank_size: int = 1024
    match_every: int = 2
    augment: bool = True


@dataclass
class SafeCLIPConfig:
    """SafeCLIP's phases (the paper: 5 unimodal epochs, 1 low-lr CLIP epoch, p ≥ 0.9, +1 %/epoch to 85 %)."""
    unimodal_epochs: int = 1
    lowlr_epochs: int = 1
    lowlr_scale: float = 0.1
    safe_p: float = 0.9
    safe_growth: float = 0.01
    safe_cap: float = 0.85


# ----------------------------------------------------------------------------------------------------------------
# Trainers
# ----------------------------------------------------------------------------------------------------------------

class Trainer(TrainHooks):
    """Plain CLIP; the base of every defense. ``loss(net, batch)`` is the loss of one batch of ``corpus``
    (``index`` says which pairs), ``start_epoch(e)`` the work between epochs, ``report()`` what the run measured."""

    name = "clip"
    augment = False

    def __init__(self, bundle, corpus, schedule: PretrainConfig, rank: int = 0, world: int = 1):
        self.bundle, self.corpus, self.schedule, self.rank, self.world = bundle, corpus, schedule, rank, world
        self.steps_per_epoch = schedule.steps_per_epoch(len(corpus))
        self.step, self.epoch_done = 0, -1

    # hooks ----------------------------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        self.step = step
        epoch = step // self.steps_per_epoch
        if epoch != self.epoch_done:
            model = self.bundle.model
            was_training = model.training
            model.eval()
            try:
                self.start_epoch(epoch)
            finally:
                model.train(was_training)
            self.epoch_done = epoch

    def start_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"epoch_done": self.epoch_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_done = int(state["epoch_done"])

    def report(self) -> dict:
        return {}

    # helpers --------------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def generators(self) -> tuple[torch.Generator, np.random.Generator]:
        """This step's (torch, numpy) random generators: a pure function of (seed, step, rank)."""
        key = (self.schedule.seed * 1_000_003 + self.step) * 1009 + self.rank
        return torch.Generator().manual_seed(key), np.random.default_rng(key)

    def inputs(self, batch: dict, texts=None, augment: bool | None = None):
        """(normalised images, token ids) of a batch on the model's device, augmented when asked."""
        device = self.bundle.device
        images = batch["images"].to(device, non_blocking=True)
        texts = list(batch["texts"] if texts is None else texts)
        if self.augment if augment is None else augment:
            gen, rng = self.generators()
            images, texts = augment_images(images, gen), augment_texts(texts, rng)
        return self.bundle.normalize(images), self.bundle.tokenizer(texts).to(device, non_blocking=True)

    def loss(self, net, batch: dict) -> torch.Tensor:
        img, tok = self.inputs(batch)
        img_f, txt_f, scale = net(img, tok)[:3]
        return masked_contrastive(img_f.float(), txt_f.float(), scale.float(), None, self.rank, self.world)


class MemoryBank:
    """A FIFO bank of ``size`` unit embeddings (D,) with the index of the caption each came from."""

    def __init__(self, size: int, dim: int):
        self.size = int(size)
        self.features = torch.zeros(self.size, dim)
        self.index = torch.full((self.size,), -1, dtype=torch.long)
        self.ptr, self.count = 0, 0

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For unit queries (B, D): the most similar bank entries (B, D) and their caption indices (B,)."""
        bank = self.features[:self.count].to(queries.device, queries.dtype)
        best = (queries @ bank.T).argmax(1)
        return bank[best], self.index[:self.count][best.cpu()]

    def push(self, features: torch.Tensor, index: torch.Tensor) -> None:
        """Add (B, D) detached features (the oldest entries leave first)."""
        features, index = features.detach().float().cpu(), index.cpu()
        if len(features) > self.size:
            features, index = features[-self.size:], index[-self.size:]
        pos = (self.ptr + torch.arange(len(features))) % self.size
        self.features[pos], self.index[pos] = features, index
        self.ptr = int((self.ptr + len(features)) % self.size)
        self.count = min(self.size, self.count + len(features))

    def state_dict(self) -> dict:
        return {"features": self.features.clone(), "index": self.index.clone(), "ptr": self.ptr, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.features, self.index = state["features"].clone(), state["index"].clone()
        self.ptr, self.count = int(state["ptr"]), int(state["count"])


class RoCLIPTrainer(Trainer):
    name = "roclip"

    def __init__(self, bundle, corpus, schedule: PretrainConfig, config: RoCLIPConfig | None = None,
                 rank: int = 0, world: int = 1):
        super().__init__(bundle, corpus, schedule, rank, world)
        self.config = config or RoCLIPConfig()
        if not 1 <= self.config.bank_size <= len(corpus):
            raise RClipError(f"bank_size {self.config.bank_size} must be between 1 and the corpus size {len(corpus)}")
        if self.config.match_every < 1:
            raise RClipError(f"match_every must be >= 1 epoch; got {self.config.match_every}")
        self.augment = self.config.augment
        self.bank = MemoryBank(self.config.bank_size, int(bundle.model.text_projection.shape[1]))
        self.matches: list[dict] = []        # per matching epoch: images and the caption indices they were given

    def matching(self, epoch: int) -> bool:
        return (epoch + 1) % self.config.match_every == 0

    def loss(self, net, batch: dict) -> torch.Tensor:
        img, tok = self.inputs(batch)
        img_f, txt_f, scale = net(img, tok)[:3]
        img_f, txt_f, scale = img_f.float(), txt_f.float(), scale.float()
        index = batch["index"]
        gathered = _gather_with_grad(txt_f.detach(), self.world) if self.world > 1 else txt_f.detach()
        gathered_index = _gather_with_grad(index.to(img_f.device), self.world).cpu() if self.world > 1 else index
        if self.matching(self.epoch) and self.bank.count:
            nearest, caption = self.bank.nearest(img_f.detach())
            self._record(index, caption)
            self.bank.push(gathered, gathered_index)
            logits = scale * img_f @ nearest.T                           # the bank is detached: images learn
            rows = torch.arange(len(img_f), device=img_f.device)
            return 0.5 * (F.cross_entropy(logits, rows) + F.cross_entropy(logits.T, rows)) + 0.0 * txt_f.sum()
        self.bank.push(gathered, gathered_index)
        return masked_contrastive(img_f, txt_f, scale, None, self.rank, self.world)

    def _record(self, index: torch.Tensor, caption: torch.Tensor) -> None:
        if not self.matches or self.matches[-1]["epoch"] != self.epoch:
            self.matches.append({"epoch": self.epoch, "image": torch.zeros(0, dtype=torch.long),
                                 "caption": torch.zeros(0, dtype=torch.long)})
        rec = self.matches[-1]
        rec["image"] = torch.cat([rec["image"], index.cpu()])
        rec["caption"] = torch.cat([rec["caption"], caption.cpu()])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bank": self.bank.state_dict(), "matches": self.matches}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bank.load_state_dict(state["bank"])
        self.matches = list(state["matches"])

    def report(self) -> dict:
        """Per matching epoch: which caption (corpus index) the bank gave each image seen."""
        return {"matches": self.matches}


def fit_gmm_1d(x: torch.Tensor, iters: int = 200, tol: float = 1e-8) -> dict:
    """A 2-component Gaussian mixture on scalars x (N,) by EM, started from the lower and upper thirds.

    Returns ``means`` (2,), ``stds`` (2,), ``weights`` (2,) with component 1 the one of larger mean,
    ``posterior`` (N,) = P(component 1 | x), ``log_likelihood`` (per point, final) and ``iters``.
    """
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    if len(x) < 2 or not torch.isfinite(x).all():
        raise RClipError("the GMM needs at least two finite similarities")
    order = x.sort().values
    third = max(1, len(x) // 3)
    mu = torch.stack([order[:third].mean(), order[-third:].mean()])
    var = torch.full((2,), float(x.var()) + 1e-6, dtype=torch.float64)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    prev = -math.inf
    for it in range(1, iters + 1):
        log_p = -0.5 * ((x[:, None] - mu) ** 2 / var + torch.log(2 * math.pi * var)) + torch.log(w)
        ll = torch.logsumexp(log_p, 1)
        resp = (log_p - ll[:, None]).exp()
        nk = resp.sum(0).clamp_min(1e-12)
        w, mu = nk / len(x), (resp * x[:, None]).sum(0) / nk
        var = ((resp * (x[:, None] - mu) ** 2).sum(0) / nk).clamp_min(1e-6 * float(x.var()) + 1e-12)
        cur = float(ll.mean())
        if cur - prev < tol:
            break
        prev = cur
    log_p = -0.5 * ((x[:, None] - mu) ** 2 / var + torch.log(2 * math.pi * var)) + torch.log(w)
    ll = torch.logsumexp(log_p, 1)
    post = (log_p - ll[:, None]).exp()
    hi = int(mu.argmax())
    perm = [1 - hi, hi]
    return {"means": mu[perm], "stds": var[perm].sqrt(), "weights": w[perm], "posterior": post[:, hi],
            "log_likelihood": float(ll.mean()), "iters": it}


@torch.no_grad()
def pair_similarities(bundle, corpus, batch_size: int = 512) -> torch.Tensor:
    """Cosine similarity (N,) of every image with its own caption in ``corpus``, in eval mode."""
    out = []
    for lo in range(0, len(corpus), batch_size):
        batch = corpus.__getitems__(list(range(lo, min(len(corpus), lo + batch_size))))
        img = bundle.model.encode_image(bundle.normalize(batch["images"].to(bundle.device)), normalize=True)
        txt = bundle.model.encode_text(bundle.tokenizer(batch["texts"]).to(bundle.device), normalize=True)
        out.append((img * txt).sum(-1).float().cpu())
    return torch.cat(out)


class SafeCLIPTrainer(Trainer):
    name = "safeclip"
    augment = False

    def __init__(self, bundle, corpus, schedule: PretrainConfig, config: SafeCLIPConfig | None = None,
                 rank: int = 0, world: int = 1):
        super().__init__(bundle, corpus, schedule, rank, world)
        self.config = c = config or SafeCLIPConfig()
        if c.unimodal_epochs + c.lowlr_epochs >= schedule.epochs:
            raise RClipError(f"SafeCLIP's warm-up ({c.unimodal_epochs} unimodal + {c.lowlr_epochs} low-lr epochs) "
                             f"leaves no filtered epoch of the {schedule.epochs}; lengthen the schedule")
        if not 0 < c.safe_p < 1 or not 0 < c.safe_cap <= 1 or c.safe_growth < 0:
            raise RClipError("safe_p must be in (0, 1), safe_cap in (0, 1], safe_growth >= 0")
        self.safe = torch.ones(len(corpus), dtype=torch.bool)
        self.fraction: float | None = None
        self.splits: list[dict] = []

    def phase(self, epoch: int) -> str:
        c = self.config
        if epoch < c.unimodal_epochs:
            return "unimodal"
        return "lowlr" if epoch < c.unimodal_epochs + c.lowlr_epochs else "filtered"

    def lr_scale(self, step: int) -> float:
        return self.config.lowlr_scale if self.phase(step // self.steps_per_epoch) == "lowlr" else 1.0

    def start_epoch(self, epoch: int) -> None:
        if self.phase(epoch) != "filtered":
            return
        sims = pair_similarities(self.bundle, self.corpus)
        gmm = fit_gmm_1d(sims)
        post = gmm["posterior"]
        if self.fraction is None:                  # the first split: p >= safe_p
            safe = post >= self.config.safe_p
            self.fraction = float(safe.double().mean())
        else:
            self.fraction = min(self.fraction + self.config.safe_growth, self.config.safe_cap)
            keep = round(self.fraction * len(post))
            safe = torch.zeros(len(post), dtype=torch.bool)
            safe[post.argsort(descending=True, stable=True)[:keep]] = True
        self.safe = safe
        poisoned = getattr(self.corpus, "poisoned", None)
        self.splits.append({"epoch": epoch, "fraction": float(safe.double().mean()),
                            "means": gmm["means"].tolist(), "stds": gmm["stds"].tolist(),
                            "poisoned_safe": int((safe & poisoned).sum()) if poisoned is not None else -1,
                            "poisoned": int(poisoned.sum()) if poisoned is not None else -1})

    def loss(self, net, batch: dict) -> torch.Tensor:
        phase = self.phase(self.epoch)
        if phase == "lowlr":
            return super().loss(net, batch)
        img, tok = self.inputs(batch, augment=False)
        img_aug, tok_aug = self.inputs(batch, augment=True)
        b = len(img)
        feats = net(torch.cat([img, img_aug]), torch.cat([tok, tok_aug]))
        img_f, txt_f, scale = (t.float() for t in feats[:3])
        safe = torch.zeros(b, dtype=torch.bool) if phase == "unimodal" else self.safe[batch["index"]]
        safe = safe.to(img_f.device)
        risky = ~safe
        unimodal = masked_contrastive(img_f[:b], img_f[b:], scale, risky, self.rank, self.world) + \
            masked_contrastive(txt_f[:b], txt_f[b:], scale, risky, self.rank, self.world)
        clip = masked_contrastive(img_f[:b], txt_f[:b], scale, safe, self.rank, self.world)
        share = safe.float().mean()
        return share * clip + (1 - share) * 0.5 * unimodal

    def state_dict(self) -> dict:
        return {**super().state_dict(), "safe": self.safe.clone(), "fraction": self.fraction, "splits": self.splits}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.safe, self.fraction, self.splits = state["safe"].clone(), state["fraction"], list(state["splits"])

    def report(self) -> dict:
        return {"splits": self.splits}


# ----------------------------------------------------------------------------------------------------------------
# Running and caching
# ----------------------------------------------------------------------------------------------------------------

def make_trainer(method: str, bundle, corpus, schedule: PretrainConfig, config=None, rank: int = 0, world: int = 1
                 ) -> Trainer:
    """The trainer of ``method`` (``"clip"``, ``"roclip"``, ``"safeclip"`` or ``"otcclip"``) with its config."""
    if method == "clip":
        return Trainer(bundle, corpus, schedule, rank, world)
    if method == "roclip":
        return RoCLIPTrainer(bundle, corpus, schedule, config, rank, world)
    if method == "safeclip":
        return SafeCLIPTrainer(bundle, corpus, schedule, config, rank, world)
    if method == "otcclip":
        from rclip.methods.otcclip import OTCCLIPTrainer

        return OTCCLIPTrainer(bundle, corpus, schedule, config, rank, world)
    raise RClipError(f"unknown pre-training method {method!r}; choose one of {', '.join(METHODS)}")


def pretrain_defense(bundle, corpus, method: str, schedule: PretrainConfig, config=None, *, out_dir: str | Path,
                     progress: bool = True) -> tuple[dict, dict]:
    """Pre-train ``bundle.model`` in place on ``corpus`` with ``method``; resumes from ``out_dir``.
    Returns (fit's training log, the trainer's report)."""
    rank, world = init_distributed()
    trainer = make_trainer(method, bundle, corpus, schedule, config, rank, world)
    module = getattr(trainer, "module", None)
    log = fit(bundle, corpus, schedule.train_config(len(corpus)), out_dir, trainer.loss, module=module,
              hooks=trainer, progress=progress, desc=method)
    return log, trainer.report()


def defended_clip(model: str, corpus, corpus_key: dict, method: str, schedule: PretrainConfig, config=None, *,
                  device="cpu", progress: bool = True):
    """A CLIP pre-trained from scratch (``models.load(model)``, initialised from ``schedule.seed``) on ``corpus``
    with ``method``, cached under ``$RCLIP_CACHE/poison_defenses`` by all the settings and ``corpus_key``; an
    interrupted run resumes. Returns ``(bundle, log, report)``."""
    from rclip import models
    from rclip.cache import artefact_path, write_json

    settings = {k: v for k, v in asdict(schedule).items() if k != "num_workers"}    # workers do not change results
    key = {"model": model, "corpus": corpus_key, "method": method, "schedule": settings,
           "config": asdict(config) if config is not None else None, "device": torch.device(device).type}
    path = artefact_path("poison_defenses", key, ".safetensors")
    log_path, report_path = path.with_suffix(".log.json"), path.with_suffix(".report.pt")
    if path.is_file() and log_path.is_file() and report_path.is_file():
        bundle = models.load(None, checkpoint=path, device=device)
        return bundle, json.loads(log_path.read_text()), torch.load(report_path, weights_only=True)
    torch.manual_seed(schedule.seed)
    bundle = models.load(model, device=device)
    log, report = pretrain_defense(bundle, corpus, method, schedule, config, out_dir=path.with_suffix(".run"),
                                   progress=progress)
    if log.get("stopped_early"):
        raise RClipError(f"{method} pre-training stopped early at step {log['last_step']}; run again to resume")
    bundle.model.eval().requires_grad_(False)
    from rclip.cache import atomic_path

    with atomic_path(report_path) as tmp:
        torch.save(report, tmp)
    write_json(log_path, log)
    models.save(bundle, path, extra={"pretrained_with": method})
    return models.load(None, checkpoint=path, device=device), json.loads(log_path.read_text()), \
        torch.load(report_path, weights_only=True)


__all__ = ["METHODS", "augment_images", "eda", "augment_texts", "masked_contrastive", "PretrainConfig",
           "RoCLIPConfig", "SafeCLIPConfig", "Trainer", "MemoryBank", "RoCLIPTrainer", "fit_gmm_1d",
           "pair_similarities", "SafeCLIPTrainer", "make_trainer", "pretrain_defense", "defended_clip"]
