"""The monitoring policy: how monitoring chunks data, when it alerts, and how the closed loop acts.

One configurable place for every monitoring and promotion threshold; the monitoring itself is
``mlops.core.monitoring``.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg
from pydantic import Field

from mlops.core.monitoring import DECAY_DEFAULTS


class MonitoringPolicy(dg.ConfigurableResource):
    """How monitoring chunks data, when it alerts, and how the closed loop acts on alerts."""

    # Chunks: by calendar period of the prediction (pandas offset alias), or by row count if > 0.
    chunk_period: str = "D"
    chunk_size: int = 0
    # Monitoring looks at the predictions of this many recent days (older chunks keep their results).
    analysis_window_days: int = 60
    # Decay alert (defaults: mlops.core.monitoring.DECAY_DEFAULTS; a use case's ``monitoring`` block
    # overrides them): ROC AUC (estimated or realized; multiclass: macro) below the reference's
    # minus this drop...
    max_auc_drop: float = DECAY_DEFAULTS["max_auc_drop"]
    # ...or, for regression, RMSE (estimated by DLE or realized) above the reference's times 1 + this...
    max_rmse_increase: float = DECAY_DEFAULTS["max_rmse_increase"]
    # ...in this many consecutive chunks (the newest ones that have a value).
    consecutive_chunks: int = int(DECAY_DEFAULTS["consecutive_chunks"])
    # ...and, for a realized binary metric, beyond the noise: pooled over those chunks, the one-sided
    # upper bound of an entity-clustered bootstrap interval at this confidence must be under the
    # floor (``mlops.core.monitoring.decay_evidence``; 0 turns it off). An account is scored every
    # day and one label window covers ~30 daily chunks, so "3 consecutive chunks" alone is about one
    # observation: on the loop benchmark 0.99 removes every retrain without a drift and every worse
    # promotion, and detects learnable drifts 0-5 days later than without it (docs/BENCHMARKS.md).
    decay_confidence: float = 0.99
    continuous_drift_methods: list[str] = Field(default_factory=lambda: ["jensen_shannon"])
    # Univariate drift alert: Jensen-Shannon distance over this (chi-squared uses its p-value).
    jensen_shannon_threshold: float = 0.1
    # Multivariate drift alert: reconstruction error this much above the reference's own.
    multivariate_drift_margin: float = 0.1
    categorical_drift_methods: list[str] = Field(default_factory=lambda: ["chi2"])
    # The closed loop (mlops.core.loop): within one decay episode, at most this many retrains, then an
    # alert for a person; the first this many days after the alert, another only once this many days
    # of new labels have come in; the episode is restored after this many consecutive realized chunks
    # at or above its floor.
    loop_max_retrains: int = 2
    loop_first_retrain_after_days: int = 7
    loop_retrain_min_new_label_days: int = 7
    loop_restore_chunks: int = 3
    # An absolute floor on the decay metric (ROC AUC; higher is better), above each version's own.
    loop_performance_slo: float | None = None
    # Shadow comparison: the challenger needs this many shadow predictions before a decision.
    shadow_min_predictions: int = 500
    # Promotion: the challenger may be at most this much worse than the champion (ROC AUC).
    promotion_auc_tolerance: float = 0.02
    # Promotion of a regression: the challenger's RMSE may be at most this fraction above the champion's.
    promotion_rmse_tolerance: float = 0.02
    # Promotion: realized ROC AUC decides once this many shadowed predictions have labels.
    promotion_min_labelled_rows: int = 200
    # ...of which, for a binary label, this many positives: a paired bootstrap over a handful of frauds
    # is no evidence (on the fraud benchmark's hard drift, a challenger was promoted on 877 labelled
    # predictions holding one or two frauds, PR AUC 0.0013 vs 0.0012 with a "99% CI" above zero).
    promotion_min_labelled_positives: int = 10
    # Promotion after a decay alert needs evidence: the paired interval of (challenger - champion)
    # at this confidence must lie above this improvement; a challenger still without that evidence
    # after this many days in shadow is retired (the loop may then retrain on more labels).
    promotion_confidence: float = 0.99
    promotion_min_improvement: float = 0.0
    promotion_max_shadow_days: int = 21
    # Promotion: the challenger's shadow scoring p99 must stay under this budget.
    promotion_max_p99_ms: float = 50.0
    # The serving endpoint the health sensor probes (uptime KPI).
    service_url: str = "http://127.0.0.1:3001"
    # Cost of serving: price of one CPU-hour, in the currency of the bill.
    price_per_cpu_hour: float = 0.048

    def fingerprint(self) -> str:
        keys = ("chunk_period", "chunk_size", "max_auc_drop", "continuous_drift_methods", "categorical_drift_methods",
                "jensen_shannon_threshold", "multivariate_drift_margin")
        payload = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def chunking(self) -> dict:
        if self.chunk_size > 0:
            return {"chunk_size": self.chunk_size}
        return {"chunk_period": self.chunk_period}
