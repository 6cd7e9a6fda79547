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

The last section is chapter 4's experiment, so that its notebook only orchestrates and plots: the poisoned corpus
and test tasks (:func:`poison_setup`), the six regimes (:func:`chapter_regimes`, :func:`train_regimes`), their
per-item scores (:func:`evaluate_regimes` -> :class:`Evaluation`: zero-shot and linear probe per test image, attack
success per attacked item, counted only above chance), re-matching scored per image against the world's ground
truth (:func:`rematch_events`, :func:`weight_sweep`, :func:`roclip_matches`) and the claims built from them
(:meth:`Evaluation.asr_claim`, :func:`rematch_claim`) by :mod:`rclip.claims`.
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


def initial_clip(model: str, seed: int, *, device="cpu"):
    """The CLIP every regime starts from: ``models.load(model)`` after seeding torch with ``seed`` — random weights
    for an architecture (pre-training from scratch), the shipped weights for ``"world"`` (continued pre-training)."""
    from rclip import models

    torch.manual_seed(seed)
    return models.load(model, device=device)


def defended_clip(model: str, corpus, corpus_key: dict, method: str, schedule: PretrainConfig, config=None, *,
                  device="cpu", progress: bool = True):
    """A CLIP pre-trained on ``corpus`` with ``method`` from :func:`initial_clip` (``model``, ``schedule.seed``):
    from scratch, or further from the shipped world CLIP when ``model`` is ``"world"``; cached under
    ``$RCLIP_CACHE/poison_defenses`` by all the settings and ``corpus_key``; an interrupted run resumes. Returns
    ``(bundle, log, report)``."""
    from rclip.train import train_cached

    def train(run_dir):
        bundle = initial_clip(model, schedule.seed, device=device)
        log, report = pretrain_defense(bundle, corpus, method, schedule, config, out_dir=run_dir, progress=progress)
        return bundle, log, report

    key = {"model": model, "corpus": corpus_key, "method": method, "schedule": schedule, "config": config,
           "device": torch.device(device).type}   # a pre-training: the device changes the numbers
    if model == "world":                          # continued from the shipped file: a retrained one is another start
        from rclip.models import WORLD_CLIP_DIR

        key["start_sha256"] = (WORLD_CLIP_DIR / "SHA256SUMS").read_text().split()[0]
    return train_cached("poison_defenses", key, train, device=device)


# ----------------------------------------------------------------------------------------------------------------
# The chapter's experiment (notebook 04_otcclip): the poisoned corpus, the regimes, their per-item scores, the claims
# ----------------------------------------------------------------------------------------------------------------

#: The pre-training regimes of the chapter: the four the paper compares, then the two halves of OTCCLIP.
REGIMES = ("CLIP", "RoCLIP", "SafeCLIP", "OTCCLIP", "OT matching only", "OT losses only")
#: The regimes of the main comparison (the ablation adds the two halves).
COMPARED = REGIMES[:4]
ABLATION = ("CLIP", "OT matching only", "OT losses only", "OTCCLIP")


def attack_configs(p: dict):
    """The attacks of the chapter from its parameters ``p`` (``seed``, ``attack_task``, ``patch_sizes``,
    ``patch_targets``, ``backdoor_rate``, ``blend_alpha``, ``blend_target``, ``n_targets``,
    ``captions_per_target``): BadNets patches, one blended backdoor and targeted poisoning, each with its own seed.
    Returns ``(backdoor configs, targeted config)``."""
    from rclip.attacks.poison import BackdoorConfig, TargetedPoisonConfig, Trigger

    seed, task = int(p["seed"]), p["attack_task"]
    if len(p["patch_sizes"]) != len(p["patch_targets"]):
        raise RClipError(f"patch_sizes {p['patch_sizes']} and patch_targets {p['patch_targets']} must pair up")
    backdoors = [BackdoorConfig(trigger=Trigger("patch", patch_size=side, seed=seed + 1 + i), task=task,
                                target_label=target, poison_rate=p["backdoor_rate"], seed=seed + 1 + i)
                 for i, (side, target) in enumerate(zip(p["patch_sizes"], p["patch_targets"]))]
    backdoors.append(BackdoorConfig(trigger=Trigger("blend", alpha=p["blend_alpha"], seed=seed + 11), task=task,
                                    target_label=p["blend_target"], poison_rate=p["backdoor_rate"], seed=seed + 11))
    targeted = TargetedPoisonConfig(task=task, n_targets=p["n_targets"], captions_per_target=p["captions_per_target"],
                                    seed=seed + 21)
    return backdoors, targeted


@dataclass
class PoisonSetup:
    """What the chapter pre-trains on and evaluates with, and how it says so.

    pairs: the corpus the pre-trainings read (world: the rendered :class:`~rclip.data.pairs.PairCorpus`; paper: the
    :class:`~rclip.attacks.poison.PoisonedCorpus`), with ``texts`` and ``poisoned``. attacked: the poisoned corpus
    with its attack layers (what :func:`~rclip.attacks.poison.threat_items` measures). truth: the world's
    :class:`~rclip.attacks.poison.GroundTruth` (None at paper scale). tasks: name -> test zero-shot task (the
    attacked task among them). preprocess: PIL -> [0, 1] tensor (paper scale; None at world scale).
    """
    scale: str
    model: str
    resolution: int
    pairs: object
    attacked: object
    truth: object
    tasks: dict
    attack_task: str
    corpus_key: dict
    corpus_text: str
    backdoors: list
    targeted: object
    epochs: int
    preprocess: object = None
    continued: bool = False
    seed: int = 0

    @property
    def poison_rates(self) -> dict:
        """Poisoned pairs per attack, and all of them, as a percentage of the corpus pairs (what the papers call
        the poison rate): ``{attack name: %, "all attacks": %}``, attack names as
        :func:`~rclip.attacks.poison.attack_names` gives them."""
        from rclip.attacks.poison import poison_counts

        n = len(self.pairs)
        rates = {name: 100.0 * count / n for name, count in poison_counts(self.attacked).items()}
        rates["all attacks"] = 100.0 * self.n_poison / n
        return rates

    def regime_preconditions(self, attacks, *, max_rate: float = 1.0, max_backdoor_rate: float = 0.5,
                             min_targets: int = 50) -> list:
        """The regime a claim on ``attacks`` needs, as preconditions: the papers' poison rates — every poisoned pair
        of the corpus at most ``max_rate`` % of it, each backdoor's pairs at most ``max_backdoor_rate`` % — and the
        book's statistical bar for targeted poisoning, at least ``min_targets`` targets (one target then moves the
        ASR by at most 2 points; RoCLIP and SafeCLIP report 16)."""
        from rclip.claims import Precondition

        rates = self.poison_rates
        pre = [Precondition.at_most("poisoned pairs, all attacks (% of the corpus)", rates["all attacks"], max_rate)]
        for a in attacks:
            if a == "targeted":
                pre.append(Precondition.at_least("targets of targeted poisoning", self.targeted.n_targets,
                                                 min_targets))
            elif a in rates:
                pre.append(Precondition.at_most(f"{a} poisoned pairs (% of the corpus)", rates[a], max_backdoor_rate))
        return pre

    @property
    def n_poison(self) -> int:
        return int(self.pairs.poisoned.sum())

    @property
    def label(self) -> str:
        return f"{self.scale} scale"

    @property
    def model_text(self) -> str:
        if self.continued:
            return (f"the shipped world CLIP ({self.resolution} px) pre-trained further for {self.epochs} epochs on a "
                    f"new crawl")
        return f"{self.model} ({self.resolution} px) pre-trained from scratch for {self.epochs} epochs"

    def sentence(self) -> str:
        return (f"{self.label}, {self.model_text} on {self.corpus_text}, plus {self.n_poison} poisoned pairs "
                f"({100 * self.n_poison / len(self.pairs):.1f} % of {len(self.pairs)})")

    def attack_text(self) -> str:
        """The attacks in a few words: ``"on colour: targeted (8 targets × 25 captions); patch 3 px → ..."``."""
        t = self.targeted
        parts = [f"targeted ({t.n_targets} targets × {t.captions_per_target} captions)"]
        for b in self.backdoors:
            trig = b.trigger
            what = f"patch {trig.side(self.resolution)} px" if trig.kind == "patch" else f"blend α {trig.alpha:g}"
            parts.append(f"{what} → class {b.target_label} on {100 * b.poison_rate:g} % of the pairs")
        return f"on {self.attack_task}: " + "; ".join(parts)

    def caption(self, what: str, *, n: str, attack: bool = True) -> str:
        """A table's caption line: what it shows, then scale, model, data, n and the attacks."""
        parts = [what, self.label, f"model {self.model_text}",
                 f"data {self.corpus_text} + {self.n_poison} poisoned pairs", f"n = {n}"]
        if attack:
            parts.append(f"attacks {self.attack_text()}")
        return " · ".join(parts)

    def scope(self) -> str:
        """What this scale can show (a paragraph of the chapter)."""
        if self.scale == "paper":
            return ("The paper's own setting: a CLIP pre-trained from scratch on a web corpus under each defense, "
                    "measured on real zero-shot sets; re-matching precision cannot be scored (no ground truth), only "
                    "how much poison it breaks.")
        if self.continued:
            return ("The fine-tuning threat that RoCLIP and SafeCLIP also evaluate: a competent CLIP (the shipped world "
                    "CLIP, which knows colour, texture and count and mostly shape) is pre-trained further on a new "
                    "crawl that carries the attacks, under each defense. Because the victim starts competent, an "
                    "attack's success is not confounded with a model that never learned the task, and the candidate "
                    "pools hold true captions, so re-matching precision can be compared. It cannot show what happens "
                    "when the poison is present from the first step of pre-training from scratch (profile gpu).")
        if self.resolution < 64:
            return ("Whether the calibrated attacks poison an undefended pre-training, whether each defense removes "
                    "them and at what cost in accuracy, and how precise re-matching is for a CLIP this small, all on "
                    "attributes a 32-px model learns in a minute (colour, texture). It cannot show shape-based "
                    "accuracy, nor the accuracy gains the paper reports, which need a model that retrieves true "
                    "captions well; the profile gpu (64 px, the full world) is where those are meant to be read.")
        return ("The full world at 64 px, where a CLIP learns shape as well as colour and retrieves captions well, so "
                "re-matching precision and the defenses' accuracy costs can be compared as the paper compares them.")


def poison_setup(p: dict) -> PoisonSetup:
    """The poisoned corpus and test tasks of the chapter from its parameters ``p`` (``run.params``).

    World scale: a focused or full world corpus of ``n_pairs`` pairs carrying every attack of
    :func:`attack_configs` on disjoint pairs, rendered once and cached, with its ground truth; test tasks ``tasks``
    (the attacked task added if missing). Paper scale: the CC3M-style corpus of ``inputs.datasets.cc3m`` under the
    same attacks on the first zero-shot set of ``inputs`` (its test images are the targets), ``inputs.model``
    pre-trained from scratch; no ground truth.
    """
    from rclip import data, models, world
    from rclip.attacks.poison import GroundTruth, PoisonedCorpus, backdoor_poison, targeted_poison
    from rclip.data.pairs import FocusedWorldPairs, cached_corpus, read_pairs

    backdoors, targeted = attack_configs(p)
    ks = p.get("pool_ks")
    if ks is not None and (not isinstance(ks, (list, tuple)) or not ks
                           or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks)):
        raise RClipError(f"pool_ks must be a non-empty list of pool sizes >= 1 (e.g. [4, 8, 16]); got {ks!r}")
    seed, n_test = int(p["seed"]), int(p["n_test"])
    if p["scale"] == "paper":
        inputs = p["inputs"] or {}
        cc3m = (inputs.get("datasets") or {}).get("cc3m") or {}
        if not inputs.get("model"):
            raise RClipError("inputs.model is not set: name the open_clip architecture to pre-train (e.g. ViT-B-32)")
        blank = models.load(inputs["model"])              # random weights: only its preprocessing is used here
        base = read_pairs(cc3m.get("captions"), cc3m.get("images"), blank.preprocess, limit=p["paper_limit"])
        tasks = data.paper_tasks(inputs, blank.preprocess, n=n_test)
        attack_task = next(iter(tasks))
        poisoned = PoisonedCorpus(base, tasks[attack_task], backdoors=backdoors, targeted=targeted)
        key = {"captions": str(cc3m.get("captions")), "images": str(cc3m.get("images")), "n": len(base),
               "attack_set": attack_task, "attacks": [repr(a) for a in backdoors] + [repr(targeted)]}
        return PoisonSetup("paper", inputs["model"], blank.image_size, poisoned, poisoned, None, tasks, attack_task,
                           key, f"{len(base)} pairs of {cc3m.get('captions')}", backdoors, targeted, p["epochs"],
                           blank.preprocess, seed=seed)
    if p["scale"] != "world":
        raise RClipError(f"scale must be 'world' or 'paper', got {p['scale']!r}")
    n, res, mentions = int(p["n_pairs"]), int(p["resolution"]), list(p["focused_mentions"])
    continued = p["model"] == "world"
    if continued:
        from rclip.world_clip import DEFAULTS

        if res != DEFAULTS["resolution"]:
            raise RClipError(f"model 'world' continues the shipped world CLIP, which reads {DEFAULTS['resolution']}-px "
                             f"images; set resolution: {DEFAULTS['resolution']} (got {res}), or name an architecture "
                             "(e.g. rclip-tiny) to pre-train from scratch")
        seed = seed + 1        # a new crawl: the shipped CLIP was pre-trained on the world's stream of seed 0
    if p["corpus"] == "focused":
        base = FocusedWorldPairs(n, resolution=res, seed=seed, mentions=tuple(mentions), size=1)
        text = f"{n} world pairs of one large object each, captions stating its {' and/or '.join(mentions)}"
    elif p["corpus"] == "full":
        base = world.WorldPairs(n, resolution=res, seed=seed)
        text = f"{n} world pairs (the full world: 1-4 objects, distractors, every caption style)"
    else:
        raise RClipError(f"corpus must be 'focused' or 'full', got {p['corpus']!r}")
    poisoned = base
    for cfg in backdoors:
        poisoned = backdoor_poison(poisoned, cfg)
    poisoned = targeted_poison(poisoned, targeted)
    key = {"corpus": p["corpus"], "n": n, "resolution": res, "seed": seed,
           "mentions": mentions if p["corpus"] == "focused" else None,
           "attacks": [repr(a) for a in backdoors] + [repr(targeted)]}
    names = list(dict.fromkeys([*p["tasks"], p["attack_task"]]))
    tasks = {t: world.zeroshot_task(t, split="test", n=n_test, resolution=res, seed=seed) for t in names}
    # (the crawl's seed throughout: the targets and the backdoor test images are drawn from these same test streams)
    return PoisonSetup("world", p["model"], res, cached_corpus(poisoned, key), poisoned, GroundTruth(poisoned), tasks,
                       p["attack_task"], key, text, backdoors, targeted, p["epochs"], continued=continued, seed=seed)


def example_pairs(setup: PoisonSetup, n_clean: int = 4) -> tuple[torch.Tensor, list[str]]:
    """One pair of each attack (its first poisoned pair) and the first ``n_clean`` clean pairs of the corpus, for a
    figure: images (B, 3, S, S) in [0, 1] and titles ``"[kind] caption"``."""
    picks, titles = [], []
    for layer in setup.attacked.layers():
        idx = int(layer.own.nonzero()[0])
        kind = "targeted" if layer.kind == "targeted" else layer.trigger.kind
        picks.append(idx)
        titles.append(f"[{kind}] {setup.pairs.texts[idx]}")
    clean = [int(i) for i in (~setup.pairs.poisoned).nonzero()[:n_clean, 0]]
    titles += [f"[clean] {setup.pairs.texts[i]}" for i in clean]
    return setup.pairs.images(picks + clean), titles


def chapter_schedule(p: dict) -> PretrainConfig:
    """The one schedule every regime of the chapter shares (parameters ``epochs``, ``batch_size``, ``lr``,
    ``warmup_steps``, ``seed``, ``num_workers``)."""
    return PretrainConfig(epochs=p["epochs"], batch_size=p["batch_size"], lr=p["lr"], warmup_steps=p["warmup_steps"],
                          seed=p["seed"], num_workers=p["num_workers"])


#: RoCLIP's memory bank relative to its corpus: 21 845 captions for its 1 M-pair CC3M subset.
ROCLIP_BANK_PER_PAIR = 21_845 / 1_000_000


def roclip_bank_size(bank: int | None, n_corpus: int | None) -> int:
    """RoCLIP's memory-bank size: ``bank`` if given, else the paper's size relative to a corpus of ``n_corpus``
    pairs (:data:`ROCLIP_BANK_PER_PAIR`, at least 1)."""
    if bank is not None:
        if int(bank) < 1:
            raise RClipError(f"roclip_bank must be >= 1 (or None for the paper's size relative to the corpus); "
                             f"got {bank}")
        return int(bank)
    if n_corpus is None:
        raise RClipError("roclip_bank is None (the paper's size relative to the corpus) but the corpus size is "
                         "unknown: pass n_corpus")
    return max(1, round(ROCLIP_BANK_PER_PAIR * int(n_corpus)))


def chapter_regimes(p: dict, n_corpus: int | None = None) -> dict[str, tuple[str, object]]:
    """The chapter's six regimes, name -> (method, config): CLIP, RoCLIP, SafeCLIP, OTCCLIP, and OTCCLIP without
    its OT objectives ("OT matching only") or without applying its re-matching ("OT losses only"; the matching is
    still computed and recorded).

    From the parameters ``roclip_bank`` (None: the paper's bank relative to a corpus of ``n_corpus`` pairs,
    :func:`roclip_bank_size`), ``safeclip_unimodal_epochs``, ``safeclip_lowlr_scale``,
    ``safeclip_growth``, ``otc_every``, ``otc_k``, ``otc_inter``, ``otc_intra`` (both intra-modality terms),
    ``otc_negatives`` and ``otc_ot_iters``; the rest are the configs' defaults, the papers' settings: RoCLIP's
    break_epoch 2, SafeCLIP's one low-lr epoch, p ≥ 0.9 and 85 % cap, OTCCLIP's first re-matching at epoch 1, the
    re-matched pairs trained on in that epoch only (RoCLIP's schedule), the pure OT distance (global weight 0,
    50 Sinkhorn iterations) for re-matching and τ = 0.1 for the OT contrastive terms."""
    from rclip.methods import otcclip as otc

    align = otc.AlignmentConfig(inter_weight=p["otc_inter"], image_intra_weight=p["otc_intra"],
                                text_intra_weight=p["otc_intra"], negatives=p["otc_negatives"],
                                ot=otc.OTConfig(max_iter=p["otc_ot_iters"], tol=1e-4))
    matching = otc.RematchConfig(k=p["otc_k"], ot=otc.OTConfig(max_iter=50, tol=1e-4))
    no_align = otc.AlignmentConfig(inter_weight=0.0, image_intra_weight=0.0, text_intra_weight=0.0)

    def otc_config(rematch=True, align=align):
        return otc.OTCCLIPConfig(rematch=rematch, rematch_every=p["otc_every"], matching=matching, align=align)

    return {
        "CLIP": ("clip", None),
        "RoCLIP": ("roclip", RoCLIPConfig(bank_size=roclip_bank_size(p["roclip_bank"], n_corpus))),
        "SafeCLIP": ("safeclip", SafeCLIPConfig(unimodal_epochs=p["safeclip_unimodal_epochs"],
                                                lowlr_scale=p["safeclip_lowlr_scale"],
                                                safe_growth=p["safeclip_growth"])),
        "OTCCLIP": ("otcclip", otc_config()),
        "OT matching only": ("otcclip", otc_config(align=no_align)),
        "OT losses only": ("otcclip", otc_config(rematch=False)),
    }


def train_regimes(setup: PoisonSetup, p: dict, *, device="cpu", progress: bool = False
                  ) -> tuple[dict, dict, dict]:
    """Pre-train every regime of :func:`chapter_regimes` on ``setup.pairs`` with :func:`chapter_schedule` (cached
    by :func:`defended_clip`). Returns ``({name: bundle}, {name: training log}, {name: trainer report})``."""
    trained, logs, reports = {}, {}, {}
    for name, (method, cfg) in chapter_regimes(p, len(setup.pairs)).items():
        trained[name], logs[name], reports[name] = defended_clip(setup.model, setup.pairs, setup.corpus_key, method,
                                                                 chapter_schedule(p), cfg, device=device,
                                                                 progress=progress)
    return trained, logs, reports


def probe_sets(setup: PoisonSetup, p: dict) -> dict:
    """Linear-probe splits per test task: ``{task: ((x, y) train, (x, y) val, (x, y) test)}`` — world: the
    task's train (``n_probe``), val (``n_probe // 2``) and test images; paper: the set's train split halved into
    train and validation, and the test images of ``setup.tasks``."""
    from rclip import data, world

    n = int(p["n_probe"])
    if setup.scale == "world":
        return {t: tuple(world.zeroshot_task(t, split=s, n=m, resolution=setup.resolution, seed=setup.seed).tensors()
                         for s, m in (("train", n), ("val", n // 2))) + (task.tensors(),)
                for t, task in setup.tasks.items()}
    train = data.paper_tasks(p["inputs"], setup.preprocess, names=list(setup.tasks), n=n + n // 2, split="train")
    out = {}
    for t, task in setup.tasks.items():
        x, y = train[t].tensors()
        out[t] = ((x[:n], y[:n]), (x[n:], y[n:]), task.tensors())
    return out


def _concat(parts) -> np.ndarray:
    return np.concatenate([np.asarray(x, dtype=float) for x in parts])


@dataclass
class Evaluation:
    """Per-item scores of the pre-trained regimes: zero-shot correctness (condition ``"clean"``) and linear-probe
    correctness (condition ``"linear probe"``) as :class:`~rclip.robustness.Scores`, and every attack's per-item
    outcome (:func:`~rclip.attacks.poison.threat_items`) per model. An ASR is *counted* for a model only where its
    clean zero-shot top-1 on the attacked task is above chance (:func:`rclip.claims.above_chance`): a model that
    learned nothing has no attack success to claim."""
    zeroshot: object
    probe: object
    threats: dict

    @property
    def attacks(self) -> list[str]:
        return list(next(iter(self.threats.values())))

    def chance_test(self, model: str, task: str) -> dict:
        """{accuracy, ci_low, chance, above} of ``model``'s clean zero-shot top-1 on ``task`` (points)."""
        from rclip.claims import above_chance

        return above_chance(self.zeroshot.data[(model, task, "clean")], self.zeroshot.classes[task])

    def asr_items(self, model: str, attack: str) -> np.ndarray:
        """0/100 per attacked item (target image or triggered test image): did the attack succeed on it?"""
        return 100.0 * self.threats[model][attack]["hit"].numpy().astype(float)

    def rates(self) -> dict:
        """Every attack's raw rates per model, counted or not: ``{model: {attack: {task, target, asr, base_rate, n}}}``
        (points), as :func:`~rclip.attacks.poison.threat_report` gives them."""
        return {m: {a: {"task": t["task"], "target": t["target"], "asr": float(t["hit"].float().mean() * 100),
                        "base_rate": float(t["base"].float().mean() * 100), "n": len(t["hit"])}
                    for a, t in row.items()} for m, row in self.threats.items()}

    def asr_table(self, models=None) -> "pd.DataFrame":
        """Per model and attack: ASR (%) — blank where the model is at chance on the attacked task (not counted) —,
        the base rate (%) of the same items without the attack's effect, n, and the model's clean top-1 on the
        attacked task beside its chance level."""
        import pandas as pd

        rows = {}
        for m in models or list(self.threats):
            for a, t in self.threats[m].items():
                c = self.chance_test(m, t["task"])
                asr = float(t["hit"].float().mean() * 100)
                rows[(m, a)] = {"ASR (%)": asr if c["above"] else float("nan"),
                                "base rate (%)": float(t["base"].float().mean() * 100), "n": len(t["hit"]),
                                "clean top-1 on the attacked task (%)": c["accuracy"], "chance (%)": c["chance"],
                                "above chance": c["above"]}
        df = pd.DataFrame(rows).T
        df.index.names = ["model", "attack"]
        return df.astype({"ASR (%)": float, "base rate (%)": float, "n": int, "chance (%)": float,
                          "clean top-1 on the attacked task (%)": float, "above chance": bool})

    def summary(self, models) -> "pd.DataFrame":
        """One row per model: the counted ASR of each attack, mean zero-shot and linear-probe top-1 over the
        tasks on which the model is above chance (the tasks left out named)."""
        import pandas as pd

        asr = self.asr_table(models)["ASR (%)"].unstack("attack").reindex(index=list(models), columns=self.attacks)
        asr.columns = [f"ASR (%) {a}" for a in asr.columns]
        zs, lp = self.zeroshot.means().loc[list(models)], self.probe.means().loc[list(models)]
        return pd.concat([asr, zs["clean"].rename("zero-shot (%)"), lp["linear probe"].rename("linear probe (%)"),
                          zs["left out (at chance)"].rename("zero-shot: left out (at chance)"),
                          lp["left out (at chance)"].rename("linear probe: left out (at chance)")], axis=1)

    def knows(self, model: str, tasks=None) -> list:
        """Preconditions that ``model`` is above chance on each of ``tasks`` (default: every attacked task): the
        Wilson lower end of its clean zero-shot top-1 above 1/K."""
        from rclip.claims import Precondition

        tasks = dict.fromkeys(tasks or [t["task"] for row in self.threats.values() for t in row.values()])
        return [Precondition.above(f"{model}'s clean top-1 on {t}, 95 % lower end (%)", c["ci_low"], c["chance"])
                for t in tasks for c in [self.chance_test(model, t)]]

    def victim_preconditions(self, victim: str = "CLIP", min_clean: float = 80.0) -> list:
        """What a defence comparison needs of the undefended model: its clean top-1 on each attacked task at least
        ``min_clean`` percent (a victim that has not learned the task cannot show what a defence protects)."""
        from rclip.claims import Precondition

        tasks = dict.fromkeys(t["task"] for t in self.threats[victim].values())
        return [Precondition.at_least(f"{victim}'s clean top-1 on {t} (%)", self.chance_test(victim, t)["accuracy"],
                                      min_clean) for t in tasks]

    def asr_claim(self, claim: str, lower: str, higher: str, attacks, *, victim: str = "CLIP",
                  min_asr: float = 50.0, min_clean: float = 80.0, source: str = "paper", note: str = "",
                  preconditions=()) -> dict:
        """The claim that ``lower`` has a lower attack success than ``higher`` on ``attacks``, item by item (the
        attacks' items concatenated). Preconditions: the undefended ``victim`` is poisoned (its lowest ASR over
        ``attacks`` at least ``min_asr`` %); ``victim``, ``lower`` and ``higher`` above chance on every attacked
        task (the Wilson lower end of the clean top-1 above 1/K: an ASR of 0 from a model that learned nothing
        counts for nothing); :meth:`victim_preconditions`; and ``preconditions`` (e.g. the papers' poison regime,
        :meth:`PoisonSetup.regime_preconditions`)."""
        from rclip.claims import Precondition, compare

        attacks = list(attacks)
        lowest = min(float(self.threats[victim][a]["hit"].float().mean() * 100) for a in attacks)
        pre = [Precondition.at_least(f"{victim}'s ASR, lowest over {', '.join(attacks)} (%)", lowest, min_asr)]
        for m in dict.fromkeys([victim, higher, lower]):
            pre += self.knows(m, [self.threats[victim][a]["task"] for a in attacks])
        pre += self.victim_preconditions(victim, min_clean) + list(preconditions)
        items = ("target images" if attacks == ["targeted"] else "triggered images"
                 if "targeted" not in attacks else "attacked items")
        return compare(claim, _concat(self.asr_items(higher, a) for a in attacks),
                       _concat(self.asr_items(lower, a) for a in attacks), metric="attack success (%)",
                       source=source, labels=(f"{higher} ASR", f"{lower} ASR"), items=items, preconditions=pre,
                       note=note)


def evaluate_regimes(trained: dict, setup: PoisonSetup, probes: dict, n_test: int) -> Evaluation:
    """Zero-shot (each task's templates) and linear-probe correctness per test image (``probes``: from
    :func:`probe_sets`), and every attack's outcome per item (backdoors on the first ``n_test`` test images of the
    attacked task), of every pre-trained model."""
    from rclip import probe, zeroshot
    from rclip.attacks.poison import threat_items
    from rclip.robustness import Scores

    classes = {t: task.num_classes for t, task in setup.tasks.items()}
    zs, lp, threats = Scores(classes), Scores(classes, clean="linear probe"), {}
    for name, bundle in trained.items():
        for t, task in setup.tasks.items():
            x, y = task.tensors()
            zs.add(name, t, "clean", zeroshot.correct(zeroshot.zeroshot_classifier(bundle, task), x, y))
            feats = [(bundle.encode_images(xs).float(), ys) for xs, ys in probes[t]]
            lp.add(name, t, "linear probe", probe.linear_probe(*feats, task.num_classes)["test_correct"])
        threats[name] = threat_items(bundle, setup.attacked, n_test=n_test)
    return Evaluation(zs, lp, threats)


# -- caption re-matching, scored against the world's ground truth ----------------------------------------------

def match_items(setup: PoisonSetup, assigned, candidates=None) -> dict:
    """:func:`rclip.methods.otcclip.rematch_items` of an assignment of captions to every image of ``setup.pairs``:
    exact precision and pool hit from the world's ground truth (None at paper scale), poison broken per poisoned
    pair (paper scale: a caption of the pair's adversarial class keeps the poison)."""
    from rclip.methods.otcclip import rematch_items

    truth = setup.truth
    keeps = truth.keeps_poison if truth is not None else setup.pairs.keeps_poison
    return rematch_items(assigned, truth.describes if truth is not None else None, poisoned=setup.pairs.poisoned,
                         keeps_poison=keeps, candidates=candidates)


def item_means(items: dict, poisoned) -> dict:
    """Precision, clean precision (over unpoisoned images), poison broken and pool hit (%) of :func:`match_items`
    (NaN where there is no ground truth)."""
    nan = float("nan")
    prec = items["precision"]
    clean = ~np.asarray(torch.as_tensor(poisoned, dtype=torch.bool))
    return {"precision": nan if prec is None else float(prec.mean()),
            "clean precision": nan if prec is None or not clean.any() else float(prec[clean].mean()),
            "poison broken": nan if items["broken"] is None or not len(items["broken"]) else float(
                items["broken"].mean()),
            "pool hit": nan if items["pool hit"] is None else float(items["pool hit"].mean())}


def rematch_events(setup: PoisonSetup, reports: dict, runs=("OTCCLIP", "OT matching only", "OT losses only")):
    """Every re-matching the OTCCLIP runs recorded, each scored both ways on its own candidate pools: global
    matching (the most similar candidate) and OT matching. Returns ``(table, items)``: a DataFrame with one row per
    (run, epoch, matching) of :func:`item_means`, and ``{(run, epoch, matching): per-item outcomes}``."""
    import pandas as pd

    rows, items = [], {}
    for run in runs:
        for ev in reports[run]["events"]:
            pool = ev.get("candidates")
            for how in ("global", "ot"):
                items[(run, ev["epoch"], how)] = it = match_items(setup, ev[how], pool)
                rows.append({"run": run, "epoch": ev["epoch"], "matching": how, **item_means(it, setup.pairs.poisoned)})
    columns = ["run", "epoch", "matching", "precision", "clean precision", "poison broken", "pool hit"]
    return pd.DataFrame(rows, columns=columns), items


def roclip_matches(setup: PoisonSetup, report: dict):
    """Precision and poison broken (%) of RoCLIP's memory-bank matches at each matching epoch (the images of the
    batches it matched, each with its nearest caption in the bank), one row per epoch."""
    import pandas as pd

    truth = setup.truth
    keeps = truth.keeps_poison if truth is not None else setup.pairs.keeps_poison
    rows = []
    for m in report["matches"]:
        images, captions = m["image"].tolist(), m["caption"].tolist()
        poisoned = [k for k, i in enumerate(images) if setup.pairs.poisoned[i]]
        rows.append({"epoch": m["epoch"], "matched images": len(images),
                     "precision": float("nan") if truth is None else
                     100 * float(np.mean([truth.describes(i, j) for i, j in zip(images, captions)])),
                     "poison broken": 100 * float(np.mean([not keeps(images[k], captions[k]) for k in poisoned]))
                     if poisoned else float("nan")})
    return pd.DataFrame(rows, columns=["epoch", "matched images", "precision", "poison broken"]).set_index("epoch")


def rematch_models(bundles: dict, setup: PoisonSetup, k: int) -> dict:
    """Re-match the whole corpus once with each model of ``bundles`` ({name: bundle}): its top-``k`` candidates by
    global cosine, then their OT distances (50 Sinkhorn iterations, as in training). Returns {name:
    :class:`~rclip.methods.otcclip.Rematch`}, from which :func:`weight_sweep` and :func:`pool_sweep` read every
    smaller pool and every mix without re-encoding."""
    from rclip.methods import otcclip as otc

    cfg = otc.RematchConfig(k=k, ot=otc.OTConfig(max_iter=50, tol=1e-4))
    return {name: otc.rematch_corpus(bundle, setup.pairs, cfg) for name, bundle in bundles.items()}


def weight_sweep(rematches: dict, setup: PoisonSetup, weights):
    """Choose each image's caption from its pool (``rematches``: :func:`rematch_models`) by the mixed distance
    (1 - w) · OT + w · (1 - cos) for each w of ``weights`` (0 and 1 always included: pure OT and global matching on
    the same pools). Returns ``(table, items)``: one row per (model, w) of :func:`item_means` and
    ``{(model, w): per-item outcomes}``."""
    import pandas as pd

    from rclip.methods import otcclip as otc

    weights = sorted({0.0, 1.0, *map(float, weights)})
    rows, items = {}, {}
    for name, r in rematches.items():
        for w in weights:
            items[(name, w)] = it = match_items(setup, otc.mixed_choice(r, w), r.candidates)
            rows[(name, w)] = item_means(it, setup.pairs.poisoned)
    table = pd.DataFrame(rows).T
    table.index.names = ["model", "global weight w"]
    return table, items


def pool_sweep(rematches: dict, setup: PoisonSetup, ks):
    """OT against global re-matching on the same pools, for each pool size k of ``ks`` (each at most the k of
    ``rematches``): the pools are each image's k most similar captions, global matching takes the first, OT matching
    the one at the smallest OT distance (:func:`~rclip.methods.otcclip.restrict`). Returns ``(table, items)``: one
    row per (model, k, matching) of :func:`item_means`, and ``{(model, k, matching): per-item outcomes}``."""
    import pandas as pd

    from rclip.methods import otcclip as otc

    rows, items = {}, {}
    for name, r in rematches.items():
        for k in sorted(set(map(int, ks))):
            sub = otc.restrict(r, k)
            for how, choice in (("global", sub.candidates[:, 0]), ("ot", sub.assigned)):
                items[(name, k, how)] = it = match_items(setup, choice, sub.candidates)
                rows[(name, k, how)] = item_means(it, setup.pairs.poisoned)
    table = pd.DataFrame(rows).T
    table.index.names = ["model", "k", "matching"]
    return table, items


def rematch_claim(claim: str, a: dict | None, b: dict | None, *, labels: tuple[str, str], metric: str = "precision",
                  min_pool_hit: float = 90.0, preconditions=(), source: str = "book", note: str = "") -> dict:
    """A claim that re-matching ``a`` beats re-matching ``b`` (per-item outcomes of :func:`match_items`, on the same
    images) on ``metric``: ``"precision"`` (per image: the new caption is true of it) or ``"broken"`` (per poisoned
    pair: the new caption no longer teaches the attack). A precision claim needs the candidate pools to hold a true
    caption for at least ``min_pool_hit`` % of the images (else both matchings choose mostly among wrong captions)
    and exact ground truth (absent at paper scale: then untestable). ``preconditions``: further ones (e.g. the
    re-matching model knows the attacked task, :meth:`Evaluation.knows`). ``a`` or ``b`` None: no re-matching was
    recorded (untestable)."""
    from rclip.claims import Precondition, compare, untestable

    unit = {"precision": ("true caption (%)", "images"), "broken": ("poison broken (%)", "poisoned pairs")}
    if metric not in unit:
        raise RClipError(f"metric must be 'precision' or 'broken', got {metric!r}")
    name, items = unit[metric]
    if a is None or b is None:
        return untestable(claim, metric=name, source=source, labels=labels, items=items, note=note,
                          preconditions=[Precondition.at_least("re-matchings recorded", 0, 1), *preconditions])
    pre = list(preconditions)
    if metric == "precision":
        truth = Precondition.at_least("images with exact ground truth (%)", 0.0 if a["precision"] is None else 100.0,
                                      100.0)
        pool = None if a["pool hit"] is None else float(a["pool hit"].mean())
        pre += [truth, Precondition.at_least("pool hit: images with a true caption among their candidates (%)", pool,
                                             min_pool_hit)]
        if a["precision"] is None:
            return untestable(claim, metric=name, source=source, labels=labels, items=items, note=note,
                              preconditions=pre)
    return compare(claim, a[metric], b[metric], metric=name, source=source, labels=labels, items=items,
                   preconditions=pre, note=note)


def last_event(items: dict, run: str) -> tuple[dict | None, dict | None, int | None]:
    """The OT and global per-item outcomes of ``run``'s last recorded re-matching, and its epoch (Nones if none)."""
    epochs = [e for (r, e, _) in items if r == run]
    if not epochs:
        return None, None, None
    e = max(epochs)
    return items[(run, e, "ot")], items[(run, e, "global")], e


__all__ = ["METHODS", "DEFENSES", "augment_images", "eda", "augment_texts", "masked_contrastive", "PretrainConfig",
           "RoCLIPConfig", "SafeCLIPConfig", "Trainer", "MemoryBank", "RoCLIPTrainer", "fit_gmm_1d",
           "pair_similarities", "SafeCLIPTrainer", "make_trainer", "pretrain_defense", "initial_clip", "defended_clip",
           "REGIMES", "COMPARED", "ABLATION", "attack_configs", "PoisonSetup", "poison_setup", "example_pairs",
           "chapter_schedule", "ROCLIP_BANK_PER_PAIR", "roclip_bank_size", "chapter_regimes", "train_regimes",
           "probe_sets", "Evaluation", "evaluate_regimes",
           "match_items", "item_means", "rematch_events", "roclip_matches", "rematch_models", "weight_sweep",
           "pool_sweep", "rematch_claim",
           "last_event"]
