"""The model's input: feature columns, fixed category levels and their encodings.

Training (``mlops.core.modeling``) and serving (``bentos.service``) both encode through these
functions, so the two can never disagree. Free of Dagster and pandera, so the serving process
imports it cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mlops.core.vocabulary import PLANS, SEGMENTS

if TYPE_CHECKING:  # pandas is imported where a frame is built: the service's hot path never needs it
    import pandas as pd

NUMERIC_FEATURES: tuple[str, ...] = (
    "active_days_7d",
    "events_7d",
    "events_28d",
    "usage_trend_7d_vs_28d",
    "sessions_28d",
    "avg_active_users_7d",
    "avg_active_users_28d",
    "seat_utilisation_7d",
    "seats",
    "mrr",
    "company_size",
    "tenure_days",
    "payment_failures_28d",
    "payment_failures_91d",
    "tickets_28d",
    "high_severity_tickets_28d",
    "max_ticket_severity_28d",
)
CATEGORICAL_FEATURES: dict[str, tuple[str, ...]] = {"plan": PLANS, "segment": SEGMENTS}
FEATURE_COLUMNS: tuple[str, ...] = NUMERIC_FEATURES + tuple(CATEGORICAL_FEATURES)

def to_model_frame(features: pd.DataFrame) -> pd.DataFrame:
    """The model's input matrix: feature columns in a fixed order, categories with fixed levels.

    Training and serving both call this, so the two can never disagree on encoding.
    """
    import pandas as pd

    missing = [c for c in FEATURE_COLUMNS if c not in features.columns]
    if missing:
        raise KeyError(f"feature frame lacks columns {missing}")
    frame = features.loc[:, list(FEATURE_COLUMNS)].copy()
    for col in NUMERIC_FEATURES:
        frame[col] = pd.to_numeric(frame[col], errors="raise").astype("float64")
    for col, levels in CATEGORICAL_FEATURES.items():
        frame[col] = pd.Categorical(frame[col], categories=list(levels))
    return frame


def to_model_matrix(features: pd.DataFrame) -> np.ndarray:
    """The same input as ``to_model_frame`` as a float matrix (categories as their fixed codes).

    LightGBM scores a numpy row an order of magnitude faster than a data frame, with the same
    result: it encodes pandas categoricals by exactly these codes.
    """
    frame = to_model_frame(features)
    matrix = np.empty((len(frame), len(FEATURE_COLUMNS)), dtype=np.float64)
    for i, col in enumerate(FEATURE_COLUMNS):
        if col in CATEGORICAL_FEATURES:
            codes = frame[col].cat.codes.to_numpy().astype(np.float64)
            codes[codes < 0] = np.nan  # an unseen category is a missing value, as in training
            matrix[:, i] = codes
        else:
            matrix[:, i] = frame[col].to_numpy()
    return matrix


_CATEGORY_CODES = {col: {level: float(i) for i, level in enumerate(levels)} for col, levels in CATEGORICAL_FEATURES.items()}


def encode_records(records: list[dict]) -> np.ndarray:
    """``to_model_matrix`` for a few records, without pandas: the single-account hot path."""
    matrix = np.empty((len(records), len(FEATURE_COLUMNS)), dtype=np.float64)
    for r, record in enumerate(records):
        for i, col in enumerate(FEATURE_COLUMNS):
            value = record[col]
            codes = _CATEGORY_CODES.get(col)
            matrix[r, i] = codes.get(value, np.nan) if codes is not None else float(value)
    return matrix
