"""Accuracy under attack, per item: sweeps over budgets, the world's reference budgets, AutoAttack's protocol, and
:class:`Scores` — the per-item correctness of models on tasks under conditions, from which every accuracy table,
every mean over tasks (chance-level tasks left out) and every claim is taken."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from rclip.attacks.image import autoattack, pgd
from rclip.errors import RClipError
from rclip.zeroshot import accuracy, correct, predict, zeroshot_classifier


def pgd_sweep(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps_list: Sequence[float], *,
              steps: int = 10, seed: int = 0, batch_size: int = 128) -> dict[float, float]:
    """Top-1 (%) under L-inf PGD-``steps`` (CE loss, random start, step eps/4) for each eps ([0, 1] units).

    ``eps = 0`` gives the clean accuracy.
    """
    device = next(classifier.buffers()).device
    x, y = images.to(device), labels.to(device)
    out = {}
    for eps in eps_list:
        adv = pgd(classifier, x, y, eps, steps=steps, seed=seed, batch_size=batch_size) if eps > 0 else x
        out[float(eps)] = accuracy(classifier, adv, y)
    return out


def collapse_radius(sweep: dict[float, float], threshold: float = 10.0) -> float | None:
    """The smallest eps > 0 at which one task's accuracy (%) is below ``threshold`` (``None`` if it never is)."""
    return next((eps for eps in sorted(sweep) if eps > 0 and sweep[eps] < threshold), None)


def reference_budget(sweeps: dict[str, dict[float, float]], threshold: float = 10.0) -> float | None:
    """The smallest eps at which *every* task's accuracy is below ``threshold`` percent (``None`` if none is)."""
    eps_values = sorted(set.intersection(*(set(s) for s in sweeps.values())))
    for eps in eps_values:
        if eps > 0 and all(s[eps] < threshold for s in sweeps.values()):
            return eps
    return None


def reference_budgets(sweeps: dict[str, dict[float, float]], threshold: float = 10.0) -> dict[str, float | None]:
    """Each task's own reference budget: the smallest eps of its sweep at which its top-1 falls below
    ``threshold`` percent (``None`` where it never does in the grid)."""
    return {task: collapse_radius(s, threshold) for task, s in sweeps.items()}


def last_to_fall(radii: dict[str, float | None]) -> str:
    """The task that collapses last: the largest reference budget, a task that never falls in the grid first."""
    return max(radii, key=lambda task: float("inf") if radii[task] is None else radii[task])


def correct_table(defenses: dict[str, nn.Module], inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """Per-image correctness (bool, CPU) of every defense (name -> [0, 1] pixels -> logits) on every input set
    (name -> (images, labels)). Returns ``{defense: {input set: (N,) bool}}``."""
    return {d: {s: correct(model, x, y) for s, (x, y) in inputs.items()} for d, model in defenses.items()}


def accuracy_table(defenses: dict[str, nn.Module], inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]
                   ) -> dict[str, dict[str, float]]:
    """Top-1 (%) of every defense on every input set: the means of :func:`correct_table`."""
    return {d: {s: 100.0 * c.float().mean().item() for s, c in row.items()}
            for d, row in correct_table(defenses, inputs).items()}


def autoattack_correct(bundle, tasks: dict, budgets: dict[str, float] | dict[str, dict[str, float]], *,
                       steps: int = 100, seed: int = 0, batch_size: int | None = None
                       ) -> dict[str, dict[str, torch.Tensor]]:
    """Per-image zero-shot correctness of ``bundle`` on each task, clean and under AutoAttack (APGD-CE + APGD-DLR,
    :func:`rclip.attacks.autoattack`) at each ℓ∞ budget, the attack white-box against this very model.

    As in AutoAttack's protocol only the images still classified correctly are attacked: first the clean-correct
    ones at the smallest budget, then, at each larger budget, those that survived the smaller one (an adversarial
    image within a smaller ball is one within the larger ball too, so robust accuracy can only fall). A label whose
    budget equals one already attacked on this task (e.g. a reference budget of 2/255 beside the nominal 2/255)
    takes that budget's result: AutoAttack runs once per distinct budget.

    tasks: name -> ZeroShotTask (class embeddings from its templates). budgets: label -> eps ([0, 1] units), or
    label -> {task: eps} for a budget that differs by task (the world's per-task reference budgets; a task
    missing from it is not attacked at that label). Returns ``{task: {"clean": (N,) bool, label: (N,) bool}}``.
    """
    out = {}
    for name, task in tasks.items():
        x, y = task.tensors()
        x, y = x.to(bundle.device), y.to(bundle.device)
        clf = zeroshot_classifier(bundle, task)
        alive = predict(clf, x).to(y.device) == y
        row = {"clean": alive.cpu().clone()}
        own = {label: (eps if not isinstance(eps, dict) else eps.get(name)) for label, eps in budgets.items()}
        done = {}                                   # budget -> the label that attacked it
        for label, eps in sorted(((k, v) for k, v in own.items() if v is not None), key=lambda kv: kv[1]):
            if eps in done:
                row[label] = row[done[eps]].clone()
                continue
            done[eps] = label
            idx = alive.nonzero().flatten()
            if len(idx):
                adv = autoattack(clf, x[idx], y[idx], eps, steps=steps, seed=seed, batch_size=batch_size)
                alive[idx] = predict(clf, adv).to(y.device) == y[idx]
            row[label] = alive.cpu().clone()
        out[name] = {k: row[k] for k in ["clean", *budgets] if k in row}
    return out


class Scores:
    """Per-item correctness of models on tasks under conditions (``"clean"``, ``"PGD 1/255"``, ...), and every
    figure derived from it: the accuracy table with each task's chance level, means over the tasks on which a model
    is above chance (the others left out and named), and the per-item arrays a claim compares.

    chance: task -> number of classes. A model is above chance on a task when the Wilson interval of its clean
    accuracy lies above 1/K (:func:`rclip.claims.above_chance`).
    """

    def __init__(self, classes: dict[str, int], clean: str = "clean"):
        self.classes = dict(classes)
        self.clean = clean
        self.data: dict[tuple[str, str, str], np.ndarray] = {}

    def add(self, model: str, task: str, condition: str, correct_: torch.Tensor | np.ndarray) -> None:
        """Record (N,) per-item correctness (bool or 0/1) of ``model`` on ``task`` under ``condition``."""
        if task not in self.classes:
            raise RClipError(f"task {task!r} has no class count; known: {sorted(self.classes)}")
        arr = np.asarray(correct_.cpu().numpy() if hasattr(correct_, "cpu") else correct_, dtype=float) * 100.0
        self.data[(model, task, condition)] = arr

    def add_all(self, model: str, per_task: dict[str, dict[str, torch.Tensor]]) -> "Scores":
        """Record ``{task: {condition: (N,) bool}}`` (e.g. :func:`autoattack_correct`) for ``model``."""
        for task, row in per_task.items():
            for condition, c in row.items():
                self.add(model, task, condition, c)
        return self

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(m for m, _, _ in self.data))

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(t for _, t, _ in self.data))

    @property
    def conditions(self) -> list[str]:
        return list(dict.fromkeys(c for _, _, c in self.data))

    def chance(self, task: str) -> float:
        return 100.0 / self.classes[task]

    def above_chance(self, model: str, task: str) -> bool:
        from rclip.claims import above_chance

        key = (model, task, self.clean)
        if key not in self.data:
            raise RClipError(f"no clean scores of {model} on {task}: record condition {self.clean!r} first")
        return above_chance(self.data[key], self.classes[task])["above"]

    def tasks_above_chance(self, *models: str) -> list[str]:
        """The tasks on which every one of ``models`` is above chance."""
        return [t for t in self.tasks if all((m, t, self.clean) in self.data and self.above_chance(m, t)
                                             for m in models)]

    def table(self) -> pd.DataFrame:
        """Top-1 (%) per (model, task) and condition, with the task's chance level and whether the model's clean
        accuracy is above it."""
        rows = {}
        for (m, t, c), arr in self.data.items():
            rows.setdefault((m, t), {})[c] = float(arr.mean())
        df = pd.DataFrame(rows).T.reindex(columns=self.conditions).astype(float)
        df.index.names = ["model", "task"]
        df.insert(0, "chance", [self.chance(t) for _, t in df.index])
        df["above chance"] = [self.above_chance(m, t) if (m, t, self.clean) in self.data else None
                              for m, t in df.index]
        return df

    def means(self) -> pd.DataFrame:
        """Mean top-1 (%) per model and condition over the tasks on which the model is above chance; the column
        ``left out`` names the others."""
        rows = {}
        for m in self.models:
            keep = self.tasks_above_chance(m)
            row = {c: float(np.mean([self.data[(m, t, c)].mean() for t in keep if (m, t, c) in self.data]))
                   if any((m, t, c) in self.data for t in keep) else float("nan") for c in self.conditions}
            row["left out (at chance)"] = ", ".join(t for t in self.tasks if t not in keep
                                                    and (m, t, self.clean) in self.data) or "—"
            rows[m] = row
        df = pd.DataFrame(rows).T
        df.index.name = "model"
        return df.astype({c: float for c in self.conditions})

    def items(self, model: str, condition: str, tasks: Sequence[str]) -> np.ndarray:
        """The per-item 0/100 values of ``model`` under ``condition`` on ``tasks``, concatenated in task order."""
        missing = [t for t in tasks if (model, t, condition) not in self.data]
        if missing:
            raise RClipError(f"no scores of {model} under {condition!r} on {missing}")
        return np.concatenate([self.data[(model, t, condition)] for t in tasks])

    def disagreement(self, a: str, b: str, condition: str) -> float | None:
        """The share (%) of items that models ``a`` and ``b`` score differently under ``condition``, over the tasks
        on which both are above chance (those a :meth:`compare` of the two pools): the precondition that two models
        meant to differ do. None when no such task."""
        keep = self.tasks_above_chance(a, b)
        if not keep:
            return None
        return float((self.items(a, condition, keep) != self.items(b, condition, keep)).mean() * 100)

    def compare(self, claim: str, a: str, b: str, condition: str, *, condition_b: str | None = None,
                tasks: Sequence[str] | None = None, preconditions=(), **kw) -> dict:
        """A claim that model ``a`` beats model ``b`` under ``condition`` (``b`` under ``condition_b`` if given),
        item by item over ``tasks`` (default: every task on which both are above chance). Precondition: at least
        one such task. Other keywords go to :func:`rclip.claims.compare`."""
        from rclip.claims import Precondition, compare, untestable

        pool = list(tasks) if tasks is not None else self.tasks
        keep = [t for t in pool if t in self.tasks_above_chance(a, b)]
        pre = [Precondition.at_least(f"tasks on which {a} and {b} are above chance", len(keep), 1), *preconditions]
        kw.setdefault("items", "images")
        kw.setdefault("labels", (a, b))
        note = kw.pop("note", "") + ("" if keep == pool else
                                     f" Left out (at chance): {', '.join(t for t in pool if t not in keep)}.")
        if not keep:
            return untestable(claim, metric=kw.pop("metric", f"top-1 (%), {condition}"), preconditions=pre,
                              note=note.strip(), **{k: v for k, v in kw.items() if k in ("source", "labels", "items")})
        kw.setdefault("metric", f"top-1 (%), {condition}" + (f" vs {condition_b}" if condition_b else "")
                      + f", {len(keep)} task(s)")
        return compare(claim, self.items(a, condition, keep), self.items(b, condition_b or condition, keep),
                       preconditions=pre, note=note.strip(), **kw)


def transfer_sets(victim: nn.Module, images: torch.Tensor, labels: torch.Tensor, budgets: dict[str, float], *,
                  steps: int = 10, seed: int = 0, attacks: Sequence[str] | dict[str, Sequence[str] | None] = ("pgd", "cw"),
                  kappa: float = 50.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Clean images and their adversarial versions against ``victim`` ([0, 1] pixels -> logits), computed once so
    that every defense is scored on the same images (the COLA/TTC protocol: a transfer attack from the undefended
    model). attacks: ``"pgd"`` (cross-entropy) and/or ``"cw"`` (the CW margin with ``kappa``), ``steps`` steps of
    ε/4 from a random start, at every budget; or a dict attack -> the budget names it runs at (``None``: all).
    Returns ``{"clean": (x, y), "PGD <budget>": (x_adv, y), "CW <budget>": ...}``."""
    from rclip.attacks.image import cw

    where = dict(attacks) if isinstance(attacks, dict) else {a: None for a in attacks}
    for attack, names in where.items():
        unknown = sorted(set(names or ()) - set(budgets))
        if unknown:
            raise RClipError(f"{attack} budgets {unknown} are not among the budgets {sorted(budgets)}")
    sets = {"clean": (images, labels)}
    for name, eps in budgets.items():
        for attack in (a for a, names in where.items() if names is None or name in names):
            if attack == "pgd":
                sets[f"PGD {name}"] = (pgd(victim, images, labels, eps, steps=steps, seed=seed), labels)
            elif attack == "cw":
                sets[f"CW {name}"] = (cw(victim, images, labels, eps, steps=steps, kappa=kappa, seed=seed), labels)
            else:
                raise RClipError(f"unknown transfer attack {attack!r}; choose 'pgd' or 'cw'")
    return sets


def ms_per_image(classifiers: dict[str, nn.Module], images: torch.Tensor, warmup: int = 4) -> dict[str, float]:
    """Milliseconds per image to classify ``images`` with each classifier, measured back to back on the same
    images after ``warmup`` images of warm-up (wall clock, this machine)."""
    import time

    out = {}
    for name, model in classifiers.items():
        with torch.no_grad():
            model(images[:warmup])
            t0 = time.perf_counter()
            model(images)
            out[name] = (time.perf_counter() - t0) / len(images) * 1e3
    return out
