"""The shadow comparison: champion and challenger on the same requests, and the promotion decision."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlops.core.model_inputs import to_model_matrix
from mlops.core.monitoring import DECISION_THRESHOLD, PREDICTED, SCORE, TARGET, prepare
from mlops.core.names import CHALLENGER, CHAMPION

SHADOW_DDL = """
CREATE TABLE IF NOT EXISTS shadow_comparisons (
    evaluated_at TIMESTAMP NOT NULL, champion_version VARCHAR NOT NULL, challenger_version VARCHAR,
    decision VARCHAR NOT NULL, reason VARCHAR NOT NULL, shadow_pairs BIGINT NOT NULL, details VARCHAR NOT NULL,
    dagster_run_id VARCHAR NOT NULL
)
"""
SHADOW_PAIRS_SQL = f"""
SELECT c.prediction_id, c.account_id, c.score AS champion_score, h.score AS challenger_score,
       c.latency_ms AS champion_latency_ms, h.latency_ms AS challenger_latency_ms, c.snapshot_version
FROM prediction_log c JOIN prediction_log h USING (prediction_id)
WHERE c.role = '{CHAMPION}' AND h.role = '{CHALLENGER}' AND c.model_version = ? AND h.model_version = ?
"""  # noqa: S608 - constant role names


def shadow_pairs(con, champion_version: str, challenger_version: str) -> pd.DataFrame:
    return con.execute(SHADOW_PAIRS_SQL, [champion_version, challenger_version]).df()


def compare_shadow(pairs: pd.DataFrame, logged: pd.DataFrame, references: dict[str, pd.DataFrame],
                   boosters: dict) -> dict:
    """Agreement, latency and ROC AUC (estimated and, where labels exist, realized) of both models."""
    import nannyml as nml
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    champ_v, chall_v = list(references)
    cut = DECISION_THRESHOLD
    out: dict = {
        "agreement": float(((pairs["champion_score"] >= cut) == (pairs["challenger_score"] >= cut)).mean()),
        "rank_correlation": float(spearmanr(pairs["champion_score"], pairs["challenger_score"]).statistic),
        "mean_abs_score_diff": float((pairs["champion_score"] - pairs["challenger_score"]).abs().mean()),
    }
    for role in (CHAMPION, CHALLENGER):
        latency = pairs[f"{role}_latency_ms"]
        out[f"{role}_p95_ms"] = float(np.percentile(latency, 95))
        out[f"{role}_p99_ms"] = float(np.percentile(latency, 99))
    # CBPE: each model's estimate on the shadow requests, calibrated on its own reference.
    features = logged.drop(columns=["score"]).merge(pairs[["prediction_id", "champion_score", "challenger_score"]],
                                                    on="prediction_id")
    for role, version in ((CHAMPION, champ_v), (CHALLENGER, chall_v)):
        data = prepare(features.rename(columns={f"{role}_score": SCORE}))
        estimator = nml.CBPE(metrics=["roc_auc"], y_pred_proba=SCORE, y_pred=PREDICTED, y_true=TARGET,
                             problem_type="classification_binary", chunk_number=1)
        estimator.fit(prepare(references[version]))
        result = estimator.estimate(data.drop(columns=[TARGET])).filter(period="analysis").to_df()
        out[f"{role}_estimated_roc_auc"] = float(result[("roc_auc", "value")].iloc[0])
    # Realized: both models scored on the freshest traffic whose labels have matured.
    mature = logged[logged[TARGET].notna()]
    if len(mature) and mature[TARGET].nunique() == 2:
        matrix = to_model_matrix(mature)
        for role, version in ((CHAMPION, champ_v), (CHALLENGER, chall_v)):
            out[f"{role}_realized_roc_auc"] = float(roc_auc_score(mature[TARGET], boosters[version].predict(matrix)))
        out["labelled_rows"] = len(mature)
    return out


def promotion_decision(comparison: dict, policy) -> tuple[str, str]:
    """Promote when the challenger is not worse than the champion beyond the tolerance and meets the
    latency budget; otherwise retire it. Returns (decision, reason).

    Realized ROC AUC on labelled traffic, where there is enough of it, decides: CBPE assumes the
    relation between features and churn has not changed, which is exactly what a concept drift
    breaks, and each model's estimate is calibrated on its own reference. Without labels, the CBPE
    estimates decide. ``policy`` is the monitoring policy (``promotion_*`` thresholds)."""
    tol = policy.promotion_auc_tolerance
    labelled = comparison.get("labelled_rows", 0) >= policy.promotion_min_labelled_rows
    kind = "realized" if labelled and comparison.get("challenger_realized_roc_auc") is not None else "estimated"
    champ, chall = comparison.get(f"champion_{kind}_roc_auc"), comparison.get(f"challenger_{kind}_roc_auc")
    problems, evidence = [], []
    if champ is None or chall is None:
        problems.append("no ROC AUC evidence for the comparison")
    else:
        evidence.append(f"{kind} ROC AUC {chall:.4f} vs champion {champ:.4f}"
                        + (f" on {comparison['labelled_rows']} labelled predictions" if kind == "realized" else ""))
        if chall < champ - tol:
            problems.append(f"{kind} ROC AUC {chall:.4f} is worse than the champion's {champ:.4f} beyond {tol}")
    p99 = comparison["challenger_p99_ms"]
    evidence.append(f"shadow p99 {p99:.2f} ms")
    if p99 > policy.promotion_max_p99_ms:
        problems.append(f"shadow p99 {p99:.2f} ms is over the budget {policy.promotion_max_p99_ms} ms")
    if problems:
        return "retire", "; ".join(problems)
    return "promote", "; ".join(evidence)
