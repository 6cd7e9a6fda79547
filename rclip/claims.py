"""The claims engine: one rule that turns a paired comparison into a verdict, for every chapter.

A claim says that side A beats side B on a per-item metric measured on the *same* test items (images, captions,
targets): ``a[i]`` and ``b[i]`` belong to item ``i``. The engine estimates the mean paired difference
``mean(a - b)`` with a 95 % confidence interval and gives one of four verdicts:

* **reproduced** — the interval lies wholly on the claim's side of its null value (0, or ``-tolerance`` for a
  claim of the form "A is no worse than B by more than ``tolerance``");
* **not reproduced** — the interval lies wholly on the other side, or wholly below the effect size the paper
  states (``effect``);
* **undecided** — the interval contains the null value; the record then says how many items the observed
  difference would need (``n_needed``: 80 % power at a two-sided 5 % level; with several training seeds, items
  at that many seeds, the seed part of the error held fixed — or none, if that part alone is too wide);
* **untestable** — a named precondition failed (its value and threshold are recorded); the data are still
  summarised, but no verdict is drawn from them.

Statistics come from scipy and statsmodels, not re-derived: the interval is :func:`scipy.stats.bootstrap` (BCa)
of the mean paired difference; for 0/100 metrics (correct or not) the exact McNemar p-value
(:func:`statsmodels.stats.contingency_tables.mcnemar`) is recorded beside it; single proportions get Wilson or
Clopper–Pearson intervals (:func:`proportion`). Where training randomness matters, ``a`` and ``b`` may be
``(seeds, items)`` arrays: the interval then resamples seeds, then items within them (a two-level bootstrap),
so it covers seed variance as well.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from rclip.errors import RClipError

VERDICTS = ("reproduced", "not reproduced", "undecided", "untestable")
SOURCES = ("paper", "book")
CONFIDENCE = 0.95
POWER = 0.8


@dataclass(frozen=True)
class Precondition:
    """A condition a comparison needs before it can test its claim: ``value`` measured against ``threshold``.

    Build one with :meth:`at_least` or :meth:`at_most` so that ``holds`` is computed, not asserted."""
    name: str
    value: float | None
    threshold: float
    holds: bool
    relation: str = ">="

    @classmethod
    def at_least(cls, name: str, value: float | None, threshold: float) -> "Precondition":
        ok = value is not None and not _isnan(value) and float(value) >= threshold
        return cls(name, None if value is None else float(value), float(threshold), bool(ok), ">=")

    @classmethod
    def at_most(cls, name: str, value: float | None, threshold: float) -> "Precondition":
        ok = value is not None and not _isnan(value) and float(value) <= threshold
        return cls(name, None if value is None else float(value), float(threshold), bool(ok), "<=")

    @classmethod
    def below(cls, name: str, value: float | None, threshold: float) -> "Precondition":
        ok = value is not None and not _isnan(value) and float(value) < threshold
        return cls(name, None if value is None else float(value), float(threshold), bool(ok), "<")

    @classmethod
    def above(cls, name: str, value: float | None, threshold: float) -> "Precondition":
        ok = value is not None and not _isnan(value) and float(value) > threshold
        return cls(name, None if value is None else float(value), float(threshold), bool(ok), ">")

    def text(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        return f"{self.name}: {value} {self.relation} {self.threshold:g} {'✓' if self.holds else '✗'}"


def _isnan(x) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def _as_2d(x, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=float)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise RClipError(f"{name} must be per-item values, shape (items,) or (seeds, items); got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise RClipError(f"{name} has no items: a claim needs at least one test item per side")
    if not np.isfinite(arr).all():
        raise RClipError(f"{name} contains NaN or inf: drop the items that have no value before comparing")
    return arr


def paired_interval(d: np.ndarray, *, confidence: float = CONFIDENCE, n_resamples: int = 9999, seed: int = 0
                    ) -> tuple[float, float, float]:
    """(low, high, standard error) of the mean of ``d`` — paired differences, shape (seeds, items).

    One seed: :func:`scipy.stats.bootstrap` (BCa) of the mean. Several seeds: a two-level percentile bootstrap
    (seeds with replacement, then items with replacement; every seed is scored on the same test items, so one item
    draw serves all drawn seeds, and both sides, because ``d`` already holds their differences). A constant ``d``
    has a zero-width interval.
    """
    from scipy import stats

    if np.ptp(d) == 0:
        v = float(d.flat[0])
        return v, v, 0.0
    rng = np.random.default_rng(seed)
    if d.shape[0] == 1:
        res = stats.bootstrap((d[0],), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                              method="BCa", rng=rng, vectorized=True)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (np.isfinite(low) and np.isfinite(high)):  # BCa can fail on near-constant data: percentile then
            res = stats.bootstrap((d[0],), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                  method="percentile", rng=rng, vectorized=True)
            low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        return low, high, float(res.standard_error)
    s, n = d.shape
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 500):       # chunks keep memory at 500 x seeds x items
        m = min(500, n_resamples - start)
        seeds = rng.integers(0, s, size=(m, s))
        items = rng.integers(0, n, size=(m, 1, n))   # the same test items serve every seed (crossed, not nested)
        means[start:start + m] = d[seeds[..., None], items].mean(axis=(1, 2))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high), float(means.std(ddof=1))


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Exact McNemar p-value (statsmodels) for paired 0/1 outcomes (values 0 or 1, or 0 or 100); None otherwise."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    top = max(a.max(initial=0), b.max(initial=0))
    scale = 100.0 if top > 1 else 1.0
    if not (np.isin(a, (0, scale)).all() and np.isin(b, (0, scale)).all()):
        return None
    a, b = a > 0, b > 0
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    return float(mcnemar(table, exact=True).pvalue)


def n_needed(estimate: float, standard_error: float, n: int, *, confidence: float = CONFIDENCE,
             power: float = POWER, null: float = 0.0, seed_error: float = 0.0) -> int | None:
    """Items the observed difference would need to be resolved: the n at which a two-sided test at level
    1 - ``confidence`` has ``power`` against ``estimate``. Only the item part of the variance shrinks with n
    (as 1/n): ``seed_error`` is the standard error that comes from training seeds (:func:`seed_error`), which more
    items at the same seeds do not reduce. None when the observed difference equals the null value, or when the
    seed part alone is too wide for any n at these seeds (then more seeds are needed, not more items)."""
    from scipy.stats import norm

    gap = abs(estimate - null)
    if gap == 0 or standard_error <= 0:
        return None
    z = norm.ppf(1 - (1 - confidence) / 2) + norm.ppf(power)
    target = (gap / z) ** 2                     # the variance of the mean at which the test has that power
    seed_var = min(seed_error ** 2, standard_error ** 2)
    if seed_var >= target:
        return None
    return int(math.ceil(n * (standard_error ** 2 - seed_var) / (target - seed_var)))


def seed_error(d: np.ndarray) -> float:
    """The part of the standard error of ``d.mean()`` that comes from training seeds, for paired differences ``d``
    of shape (seeds, items) scored on the same items: the spread of the per-seed means over sqrt(seeds) (the item
    effects cancel between seeds, so what remains is seed-to-seed variation and its interaction with items).
    0 for one seed."""
    s = d.shape[0]
    return 0.0 if s < 2 else float(np.std(d.mean(axis=1), ddof=1) / math.sqrt(s))


def verdict_of(low: float, high: float, *, null: float = 0.0, effect: float | None = None,
               preconditions: Sequence[Precondition] = ()) -> str:
    """The engine's rule (see the module docstring), on an interval oriented so the claim's side is positive."""
    if any(not p.holds for p in preconditions):
        return "untestable"
    if high < null or (effect is not None and high < effect):
        return "not reproduced"
    if low > null:
        return "reproduced"
    return "undecided"


def compare(claim: str, a, b, *, metric: str, source: str = "paper", labels: tuple[str, str] = ("A", "B"),
            tolerance: float = 0.0, effect: float | None = None, preconditions: Iterable[Precondition] = (),
            items: str = "items", note: str = "", confidence: float = CONFIDENCE, n_resamples: int = 9999,
            seed: int = 0) -> dict:
    """Decide ``claim``: side ``a`` is larger than side ``b`` on ``metric``, item by item.

    a, b: per-item values on the same items, shape (items,) or (seeds, items) (points for accuracies: 0 or 100).
    To claim that A is *smaller* (e.g. a lower attack success rate), pass the sides the other way round and say so
    in ``labels``. tolerance: a non-inferiority margin — the claim is "A is no worse than B by more than
    ``tolerance``" (null value ``-tolerance``). effect: the minimum difference the paper states; an interval wholly
    below it is "not reproduced". source: ``"paper"`` (the claim is quoted from the paper) or ``"book"`` (the
    book's own reading). Returns the record that goes to ``results.claims``.
    """
    if source not in SOURCES:
        raise RClipError(f"source must be one of {SOURCES}, got {source!r}")
    if tolerance < 0:
        raise RClipError(f"tolerance is a non-negative margin, got {tolerance}")
    pre = list(preconditions)
    A, B = _as_2d(a, "a"), _as_2d(b, "b")
    if A.shape != B.shape:
        raise RClipError(f"a and b must be measured on the same items (and seeds): shapes {A.shape} vs {B.shape}")
    d = A - B
    estimate = float(d.mean())
    low, high, se = paired_interval(d, confidence=confidence, n_resamples=n_resamples, seed=seed)
    null = 0.0 - float(tolerance)
    verdict = verdict_of(low, high, null=null, effect=effect, preconditions=pre)
    n = int(d.shape[1])
    seed_se = seed_error(d)
    need = n_needed(estimate, se, n, confidence=confidence, null=null, seed_error=seed_se) \
        if verdict == "undecided" else None
    return {
        "claim": claim, "source": source, "metric": metric, "items": items, "n": n, "seeds": int(d.shape[0]),
        "sides": list(labels), "mean_a": float(A.mean()), "mean_b": float(B.mean()),
        "estimate": estimate, "ci_low": low, "ci_high": high, "confidence": confidence,
        "null": null, "effect": effect,
        "p_mcnemar": mcnemar_p(A, B) if d.shape[0] == 1 else None,
        "verdict": verdict,
        "n_needed": need,
        "preconditions": [asdict(p) for p in pre],
        "note": note,
    } | ({"seed_error": seed_se} if d.shape[0] > 1 else {})


def untestable(claim: str, *, metric: str, preconditions: Iterable[Precondition], source: str = "paper",
               labels: tuple[str, str] = ("A", "B"), items: str = "items", note: str = "") -> dict:
    """The record of a claim whose comparison could not be run because a precondition failed before it."""
    pre = list(preconditions)
    if all(p.holds for p in pre):
        raise RClipError(f"claim {claim!r}: untestable() needs a failed precondition; every one given holds")
    return {"claim": claim, "source": source, "metric": metric, "items": items, "n": 0, "seeds": 0,
            "sides": list(labels), "mean_a": None, "mean_b": None, "estimate": None, "ci_low": None,
            "ci_high": None, "confidence": CONFIDENCE, "null": 0.0, "effect": None, "p_mcnemar": None,
            "verdict": "untestable", "n_needed": None, "preconditions": [asdict(p) for p in pre], "note": note}


def proportion(count: int, n: int, *, method: str = "wilson", confidence: float = CONFIDENCE) -> dict:
    """A proportion in points with its interval (statsmodels' ``proportion_confint``: ``"wilson"`` or
    ``"beta"`` = Clopper–Pearson)."""
    from statsmodels.stats.proportion import proportion_confint

    if n <= 0:
        raise RClipError("a proportion needs n > 0 trials")
    if not 0 <= count <= n:
        raise RClipError(f"count {count} is outside [0, n = {n}]")
    low, high = proportion_confint(count, n, alpha=1 - confidence, method=method)
    return {"estimate": 100.0 * count / n, "ci_low": 100.0 * float(low), "ci_high": 100.0 * float(high), "n": n}


def above_chance(correct, num_classes: int, *, confidence: float = CONFIDENCE) -> dict:
    """Is a classifier above chance on a task? ``correct``: per-item 0/1 (or 0/100) outcomes on clean images.

    Above chance when the Wilson interval's lower end exceeds 1 / ``num_classes`` (one-sided test at level
    (1 - confidence) / 2). Returns {accuracy, ci_low, chance, above} in points."""
    c = np.asarray(correct.detach().cpu().numpy() if hasattr(correct, "detach") else correct, float).ravel()
    hits = int((c > 0).sum())
    p = proportion(hits, len(c), confidence=confidence)
    chance = 100.0 / num_classes
    return {"accuracy": p["estimate"], "ci_low": p["ci_low"], "chance": chance, "above": bool(p["ci_low"] > chance)}


def check(record: dict) -> dict:
    """Validate a claim record against the schema of ``results.claims``; returns it."""
    required = ("claim", "source", "metric", "n", "estimate", "ci_low", "ci_high", "verdict", "preconditions",
                "n_needed")
    missing = [k for k in required if k not in record]
    if missing:
        raise RClipError(f"claim record lacks {missing}: build it with rclip.claims.compare or untestable")
    if record["verdict"] not in VERDICTS:
        raise RClipError(f"verdict {record['verdict']!r} is not one of {VERDICTS}")
    if record["source"] not in SOURCES:
        raise RClipError(f"source {record['source']!r} is not one of {SOURCES}")
    for p in record["preconditions"]:
        if set(p) < {"name", "value", "threshold", "holds"}:
            raise RClipError(f"precondition {p} lacks name / value / threshold / holds")
    if record["verdict"] == "undecided" and record["n_needed"] is None and record["estimate"] not in (None, 0.0) \
            and record["ci_low"] != record["ci_high"] and not record.get("seed_error"):
        raise RClipError(f"claim {record['claim']!r} is undecided but gives no n_needed")
    return record


def table(records: Sequence[dict]):
    """The rendered claims table: one row per claim, the interval beside the estimate, the verdict, what a
    failed precondition measured, and the n an undecided claim would need."""
    import pandas as pd

    rows = []
    for r in map(check, records):
        est = "—" if r["estimate"] is None else interval_text(r)
        sides = f"{r['sides'][0]} {r['mean_a']:.1f} vs {r['sides'][1]} {r['mean_b']:.1f}" \
            if r["mean_a"] is not None else " vs ".join(r["sides"])
        pre = "; ".join(Precondition(**p).text() for p in r["preconditions"]) or "—"
        verdict = r["verdict"]
        if verdict == "undecided":
            verdict += _needed_text(r)
        rows.append({"claim": r["claim"], "source": r["source"], "metric": r["metric"],
                     "n": f"{r['n']:,} {r.get('items', 'items')}" + (f" × {r['seeds']} seeds" if r.get("seeds", 1) > 1
                                                                      else ""),
                     "sides": sides, "difference [95 % CI]": est, "verdict": verdict, "preconditions": pre})
    return pd.DataFrame(rows).set_index("claim")


def _needed_text(r: dict) -> str:
    """What an undecided claim would need, for the claims table."""
    seeds = r.get("seeds", 1)
    if r["n_needed"]:
        return f" (n ≈ {r['n_needed']:,} {r.get('items', 'items')}" + (f" at {seeds} seeds)" if seeds > 1 else ")")
    if r.get("seed_error"):
        return f" (more than {seeds} seeds: their spread alone exceeds what the difference allows)"
    return " (no difference)"


def interval_text(record: dict, digits: int = 1) -> str:
    """A record's paired difference as prose reads it: "+3.4 [+1.4, +5.6]" (estimate [95 % interval]), or
    "untestable" when nothing was estimated (:func:`untestable`'s records). A record that was estimated but whose
    precondition failed still reads its numbers: its verdict, not this text, says it is untestable."""
    r = check(record)
    if r["estimate"] is None:
        return "untestable"
    f = "{:+." + str(digits) + "f}"
    return f"{f.format(r['estimate'])} [{f.format(r['ci_low'])}, {f.format(r['ci_high'])}]"


def grid(records: Mapping[tuple, dict], *, names: Sequence[str] | None = None, digits: int = 1):
    """Many paired differences at a glance (an ablation against its default, say).

    ``records`` maps keys ``(row, ..., column)`` — every key of the same length — to records of :func:`compare`.
    Each cell reads "estimate [low, high]" followed by "✓" when the engine decides the claim either way
    (reproduced or not reproduced), "?" when it is undecided, and "untestable" when a precondition failed. Rows
    and columns keep the order of first appearance; ``names`` names the row levels. Missing cells show "—".
    """
    import pandas as pd

    if not isinstance(records, Mapping) or not records:
        raise RClipError("grid() needs a non-empty mapping {(row, ..., column): record of claims.compare}")
    lengths = {len(k) if isinstance(k, tuple) else 0 for k in records}
    if min(lengths) < 2 or len(lengths) > 1:
        raise RClipError(f"grid() keys must be tuples (row, ..., column) of one length >= 2; got lengths "
                         f"{sorted(lengths)} (0: not a tuple)")
    marks = {"reproduced": "✓", "not reproduced": "✓", "undecided": "?", "untestable": "untestable"}
    cells, rows, cols = {}, {}, {}
    for key, r in records.items():
        r = check(r)
        row, col = key[:-1], key[-1]
        rows.setdefault(row, None)
        cols.setdefault(col, None)
        cells[row, col] = marks[r["verdict"]] if r["estimate"] is None else \
            f"{interval_text(r, digits)} {marks[r['verdict']]}"
    index = pd.MultiIndex.from_tuples(list(rows), names=names) if len(next(iter(rows))) > 1 else \
        pd.Index([r[0] for r in rows], name=names[0] if names else None)
    return pd.DataFrame([[cells.get((row, c), "—") for c in cols] for row in rows], index=index, columns=list(cols))


__all__ = ["VERDICTS", "Precondition", "compare", "untestable", "proportion", "above_chance", "paired_interval",
           "mcnemar_p", "n_needed", "seed_error", "verdict_of", "check", "table", "interval_text", "grid"]
