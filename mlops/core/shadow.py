"""The shadow comparison: champion and challenger on the same requests, and the promotion decision.

One comparison for churn and every declared use case: the primary metric is the problem type's
(``PromotionMetric``; binary ROC AUC, or PR AUC when a binary use case declares ``min_pr_auc``,
regression RMSE, multiclass macro ROC AUC), realized on the freshest labelled traffic where enough
labels have matured, else NannyML's estimate (CBPE for classification, DLE for regression).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlops.core.model_inputs import to_model_matrix
from mlops.core.monitoring import CHURN_SPEC, DECISION_THRESHOLD, PREDICTED, SCORE, MonitorSpec, prepare
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
        return float(metrics.root_mean_squared_error(y.astype(float), scores))
    if metric.name == "average_precision":
        return float(metrics.average_precision_score(y.astype(int), scores))
    if spec.problem_type == "multiclass":
        classes = list(spec.classes)
        order = np.argsort(classes)  # scikit-learn takes the classes in sorted order
        return float(metrics.roc_auc_score(y, np.asarray(scores)[:, order], multi_class="ovr", average="macro",
                                           labels=sorted(classes)))
    return float(metrics.roc_auc_score(y.astype(int), scores))


def _estimated(metric: PromotionMetric, spec: MonitorSpec, reference: pd.DataFrame, data: pd.DataFrame) -> float:
    """NannyML's estimate of ``metric`` on ``data`` (one chunk), fitted on the model's own reference."""
    import nannyml as nml

    features = list(spec.features)
    if spec.problem_type == "regression":
        estimator = nml.DLE(feature_column_names=features, y_pred=SCORE, y_true=spec.target, metrics=[metric.name],
                            chunk_number=1)
    else:
        estimator = nml.CBPE(metrics=[metric.name], y_pred_proba=SCORE, y_pred=PREDICTED, y_true=spec.target,
                             problem_type="classification_binary", chunk_number=1)
    estimator.fit(prepare(reference, spec))
    result = estimator.estimate(data.drop(columns=[spec.target])).filter(period="analysis").to_df()
    return float(result[(metric.name, "value")].iloc[0])


def compare_shadow(pairs: pd.DataFrame, logged: pd.DataFrame, references: dict[str, pd.DataFrame],
                   boosters: dict, *, spec: MonitorSpec = CHURN_SPEC, metric: PromotionMetric = ROC_AUC,
                   score: Callable | None = None) -> dict:
    """Agreement, latency and the primary ``metric`` (estimated and, where labels exist, realized) of
    both models on the shadow pairs (``shadow_pairs``). ``logged``: the champion's logged rows with
    their features and (once mature) labels (``analysis_frame``/``usecase_analysis_frame``);
    ``references``: champion and challenger version -> their reference (holdout) frame, in that
    order; ``score(booster, rows)``: a model's scores of feature rows (churn's by default).

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
                out[f"{role}_estimated_{metric.name}"] = _estimated(metric, spec, references[version], data)
    # Realized: both models scored on the freshest traffic whose labels have matured.
    target = spec.target
    mature = logged[logged[target].notna()] if target in logged else logged.iloc[0:0]
    enough = len(mature) and (spec.problem_type == "regression" or mature[target].nunique() >= 2)
    if enough:
        for role, version in ((CHAMPION, champ_v), (CHALLENGER, chall_v)):
            out[f"{role}_realized_{metric.name}"] = _realized(metric, spec, mature[target],
                                                              score(boosters[version], mature))
        out["labelled_rows"] = len(mature)
    return out


def promotion_decision(comparison: dict, policy, metric: PromotionMetric = ROC_AUC) -> tuple[str, str]:
    """Promote when the challenger is not worse than the champion beyond the tolerance on ``metric``
    and meets the latency budget; otherwise retire it. Returns (decision, reason).

    Realized ``metric`` on labelled traffic, where there is enough of it, decides: the estimates
    (CBPE, DLE) assume the relation between features and label has not changed, which is exactly
    what a concept drift breaks, and each model's estimate is calibrated on its own reference.
    Without labels, the estimates decide. ``policy`` is the monitoring policy (``promotion_*``
    thresholds: ``promotion_auc_tolerance`` for the AUCs, absolute; ``promotion_rmse_tolerance``
    for RMSE, relative to the champion's)."""
    labelled = comparison.get("labelled_rows", 0) >= policy.promotion_min_labelled_rows
    kind = "realized" if labelled and comparison.get(f"challenger_realized_{metric.name}") is not None else "estimated"
    champ, chall = comparison.get(f"champion_{kind}_{metric.name}"), comparison.get(f"challenger_{kind}_{metric.name}")
    problems, evidence = [], []
    label = f"{kind} {metric.label}"
    if champ is None or chall is None:
        problems.append(f"no {metric.label} evidence for the comparison")
    else:
        tol = (policy.promotion_auc_tolerance if metric.higher_is_better
               else policy.promotion_rmse_tolerance * abs(champ))
        evidence.append(f"{label} {chall:.4f} vs champion {champ:.4f}"
                        + (f" on {comparison['labelled_rows']} labelled predictions" if kind == "realized" else ""))
        if metric.worse_beyond(chall, champ, tol):
            problems.append(f"{label} {chall:.4f} is worse than the champion's {champ:.4f} beyond {tol:.4g}")
    p99 = comparison["challenger_p99_ms"]
    evidence.append(f"shadow p99 {p99:.2f} ms")
    if p99 > policy.promotion_max_p99_ms:
        problems.append(f"shadow p99 {p99:.2f} ms is over the budget {policy.promotion_max_p99_ms} ms")
    if problems:
        return "retire", "; ".join(problems)
    return "promote", "; ".join(evidence)
