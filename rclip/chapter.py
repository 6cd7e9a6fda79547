"""The chapter toolkit: what every chapter notebook needs before and after its experiments, written once.

* :func:`classification` — the scale set-up of a zero-shot classification chapter: the model bundle, the test
  tasks, the papers' nominal budgets and (world scale) each task's own reference budget from chapter 0, and the
  sentences that say what every number is.
* :func:`robust_baselines` — the TeCoA / PMG-AFT / FARE encoders that chapters 1 and 2 share (one schedule, one
  cache), or the released checkpoints at paper scale; :func:`finetune_recipe` states that schedule in words.
* :func:`attacked_scores` — clean and PGD correctness of several encoders, each attacked against itself: the
  measurement behind a precondition such as "the baseline meant to be robust is" (on validation tasks);
  :func:`robust_precondition` turns it into that precondition, decided by the claims engine.
* :func:`styled` — a table as the book shows it: whole cells (never truncated), numbers rounded, and a caption
  line stating scale, model, data, n and attack.

Everything here reads the notebook's resolved parameters from ``run.params`` (:func:`rclip.book.start`), so the
parameter names below are the ones the notebooks declare.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rclip.errors import RClipError


def eps_label(eps_255: float) -> str:
    """``4`` -> ``"4/255"`` (a budget's label, in units of 1/255)."""
    return f"{eps_255:g}/255"


def nominal_budgets(eps_255) -> dict[str, float]:
    """The papers' radii, ``[1, 4]`` -> ``{"1/255": 1/255, "4/255": 4/255}`` ([0, 1] pixel units)."""
    return {eps_label(e): e / 255 for e in eps_255}


REFERENCE_SOURCE = "chapter 0 (results/00_world.json: reference_budgets_255)"


def reference_budgets(run, tasks) -> tuple[dict[str, float], str]:
    """Each task's own reference budget (ℓ∞, [0, 1] units) fixed by chapter 0: the smallest radius of its grid at
    which the undefended world CLIP's PGD-10 top-1 falls below 10 %. Read from chapter 0's results of the same
    book run (its output directory), else from the published book (the file read is recorded in the run's
    ``inputs``). Tasks that never fall in the grid are left out. Returns ``(budgets, their source)``, the source
    named without a directory (:data:`REFERENCE_SOURCE`), so results recording it do not depend on where the book
    was checked out or run."""
    blob, where = run.sibling_results("00_world")
    per_task = blob["results"].get("reference_budgets_255")
    if not isinstance(per_task, dict):
        raise RClipError(f"{where} has no per-task reference budgets (results.reference_budgets_255): re-run "
                         f"chapter 0 (`rclip book --profile {run.profile} --only 00_world`)")
    return {t: float(per_task[t]) / 255 for t in tasks if per_task.get(t) is not None}, REFERENCE_SOURCE


@dataclass
class Setup:
    """What a chapter evaluates on, and how it says so.

    scale: ``"world"`` or ``"paper"``. tasks: name -> test :class:`ZeroShotTask`. nominal: the papers' budgets,
    label -> eps. reference: task -> its own reference budget (world scale; empty at paper scale).
    """
    scale: str
    bundle: object
    tasks: dict
    nominal: dict[str, float]
    reference: dict[str, float] = field(default_factory=dict)
    reference_source: str = ""
    n: int = 0
    data: str = ""

    @property
    def label(self) -> str:
        return f"{self.scale} scale"

    @property
    def model(self) -> str:
        return f"{self.bundle.meta['name']} ({self.bundle.image_size} px)"

    def budgets(self, task: str) -> dict[str, float]:
        """The budgets ``task`` is attacked at: the nominal ones, then ``"ref"`` (its own reference budget)."""
        out = dict(self.nominal)
        if task in self.reference:
            out["ref"] = self.reference[task]
        return out

    def budget_map(self) -> dict:
        """``{label: eps}`` with ``"ref"`` as ``{task: eps}`` (for :func:`rclip.robustness.autoattack_correct`)."""
        return {**self.nominal, **({"ref": dict(self.reference)} if self.reference else {})}

    def validation(self, n: int) -> dict:
        """The same tasks on the world's validation split (``n`` images each), for choosing settings — never the
        test split. Paper scale has no validation split here: it raises."""
        from rclip import world

        if self.scale != "world":
            raise RClipError("validation tasks exist at world scale only; at paper scale use the published "
                             "settings of the method being tuned")
        return {t: world.zeroshot_task(t, split="val", n=n, resolution=task.meta["resolution"],
                                       seed=task.meta["seed"]) for t, task in self.tasks.items()}

    def reference_text(self) -> str:
        """The reference budgets in words, e.g. ``"shape 2/255, colour 6/255"``."""
        if not self.reference:
            return "none (paper scale: the papers' radii only)"
        return ", ".join(f"{t} {eps_label(round(e * 255, 4))}" for t, e in self.reference.items())

    def sentence(self) -> str:
        return (f"{self.label}: {self.model} on {self.data}; ℓ∞ attacks at the papers' radii "
                f"({', '.join(self.nominal)})" + (f" and at each task's own reference budget "
                                                   f"({self.reference_text()})" if self.reference else ""))

    def caption(self, what: str, *, n: str | None = None, attack: str | None = None, model: str | None = None,
                data: str | None = None) -> str:
        """The caption line of a table: what it shows, then scale, model, data (default: the test tasks), n and
        attack."""
        parts = [what, self.label, f"model {model or self.model}", f"data {data or self.data}",
                 f"n = {n or f'{self.n} images per task'}"]
        if attack:
            parts.append(f"attack {attack}")
        return " · ".join(parts)


def classification(run, *, n: int | None = None) -> Setup:
    """The scale set-up of a zero-shot classification chapter, from the notebook's parameters ``scale``,
    ``inputs``, ``model``, ``checkpoint``, ``resolution``, ``tasks``, ``n_eval`` and ``nominal_eps``."""
    from rclip import data, models, world

    p = run.params
    n = int(n or p["n_eval"])
    nominal = nominal_budgets(p["nominal_eps"])
    if p["scale"] == "paper":
        bundle = data.paper_model(p["inputs"], device=run.device)
        tasks = data.paper_tasks(p["inputs"], bundle.preprocess, names=p["tasks"], n=n)
        return Setup("paper", bundle, tasks, nominal, n=n,
                     data=f"the test splits of {', '.join(tasks)} ({n} evenly spaced images per set)")
    if p["scale"] != "world":
        raise RClipError(f"scale must be 'world' or 'paper', got {p['scale']!r}")
    bundle = models.load(p["model"], checkpoint=p["checkpoint"], device=run.device)
    if bundle.image_size != p["resolution"]:
        raise RClipError(f"{p['model']} takes {bundle.image_size} px images; set resolution={bundle.image_size}")
    tasks = {t: world.zeroshot_task(t, split="test", n=n, resolution=p["resolution"], seed=p["seed"])
             for t in p["tasks"]}
    reference, where = reference_budgets(run, tasks)
    return Setup("world", bundle, tasks, nominal, reference, where, n=n,
                 data=f"the world's test split, {len(tasks)} tasks")


def finetune_config(params: dict, method: str):
    """The TeCoA / PMG-AFT / FARE configuration the chapters share, from the ``finetune`` parameter (``{task, n,
    steps, batch, attack_steps, eps, lr}``, set once, in each profile's ``shared`` section)."""
    from rclip.methods.robust_finetune import AdvFinetuneConfig
    from rclip.train import TrainConfig

    f = finetune_settings(params)
    steps, lr = int(f["steps"]), float(f["lr"])
    return AdvFinetuneConfig(method, eps=f["eps"] / 255, attack_steps=f["attack_steps"],
                             train=TrainConfig(steps=steps, batch_size=f["batch"], lr=lr, min_lr=lr / 10,
                                               warmup_steps=max(1, steps // 10), weight_decay=1e-4,
                                               ckpt_every=max(1, steps // 4), seed=params["seed"]))


def finetune_recipe(params: dict) -> str:
    """The shared adversarial fine-tuning schedule in words, as :func:`finetune_config` runs it on the data of
    :func:`finetune_data` (the sentence a chapter prints beside the baselines it trains)."""
    f = finetune_settings(params)
    cfg = finetune_config(params, "tecoa")
    t = cfg.train
    images = "all train images" if f["n"] is None else f"the {f['n']:,} train images"
    where = f["task"] if params.get("scale", "world") == "world" else "inputs.datasets.imagenet_train"
    optimizer = {"adamw": "AdamW", "sgd": f"SGD (momentum {t.momentum:g})"}[t.optimizer]
    clip = f", gradient norm clipped at {t.grad_clip:g}" if t.grad_clip else ""
    return (f"PGD-{cfg.attack_steps} (step ε/4, random start) at ε = {eps_label(f['eps'])} inside every step; "
            f"{t.steps} steps × {t.batch_size} images from {images} of {where}; {optimizer}, lr {t.lr:g} (warm-up "
            f"{t.warmup_steps} steps, cosine to {t.min_lr:g}), weight decay {t.weight_decay:g} (not on gains and "
            f"biases){clip}{'; bf16 autocast where the device has it' if t.amp else ''}; the image tower only")


def attacked_scores(bundles: dict, tasks: dict, budgets: dict[str, float], *, n: int, steps: int, seed: int):
    """Per-image correctness of each CLIP in ``bundles`` (name -> bundle), zero-shot on ``tasks`` (the first ``n``
    images of each), clean and under ℓ∞ PGD-``steps`` (step ε/4, random start) computed against that same CLIP at
    each of ``budgets`` (label -> ε): conditions ``"clean"`` and ``"PGD <label>"``.

    For preconditions that must be settled before a claim is tested, e.g. that a baseline meant to be robust is,
    on :meth:`Setup.validation` tasks. Returns a :class:`rclip.robustness.Scores`."""
    from rclip import robustness, zeroshot

    if not bundles or not tasks:
        raise RClipError("attacked_scores needs at least one model and one task")
    scores = robustness.Scores({t: task.num_classes for t, task in tasks.items()})
    for name, b in bundles.items():
        per_task = {}
        for t, task in tasks.items():
            clf = zeroshot.zeroshot_classifier(b, task)
            sets = robustness.transfer_sets(clf, *task.tensors(n), budgets, steps=steps, seed=seed, attacks=("pgd",))
            per_task[t] = robustness.correct_table({name: clf}, sets)[name]
        scores.add_all(name, per_task)
    return scores


def robust_precondition(encoders: dict, tasks: dict, *, eps_255: float, n: int, steps: int, seed: int,
                        where: str, reference: str = "CLIP", threshold: float = 10.0) -> dict:
    """The precondition of every claim against a baseline meant to be robust: each encoder of ``encoders`` (name ->
    bundle; ``reference``, the undefended CLIP, among them) is attacked against itself with PGD-``steps`` at its
    fine-tuning budget ``eps_255`` / 255 on the first ``n`` images of each of ``tasks`` (:func:`attacked_scores`;
    the validation split at world scale, named by ``where``), and the claims engine compares it with ``reference``
    over the tasks on which both are above chance. The precondition holds when the 95 % interval's lower end is at
    least ``threshold`` points.

    Returns ``{"scores", "means", "gaps": {name: record}, "preconditions": {name: Precondition}, "label",
    "record"}``, ``record`` being what the chapter stores (split, n, budget, means, the engine's records)."""
    from rclip import claims
    from rclip.book import records

    if reference not in encoders or len(encoders) < 2:
        raise RClipError(f"robust_precondition needs {reference!r} and at least one encoder to compare with it; "
                         f"got {sorted(encoders)}")
    label, eps = next(iter(nominal_budgets([eps_255]).items()))
    scores = attacked_scores(encoders, tasks, {label: eps}, n=n, steps=steps, seed=seed)
    cond = f"PGD {label}"
    gaps = {m: scores.compare(f"{m} is more robust than {reference} at {cond} ({where})", m, reference, cond,
                              source="book") for m in encoders if m != reference}
    pre = {m: claims.Precondition.at_least(f"{m} − {reference} at {cond}, the fine-tuning budget, {n} {where} images "
                                           f"per task (points, 95 % interval's lower end)", r["ci_low"], threshold)
           for m, r in gaps.items()}
    means = scores.means()
    return {"scores": scores, "means": means, "gaps": gaps, "preconditions": pre, "label": label,
            "record": {"split": where, "n_per_task": n, "budget": label, "attack": f"PGD-{steps}, step ε/4, random "
                       "start, against each model itself", "means": records(means), "gaps": list(gaps.values()),
                       "preconditions": {m: vars(p) for m, p in pre.items()}}}


FINETUNE_KEYS = ("task", "n", "steps", "batch", "attack_steps", "eps", "lr")


def finetune_settings(params: dict) -> dict:
    """The ``finetune`` parameter, checked: every key of :data:`FINETUNE_KEYS` and nothing else."""
    f = params.get("finetune")
    if not isinstance(f, dict) or set(f) != set(FINETUNE_KEYS):
        got = sorted(f) if isinstance(f, dict) else f
        raise RClipError(f"the finetune parameter must give exactly {list(FINETUNE_KEYS)}; got {got}")
    return f


def finetune_data(params: dict, setup: Setup):
    """The images every adversarial fine-tune of chapters 1 and 2 trains on (the baselines and HOT-CLIP's
    submodels): at world scale ``finetune['n']`` train images of the world task ``finetune['task']``; at paper scale
    the folder ``inputs.datasets.imagenet_train`` (``finetune['n']`` evenly spaced images, None = all).

    Returns ``(dataset, its task (class names and templates), its cache key)``."""
    from rclip import data, world

    p, f = params, finetune_settings(params)
    if setup.scale == "paper":
        dataset, task = data.inputs.paper_finetune_set(p["inputs"], setup.bundle.preprocess, n=f["n"])
        return dataset, task, {"root": str(p["inputs"]["datasets"]["imagenet_train"]), "n": f["n"]}
    dataset = world.WorldLabelled(f["task"], f["n"], split="train", resolution=p["resolution"], seed=p["seed"])
    task = world.zeroshot_task(f["task"], n=1, resolution=p["resolution"], seed=p["seed"])
    return dataset, task, {"task": f["task"], "n": f["n"], "seed": p["seed"], "resolution": p["resolution"]}


def robust_baselines(run, setup: Setup, methods=("tecoa", "pmg", "fare")) -> tuple[dict, dict]:
    """The adversarially fine-tuned encoders of ``methods``: at world scale fine-tuned from the world CLIP on the
    train split of ``finetune['task']`` with the shared schedule (cached; the same models in every chapter); at paper
    scale the checkpoints of ``inputs.robust_checkpoints`` (a method without one is fine-tuned on
    ``inputs.datasets.imagenet_train`` when that is given, else left out).

    Returns ``({method: bundle}, {method: training summary})``."""
    from rclip import data, zeroshot
    from rclip.book import train_summary
    from rclip.methods.robust_finetune import finetuned_clip

    p = run.params
    out, logs = {}, {}
    todo = list(methods)
    if setup.scale == "paper":
        released = data.robust_models(p["inputs"], device=run.device)
        out = {m: released[m] for m in methods if m in released}
        todo = [m for m in methods if m not in out]
        if not todo or not (p["inputs"].get("datasets") or {}).get("imagenet_train"):
            return out, logs
    train_set, task, data_key = finetune_data(p, setup)
    weights = zeroshot.class_embeddings(setup.bundle, zeroshot.class_prompts(task))
    for m in todo:
        out[m], log = finetuned_clip(setup.bundle, finetune_config(p, m), train_set, data_key, class_weights=weights,
                                     progress=False)
        logs[m] = train_summary(log)
    return out, logs


def styled(df, caption: str, digits: int = 1, percent: bool = False):
    """A table as the book shows it: a pandas Styler with ``caption`` (scale, model, data, n, attack), numbers
    rounded to ``digits``, NaN as "—", and no truncated cells."""
    fmt = "{:." + str(digits) + "f}" + ("%" if percent else "")

    def cell(v):
        if isinstance(v, bool) or v is None:
            return "—" if v is None else ("yes" if v else "no")
        if isinstance(v, float):
            return "—" if v != v else fmt.format(v)
        return str(v)

    return (df.style.format(cell).set_caption(caption)
            .set_table_styles([{"selector": "caption", "props": "caption-side: top; text-align: left; "
                                                                 "font-size: 0.85em; color: #444;"},
                               {"selector": "td, th", "props": "white-space: normal;"}]))
