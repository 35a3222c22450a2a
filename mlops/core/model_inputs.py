"""The model's input: feature columns, fixed category levels and their encodings.

Training (``mlops.core.modeling``) and serving (``bentos.service``) both encode through these
functions, so the two can never disagree. Free of Dagster and pandera, so the serving process
imports it cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

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
# Churn's categorical features, its FEATURE_COLUMNS and CHURN_INPUTS (with to_model_frame,
# to_model_matrix and encode_records, its encoders) are built on first use (``__getattr__`` below):
# their levels are the domain's, read from churn's declared tables (``mlops.core.vocabulary``), and a
# declared use case's MLflow model ships this module without them.

class ModelInputs:
    """A model's input: numeric columns, then categorical columns with fixed levels, in a fixed order.

    One object per use case (``ModelInputs.of(usecase)``; churn's is ``CHURN_INPUTS``): training,
    the MLflow pyfunc and the service all encode through it, so they can never disagree. An unseen
    category is a missing value, as LightGBM treats it in training.
    """

    def __init__(self, numeric: tuple[str, ...], categorical: dict[str, tuple[str, ...]]):
        self.numeric = tuple(numeric)
        self.categorical = {col: tuple(levels) for col, levels in categorical.items()}
        self.columns: tuple[str, ...] = self.numeric + tuple(self.categorical)
        self._codes = {col: {level: float(i) for i, level in enumerate(levels)}
                       for col, levels in self.categorical.items()}

    @classmethod
    def of(cls, usecase) -> ModelInputs:
        """The inputs of a declared use case (``mlops.core.usecase.UseCase``): its numeric features and
        numeric request fields, then its categorical features and categorical request fields."""
        fields = usecase.serving.request_fields
        numeric = (*usecase.features.numeric, *(f.name for f in fields if f.isin is None))
        categorical = {**usecase.features.categorical, **{f.name: tuple(f.isin) for f in fields if f.isin is not None}}
        return cls(numeric, categorical)

    def to_model_frame(self, features: pd.DataFrame) -> pd.DataFrame:
        """The model's input frame: the columns in order, numbers as float64, categories with fixed levels."""
        import pandas as pd

        missing = [c for c in self.columns if c not in features.columns]
        if missing:
            raise KeyError(f"feature frame lacks columns {missing}")
        frame = features.loc[:, list(self.columns)].copy()
        for col in self.numeric:
            frame[col] = pd.to_numeric(frame[col], errors="raise").astype("float64")
        for col, levels in self.categorical.items():
            frame[col] = pd.Categorical(frame[col], categories=list(levels))
        return frame

    def to_model_matrix(self, features: pd.DataFrame) -> np.ndarray:
        """The same input as ``to_model_frame`` as a float matrix (categories as their fixed codes).

        LightGBM scores a numpy row an order of magnitude faster than a data frame, with the same
        result: it encodes pandas categoricals by exactly these codes.
        """
        frame = self.to_model_frame(features)
        matrix = np.empty((len(frame), len(self.columns)), dtype=np.float64)
        for i, col in enumerate(self.columns):
            if col in self.categorical:
                codes = frame[col].cat.codes.to_numpy().astype(np.float64)
                codes[codes < 0] = np.nan  # an unseen category is a missing value, as in training
                matrix[:, i] = codes
            else:
                matrix[:, i] = frame[col].to_numpy()
        return matrix

    def encode_records(self, records: list[dict]) -> np.ndarray:
        """``to_model_matrix`` for a few records, without pandas: the single-request hot path."""
        matrix = np.empty((len(records), len(self.columns)), dtype=np.float64)
        for r, record in enumerate(records):
            for i, col in enumerate(self.columns):
                value = record[col]
                codes = self._codes.get(col)
                matrix[r, i] = codes.get(value, np.nan) if codes is not None else float(value)
        return matrix


_CHURN_NAMES = ("CATEGORICAL_FEATURES", "FEATURE_COLUMNS", "CHURN_INPUTS", "to_model_frame", "to_model_matrix",
                "encode_records")


def __getattr__(name: str):
    """Churn's inputs, built once on first use (PEP 562)."""
    if name not in _CHURN_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from mlops.core.vocabulary import PLANS, SEGMENTS

    categorical = {"plan": PLANS, "segment": SEGMENTS}
    inputs = ModelInputs(NUMERIC_FEATURES, categorical)
    globals().update(CATEGORICAL_FEATURES=categorical, FEATURE_COLUMNS=inputs.columns, CHURN_INPUTS=inputs,
                     to_model_frame=inputs.to_model_frame, to_model_matrix=inputs.to_model_matrix,
                     encode_records=inputs.encode_records)
    return globals()[name]
