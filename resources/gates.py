"""Validation-gate thresholds: one definition, configurable per deployment."""

from __future__ import annotations

import dagster as dg


class GatePolicy(dg.ConfigurableResource):
    """Thresholds a trained model must meet before it may carry the ``challenger`` alias."""

    min_roc_auc: float = 0.70
    # A candidate may be at most this much worse than the champion on the same holdout.
    champion_auc_tolerance: float = 0.02
    max_expected_calibration_error: float = 0.05
    # Largest allowed ROC AUC gap between customer segments (fairlearn MetricFrame).
    max_fairness_gap: float = 0.15
    fairness_min_group_size: int = 100
    # ...and with at least this many rows of each class (a ROC AUC over a handful of churners is noise).
    fairness_min_class_rows: int = 20
    max_single_row_p99_ms: float = 10.0
    max_model_bytes: int = 20_000_000
    # Freshness: the newest training label may be at most this many days older than the newest raw event.
    max_label_staleness_days: int = 45
