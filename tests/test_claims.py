"""The claims engine against independent computations: scipy's bootstrap, statsmodels' McNemar, and simulation."""
import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

from rclip import claims
from rclip.errors import RClipError


def _pair(rng, n, pa, pb, rho=0.0):
    """Paired 0/100 outcomes of two classifiers with accuracies pa, pb (correlated through a shared draw)."""
    u = rng.random(n)
    v = np.where(rng.random(n) < rho, u, rng.random(n))
    return (u < pa) * 100.0, (v < pb) * 100.0


def test_interval_equals_scipy_bootstrap_on_the_same_data():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 3.0, 300)
    b = a - rng.normal(0.4, 1.0, 300)
    rec = claims.compare("a beats b", a, b, metric="m", seed=7, n_resamples=4000)
    ref = stats.bootstrap((a - b,), np.mean, n_resamples=4000, method="BCa", rng=np.random.default_rng(7))
    assert rec["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert rec["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=1e-12)
    assert rec["estimate"] == pytest.approx(float(np.mean(a - b)))
    # scipy's own paired form gives the same interval (it resamples the same item indices for both sides)
    paired = stats.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True,
                             n_resamples=4000, method="percentile", rng=np.random.default_rng(3))
    rec_p = claims.compare("a beats b", a, b, metric="m", seed=3, n_resamples=4000)
    assert abs(rec_p["ci_low"] - paired.confidence_interval.low) < 0.05
    assert abs(rec_p["ci_high"] - paired.confidence_interval.high) < 0.05


def test_mcnemar_p_equals_statsmodels():
    rng = np.random.default_rng(1)
    a, b = _pair(rng, 400, 0.62, 0.55, rho=0.5)
    rec = claims.compare("a beats b", a, b, metric="top-1")
    A, B = a > 0, b > 0
    table = [[(A & B).sum(), (A & ~B).sum()], [(~A & B).sum(), (~A & ~B).sum()]]
    assert rec["p_mcnemar"] == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert claims.mcnemar_p(np.array([0.5, 1.0]), np.array([1.0, 0.0])) is None   # not 0/1 outcomes


def test_null_simulation_is_mostly_undecided():
    """Two classifiers with the same accuracy, n = 500: at most 7 % of 200 runs are called anything but
    undecided."""
    rng = np.random.default_rng(2)
    called = 0
    for i in range(200):
        a, b = _pair(rng, 500, 0.6, 0.6, rho=0.3)
        called += claims.compare("a beats b", a, b, metric="top-1", n_resamples=2000, seed=i)["verdict"] != "undecided"
    assert called / 200 <= 0.07


def test_true_difference_is_reproduced():
    """A true difference of 10 points at n = 1000 is called reproduced at least 95 % of the time."""
    rng = np.random.default_rng(3)
    hits = 0
    for i in range(100):
        a, b = _pair(rng, 1000, 0.65, 0.55, rho=0.3)
        hits += claims.compare("a beats b", a, b, metric="top-1", n_resamples=2000, seed=i)["verdict"] == "reproduced"
    assert hits >= 95


def test_failed_precondition_is_untestable_whatever_the_data():
    rng = np.random.default_rng(4)
    a, b = _pair(rng, 1000, 0.9, 0.1)
    bad = claims.Precondition.at_least("baseline robust accuracy", 3.0, 10.0)
    good = claims.Precondition.at_least("model above chance", 40.0, 25.0)
    for pre in ([bad], [good, bad]):
        rec = claims.compare("a beats b", a, b, metric="top-1", preconditions=pre)
        assert rec["verdict"] == "untestable"
        assert {"name", "value", "threshold", "holds"} <= set(rec["preconditions"][-1])
    assert claims.compare("a beats b", a, b, metric="top-1", preconditions=[good])["verdict"] == "reproduced"
    rec = claims.untestable("a beats b", metric="top-1", preconditions=[bad])
    assert rec["verdict"] == "untestable" and claims.check(rec) is rec
    with pytest.raises(RClipError, match="failed precondition"):
        claims.untestable("a beats b", metric="top-1", preconditions=[good])


def test_verdicts_other_side_effect_tolerance_and_n_needed():
    rng = np.random.default_rng(5)
    a, b = _pair(rng, 1000, 0.45, 0.65)
    assert claims.compare("a beats b", a, b, metric="m")["verdict"] == "not reproduced"
    a, b = _pair(rng, 1000, 0.70, 0.60)
    rec = claims.compare("a beats b by 28 points", a, b, metric="m", effect=28.0)
    assert rec["ci_low"] > 0 and rec["verdict"] == "not reproduced"      # significant, but far below the stated size
    # non-inferiority: A within 5 points of B although slightly worse
    a, b = _pair(rng, 4000, 0.60, 0.61, rho=0.9)
    assert claims.compare("a keeps b's accuracy", a, b, metric="m", tolerance=5.0)["verdict"] == "reproduced"
    # undecided gives the n the observed difference needs; n at that size resolves it
    a, b = _pair(rng, 200, 0.62, 0.58, rho=0.3)
    rec = claims.compare("a beats b", a, b, metric="m")
    assert rec["verdict"] == "undecided" and rec["n_needed"] > 200
    d = a - b
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    expect = (z * d.std(ddof=1) / abs(d.mean())) ** 2
    assert rec["n_needed"] == pytest.approx(expect, rel=0.15)


def test_n_needed_with_seeds_holds_the_seed_part_fixed():
    rng = np.random.default_rng(11)
    items = rng.normal(0.0, 20.0, size=300)                   # one item effect, shared by every seed (crossed)
    items += 2.0 - items.mean()                               # a mean difference of 2 points, standard error ~1.2
    same = np.stack([items] * 3)                              # no seed spread: the single-seed answer
    rec1 = claims.compare("a beats b", items, np.zeros(300), metric="m")
    rec3 = claims.compare("a beats b", same, np.zeros((3, 300)), metric="m")
    assert rec3["seed_error"] == 0.0 and rec1["verdict"] == rec3["verdict"] == "undecided"
    assert rec3["n_needed"] == pytest.approx(rec1["n_needed"], rel=0.15)
    # a modest seed spread: more items are needed than if all the error came from items
    spread = same + np.array([[-0.6], [0.0], [0.6]])
    rec = claims.compare("a beats b", spread, np.zeros((3, 300)), metric="m")
    assert rec["verdict"] == "undecided" and rec["seed_error"] == pytest.approx(0.6 / np.sqrt(3))
    naive = claims.n_needed(rec["estimate"], (rec["ci_high"] - rec["ci_low"]) / 3.92, 300)
    assert rec["n_needed"] > naive
    assert "at 3 seeds" in claims.table([rec])["verdict"].iloc[0]
    # seeds far apart: no number of items at three seeds resolves it, and the table says more seeds are needed
    wide = same + np.array([[-30.0], [0.0], [30.0]])
    rec = claims.compare("a beats b", wide, np.zeros((3, 300)), metric="m")
    assert rec["verdict"] == "undecided" and rec["n_needed"] is None
    assert "more than 3 seeds" in claims.table([rec])["verdict"].iloc[0]
    assert "seed_error" not in rec1                            # one seed: the record is as before


def test_constant_and_bad_inputs():
    rec = claims.compare("a beats b", np.full(50, 100.0), np.full(50, 100.0), metric="m")
    assert rec["verdict"] == "undecided" and rec["ci_low"] == rec["ci_high"] == 0 and rec["n_needed"] is None
    assert claims.compare("a beats b", np.full(50, 100.0), np.zeros(50), metric="m")["verdict"] == "reproduced"
    with pytest.raises(RClipError, match="same items"):
        claims.compare("x", np.zeros(5), np.zeros(6), metric="m")
    with pytest.raises(RClipError, match="NaN"):
        claims.compare("x", np.array([1.0, np.nan]), np.zeros(2), metric="m")
    with pytest.raises(RClipError, match="source"):
        claims.compare("x", np.zeros(5), np.zeros(5), metric="m", source="abstract")


def test_seeds_widen_the_interval():
    """With (seeds, items) inputs the interval covers seed variance: seeds that disagree widen it."""
    rng = np.random.default_rng(6)
    base_a, base_b = _pair(rng, 500, 0.62, 0.55, rho=0.5)
    same = claims.compare("x", np.stack([base_a] * 3), np.stack([base_b] * 3), metric="m", n_resamples=3000)
    single = claims.compare("x", base_a, base_b, metric="m", n_resamples=3000)
    assert same["seeds"] == 3
    assert same["ci_high"] - same["ci_low"] == pytest.approx(single["ci_high"] - single["ci_low"], rel=0.15)
    shifted_a = np.stack([base_a, np.roll(base_a, 1), np.where(rng.random(500) < 0.3, 0.0, base_a)])
    spread = claims.compare("x", shifted_a, np.stack([base_b] * 3), metric="m", n_resamples=3000)
    assert spread["ci_high"] - spread["ci_low"] > single["ci_high"] - single["ci_low"]


def test_proportions_and_chance():
    from statsmodels.stats.proportion import proportion_confint

    p = claims.proportion(30, 50, method="beta")
    low, high = proportion_confint(30, 50, method="beta")
    assert p["ci_low"] == pytest.approx(100 * low) and p["ci_high"] == pytest.approx(100 * high)
    assert claims.above_chance(np.r_[np.ones(30), np.zeros(70)], 4)["above"] is False   # 30 % on 4 classes
    assert claims.above_chance(np.r_[np.ones(45), np.zeros(55)], 4)["above"] is True


def test_table_shows_interval_and_verdicts():
    rng = np.random.default_rng(8)
    a, b = _pair(rng, 300, 0.7, 0.5)
    recs = [claims.compare("A beats B", a, b, metric="top-1", labels=("A", "B"), items="images"),
            claims.untestable("C beats D", metric="top-1",
                              preconditions=[claims.Precondition.at_least("D robust", 1.0, 10.0)])]
    t = claims.table(recs)
    assert list(t["verdict"]) == ["reproduced", "untestable"]
    assert "[" in t.loc["A beats B", "difference [95 % CI]"]
    assert "D robust: 1 >= 10 ✗" in t.loc["C beats D", "preconditions"]


def test_grid_lays_records_out_by_row_and_column_with_the_engines_verdict():
    rng = np.random.default_rng(9)
    a, b = _pair(rng, 400, 0.8, 0.4)           # a clear gain: decided
    same = b.copy()                              # no difference at all: undecided
    recs = {("views N", "1", "clean"): claims.compare("N=1 beats N=5", b, a, metric="top-1"),
            ("views N", "1", "PGD"): claims.compare("N=1 beats N=5", a, b, metric="top-1"),
            ("crop", "1-1", "clean"): claims.compare("no crops beat crops", same, b, metric="top-1")}
    g = claims.grid(recs)
    assert list(g.columns) == ["clean", "PGD"]
    assert list(g.index) == [("views N", "1"), ("crop", "1-1")]
    r = recs[("views N", "1", "PGD")]
    assert g.loc[("views N", "1"), "PGD"] == f"{r['estimate']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}] ✓"
    assert g.loc[("views N", "1"), "clean"].startswith("-") and g.loc[("views N", "1"), "clean"].endswith("✓")
    assert g.loc[("crop", "1-1"), "clean"].endswith("?")
    assert g.loc[("crop", "1-1"), "PGD"] == "—"     # a cell without a record
    assert list(claims.grid(recs, names=["ablation", "setting"]).index.names) == ["ablation", "setting"]
    for bad in ({"flat": r}, {("B", "c"): r, ("A", "1", "c"): r}, {("c",): r}):      # not (row..., column)
        with pytest.raises(RClipError, match="one length"):
            claims.grid(bad)
    for bad in ({}, [r]):
        with pytest.raises(RClipError, match="non-empty mapping"):
            claims.grid(bad)
    # a failed precondition: the data are still summarised, the cell says untestable
    failed = claims.compare("A beats B", a, b, metric="top-1", preconditions=[
        claims.Precondition.at_least("B robust", 1.0, 10.0)])
    flat = claims.grid({("A", "PGD"): failed, ("C", "PGD"): claims.untestable(
        "C beats D", metric="top-1", preconditions=[claims.Precondition.at_least("D robust", 1.0, 10.0)])})
    assert flat.loc["A", "PGD"].startswith(f"{failed['estimate']:+.1f} [") and flat.loc["A", "PGD"].endswith(
        "untestable")
    assert flat.loc["C", "PGD"] == "untestable"


def test_interval_text_reads_estimate_and_interval_or_untestable():
    rng = np.random.default_rng(4)
    a, b = _pair(rng, 300, 0.8, 0.5)
    r = claims.compare("A beats B", a, b, metric="top-1")
    assert claims.interval_text(r) == f"{r['estimate']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]"
    assert claims.interval_text(r, digits=2).count(".") == 3 and claims.interval_text(r).startswith("+")
    gone = claims.untestable("C beats D", metric="top-1", preconditions=[claims.Precondition.at_least("D", 1, 10)])
    assert claims.interval_text(gone) == "untestable"
    failed = claims.compare("A beats B", a, b, metric="top-1",
                            preconditions=[claims.Precondition.at_least("B", 1, 10)])   # estimated, then gated
    assert failed["verdict"] == "untestable" and failed["estimate"] is not None
    assert claims.interval_text(failed).startswith(f"{a.mean() - b.mean():+.1f} [")     # points, A minus B
    with pytest.raises(RClipError):
        claims.interval_text({"claim": "not a record"})
