"""HOT-CLIP: diverse adversarial submodels of CLIP's image encoder, fused hierarchically by optimal transport.

Algorithm 1 of the paper, on any CLIP bundle and labelled image set:

1. **Submodels.** For every attack a ∈ A (FGSM, PGD, MIM; ℓ∞ radius ε_train) and prompt template t ∈ T_a, fine-tune
   the image encoder adversarially with the text tower frozen: TeCoA's loss, the cross-entropy of the zero-shot
   logits ``scale · cos(f(x_adv), w_y^t)`` against class embeddings written with template t, where x_adv is attack
   a on that same loss against the current encoder. T_a is the standard template t₀ (the task's first; it trains
   the anchor, as in the paper's Appendix D) followed by templates sampled from the task's template set.
2. **L-level fusion** within each attack: OT-fuse the |T| submodels onto the t₀ one
   (:func:`rclip.methods.fusion.fuse_visual`), then fine-tune the fused encoder under attack a with t₀.
3. **V-level fusion** across attacks: OT-fuse the |A| L-level models onto the first attack's, then fine-tune with
   FARE's unsupervised loss (:func:`rclip.methods.robust_finetune.fare_step`; its target is the fused encoder's own
   clean embedding at the start of the stage, an assumption: the paper says "unsupervised adversarial
   fine-tuning" only).

Every trained or fused encoder is cached under ``$RCLIP_CACHE/hot_clip`` (its image tower only, safetensors) keyed
by everything that made it, so the strategies of the ablation (direct average, direct OT fusion, hierarchical)
and the pool sizes share submodels, and a re-run loads instead of training. Towers are loaded from the cache only
when a step needs them and released after it; :class:`Residency` counts the towers alive at each moment, which
measures the peak number of models in memory (the paper's O(max(|A|, |T|) · U) against O(|A||T| · U)).

The chapter's helpers close the module: the configuration and training data from a notebook's parameters
(:func:`config`; the training images are :func:`rclip.chapter.finetune_data`), AutoAttack scores of several encoders with measured ones reused
(:func:`autoattack_scores`, :func:`measured`), the items a stated gain would need (:func:`n_to_resolve`) and the
memory table (:func:`memory_table`). The book's independent-towers experiment is :mod:`rclip.methods.towers`.
"""
from __future__ import annotations

import contextlib
import json
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rclip.attacks.image import fgsm, mim, pgd
from rclip.cache import artefact_path, write_json
from rclip.errors import RClipError
from rclip.methods.fusion import FusionConfig, fuse_visual, self_match_share, visual_state
from rclip.methods.robust_finetune import (AdvFinetuneConfig, _zero_shot_logits, fare_step,
                                           freeze_all_but_image_encoder)
from rclip.train import LossFn, TrainConfig, fit, save_tower, train_cached
from rclip.zeroshot import ZeroShotClassifier, class_embeddings

ATTACKS = ("fgsm", "pgd", "mim")
STRATEGIES = ("average", "direct", "hierarchical")


def _paper_schedule(steps: int) -> TrainConfig:
    """The paper's optimiser (AdamW, lr 1e-5, weight decay 0.01, batch 128) for ``steps`` steps."""
    return TrainConfig(steps=steps, batch_size=128, lr=1e-5, min_lr=1e-6, warmup_steps=max(1, steps // 20),
                       weight_decay=0.01, grad_clip=1.0, ckpt_every=max(1, steps // 4),
                       eval_every=max(1, steps // 4))


@dataclass(frozen=True)
class HotClipConfig:
    """Everything that makes a HOT-CLIP encoder (the paper's values as defaults, steps at one's own scale).

    attacks: A, in order (the first is the V-level anchor). n_templates: |T| per attack (t₀ + n - 1 sampled).
    eps: ε_train (ℓ∞, [0, 1] pixel units). attack_steps: PGD and MIM iterations (step eps/4 for PGD, eps/steps for
    MIM; FGSM is one step of eps). submodel / intra / inter: the schedules of the submodels, the L-level fine-tune
    (under the attack, t₀) and the V-level FARE fine-tune (the paper: AdamW, lr 1e-5, weight decay 0.01, batch 128;
    2 epochs, 1 epoch, 1 epoch). intra / inter ``steps=0`` skips that fine-tune. fusion: the OT settings (the
    paper: soft alignment, Sinkhorn τ = 0.08, weights as neurons). template_seed: which templates are sampled.
    """
    attacks: tuple[str, ...] = ATTACKS
    n_templates: int = 3
    eps: float = 4 / 255
    attack_steps: int = 10
    submodel: TrainConfig = field(default_factory=lambda: _paper_schedule(500))
    intra: TrainConfig = field(default_factory=lambda: _paper_schedule(250))
    inter: TrainConfig = field(default_factory=lambda: _paper_schedule(250))
    fusion: FusionConfig = field(default_factory=lambda: FusionConfig("soft", reg=0.08))
    template_seed: int = 0

    def __post_init__(self):
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown or not self.attacks or len(set(self.attacks)) != len(self.attacks):
            raise RClipError(f"attacks must be distinct names from {ATTACKS}; got {list(self.attacks)}")
        if self.n_templates < 1:
            raise RClipError(f"n_templates must be >= 1; got {self.n_templates}")
        if not 0 < self.eps < 1:
            raise RClipError(f"eps (ε_train) must lie in (0, 1) pixel units, e.g. 4/255; got {self.eps}")


# ----------------------------------------------------------------------------------------------------------------
# Counting the towers in memory
# ----------------------------------------------------------------------------------------------------------------

class Tower(dict):
    """An image tower's state dict (parameter name -> tensor) that :class:`Residency` can watch."""


class Residency:
    """Counts the image towers alive in a pipeline: each one is registered when it is loaded, fused or copied
    for fine-tuning, and leaves the count when the last reference to it goes (a ``weakref.finalize`` callback).

    ``peak`` / ``peak_mb`` are the largest count and size seen since :meth:`reset`; ``log`` records
    (event, count) pairs. The base CLIP (the frozen text tower and the pre-trained image tower every step starts
    from) stays resident throughout and is not counted.
    """

    def __init__(self):
        self.live, self.live_mb, self.peak, self.peak_mb = 0, 0.0, 0, 0.0
        self.log: list[tuple[str, int]] = []

    def track(self, obj, what: str):
        """Register ``obj`` (a :class:`Tower` or an ``nn.Module``) as one resident tower; returns it."""
        if isinstance(obj, dict):
            mb = sum(t.numel() * t.element_size() for t in obj.values()) / 2**20
        else:
            mb = sum(t.numel() * t.element_size() for t in obj.state_dict().values()) / 2**20
        self._add(1, mb, f"+ {what}")
        weakref.finalize(obj, self._add, -1, -mb, f"- {what}")
        return obj

    @contextlib.contextmanager
    def holding(self, what: str, mb: float = 0.0):
        """Count one extra tower for the duration of a block (e.g. FARE's frozen copy of the encoder)."""
        self._add(1, mb, f"+ {what}")
        try:
            yield
        finally:
            self._add(-1, -mb, f"- {what}")

    def _add(self, n: int, mb: float, event: str):
        self.live += n
        self.live_mb += mb
        self.peak, self.peak_mb = max(self.peak, self.live), max(self.peak_mb, self.live_mb)
        self.log.append((event, self.live))

    def reset(self) -> None:
        """Start a new measurement from the towers alive now."""
        self.peak, self.peak_mb, self.log = self.live, self.live_mb, []


# ----------------------------------------------------------------------------------------------------------------
# Adversarial examples and losses
# ----------------------------------------------------------------------------------------------------------------

def adversarial_images(classifier, images: torch.Tensor, labels: torch.Tensor, attack: str, eps: float, *,
                       steps: int, seed: int = 0) -> torch.Tensor:
    """``attack`` ∈ {fgsm, pgd, mim} at ℓ∞ radius ``eps`` on ``classifier`` ([0, 1] pixels -> logits)."""
    if attack == "fgsm":
        return fgsm(classifier, images, labels, eps)
    if attack == "pgd":
        return pgd(classifier, images, labels, eps, steps=steps, seed=seed)
    if attack == "mim":
        return mim(classifier, images, labels, eps, steps=steps)
    raise RClipError(f"unknown training attack {attack!r}; choose one of {ATTACKS}")


def submodel_step(bundle, class_weights: torch.Tensor, attack: str, eps: float, attack_steps: int,
                  seed: int = 0) -> LossFn:
    """TeCoA's loss under ``attack``, for batches ``{"images", "labels", "index"}``: cross-entropy of the zero-shot
    logits of the adversarial images against ``class_weights`` (K, D), the attack run on the current encoder."""
    weights = F.normalize(class_weights.float(), dim=-1)
    victim = ZeroShotClassifier(bundle, weights)
    logits = _zero_shot_logits(bundle, weights)

    def loss_fn(visual, batch):
        x = batch["images"].to(bundle.device).float()
        y = batch["labels"].to(bundle.device)
        x_adv = adversarial_images(victim, x, y, attack, eps, steps=attack_steps,
                                   seed=seed * 1_000_003 + int(batch["index"][0]))
        return F.cross_entropy(logits(visual, x_adv).float(), y)
    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------

class HotClip:
    """Algorithm 1 on one base CLIP and one labelled training set, with every artefact cached.

    Args:
        base: the pre-trained CLIP bundle (never modified).
        dataset: training batches ``{"images" (B, 3, S, S) in [0, 1], "labels", "index"}`` via ``__getitems__``.
        data_key: what identifies ``dataset`` (part of every cache key).
        classnames, templates: the training classes and the task's prompt templates (``templates[0]`` is t₀).
        cfg: :class:`HotClipConfig`.
    """

    def __init__(self, base, dataset, data_key: dict, classnames: Sequence[str], templates: Sequence[str],
                 cfg: HotClipConfig = HotClipConfig(), *, progress: bool = False, cache_dir: str | Path | None = None):
        if len(templates) < cfg.n_templates:
            raise RClipError(f"{cfg.n_templates} templates per attack asked for, but the task has {len(templates)}")
        self.base, self.dataset, self.data_key = base, dataset, data_key
        self.classnames, self.templates, self.cfg, self.progress = list(classnames), list(templates), cfg, progress
        self.residency = Residency()
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.logs: dict[str, dict] = {}
        self.fusion_s = 0.0                 # seconds spent fusing since the last Residency reset (:meth:`strategy`)
        self._base_key = base.meta.get("sha256") or base.meta.get("name")
        self._weights: dict[str, torch.Tensor] = {}

    # -- what is trained -----------------------------------------------------------------------------------------
    def templates_for(self, attack: str) -> list[str]:
        """T_a: t₀, then ``n_templates - 1`` of the others, sampled by (template_seed, attack)."""
        rng = np.random.default_rng([self.cfg.template_seed, ATTACKS.index(attack)])
        rest = rng.permutation(len(self.templates) - 1)[: self.cfg.n_templates - 1] + 1
        return [self.templates[0]] + [self.templates[i] for i in rest]

    def class_weights(self, template: str) -> torch.Tensor:
        """(K, D) unit class embeddings written with one template, by the frozen text tower."""
        if template not in self._weights:
            self._weights[template] = class_embeddings(self.base, [[template.format(c)] for c in self.classnames])
        return self._weights[template]

    def submodel_key(self, attack: str, template: str) -> dict:
        c = self.cfg
        return {"kind": "submodel", "base": self._base_key, "data": self.data_key, "attack": attack,
                "template": template, "eps": c.eps, "attack_steps": c.attack_steps, "train": asdict(c.submodel)}

    def intra_key(self, attack: str) -> dict:
        c = self.cfg
        return {"kind": "intra", "members": [self.submodel_key(attack, t) for t in self.templates_for(attack)],
                "fusion": asdict(c.fusion), "finetune": asdict(c.intra) if c.intra.steps else None}

    def hierarchical_key(self) -> dict:
        c = self.cfg
        return {"kind": "hierarchical", "members": [self.intra_key(a) for a in c.attacks], "fusion": asdict(c.fusion),
                "finetune": asdict(c.inter) if c.inter.steps else None}

    def direct_key(self, alignment: str) -> dict:
        members = [self.submodel_key(a, t) for a in self.cfg.attacks for t in self.templates_for(a)]
        fusion = asdict(self.cfg.fusion if alignment != "none" else FusionConfig("none"))
        return {"kind": "direct", "members": members, "fusion": fusion}

    # -- the cache -----------------------------------------------------------------------------------------------
    def path(self, key: dict) -> Path:
        """Where the tower made by ``key`` is cached (``$RCLIP_CACHE/hot_clip`` unless ``cache_dir`` was given)."""
        return artefact_path("hot_clip", key, ".safetensors", root=self.cache_dir)

    def is_cached(self, key: dict) -> bool:
        """Whether the tower of ``key`` is complete in the cache (its log is written last)."""
        p = self.path(key)
        return p.is_file() and p.with_suffix(".log.json").is_file()

    def load(self, key: dict, what: str) -> Tower:
        """A cached tower, registered as resident."""
        from rclip.models import read_state_dict
        from rclip.train import verify_artefact

        path = self.path(key)
        verify_artefact(path, path.with_suffix(".log.json"))      # a corrupted tower is never read as the one made
        state, _ = read_state_dict(path)
        device = self.base.device
        return self.residency.track(Tower({k: v.to(device) for k, v in state.items()}), what)

    def _save(self, key: dict, state: dict) -> None:
        """Cache a fused (not trained) tower: the tower, then its log, as :func:`rclip.train.train_cached` does."""
        from rclip.models import sha256

        save_tower(self.path(key), state)
        write_json(self.path(key).with_suffix(".log.json"),
                   {"fused": True, "key": key, "artefact_sha256": {"model": sha256(self.path(key))}})

    def cached_log(self, key: dict) -> dict | None:
        p = self.path(key).with_suffix(".log.json")
        return json.loads(p.read_text()) if p.is_file() else None

    def bundle(self, state: dict):
        """A copy of the base CLIP with this image tower (for evaluation)."""
        return self.base.with_visual(state)

    # -- training ------------------------------------------------------------------------------------------------
    def _finetune(self, state: dict | None, loss, train: TrainConfig, key: dict, what: str,
                  evaluate=None) -> tuple[Tower, dict]:
        """Fine-tune a copy of the base with image tower ``state`` (None: the base's) by ``loss(bundle)``; cache.
        ``evaluate(bundle) -> dict`` is recorded in the log every ``train.eval_every`` steps (``log["evals"]``)."""
        def run(run_dir):
            tuned = self.base.copy() if state is None else self.base.with_visual(state)
            self.residency.track(tuned.model.visual, what)
            freeze_all_but_image_encoder(tuned.model)
            return tuned, fit(tuned, self.dataset, train, run_dir, loss(tuned), module=tuned.model.visual,
                              progress=self.progress, desc=what, evaluate=evaluate)

        _, log, _ = train_cached("hot_clip", key, run, base=self.base, part="visual", root=self.cache_dir)
        return self.load(key, what), log

    def submodel(self, attack: str, template: str) -> Tower:
        """M^(a, t): the base's image tower fine-tuned adversarially under ``attack`` with ``template``. Every
        ``cfg.submodel.eval_every`` steps its log records how far it has moved from the base (:func:`drift`)."""
        key = self.submodel_key(attack, template)
        what = f"submodel {attack} / {template!r}"
        if self.is_cached(key):
            return self.load(key, what)
        c = self.cfg
        start = visual_state(self.base)
        tower, log = self._finetune(None, lambda b: submodel_step(b, self.class_weights(template), attack, c.eps,
                                                                  c.attack_steps, c.submodel.seed),
                                    c.submodel, key, what,
                                    evaluate=lambda b: drift(start, b, c.fusion, _heads(self.base)))
        self.logs[what] = log
        return tower

    def drift_curve(self, attack: str, template: str) -> list[dict]:
        """How far submodel (``attack``, ``template``) moved from the base during its fine-tune: ``{"step",
        "samples", "weight_distance", "self_match"}`` at step 0 and every ``cfg.submodel.eval_every`` steps
        (:func:`drift`), trained first if it is not cached. Step 0 is the base itself: distance 0 and share 1 by
        definition (the identity map; soft OT of a tower onto itself blurs that by its entropy, ~2e-5 for the world
        CLIP at τ 0.08). Raises if the cached log records no drift (a tower trained with ``eval_every=0``)."""
        self.submodel(attack, template)
        log = self.cached_log(self.submodel_key(attack, template)) or {}
        later = [e for e in log.get("evals", []) if "self_match" in e]
        if not later:
            raise RClipError(f"submodel {attack} / {template!r} was cached without drift records (eval_every=0): "
                             f"delete {self.path(self.submodel_key(attack, template))} and its .log.json to retrain")
        points = [{"step": 0, "samples": 0, "weight_distance": 0.0, "self_match": 1.0}]
        return points + [{k: e[k] for k in points[0]} for e in later]

    def pool(self) -> list[tuple[str, str]]:
        """Train (or find cached) every submodel, one at a time; returns the (attack, template) pairs."""
        pairs = [(a, t) for a in self.cfg.attacks for t in self.templates_for(a)]
        for a, t in pairs:
            self.submodel(a, t)          # released at once: only the cache file stays
        return pairs

    def submodel_name(self, attack: str, template: str) -> str:
        """``"PGD / t1"``: the attack and the template's place in :meth:`templates_for` (t0 the standard one)."""
        return f"{attack.upper()} / t{self.templates_for(attack).index(template)}"

    def best_submodel(self, tasks: dict, budget: dict[str, float], *, n: int, steps: int, seed: int) -> dict:
        """The pool's most robust single submodel, chosen before any test image is attacked: every submodel of
        :meth:`pool` attacked against itself with PGD-``steps`` (step ε/4, random start) at ``budget`` (one label ->
        ε) on the first ``n`` images of each of ``tasks`` (the world's validation split;
        :func:`rclip.chapter.attacked_scores`), ranked by its top-1 under that attack pooled over the tasks on which
        *every* submodel is above chance (so that none is ranked on an easier set of tasks; ties: the pool's
        order). For the claim that fusing beats one adversarial fine-tune.

        Returns ``{"name", "bundle", "condition", "tasks", "means"}``: ``tasks`` those ranked on; ``means`` every
        submodel's mean top-1 per condition with the ranking's column; name and bundle None when no task is left."""
        from rclip.chapter import attacked_scores

        if len(budget) != 1:
            raise RClipError(f"best_submodel ranks at one budget; got {sorted(budget)}")
        named = {self.submodel_name(a, t): (a, t) for a, t in self.pool()}
        bundles = {name: self.bundle(self.submodel(a, t)) for name, (a, t) in named.items()}
        scores = attacked_scores(bundles, tasks, budget, n=n, steps=steps, seed=seed)
        condition = f"PGD {next(iter(budget))}"
        common = scores.tasks_above_chance(*bundles)
        ranking = {m: float(scores.items(m, condition, common).mean()) for m in bundles} if common else {}
        name = max(ranking, key=ranking.get) if ranking else None          # max keeps the first of equals
        means = scores.means()
        means[f"{condition}, pooled over {', '.join(common) or 'no task'} (the ranking)"] = \
            [ranking.get(m, float("nan")) for m in means.index]
        return {"name": name, "bundle": bundles.get(name), "condition": condition, "tasks": common, "means": means}

    def _fuse(self, towers: list[Tower], what: str, cfg: FusionConfig | None = None):
        start = time.perf_counter()
        res = fuse_visual(towers, cfg=cfg or self.cfg.fusion, heads=_heads(self.base))
        self.fusion_s += time.perf_counter() - start
        return self.residency.track(Tower(res.state), what), res

    def intra(self, attack: str) -> Tower:
        """L-level: the attack's submodels OT-fused onto its t₀ submodel, then fine-tuned under the attack, t₀."""
        key = self.intra_key(attack)
        what = f"L-level {attack}"
        if self.is_cached(key):
            return self.load(key, what)
        fused, _ = self._fuse([self.submodel(attack, t) for t in self.templates_for(attack)], f"{what} (fused)")
        c = self.cfg
        if not c.intra.steps:
            self._save(key, fused)
            return fused
        t0 = self.templates[0]
        tower, log = self._finetune(fused, lambda b: submodel_step(b, self.class_weights(t0), attack, c.eps,
                                                                   c.attack_steps, c.intra.seed),
                                    c.intra, key, what)
        self.logs[what] = log
        return tower

    def hierarchical(self) -> Tower:
        """V-level: the L-level models OT-fused onto the first attack's, then fine-tuned with FARE: HOT-CLIP."""
        key = self.hierarchical_key()
        if self.is_cached(key):
            return self.load(key, "HOT-CLIP")
        for a in self.cfg.attacks:       # each L-level model is made, cached and released before the next
            self.intra(a)
        fused, _ = self._fuse([self.load(self.intra_key(a), f"L-level {a}") for a in self.cfg.attacks],
                              "V-level (fused)")
        c = self.cfg
        if not c.inter.steps:
            self._save(key, fused)
            return fused
        fare = AdvFinetuneConfig("fare", eps=c.eps, attack_steps=c.attack_steps, train=c.inter)
        mb = sum(t.numel() * t.element_size() for t in fused.values()) / 2**20
        with self.residency.holding("FARE's frozen target", mb):
            tower, log = self._finetune(fused, lambda b: fare_step(b, fare, c.inter.seed), c.inter, key, "HOT-CLIP")
        self.logs["HOT-CLIP"] = log
        return tower

    def direct(self, alignment: str = "ot") -> Tower:
        """All |A|·|T| submodels fused at once onto the first: ``"ot"`` (the configured OT) or ``"none"``
        (plain weight averaging). No fine-tuning (the paper's "Direct Average" and "Direct OT Fusion")."""
        if alignment not in ("ot", "none"):
            raise RClipError(f"alignment must be 'ot' or 'none'; got {alignment!r}")
        key = self.direct_key("none" if alignment == "none" else "ot")
        what = "direct average" if alignment == "none" else "direct OT fusion"
        if self.is_cached(key):
            return self.load(key, what)
        towers = [self.submodel(a, t) for a in self.cfg.attacks for t in self.templates_for(a)]
        fused, _ = self._fuse(towers, what, FusionConfig("none") if alignment == "none" else None)
        del towers
        self._save(key, fused)
        return fused

    def encoder(self):
        """HOT-CLIP (:meth:`hierarchical`) as a CLIP bundle for evaluation."""
        return self.bundle(self.hierarchical())

    def variant(self, cfg: HotClipConfig | None = None, **changes) -> "HotClip":
        """The same pipeline (base, data, cache) with another configuration (``cfg``, default this one's) and some
        settings changed, e.g. ``variant(eps=2 / 255)`` or ``variant(attacks=("fgsm",), n_templates=3)``: a smaller
        pool reuses this one's cached submodels."""
        return HotClip(self.base, self.dataset, self.data_key, self.classnames, self.templates,
                       replace(cfg or self.cfg, **changes), progress=self.progress, cache_dir=self.cache_dir)

    def self_match(self) -> tuple[dict[str, float], object]:
        """How much OT moves anything in this pool: the share of each anchor neuron's weight that OT takes from the
        same-index neuron (:func:`rclip.methods.fusion.self_match_share`; 1 = alignment is the identity and fusion
        is plain averaging), for all submodels aligned onto one anchor at once and within each attack.

        Returns ``(shares, the direct fusion's FusionResult)`` (its plans are the chapter's figure)."""
        pairs = [(a, t) for a in self.cfg.attacks for t in self.templates_for(a)]
        subs = [self.submodel(a, t) for a, t in pairs]
        direct = fuse_visual(subs, cfg=self.cfg.fusion, heads=_heads(self.base))
        shares = {f"all {len(pairs)} submodels onto one anchor": self_match_share(direct)} if len(subs) > 1 else {}
        for a in self.cfg.attacks:
            members = [s for (aa, _), s in zip(pairs, subs) if aa == a]
            if len(members) > 1:
                shares[f"within {a.upper()}"] = self_match_share(fuse_visual(members, cfg=self.cfg.fusion,
                                                                             heads=_heads(self.base)))
        return shares, direct

    def strategy(self, name: str) -> tuple[Tower, dict]:
        """Run one fusion strategy of the ablation from the trained pool, counting resident towers.

        ``"average"`` / ``"direct"`` / ``"hierarchical"``. The pool must exist (:meth:`pool`) and the strategy's own
        result must not be cached, or nothing is measured. Returns (tower, {"peak_towers", "peak_mb", "events"})."""
        if name not in STRATEGIES:
            raise RClipError(f"unknown strategy {name!r}; choose one of {STRATEGIES}")
        self.residency.reset()
        self.fusion_s = 0.0
        tower = {"average": lambda: self.direct("none"), "direct": lambda: self.direct("ot"),
                 "hierarchical": self.hierarchical}[name]()
        r = self.residency
        return tower, {"peak_towers": r.peak, "peak_mb": round(r.peak_mb, 2), "fusion_s": round(self.fusion_s, 4),
                       "events": list(r.log)}

    def finetune_seconds(self) -> dict[str, float]:
        """The training wall time this pipeline's cached artefacts record (their logs' ``wall_s``): the submodel
        pool, which every strategy shares, and the hierarchy's L-level and V-level fine-tunes, which only it adds.
        Zero for a stage that was skipped (``steps=0``) or is not cached."""
        def wall(key):
            return float((self.cached_log(key) or {}).get("wall_s", 0.0))

        pool = sum(wall(self.submodel_key(a, t)) for a in self.cfg.attacks for t in self.templates_for(a))
        tunes = sum(wall(self.intra_key(a)) for a in self.cfg.attacks) + wall(self.hierarchical_key())
        return {"submodel pool": round(pool, 1), "hierarchy's fine-tunes": round(tunes, 1)}


def drift(start: dict, tower, fusion: FusionConfig, heads: int, *, ot: bool = False) -> dict[str, float]:
    """How far an image tower has moved from the tower ``start`` it was fine-tuned from: the relative ℓ2 distance of
    all its weights, ‖θ − θ₀‖ / ‖θ₀‖, and the self-match share when OT (``fusion``) aligns it onto ``start``
    (:func:`rclip.methods.fusion.self_match_share`: 1 = every neuron still maps onto itself, so OT fusion with
    another fine-tune of the same start would be plain averaging). ``ot``: also return the Sinkhorn solves'
    convergence (``"ot"``: :meth:`rclip.ot.ConvergenceTally.summary`)."""
    state = visual_state(tower)
    num = sum(float((state[k].float() - v.float()).pow(2).sum()) for k, v in start.items())
    den = sum(float(v.float().pow(2).sum()) for v in start.values())
    res = fuse_visual([start, state], cfg=fusion, heads=heads)
    out = {"weight_distance": float(np.sqrt(num / den)), "self_match": self_match_share(res)}
    return {**out, "ot": res.ot} if ot else out


def perturbation_curve(base, sizes: Sequence[float], fusion: FusionConfig, *, seed: int = 0) -> list[dict]:
    """How far a tower must move from ``base``'s image tower before OT stops mapping its neurons onto the base's:
    for each relative size d of ``sizes``, every floating-point tensor v of the tower gets Gaussian noise of norm
    about d·‖v‖ (``d * ‖v‖ / sqrt(numel) * N(0, 1)``, drawn in float32 on the CPU from one generator seeded
    ``seed``, then moved to v's device and dtype) and :func:`drift` measures the result against ``base``. Random
    noise is a move of that size in no particular direction. ``"ot"``: the Sinkhorn solves' convergence (at noise
    several times the weights' norm some stop at ``max_iter`` with marginal violations of a few 1e-4; their
    warnings are silenced here and counted there). Returns ``[{"relative_size", "weight_distance", "self_match",
    "ot"}]``."""
    if any(d < 0 for d in sizes):
        raise RClipError(f"perturbation sizes are relative norms >= 0, got {list(sizes)}")
    start = visual_state(base)
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in sizes:
        noisy = {k: (v + (d * v.float().norm() / v.numel() ** 0.5 * torch.randn(v.shape, generator=g)
                          ).to(v.device, v.dtype) if v.is_floating_point() else v) for k, v in start.items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="sinkhorn did not converge", category=RuntimeWarning)
            point = drift(start, base.with_visual(noisy), fusion, _heads(base), ot=True)
        out.append({"relative_size": float(d), **point})
    return out


def memory_profile(base, dataset, data_key: dict, classnames, templates, cfg: HotClipConfig) -> dict[str, dict]:
    """The number (and size) of image towers in memory at the peak of each strategy, measured by running the real
    pipeline from an empty, temporary cache with one optimisation step per stage (how many towers a step holds
    does not depend on how many steps it takes). Returns {strategy: {"peak_towers", "peak_mb", "events"}}."""
    import tempfile

    one = replace(cfg.submodel, steps=1, warmup_steps=1, ckpt_every=1, eval_every=0)
    small = replace(cfg, submodel=one, intra=one if cfg.intra.steps else replace(one, steps=0),
                    inter=one if cfg.inter.steps else replace(one, steps=0))
    with tempfile.TemporaryDirectory(prefix="rclip-hot-memory-") as tmp:
        pipe = HotClip(base, dataset, data_key, classnames, templates, small, cache_dir=tmp)
        pipe.pool()
        out = {}
        for name in STRATEGIES:
            tower, out[name] = pipe.strategy(name)
            del tower
        return out


def _heads(bundle) -> int:
    return int(bundle.model.visual.transformer.resblocks[0].attn.num_heads)


# ----------------------------------------------------------------------------------------------------------------
# The chapter's helpers
# ----------------------------------------------------------------------------------------------------------------

#: The baselines of the paper's Table 1, by the name :func:`rclip.chapter.robust_baselines` gives them.
BASELINES = {"tecoa": "TeCoA", "fare": "FARE"}


def schedule(steps: int, batch_size: int, lr: float, seed: int = 0) -> TrainConfig:
    """One stage's schedule: the paper's AdamW with weight decay 0.01, cosine from ``lr`` to lr / 10 after a 10 %
    warm-up, four checkpoints and four records of a submodel's :func:`drift`. ``steps=0`` skips the stage."""
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10),
                       weight_decay=0.01, ckpt_every=max(1, steps // 4), eval_every=max(1, steps // 4), seed=seed)


def config(params: dict) -> HotClipConfig:
    """The :class:`HotClipConfig` of a notebook's parameters: ``attacks``, ``n_templates``, ``train_eps`` (x 1/255),
    ``hot_attack_steps``, ``submodel_steps`` / ``intra_steps`` / ``inter_steps``, ``hot_batch``, ``hot_lr`` (None:
    ``finetune['lr']``, the baselines' rate), ``fusion_alignment``, ``fusion_reg``, ``seed``."""
    p = params
    lr = float(p["hot_lr"] if p.get("hot_lr") is not None else p["finetune"]["lr"])
    stage = {k: schedule(int(p[f"{k}_steps"]), int(p["hot_batch"]), lr, int(p["seed"]))
             for k in ("submodel", "intra", "inter")}
    return HotClipConfig(attacks=tuple(p["attacks"]), n_templates=int(p["n_templates"]), eps=p["train_eps"] / 255,
                         attack_steps=int(p["hot_attack_steps"]), **stage,
                         fusion=FusionConfig(p["fusion_alignment"], reg=float(p["fusion_reg"])),
                         template_seed=int(p["seed"]))


def pools(n_attacks: int, n_templates: int) -> list[tuple[int, int]]:
    """The pools |A| × |T| of the paper's Table 7 for a full pool of ``n_attacks`` × ``n_templates`` (3 × 3 there):
    1 × T, 2 × T, the full pool, A × 1 (the first attacks of the list; the standard template alone), each once."""
    out = [(1, n_templates), (min(2, n_attacks), n_templates), (n_attacks, n_templates), (n_attacks, 1)]
    return list(dict.fromkeys(out))


def fusion_only(cfg: HotClipConfig) -> HotClipConfig:
    """``cfg`` without the L-level and V-level fine-tunes: the hierarchy's fusion alone."""
    return replace(cfg, intra=replace(cfg.intra, steps=0), inter=replace(cfg.inter, steps=0))


def measured(scores, model: str, tasks: Sequence[str], conditions: Sequence[str], limit: int | None = None
             ) -> dict[str, dict[str, np.ndarray]]:
    """What ``scores`` (a :class:`rclip.robustness.Scores`) holds of ``model`` on ``tasks`` under ``conditions``,
    as ``{task: {condition: (N,) 0/1}}`` — to put an encoder already evaluated into another table unchanged
    (:func:`autoattack_scores`), rather than attack it a second time. ``limit``: its first images only (a table
    evaluated on :meth:`~rclip.data.base.ZeroShotTask.first` of the same tasks)."""
    return {t: {c: scores.data[(model, t, c)][:limit] / 100.0 for c in conditions if (model, t, c) in scores.data}
            for t in tasks}


def autoattack_scores(models: dict, tasks: dict, budgets: dict, *, steps: int, seed: int = 0):
    """A :class:`rclip.robustness.Scores` of every encoder (name -> CLIP bundle, evaluated clean and under
    :func:`rclip.robustness.autoattack_correct` at ``budgets``; or name -> ``{task: {condition: correct}}``,
    already measured, see :func:`measured`) on ``tasks``."""
    from rclip.robustness import Scores, autoattack_correct

    scores = Scores({t: task.num_classes for t, task in tasks.items()})
    for name, model in models.items():
        per_task = model if isinstance(model, dict) else autoattack_correct(model, tasks, budgets, steps=steps,
                                                                            seed=seed)
        scores.add_all(name, per_task)
    return scores


def n_to_resolve(scores, a: str, b: str, condition: str, effect: float) -> int | None:
    """How many test images would resolve a difference of ``effect`` points between models ``a`` and ``b`` under
    ``condition`` (:func:`rclip.claims.n_needed`: 80 % power at a two-sided 5 % level), with the per-image spread
    of the paired differences measured here, on the tasks where both are above chance. None when nothing was
    measured or the differences do not vary."""
    from rclip.claims import n_needed

    tasks = scores.tasks_above_chance(a, b)
    if not tasks or any((m, t, condition) not in scores.data for m in (a, b) for t in tasks):
        return None
    d = scores.items(a, condition, tasks) - scores.items(b, condition, tasks)
    if len(d) < 2 or np.ptp(d) == 0:
        return None
    return n_needed(effect, float(d.std(ddof=1) / np.sqrt(len(d))), len(d))


def memory_table(memory: dict[str, dict], n_attacks: int, n_templates: int, finetune_s: dict | None = None):
    """The measured peaks of :func:`memory_profile` beside the paper's counts: |A|·|T| submodels + the result for
    direct fusion (averaged or OT), max(|A|, |T|) + the result for the hierarchy; with each strategy's fusion time
    and, given ``finetune_s`` (:meth:`HotClip.finetune_seconds` of the real pipeline), the fine-tuning time it adds
    beyond the shared submodel pool."""
    import pandas as pd

    formula = {"average": n_attacks * n_templates + 1, "direct": n_attacks * n_templates + 1,
               "hierarchical": max(n_attacks, n_templates) + 1}
    rows = {}
    for k, v in memory.items():
        rows[k] = {"peak towers in memory (measured)": v["peak_towers"], "peak MB (measured)": v["peak_mb"],
                   "the paper's count (|A|·|T| + 1 or max(|A|, |T|) + 1)": formula[k],
                   "fusion wall time (s, measured)": v.get("fusion_s", float("nan"))}
        if finetune_s is not None:
            rows[k]["fine-tuning beyond the pool (s, this run's logs)"] = \
                finetune_s["hierarchy's fine-tunes"] if k == "hierarchical" else 0.0
    return pd.DataFrame(rows).T
