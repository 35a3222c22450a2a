"""The shadow comparison: champion and challenger on the same requests, and the promotion decision.

One comparison for churn and every declared use case: the primary metric is the problem type's
(``PromotionMetric``; binary ROC AUC, or PR AUC when a binary use case declares ``min_pr_auc``,
regression RMSE, multiclass macro ROC AUC), realized on the freshest labelled traffic where enough
labels have matured, else NannyML's estimate (CBPE for classification, DLE for regression).

The evidence is the difference on the same rows, with its confidence interval: a paired bootstrap
of the realized metric (``paired_difference``), or the estimates' difference with NannyML's
sampling errors (``estimated_difference``). A challenger trained because the champion decayed is
promoted only when the interval shows it better (``promotion_decision(require_improvement=True)``),
and waits in shadow while the interval still contains no difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlops.core.model_inputs import to_model_matrix
from mlops.core.monitoring import (
    CHURN_SPEC,
    DECISION_THRESHOLD,
    PREDICTED,
    SCORE,
    MonitorSpec,
    prepare,
    seeded_sampling_errors,
)
from mlops.core.names import CHALLENGER, CHAMPION
from mlops.core.prediction_log import prediction_log_table

SHADOW_TABLE = "shadow_comparisons"
SHADOW_COLUMNS = """(
    evaluated_at TIMESTAMP NOT NULL, champion_version VARCHAR NOT NULL, challenger_version VARCHAR,
    decision VARCHAR NOT NULL, reason VARCHAR NOT NULL, shadow_pairs BIGINT NOT NULL, details VARCHAR NOT NULL,
    dagster_run_id VARCHAR NOT NULL
)"""


def shadow_table(use_case: str | None = None) -> str:
    """Churn's ``shadow_comparisons``; a declared use case's ``shadow_comparisons_<name>``."""
    log = prediction_log_table(use_case)  # validates the name
    return SHADOW_TABLE + log.removeprefix("prediction_log")


def shadow_ddl(use_case: str | None = None) -> str:
    return f"CREATE TABLE IF NOT EXISTS {shadow_table(use_case)} {SHADOW_COLUMNS}"


SHADOW_DDL = shadow_ddl()
SHADOW_PAIRS_SQL = f"""
SELECT c.prediction_id, c.account_id, c.score AS champion_score, h.score AS challenger_score,
       c.latency_ms AS champion_latency_ms, h.latency_ms AS challenger_latency_ms, c.snapshot_version
FROM (LOG_TABLE) c JOIN (LOG_TABLE) h USING (prediction_id)
WHERE c.role = '{CHAMPION}' AND h.role = '{CHALLENGER}' AND c.model_version = ? AND h.model_version = ?
"""  # noqa: S608 - constant role names, derived table name


@dataclass(frozen=True)
class PromotionMetric:
    """The metric promotion compares: its name in the comparison's keys (``<role>_<kind>_<name>``),
    its NannyML name, how the reason names it, and which way is better."""

    name: str
    label: str
    higher_is_better: bool = True

    def worse_beyond(self, challenger: float, champion: float, tolerance: float) -> bool:
        return challenger < champion - tolerance if self.higher_is_better else challenger > champion + tolerance


ROC_AUC = PromotionMetric("roc_auc", "ROC AUC")
PR_AUC = PromotionMetric("average_precision", "PR AUC")
RMSE = PromotionMetric("rmse", "RMSE", higher_is_better=False)


def promotion_metric(usecase=None) -> PromotionMetric:
    """The primary metric of a use case's problem type (churn's, ROC AUC, when ``usecase`` is None)."""
    if usecase is None:
        return ROC_AUC
    if usecase.problem_type == "regression":
        return RMSE
    if usecase.problem_type == "binary" and usecase.gates.get("min_pr_auc") is not None:
        return PR_AUC
    return ROC_AUC


def shadow_pairs(con, champion_version: str, challenger_version: str, use_case: str | None = None) -> pd.DataFrame:
    """Champion and challenger rows of the same prediction ids in the use case's prediction log."""
    sql = SHADOW_PAIRS_SQL.replace("(LOG_TABLE)", prediction_log_table(use_case))
    return con.execute(sql, [champion_version, challenger_version]).df()


def _churn_scores(booster, frame: pd.DataFrame) -> np.ndarray:
    return booster.predict(to_model_matrix(frame))


def _realized(metric: PromotionMetric, spec: MonitorSpec, y: pd.Series, scores: np.ndarray) -> float:
    from sklearn import metrics

    if metric.name == "rmse":
        return float(metrics.root_mean_squared_error(np.asarray(y, dtype=float), scores))
    if metric.name == "average_precision":
        return float(metrics.average_precision_score(np.asarray(y).astype(int), scores))
    if spec.problem_type == "multiclass":
        classes = list(spec.classes)
        order = np.argsort(classes)  # scikit-learn takes the classes in sorted order
        return float(metrics.roc_auc_score(y, np.asarray(scores)[:, order], multi_class="ovr", average="macro",
                                           labels=sorted(classes)))
    return float(metrics.roc_auc_score(np.asarray(y).astype(int), scores))


# --- evidence: the paired difference and its confidence interval --------------------------------
# The bootstrap resamples rows with replacement: one replicate is a row weight (how many times the
# row was drawn), the same weights for both models. The weighted metrics below are the metrics of
# the resample without building it; each model's scores are sorted once, not once per replicate.
_BATCH_CELLS = 1_000_000  # replicates x rows per batch of weights (float32: 4 MB per array)


def _tie_groups(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts of the runs of equal scores in ``sorted_scores`` and each position's run."""
    new = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    return np.flatnonzero(new), np.cumsum(new) - 1


class _WeightedAUC:
    """Binary ROC AUC of row-weighted data (the Mann-Whitney statistic, ties counting a half)."""

    def __init__(self, positive: np.ndarray, scores: np.ndarray):
        self.order = np.argsort(scores, kind="mergesort")
        self.positive = positive[self.order]
        self.starts, group = _tie_groups(scores[self.order])
        self.positive_group = group[self.positive]
        if len(self.starts) == len(scores):  # no ties: every row its own group
            self.starts = None

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        w = weights[:, self.order]
        negatives = np.where(self.positive, 0, w)
        per_group = negatives if self.starts is None else np.add.reduceat(negatives, self.starts, axis=1)
        below = np.cumsum(per_group, axis=1)
        below -= 0.5 * per_group  # negatives scored lower, ties counting a half
        w_pos = w[:, self.positive]
        wins = np.einsum("bi,bi->b", w_pos, below[:, self.positive_group], dtype=np.float64)
        pairs = w_pos.sum(axis=1, dtype=np.float64) * negatives.sum(axis=1, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, wins / pairs, np.nan)  # a single class: no AUC


class _WeightedAP:
    """Average precision (scikit-learn's: precision at each distinct threshold times the recall
    gained there) of row-weighted data."""

    def __init__(self, positive: np.ndarray, scores: np.ndarray):
        self.order = np.argsort(-scores, kind="mergesort")
        self.positive = positive[self.order]
        self.starts, _ = _tie_groups(scores[self.order])
        # Where recall can grow: at the positives' rows, or (with ties) at any threshold.
        self.gains = np.flatnonzero(self.positive)
        if len(self.starts) == len(scores):  # no ties: every row its own threshold
            self.starts = None
        else:
            self.gains = slice(None)

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        w = weights[:, self.order]
        tp = np.where(self.positive, w, 0)
        if self.starts is not None:
            tp, w = np.add.reduceat(tp, self.starts, axis=1), np.add.reduceat(w, self.starts, axis=1)
        ctp, seen = np.cumsum(tp, axis=1), np.cumsum(w, axis=1)
        gain, ctp_at, seen_at = tp[:, self.gains], ctp[:, self.gains], seen[:, self.gains]
        precision = np.divide(ctp_at, seen_at, out=np.zeros(seen_at.shape), where=seen_at > 0,
                              dtype=np.float64)
        positives, total = ctp[:, -1].astype(np.float64), seen[:, -1].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = np.einsum("bi,bi->b", gain, precision, dtype=np.float64) / positives
        return np.where((positives > 0) & (total > positives), ap, np.nan)  # a single class: skipped


class _WeightedRMSE:
    def __init__(self, y: np.ndarray, predictions: np.ndarray):
        self.squared = (np.asarray(predictions, dtype=float) - y) ** 2

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        return np.sqrt(weights @ self.squared / weights.sum(axis=1, dtype=np.float64))


class _WeightedMacroAUC:
    """Multiclass macro one-vs-rest ROC AUC: the mean of each class's binary AUC."""

    def __init__(self, y: np.ndarray, scores: np.ndarray, classes: list):
        self.per_class = [_WeightedAUC(y == c, scores[:, j]) for j, c in enumerate(classes)]

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        return np.mean([auc(weights) for auc in self.per_class], axis=0)  # a class missing: NaN, skipped


def _weighted_metric(metric: PromotionMetric, spec: MonitorSpec, y: np.ndarray, scores: np.ndarray):
    if metric.name == "rmse":
        return _WeightedRMSE(y.astype(float), scores)
    if spec.problem_type == "multiclass":
        return _WeightedMacroAUC(y, np.asarray(scores, dtype=float), list(spec.classes))
    positive = y.astype(int) == 1
    if metric.name == "average_precision":
        return _WeightedAP(positive, np.asarray(scores, dtype=float))
    return _WeightedAUC(positive, np.asarray(scores, dtype=float))


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def _delong(y: np.ndarray, champion: np.ndarray, challenger: np.ndarray) -> tuple[float, float]:
    """DeLong's paired test of two binary ROC AUCs on the same rows (the fast midrank algorithm of
    Sun & Xu, 2014): the challenger-minus-champion AUC and its standard error."""
    from scipy.stats import rankdata

    positive = y.astype(int) == 1
    m, n = int(positive.sum()), int((~positive).sum())
    if not m or not n:
        raise ValueError("DeLong needs both classes")
    v10, v01, auc = [], [], []
    for s in (np.asarray(champion, dtype=float), np.asarray(challenger, dtype=float)):
        x, z = s[positive], s[~positive]
        tz = rankdata(np.r_[x, z])
        tx, ty = rankdata(x), rankdata(z)
        auc.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)  # each positive's share of negatives below it
        v01.append(1.0 - (tz[m:] - ty) / m)  # each negative's share of positives above it
    sx, sy = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    var = (sx[0, 0] + sx[1, 1] - 2 * sx[0, 1]) / m + (sy[0, 0] + sy[1, 1] - 2 * sy[0, 1]) / n
    return float(auc[1] - auc[0]), float(np.sqrt(max(var, 0.0)))


def _value_order(y: np.ndarray, *scores: np.ndarray) -> np.ndarray:
    """The permutation that sorts rows by their label, then by each score column (stable)."""
    columns = {"y": y}
    for i, values in enumerate(scores):
        for j, column in enumerate(values.reshape(len(values), -1).T):
            columns[f"s{i}_{j}"] = column
    frame = pd.DataFrame(columns)
    return frame.sort_values(list(frame.columns), kind="mergesort").index.to_numpy()


def paired_difference(y, champion_scores, challenger_scores, metric: PromotionMetric = ROC_AUC, *,
                      n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                      spec: MonitorSpec = CHURN_SPEC, method: str = "bootstrap") -> dict:
    """How much better the challenger is than the champion on ``metric``, both scored on the SAME
    rows (the labels ``y``; scores in the same row order; multiclass: one column per class of
    ``spec.classes``), with a confidence interval that accounts for the pairing.

    ``difference`` is oriented so that positive means the challenger is better: challenger minus
    champion for the AUCs, champion minus challenger for RMSE. ``method="bootstrap"`` (any metric):
    a paired percentile bootstrap, each replicate resampling the rows once and computing both
    models' metric on that same resample (resamples with a single class are skipped);
    ``method="delong"`` (binary ROC AUC only): DeLong's test, with its two-sided ``p_value``.

    Returns ``difference``, ``low``, ``high`` (the interval; NaN when too few resamples were
    usable), ``confidence``, ``rows``, ``method``, ``metric``, ``se`` (the difference's standard
    error: the replicates' standard deviation, or DeLong's) and ``resamples`` (usable replicates)."""
    y = np.asarray(y)
    champion = np.asarray(champion_scores, dtype=float)
    challenger = np.asarray(challenger_scores, dtype=float)
    rows = len(y)
    if len(champion) != rows or len(challenger) != rows:
        raise ValueError(f"{rows} labels but {len(champion)} champion and {len(challenger)} challenger scores")
    # The resamples are drawn by position: put the rows in an order their values alone decide, so that
    # the interval does not depend on how the log ordered them (by random prediction ids, say) and the
    # same evidence gives the same decision on every run. Rows equal in every value are interchangeable.
    order = _value_order(y, champion, challenger)
    y, champion, challenger = y[order], champion[order], challenger[order]
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence}: between 0 and 1")
    sign = 1.0 if metric.higher_is_better else -1.0
    difference = sign * (_realized(metric, spec, y, challenger) - _realized(metric, spec, y, champion))
    out = {"metric": metric.name, "difference": float(difference), "confidence": float(confidence), "rows": rows}
    if method == "delong":
        if metric.name != "roc_auc" or spec.problem_type != "binary":
            raise ValueError("DeLong's test compares binary ROC AUCs")
        from scipy.stats import norm

        _, se = _delong(y, champion, challenger)
        half = _z(confidence) * se
        p_value = float(2 * norm.sf(abs(difference) / se)) if se > 0 else (1.0 if difference == 0 else 0.0)
        return out | {"low": float(difference - half), "high": float(difference + half), "method": "DeLong",
                      "se": se, "p_value": p_value}
    if method != "bootstrap":
        raise ValueError(f"method {method!r}: 'bootstrap' or 'delong'")
    stats = [_weighted_metric(metric, spec, y, s) for s in (champion, challenger)]
    rng = np.random.default_rng(seed)
    batch = max(1, min(n_resamples, _BATCH_CELLS // max(rows, 1)))
    # Counts and their sums are integers (halves, for ties): exact in float32 below 2**24 rows.
    dtype = np.float32 if 2 * rows < 2**24 else np.float64
    replicates = []
    for start in range(0, n_resamples, batch):
        size = min(batch, n_resamples - start)
        draws = rng.integers(0, rows, size=(size, rows))
        weights = np.bincount((draws + rows * np.arange(size)[:, None]).ravel(),
                              minlength=size * rows).reshape(size, rows).astype(dtype)
        replicates.append(sign * (stats[1](weights) - stats[0](weights)))
    diffs = np.concatenate(replicates)
    diffs = diffs[np.isfinite(diffs)]
    alpha = (1 - confidence) / 2
    if len(diffs) >= max(min(10, n_resamples), n_resamples // 2):
        low, high = (float(q) for q in np.quantile(diffs, [alpha, 1 - alpha]))
        se = float(diffs.std(ddof=1))
    else:  # mostly single-class resamples: too few labels for an interval
        low = high = se = float("nan")
    return out | {"low": low, "high": high, "method": "paired bootstrap", "se": se, "resamples": int(len(diffs))}


def estimated_difference(champion: float, challenger: float, champion_se: float, challenger_se: float,
                         metric: PromotionMetric = ROC_AUC, *, confidence: float = 0.95, rows: int = 0,
                         method: str = "NannyML sampling error") -> dict:
    """The difference of two estimates (NannyML's CBPE or DLE), oriented as ``paired_difference``'s,
    with the interval difference +- z * sqrt(se_champion^2 + se_challenger^2): the two estimates'
    sampling errors taken as independent (each model's estimate is calibrated on its own reference)."""
    sign = 1.0 if metric.higher_is_better else -1.0
    difference = sign * (challenger - champion)
    se = float(np.hypot(champion_se, challenger_se))
    half = _z(confidence) * se
    return {"metric": metric.name, "difference": float(difference), "low": float(difference - half),
            "high": float(difference + half), "confidence": float(confidence), "rows": int(rows), "method": method,
            "se": se}


def _estimated(metric: PromotionMetric, spec: MonitorSpec, reference: pd.DataFrame,
               data: pd.DataFrame) -> tuple[float, float]:
    """NannyML's estimate of ``metric`` on ``data`` (one chunk), fitted on the model's own reference,
    and its sampling error (the standard error NannyML derives from the reference and the chunk's size)."""
    import nannyml as nml

    features = list(spec.features)
    if spec.problem_type == "regression":
        estimator = nml.DLE(feature_column_names=features, y_pred=SCORE, y_true=spec.target, metrics=[metric.name],
                            chunk_number=1)
    else:
        estimator = nml.CBPE(metrics=[metric.name], y_pred_proba=SCORE, y_pred=PREDICTED, y_true=spec.target,
                             problem_type="classification_binary", chunk_number=1)
    with seeded_sampling_errors():
        estimator.fit(prepare(reference, spec))
    result = estimator.estimate(data.drop(columns=[spec.target])).filter(period="analysis").to_df()
    error = result.get((metric.name, "sampling_error"))
    return float(result[(metric.name, "value")].iloc[0]), float(error.iloc[0]) if error is not None else float("nan")


def compare_shadow(pairs: pd.DataFrame, logged: pd.DataFrame, references: dict[str, pd.DataFrame],
                   boosters: dict, *, spec: MonitorSpec = CHURN_SPEC, metric: PromotionMetric = ROC_AUC,
                   score: Callable | None = None, confidence: float = 0.95, n_resamples: int = 1000,
                   seed: int = 0) -> dict:
    """Agreement, latency and the primary ``metric`` (estimated and, where labels exist, realized) of
    both models on the shadow pairs (``shadow_pairs``). ``logged``: the champion's logged rows with
    their features and (once mature) labels (``analysis_frame``/``usecase_analysis_frame``);
    ``references``: champion and challenger version -> their reference (holdout) frame, in that
    order; ``score(booster, rows)``: a model's scores of feature rows (churn's by default).

    The evidence for promotion (``promotion_decision``): ``realized_difference``, where labels
    exist, the paired bootstrap of the challenger-minus-champion ``metric`` on the labelled rows
    (``paired_difference``, at ``confidence`` with ``n_resamples`` replicates); without them,
    ``estimated_difference``, the difference of the estimates with the interval from NannyML's
    sampling errors (``<role>_estimated_<metric>_sampling_error``; ``estimated_difference``).

    Multiclass: the log carries one number per prediction (the predicted class's probability), so
    there is no estimate, only the realized macro ROC AUC."""
    from scipy.stats import spearmanr

    score = score or _churn_scores
    champ_v, chall_v = list(references)
    out: dict = {
        "rank_correlation": float(spearmanr(pairs["champion_score"], pairs["challenger_score"]).statistic),
        "mean_abs_score_diff": float((pairs["champion_score"] - pairs["challenger_score"]).abs().mean()),
    }
    if spec.problem_type == "binary":
        cut = DECISION_THRESHOLD
        out["agreement"] = float(((pairs["champion_score"] >= cut) == (pairs["challenger_score"] >= cut)).mean())
    for role in (CHAMPION, CHALLENGER):
        latency = pairs[f"{role}_latency_ms"]
        out[f"{role}_p95_ms"] = float(np.percentile(latency, 95))
        out[f"{role}_p99_ms"] = float(np.percentile(latency, 99))
    # The estimate: each model's on the shadow requests, calibrated on its own reference.
    if spec.problem_type != "multiclass":
        features = logged.drop(columns=[SCORE]).merge(
            pairs[["prediction_id", "champion_score", "challenger_score"]], on="prediction_id")
        if len(features):
            for role, version in ((CHAMPION, champ_v), (CHALLENGER, chall_v)):
                data = prepare(features.rename(columns={f"{role}_score": SCORE}), spec)
                value, error = _estimated(metric, spec, references[version], data)
                out[f"{role}_estimated_{metric.name}"] = value
                out[f"{role}_estimated_{metric.name}_sampling_error"] = error
            key = f"estimated_{metric.name}"
            errors = (out[f"{CHAMPION}_{key}_sampling_error"], out[f"{CHALLENGER}_{key}_sampling_error"])
            if all(np.isfinite([out[f"{CHAMPION}_{key}"], out[f"{CHALLENGER}_{key}"], *errors])):
                estimator = "DLE" if spec.problem_type == "regression" else "CBPE"
                out["estimated_difference"] = estimated_difference(
                    out[f"{CHAMPION}_{key}"], out[f"{CHALLENGER}_{key}"], *errors, metric, confidence=confidence,
                    rows=len(features), method=f"NannyML {estimator} sampling error")
    # Realized: both models scored on the freshest traffic whose labels have matured.
    target = spec.target
    mature = logged[logged[target].notna()] if target in logged else logged.iloc[0:0]
    enough = len(mature) and (spec.problem_type == "regression" or mature[target].nunique() >= 2)
    if enough:
        scores = {}
        for role, version in ((CHAMPION, champ_v), (CHALLENGER, chall_v)):
            scores[role] = score(boosters[version], mature)
            out[f"{role}_realized_{metric.name}"] = _realized(metric, spec, mature[target], scores[role])
        out["labelled_rows"] = len(mature)
        if spec.problem_type == "binary":
            out["labelled_positives"] = int((mature[target] == 1).sum())
        out["realized_difference"] = paired_difference(
            mature[target], scores[CHAMPION], scores[CHALLENGER], metric, n_resamples=n_resamples,
            confidence=confidence, seed=seed, spec=spec)
    return out


def _interval(comparison: dict, kind: str, metric: PromotionMetric, confidence: float) -> dict | None:
    """The comparison's ``<kind>_difference`` on ``metric`` at ``confidence`` (re-derived from its
    standard error, a normal approximation, when it was computed at another), or None where there is
    no finite interval."""
    found = comparison.get(f"{kind}_difference")
    if not isinstance(found, dict) or found.get("metric", metric.name) != metric.name:
        return None
    interval = dict(found)
    if abs(float(interval.get("confidence", confidence)) - confidence) > 1e-9:
        se = interval.get("se")
        if se is None or not np.isfinite(se):
            return None
        half = _z(confidence) * float(se)
        method = interval.get("method", "")
        if not method.endswith("(normal approximation)"):
            method = f"{method} (normal approximation)".strip()
        interval |= {"low": interval["difference"] - half, "high": interval["difference"] + half,
                     "confidence": confidence, "method": method}
    try:
        bounds = [float(interval[k]) for k in ("difference", "low", "high")]
    except (KeyError, TypeError, ValueError):
        return None
    return interval if all(np.isfinite(bounds)) else None


def _describe(interval: dict, kind: str) -> str:
    """'+0.1111, 95% CI +0.0800..+0.1400, paired bootstrap on 13922 labelled predictions'."""
    rows = "labelled" if kind == "realized" else "shadow"
    return (f"{interval['difference']:+.4f}, {float(interval['confidence']) * 100:g}% CI "
            f"{interval['low']:+.4f}..{interval['high']:+.4f}, {interval.get('method', 'interval')} "
            f"on {interval.get('rows', '?')} {rows} predictions")


def promotion_decision(comparison: dict, policy, metric: PromotionMetric = ROC_AUC, *,
                       require_improvement: bool = False) -> tuple[str, str]:
    """Promote, retire or keep waiting: returns (decision, reason), decision one of "promote",
    "retire" and (only with ``require_improvement``) "wait".

    Realized ``metric`` on labelled traffic, where there is enough of it
    (``policy.promotion_min_labelled_rows``; for a binary label, holding at least
    ``policy.promotion_min_labelled_positives`` positives), decides: the estimates (CBPE, DLE) assume the relation
    between features and label has not changed, which is exactly what a concept drift breaks, and
    each model's estimate is calibrated on its own reference. Without labels, the estimates decide.
    The evidence is the comparison's interval of the difference (``realized_difference`` or
    ``estimated_difference``, see ``compare_shadow``; positive = the challenger is better), at
    ``policy.promotion_confidence`` (default 0.95).

    By default (a scheduled challenger): promote when the challenger is not worse than the champion
    beyond the tolerance (``promotion_auc_tolerance`` for the AUCs, absolute;
    ``promotion_rmse_tolerance`` for RMSE, relative to the champion's), unless its interval shows it
    significantly worse (the whole interval below 0), and meets the latency budget.

    ``require_improvement`` (the challenger was trained because the champion decayed): "not worse"
    is not enough. Promote only when the interval's low bound is above
    ``policy.promotion_min_improvement`` (default 0); retire when its high bound is below that (it
    cannot be the improvement asked for); otherwise "wait": keep it in shadow and decide again when
    more labels have matured. An estimate (no labels yet) never retires in this mode: it waits for
    labels. A challenger over the latency budget is retired either way."""
    labelled = (comparison.get("labelled_rows", 0) >= policy.promotion_min_labelled_rows
                and comparison.get("labelled_positives", np.inf) >= getattr(policy, "promotion_min_labelled_positives", 0))
    kind = "realized" if labelled and comparison.get(f"challenger_realized_{metric.name}") is not None else "estimated"
    champ, chall = comparison.get(f"champion_{kind}_{metric.name}"), comparison.get(f"challenger_{kind}_{metric.name}")
    bar = float(getattr(policy, "promotion_min_improvement", 0.0) or 0.0)
    confidence = float(getattr(policy, "promotion_confidence", 0.95) or 0.95)
    interval = _interval(comparison, kind, metric, confidence) if champ is not None and chall is not None else None
    problems, pending, evidence = [], [], []
    label = f"{kind} {metric.label}"
    if champ is None or chall is None:
        (pending if require_improvement else problems).append(f"no {metric.label} evidence for the comparison")
    else:
        tol = (policy.promotion_auc_tolerance if metric.higher_is_better
               else policy.promotion_rmse_tolerance * abs(champ))
        if interval is not None:
            described = f"({_describe(interval, kind)})"
        else:
            described = f"on {comparison['labelled_rows']} labelled predictions" if kind == "realized" else ""
        evidence.append(f"{label} {chall:.4f} vs champion {champ:.4f} {described}".rstrip())
        # In a decay episode an estimate never retires: each model's CBPE/DLE is calibrated on its own
        # reference and blind to a concept drift, so the champion's looks good exactly when it is not.
        estimate_in_episode = require_improvement and kind == "estimated"
        if interval is not None and interval["high"] < 0 and not estimate_in_episode:
            problems.append(f"{label} {chall:.4f} is significantly worse than the champion's {champ:.4f} {described}")
        elif require_improvement and interval is not None:
            if interval["high"] < bar and not estimate_in_episode:
                problems.append(f"{label} {chall:.4f} falls short of the required improvement {bar:+.4g} over the "
                                f"champion's {champ:.4f} {described}")
            elif not interval["low"] > bar:
                pending.append(f"not enough evidence yet: {label} {chall:.4f} vs champion {champ:.4f} {described}, "
                               f"the interval includes {bar:+.4g}")
        elif metric.worse_beyond(chall, champ, tol):
            problems.append(f"{label} {chall:.4f} is worse than the champion's {champ:.4f} beyond {tol:.4g}")
        elif require_improvement:  # no interval: nothing shows an improvement
            pending.append(f"not enough evidence yet: no confidence interval for the {label} difference "
                           f"({chall:.4f} vs champion {champ:.4f})")
    p99 = comparison["challenger_p99_ms"]
    evidence.append(f"shadow p99 {p99:.2f} ms")
    if p99 > policy.promotion_max_p99_ms:
        problems.append(f"shadow p99 {p99:.2f} ms is over the budget {policy.promotion_max_p99_ms} ms")
    if problems:
        return "retire", "; ".join(problems)
    if pending:
        return "wait", "; ".join(pending)
    return "promote", "; ".join(evidence)
