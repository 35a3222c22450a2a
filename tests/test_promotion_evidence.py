"""Promotion that needs evidence: the paired difference of champion and challenger on the same
rows, its confidence interval, and the decision that waits while the interval still contains 0.

Synthetic data only (binormal scores with known ROC AUCs): fast, no Dagster, no warehouse."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score, root_mean_squared_error

from mlops.core.monitoring import MonitorSpec
from mlops.core.shadow import (
    PR_AUC,
    RMSE,
    ROC_AUC,
    compare_shadow,
    estimated_difference,
    paired_difference,
    promotion_decision,
)

POLICY = SimpleNamespace(promotion_auc_tolerance=0.02, promotion_rmse_tolerance=0.02, promotion_min_labelled_rows=200,
                         promotion_max_p99_ms=50.0)


def binormal(n: int, champion_auc: float, challenger_auc: float, *, rho: float = 0.6, prevalence: float = 0.25,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two models' scores whose true ROC AUCs are the given ones: each score is
    d * label + noise (unit variance, the two noises correlated ``rho``), so AUC = Phi(d / sqrt 2)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    noise = rng.multivariate_normal([0.0, 0.0], [[1.0, rho], [rho, 1.0]], size=n)
    shift = [np.sqrt(2) * norm.ppf(auc) for auc in (champion_auc, challenger_auc)]
    return y, shift[0] * y + noise[:, 0], shift[1] * y + noise[:, 1]


def realized_comparison(y, champion, challenger, metric=ROC_AUC, *, p99=2.0, **kwargs) -> dict:
    """What compare_shadow records where labels exist (the realized half of it)."""
    score = {"roc_auc": roc_auc_score, "average_precision": average_precision_score,
             "rmse": root_mean_squared_error}[metric.name]
    return {f"champion_realized_{metric.name}": float(score(y, champion)),
            f"challenger_realized_{metric.name}": float(score(y, challenger)), "labelled_rows": len(y),
            "realized_difference": paired_difference(y, champion, challenger, metric, **kwargs),
            "challenger_p99_ms": p99}


# --- paired_difference --------------------------------------------------------------------------
def test_paired_difference_keys_and_a_clearly_better_challenger():
    y, champion, challenger = binormal(4000, 0.70, 0.80)
    d = paired_difference(y, champion, challenger, ROC_AUC)
    assert {"difference", "low", "high", "confidence", "rows", "method"} <= set(d)
    assert d["rows"] == 4000 and d["confidence"] == 0.95 and d["method"] == "paired bootstrap"
    assert d["difference"] == pytest.approx(roc_auc_score(y, challenger) - roc_auc_score(y, champion))
    assert 0 < d["low"] < d["difference"] < d["high"]
    # seeded: the same interval again; another seed, nearly the same one
    assert paired_difference(y, champion, challenger, ROC_AUC) == d
    other = paired_difference(y, champion, challenger, ROC_AUC, seed=7)
    assert other["low"] == pytest.approx(d["low"], abs=0.01) and other["high"] == pytest.approx(d["high"], abs=0.01)


def test_the_interval_does_not_depend_on_the_order_of_the_rows():
    """The log orders rows by random prediction ids: the same evidence in another order must give the
    same interval, or two runs of the same day could decide differently (the demo's runs did differ
    in the interval's bounds before). Multiclass scores too."""
    y, champion, challenger = binormal(1500, 0.75, 0.8, seed=5)
    shuffled = np.random.default_rng(9).permutation(len(y))
    for metric in (ROC_AUC, PR_AUC):
        assert (paired_difference(y[shuffled], champion[shuffled], challenger[shuffled], metric)
                == paired_difference(y, champion, challenger, metric))
    classes = ("b", "a", "c")
    multi = MonitorSpec("multiclass", ("x",), (), "y", classes=classes)
    rng = np.random.default_rng(4)
    labels = rng.choice(classes, size=600)
    a, b = rng.dirichlet([1, 1, 1], size=600), rng.dirichlet([1, 1, 1], size=600)
    order = rng.permutation(600)
    assert (paired_difference(labels[order], a[order], b[order], ROC_AUC, spec=multi)
            == paired_difference(labels, a, b, ROC_AUC, spec=multi))


def test_identical_scores_differ_by_nothing():
    y, champion, _ = binormal(2000, 0.75, 0.75)
    for metric in (ROC_AUC, PR_AUC):
        d = paired_difference(y, champion, champion.copy(), metric)
        assert d["difference"] == 0 and d["low"] <= 0 <= d["high"]
    comparison = realized_comparison(y, champion, champion.copy())
    decision, reason = promotion_decision(comparison, POLICY, require_improvement=True)
    assert decision == "wait" and "+0.0000, 95% CI +0.0000..+0.0000" in reason


def test_resampled_metrics_match_scikit_learn_on_the_resample():
    """The bootstrap never builds a resample: it weights the rows. A replicate's metrics must be
    scikit-learn's on the materialised resample, ties (rounded scores) included."""
    from mlops.core.shadow import _weighted_metric

    rng = np.random.default_rng(3)
    y, champion, _ = binormal(1500, 0.7, 0.7, seed=3)
    rounded = np.round(champion, 1)
    idx = rng.integers(0, len(y), size=len(y))
    weights = np.bincount(idx, minlength=len(y))[None].astype(np.float32)
    spec = MonitorSpec("binary", ("x",), (), "y")
    for scores in (champion, rounded):
        assert _weighted_metric(ROC_AUC, spec, y, scores)(weights)[0] == pytest.approx(
            roc_auc_score(y[idx], scores[idx]), abs=1e-12)
        assert _weighted_metric(PR_AUC, spec, y, scores)(weights)[0] == pytest.approx(
            average_precision_score(y[idx], scores[idx]), abs=1e-9)
    target = rng.normal(size=len(y))
    assert _weighted_metric(RMSE, spec, target, champion)(weights)[0] == pytest.approx(
        root_mean_squared_error(target[idx], champion[idx]), abs=1e-12)
    classes = ("b", "a", "c")
    multi = MonitorSpec("multiclass", ("x",), (), "y", classes=classes)
    labels = rng.choice(classes, size=len(y))
    proba = rng.dirichlet([1, 1, 1], size=len(y))
    expected = roc_auc_score(labels[idx], proba[idx][:, np.argsort(classes)], multi_class="ovr", average="macro",
                             labels=sorted(classes))
    assert _weighted_metric(ROC_AUC, multi, labels, proba)(weights)[0] == pytest.approx(expected, abs=1e-12)


def test_rmse_difference_is_oriented_so_that_positive_means_the_challenger_is_better():
    rng = np.random.default_rng(5)
    y = rng.normal(50, 10, size=3000)
    worse, better = y + rng.normal(0, 4, size=3000), y + rng.normal(0, 2, size=3000)
    d = paired_difference(y, worse, better, RMSE)
    assert d["difference"] == pytest.approx(root_mean_squared_error(y, worse) - root_mean_squared_error(y, better))
    assert 0 < d["low"] <= d["difference"] <= d["high"]
    swapped = paired_difference(y, better, worse, RMSE)
    assert swapped["difference"] == pytest.approx(-d["difference"]) and swapped["high"] < 0
    assert promotion_decision(realized_comparison(y, worse, better, RMSE), POLICY, RMSE,
                              require_improvement=True)[0] == "promote"
    decision, reason = promotion_decision(realized_comparison(y, better, worse, RMSE), POLICY, RMSE)
    assert decision == "retire" and "realized RMSE" in reason


def test_bootstrap_interval_covers_the_true_difference():
    """Known AUCs (0.70 and 0.74): the 95% paired interval covers the true difference in about 95%
    of simulated shadow periods, and is about as wide as DeLong's."""
    truth, covered, delong_covered, widths = 0.04, 0, 0, []
    runs = 60
    for seed in range(runs):
        y, champion, challenger = binormal(800, 0.70, 0.74, rho=0.5, seed=100 + seed)
        d = paired_difference(y, champion, challenger, ROC_AUC, n_resamples=400, seed=seed)
        covered += d["low"] <= truth <= d["high"]
        dl = paired_difference(y, champion, challenger, ROC_AUC, method="delong")
        delong_covered += dl["low"] <= truth <= dl["high"]
        widths.append((d["high"] - d["low"]) / (dl["high"] - dl["low"]))
    assert covered >= 0.85 * runs and delong_covered >= 0.85 * runs
    assert 0.8 < np.median(widths) < 1.2


def test_delong():
    y, champion, challenger = binormal(3000, 0.70, 0.75, rho=0.5)
    d = paired_difference(y, champion, challenger, ROC_AUC, method="delong")
    assert d["method"] == "DeLong" and d["low"] < d["difference"] < d["high"] and 0 <= d["p_value"] <= 1
    assert d["difference"] == pytest.approx(roc_auc_score(y, challenger) - roc_auc_score(y, champion))
    with pytest.raises(ValueError, match="DeLong"):
        paired_difference(y, champion, challenger, PR_AUC, method="delong")


def test_single_class_resamples_are_skipped():
    y = np.zeros(40, dtype=int)
    y[:2] = 1  # two positives in forty: some resamples draw none
    rng = np.random.default_rng(1)
    champion, challenger = rng.random(40), rng.random(40)
    d = paired_difference(y, champion, challenger, ROC_AUC, n_resamples=200)
    assert 0 < d["resamples"] < 200 and np.isfinite(d["low"]) and d["low"] <= d["difference"] <= d["high"]


# --- promotion_decision ---------------------------------------------------------------------------
def test_a_clearly_better_challenger_is_promoted_when_improvement_is_required():
    y, champion, challenger = binormal(4000, 0.70, 0.80)
    comparison = realized_comparison(y, champion, challenger)
    decision, reason = promotion_decision(comparison, POLICY, require_improvement=True)
    assert decision == "promote"
    assert "95% CI +0." in reason and "paired bootstrap on 4000 labelled predictions" in reason
    assert reason.startswith(f"realized ROC AUC {comparison['challenger_realized_roc_auc']:.4f} vs champion ")
    # ...and by default too; over the latency budget, retired either way
    assert promotion_decision(comparison, POLICY)[0] == "promote"
    slow = comparison | {"challenger_p99_ms": 80.0}
    for require in (False, True):
        decision, reason = promotion_decision(slow, POLICY, require_improvement=require)
        assert decision == "retire" and "p99 80.00 ms is over the budget" in reason
    # a higher bar: the interval's low bound must clear it
    low = comparison["realized_difference"]["low"]
    strict = SimpleNamespace(**vars(POLICY), promotion_min_improvement=low + 0.005)
    decision, reason = promotion_decision(comparison, strict, require_improvement=True)
    assert decision == "wait" and f"the interval includes {low + 0.005:+.4g}" in reason
    out_of_reach = SimpleNamespace(**vars(POLICY), promotion_min_improvement=comparison["realized_difference"]["high"]
                                   + 0.01)
    decision, reason = promotion_decision(comparison, out_of_reach, require_improvement=True)
    assert decision == "retire" and "falls short of the required improvement" in reason


def test_a_slightly_worse_challenger_is_never_promoted():
    """The production case: 0.6410 vs the champion's 0.6508 on 13,922 labelled predictions, a
    retrained challenger (scores strongly correlated with the champion's)."""
    y, champion, challenger = binormal(13922, 0.6508, 0.6410, rho=0.85, prevalence=0.2, seed=13)
    comparison = realized_comparison(y, champion, challenger)
    d = comparison["realized_difference"]
    assert d["high"] < 0  # significantly worse
    for require in (False, True):  # within the 0.02 tolerance, but worse with confidence: retired
        decision, reason = promotion_decision(comparison, POLICY, require_improvement=require)
        assert decision == "retire" and "significantly worse" in reason and "13922 labelled" in reason
    # Less correlated models: the same gap may be within the noise, yet a decay retrain still waits.
    for rho in (0.0, 0.5):
        y, champion, challenger = binormal(13922, 0.6508, 0.6410, rho=rho, prevalence=0.2, seed=14)
        comparison = realized_comparison(y, champion, challenger)
        assert promotion_decision(comparison, POLICY, require_improvement=True)[0] in ("wait", "retire")
    # The exact numbers of the incident, as the reason prints them.
    incident = {"champion_realized_roc_auc": 0.6508, "challenger_realized_roc_auc": 0.6410, "labelled_rows": 13922,
                "challenger_p99_ms": 2.0,
                "realized_difference": {"metric": "roc_auc", "difference": -0.0098, "low": -0.0151, "high": -0.0045,
                                        "confidence": 0.95, "rows": 13922, "method": "paired bootstrap"}}
    decision, reason = promotion_decision(incident, POLICY)
    assert decision == "retire"
    assert reason == ("realized ROC AUC 0.6410 is significantly worse than the champion's 0.6508 (-0.0098, "
                      "95% CI -0.0151..-0.0045, paired bootstrap on 13922 labelled predictions)")
    unsure = incident | {"realized_difference": incident["realized_difference"] | {"high": 0.0003}}
    decision, reason = promotion_decision(unsure, POLICY, require_improvement=True)
    assert decision == "wait" and "95% CI -0.0151..+0.0003" in reason
    # by default (not a decay retrain) "not worse beyond the tolerance" still promotes, as before
    assert promotion_decision(unsure, POLICY)[0] == "promote"


def test_an_equal_challenger_waits_when_improvement_is_required():
    y, champion, challenger = binormal(3000, 0.75, 0.75, rho=0.5, seed=2)
    comparison = realized_comparison(y, champion, challenger)
    d = comparison["realized_difference"]
    assert d["low"] < 0 < d["high"]
    decision, reason = promotion_decision(comparison, POLICY, require_improvement=True)
    assert decision == "wait"
    assert "not enough evidence yet" in reason and f"{d['low']:+.4f}..{d['high']:+.4f}" in reason
    assert promotion_decision(comparison, POLICY)[0] == "promote"  # not worse: the scheduled rule


def test_few_labels_give_a_wide_interval_and_a_wait():
    policy = SimpleNamespace(**(vars(POLICY) | {"promotion_min_labelled_rows": 50}))
    y, champion, challenger = binormal(80, 0.72, 0.76, rho=0.5, seed=4)
    comparison = realized_comparison(y, champion, challenger)
    d = comparison["realized_difference"]
    assert d["high"] - d["low"] > 0.1 and d["low"] < 0 < d["high"]
    decision, reason = promotion_decision(comparison, policy, require_improvement=True)
    assert decision == "wait" and "on 80 labelled predictions" in reason
    # the same challenger on plenty of labels is shown better
    y, champion, challenger = binormal(20000, 0.72, 0.76, rho=0.5, seed=4)
    assert promotion_decision(realized_comparison(y, champion, challenger), policy,
                              require_improvement=True)[0] == "promote"
    # below the policy's labelled rows there is no realized evidence and no estimate: wait, not retire
    decision, reason = promotion_decision({"labelled_rows": 10, "challenger_p99_ms": 2.0}, POLICY,
                                          require_improvement=True)
    assert decision == "wait" and "no ROC AUC evidence" in reason


def test_a_handful_of_labelled_positives_is_no_realized_evidence():
    """900 labelled predictions holding two frauds, the challenger ranking both a little higher: every
    bootstrap resample that holds a fraud favours it, so the paired interval lies above zero, yet
    two frauds are no evidence (the fraud benchmark's hard drift promoted such a challenger, PR AUC
    0.0013 vs 0.0012). Below ``promotion_min_labelled_positives`` the realized comparison does not
    decide: without an estimate the challenger waits."""
    rng = np.random.default_rng(7)
    y = np.zeros(900, dtype=int)
    y[[10, 500]] = 1
    champion = rng.random(900)
    challenger = champion.copy()
    challenger[[10, 500]] += 0.02
    comparison = realized_comparison(y, champion, challenger, PR_AUC) | {"labelled_positives": 2}
    assert comparison["realized_difference"]["low"] > 0
    loose = SimpleNamespace(**vars(POLICY), promotion_min_labelled_positives=0)
    assert promotion_decision(comparison, loose, PR_AUC, require_improvement=True)[0] == "promote"
    strict = SimpleNamespace(**vars(POLICY), promotion_min_labelled_positives=10)
    decision, reason = promotion_decision(comparison, strict, PR_AUC, require_improvement=True)
    assert decision == "wait" and "no PR AUC evidence" in reason
    from resources.monitoring import MonitoringPolicy

    assert MonitoringPolicy().promotion_min_labelled_positives == 10
    # enough positives: the realized comparison decides again
    y[rng.choice(900, 40, replace=False)] = 1
    challenger = champion + 0.3 * y
    comparison = realized_comparison(y, champion, challenger, PR_AUC) | {"labelled_positives": int(y.sum())}
    assert promotion_decision(comparison, strict, PR_AUC, require_improvement=True)[0] == "promote"


def test_the_policy_confidence_rederives_the_interval():
    y, champion, challenger = binormal(3000, 0.70, 0.74, rho=0.5)
    comparison = realized_comparison(y, champion, challenger)
    d = comparison["realized_difference"]
    looser = SimpleNamespace(**vars(POLICY), promotion_confidence=0.5)
    half = norm.ppf(0.75) * d["se"]
    decision, reason = promotion_decision(comparison, looser, require_improvement=True)
    assert f"50% CI {d['difference'] - half:+.4f}..{d['difference'] + half:+.4f}" in reason
    assert "normal approximation" in reason


def test_the_estimated_difference_decides_without_labels():
    d = estimated_difference(0.80, 0.86, 0.01, 0.012, ROC_AUC, rows=5000, method="NannyML CBPE sampling error")
    half = norm.ppf(0.975) * np.hypot(0.01, 0.012)
    assert d["difference"] == pytest.approx(0.06)
    assert (d["low"], d["high"]) == (pytest.approx(0.06 - half), pytest.approx(0.06 + half))
    assert {"difference", "low", "high", "confidence", "rows", "method"} <= set(d)
    rmse = estimated_difference(20.0, 18.0, 0.5, 0.5, RMSE)
    assert rmse["difference"] == pytest.approx(2.0) and rmse["low"] > 0
    comparison = {"champion_estimated_roc_auc": 0.80, "challenger_estimated_roc_auc": 0.86, "labelled_rows": 0,
                  "estimated_difference": d, "challenger_p99_ms": 2.0}
    decision, reason = promotion_decision(comparison, POLICY, require_improvement=True)
    assert decision == "promote"
    assert "estimated ROC AUC 0.8600 vs champion 0.8000 (+0.0600, 95% CI" in reason
    assert "NannyML CBPE sampling error on 5000 shadow predictions" in reason
    close = estimated_difference(0.80, 0.81, 0.01, 0.01)
    assert promotion_decision(comparison | {"challenger_estimated_roc_auc": 0.81, "estimated_difference": close},
                              POLICY, require_improvement=True)[0] == "wait"
    # labels below the policy's minimum: the realized interval is not used, the estimate decides
    realized = {"metric": "roc_auc", "difference": 0.2, "low": 0.1, "high": 0.3, "confidence": 0.95, "rows": 100,
                "method": "paired bootstrap"}
    few = comparison | {"challenger_estimated_roc_auc": 0.81, "estimated_difference": close, "labelled_rows": 100,
                        "champion_realized_roc_auc": 0.6, "challenger_realized_roc_auc": 0.8,
                        "realized_difference": realized}
    assert promotion_decision(few, POLICY, require_improvement=True)[0] == "wait"
    assert promotion_decision(few | {"labelled_rows": 200}, POLICY, require_improvement=True)[0] == "promote"


def test_the_real_policy_class_keeps_its_defaults():
    from resources.monitoring import MonitoringPolicy

    policy = MonitoringPolicy(promotion_auc_tolerance=0.02, promotion_max_p99_ms=10, promotion_min_labelled_rows=200)
    y, champion, challenger = binormal(3000, 0.75, 0.75, rho=0.5, seed=2)
    comparison = realized_comparison(y, champion, challenger)
    assert promotion_decision(comparison, policy)[0] == "promote"
    assert promotion_decision(comparison, policy, require_improvement=True)[0] == "wait"


# --- compare_shadow: both evidence paths, end to end on NannyML ----------------------------------
SPEC = MonitorSpec("binary", ("x1", "x2"), (), "label", name="synthetic")


def _frame(n: int, seed: int, start: str) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    p = 1 / (1 + np.exp(-(1.2 * x1 + 0.6 * x2 - 1.0)))
    return pd.DataFrame({"x1": x1, "x2": x2, "label": (rng.random(n) < p).astype(float),
                         "timestamp": pd.date_range(start, periods=n, freq="min")})


def _champion(rows: pd.DataFrame) -> np.ndarray:  # uses x1 only
    return 1 / (1 + np.exp(-(1.2 * rows["x1"].to_numpy() - 1.0)))


def _challenger(rows: pd.DataFrame) -> np.ndarray:  # the true model
    return 1 / (1 + np.exp(-(1.2 * rows["x1"].to_numpy() + 0.6 * rows["x2"].to_numpy() - 1.0)))


def test_compare_shadow_records_both_kinds_of_evidence():
    models = {"1": _champion, "2": _challenger}
    references = {}
    for version, seed in (("1", 1), ("2", 2)):
        ref = _frame(3000, seed, "2024-01-01")
        references[version] = ref.assign(score=models[version](ref))
    traffic = _frame(2500, 3, "2024-03-01").assign(prediction_id=lambda f: [f"p{i}" for i in range(len(f))])
    pairs = pd.DataFrame({"prediction_id": traffic["prediction_id"], "champion_score": _champion(traffic),
                          "challenger_score": _challenger(traffic), "champion_latency_ms": 1.0,
                          "challenger_latency_ms": 2.0})
    logged = traffic.assign(score=_champion(traffic))
    score = lambda booster, rows: booster(rows)  # noqa: E731 - the "booster" is the model function

    labelled = compare_shadow(pairs, logged, references, models, spec=SPEC, score=score, n_resamples=300)
    for role in ("champion", "challenger"):
        assert labelled[f"{role}_estimated_roc_auc_sampling_error"] > 0
    realized, estimated = labelled["realized_difference"], labelled["estimated_difference"]
    assert realized["rows"] == labelled["labelled_rows"] == 2500 and realized["method"] == "paired bootstrap"
    assert realized["difference"] == pytest.approx(labelled["challenger_realized_roc_auc"]
                                                   - labelled["champion_realized_roc_auc"])
    assert realized["low"] > 0  # the true model is better, on the same rows
    se = np.hypot(labelled["champion_estimated_roc_auc_sampling_error"],
                  labelled["challenger_estimated_roc_auc_sampling_error"])
    assert estimated["high"] - estimated["low"] == pytest.approx(2 * norm.ppf(0.975) * se)
    assert estimated["rows"] == 2500 and "CBPE" in estimated["method"]
    decision, reason = promotion_decision(labelled, POLICY, require_improvement=True)
    assert decision == "promote" and "paired bootstrap on 2500 labelled predictions" in reason

    unlabelled = compare_shadow(pairs, logged.assign(label=np.nan), references, models, spec=SPEC, score=score)
    assert "realized_difference" not in unlabelled and "labelled_rows" not in unlabelled
    assert unlabelled["estimated_difference"] == estimated
    decision, reason = promotion_decision(unlabelled, POLICY, require_improvement=True)
    assert decision in ("promote", "wait") and "CBPE sampling error on 2500 shadow predictions" in reason


def test_compare_shadow_estimates_a_regression_with_dle():
    """The spend pipeline's case: the same model retrained, no label matured yet. DLE's estimates
    carry sampling errors; the difference is 0 within its interval, so the scheduled rule promotes
    and a decay retrain waits."""
    spec = MonitorSpec("regression", ("x1", "x2"), (), "amount", name="synthetic_spend")

    def frame(n, seed, start):
        rng = np.random.default_rng(seed)
        x1, x2 = rng.normal(size=n), rng.normal(size=n)
        return pd.DataFrame({"x1": x1, "x2": x2, "amount": 50 + 8 * x1 + 3 * x2 + rng.normal(0, 4, size=n),
                             "timestamp": pd.date_range(start, periods=n, freq="min")})

    def model(rows):
        return 50 + 8 * rows["x1"].to_numpy() + 3 * rows["x2"].to_numpy()

    models = {"1": model, "2": model}
    references = {v: (lambda ref: ref.assign(score=model(ref)))(frame(1500, 10 + i, "2024-01-01"))
                  for i, v in enumerate(models)}
    traffic = frame(1000, 30, "2024-03-01").assign(prediction_id=lambda f: [f"p{i}" for i in range(len(f))])
    pairs = pd.DataFrame({"prediction_id": traffic["prediction_id"], "champion_score": model(traffic),
                          "challenger_score": model(traffic), "champion_latency_ms": 1.0,
                          "challenger_latency_ms": 1.1})
    logged = traffic.assign(score=model(traffic), amount=np.nan)
    out = compare_shadow(pairs, logged, references, models, spec=spec, metric=RMSE,
                         score=lambda booster, rows: booster(rows))
    assert out["champion_estimated_rmse_sampling_error"] > 0 and out["challenger_estimated_rmse_sampling_error"] > 0
    d = out["estimated_difference"]
    assert d["metric"] == "rmse" and "DLE" in d["method"] and d["low"] <= 0 <= d["high"]
    assert d["difference"] == pytest.approx(out["champion_estimated_rmse"] - out["challenger_estimated_rmse"])
    decision, reason = promotion_decision(out, POLICY, RMSE)
    assert decision == "promote" and "estimated RMSE" in reason and "DLE sampling error on 1000 shadow" in reason
    assert promotion_decision(out, POLICY, RMSE, require_improvement=True)[0] == "wait"


def test_the_estimated_average_precision_and_its_sampling_error_do_not_depend_on_the_global_rng():
    """NannyML resamples the reference with numpy's global RNG for average precision's sampling
    error: the platform fits under a fixed seed, so the shadow comparison of the same data gives the
    same interval in a Dagster run and on the simulated clock, and leaves the caller's RNG alone."""
    models = {"1": _champion, "2": _challenger}
    references = {v: _frame(3000, seed, "2024-01-01").pipe(lambda f, v=v: f.assign(score=models[v](f)))
                  for v, seed in (("1", 1), ("2", 2))}
    traffic = _frame(2500, 3, "2024-03-01").assign(prediction_id=lambda f: [f"p{i}" for i in range(len(f))])
    pairs = pd.DataFrame({"prediction_id": traffic["prediction_id"], "champion_score": _champion(traffic),
                          "challenger_score": _challenger(traffic), "champion_latency_ms": 1.0,
                          "challenger_latency_ms": 1.0})
    logged = traffic.assign(score=_champion(traffic), label=np.nan)  # no label yet: the estimate decides
    runs = []
    for state in (7, 8):
        np.random.seed(state)
        out = compare_shadow(pairs, logged, references, models, spec=SPEC, metric=PR_AUC,
                             score=lambda booster, rows: booster(rows))
        runs.append((out["champion_estimated_average_precision_sampling_error"],
                     out["challenger_estimated_average_precision_sampling_error"],
                     out["estimated_difference"]["low"], np.random.random()))
    assert runs[0][:3] == runs[1][:3] and runs[0][0] > 0
    np.random.seed(7)
    assert runs[0][3] == np.random.random()  # the caller's random state is as if nothing had run
