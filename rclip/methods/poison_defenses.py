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

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rclip.errors import RClipError
from rclip.methods.otcclip import OTCCLIPTrainer
from rclip.methods.pretraining import (PretrainConfig, Trainer, augment_images, augment_texts, eda,
                                       masked_contrastive)
from rclip.train import fit, init_distributed

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

DEFENSES: dict[str, type[Trainer]] = {"clip": Trainer, "roclip": RoCLIPTrainer, "safeclip": SafeCLIPTrainer,
                                      "otcclip": OTCCLIPTrainer}
METHODS = tuple(DEFENSES)


def make_trainer(method: str, bundle, corpus, schedule: PretrainConfig, config=None, rank: int = 0, world: int = 1
                 ) -> Trainer:
    """The trainer of ``method`` (a key of :data:`DEFENSES`) with its config (none for plain CLIP)."""
    if method not in DEFENSES:
        raise RClipError(f"unknown pre-training method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "clip":
        return Trainer(bundle, corpus, schedule, rank, world)
    return DEFENSES[method](bundle, corpus, schedule, config, rank, world)


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
    from rclip.train import train_cached

    def train(run_dir):
        torch.manual_seed(schedule.seed)
        bundle = models.load(model, device=device)
        log, report = pretrain_defense(bundle, corpus, method, schedule, config, out_dir=run_dir, progress=progress)
        return bundle, log, report

    key = {"model": model, "corpus": corpus_key, "method": method, "schedule": schedule, "config": config,
           "device": torch.device(device).type}   # a from-scratch pre-training: the device changes the numbers
    return train_cached("poison_defenses", key, train, device=device)


__all__ = ["METHODS", "DEFENSES", "augment_images", "eda", "augment_texts", "masked_contrastive", "PretrainConfig",
           "RoCLIPConfig", "SafeCLIPConfig", "Trainer", "MemoryBank", "RoCLIPTrainer", "fit_gmm_1d",
           "pair_similarities", "SafeCLIPTrainer", "make_trainer", "pretrain_defense", "defended_clip"]
