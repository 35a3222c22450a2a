"""Feature views, declared once, and everything built from them.

The feature views are SQL over the raw tables, keyed by ``(account_id, feature_date)``: a row holds
what was known at the end of ``feature_date`` and becomes available at ``available_at`` (the next
midnight). From the same SQL the store builds:

- the offline daily feature table, over the whole history;
- point-in-time correct training sets: an ASOF join gives a label at time t the latest feature row
  with ``available_at <= t``, never one computed from events at or after t;
- the online snapshot (the latest row per account), computed over a bounded look-back window and
  written atomically as a versioned Parquet file for the serving layer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd

from resources.schemas import PLANS, SEGMENTS
from resources.settings import PlatformSettings, write_atomic
from resources.tenants import TenantCatalog

NUMERIC_FEATURES: tuple[str, ...] = (
    "active_days_7d",
    "events_7d",
    "events_30d",
    "usage_trend_7d_vs_30d",
    "sessions_30d",
    "avg_active_users_7d",
    "avg_active_users_30d",
    "seat_utilisation_7d",
    "seats",
    "mrr",
    "company_size",
    "tenure_days",
    "payment_failures_30d",
    "payment_failures_90d",
    "tickets_30d",
    "high_severity_tickets_30d",
    "max_ticket_severity_30d",
)
CATEGORICAL_FEATURES: dict[str, tuple[str, ...]] = {"plan": PLANS, "segment": SEGMENTS}
FEATURE_COLUMNS: tuple[str, ...] = NUMERIC_FEATURES + tuple(CATEGORICAL_FEATURES)
KEY_COLUMNS = ("account_id", "feature_date", "available_at")
# Widest window below is 90 days: the online snapshot needs at least that much history.
LOOKBACK_DAYS = 90
LABEL_HORIZON_DAYS = 30
PREDICTION_EVERY_DAYS = 7
MIN_HISTORY_DAYS = 35

# One definition of every feature. $lo/$hi bound the feature dates that are returned; the grid
# starts LOOKBACK_DAYS earlier so that every window is complete.
FEATURE_VIEW_SQL = """
WITH days AS (
    SELECT CAST(d AS DATE) AS feature_date
    FROM range(CAST($lo AS DATE) - INTERVAL (LOOKBACK) DAY, CAST($hi AS DATE) + INTERVAL 1 DAY, INTERVAL 1 DAY) t(d)
),
grid AS (
    SELECT a.account_id, d.feature_date
    FROM raw_accounts a JOIN days d ON d.feature_date >= CAST(a.signup_date AS DATE)
),
billing_daily AS (
    SELECT account_id, CAST(event_time AS DATE) AS feature_date,
           count(*) FILTER (WHERE event_type = 'payment_failed') AS payment_failures
    FROM raw_billing_events GROUP BY ALL
),
tickets_daily AS (
    SELECT account_id, CAST(opened_at AS DATE) AS feature_date,
           count(*) AS tickets, count(*) FILTER (WHERE severity >= 3) AS high_severity_tickets,
           max(severity) AS max_severity
    FROM raw_support_tickets GROUP BY ALL
),
daily AS (
    SELECT g.account_id, g.feature_date,
           CAST(u.account_id IS NOT NULL AS INTEGER) AS active_day,
           coalesce(u.active_users, 0) AS active_users,
           coalesce(u.sessions, 0) AS sessions,
           coalesce(u.feature_events, 0) AS feature_events,
           coalesce(b.payment_failures, 0) AS payment_failures,
           coalesce(t.tickets, 0) AS tickets,
           coalesce(t.high_severity_tickets, 0) AS high_severity_tickets,
           coalesce(t.max_severity, 0) AS max_severity
    FROM grid g
    LEFT JOIN raw_usage_events u ON u.account_id = g.account_id AND u.event_date = g.feature_date
    LEFT JOIN billing_daily b ON b.account_id = g.account_id AND b.feature_date = g.feature_date
    LEFT JOIN tickets_daily t ON t.account_id = g.account_id AND t.feature_date = g.feature_date
),
windowed AS (
    SELECT account_id, feature_date,
           sum(active_day) OVER w7 AS active_days_7d,
           sum(feature_events) OVER w7 AS events_7d,
           sum(feature_events) OVER w30 AS events_30d,
           sum(sessions) OVER w30 AS sessions_30d,
           avg(active_users) OVER w7 AS avg_active_users_7d,
           avg(active_users) OVER w30 AS avg_active_users_30d,
           sum(payment_failures) OVER w30 AS payment_failures_30d,
           sum(payment_failures) OVER w90 AS payment_failures_90d,
           sum(tickets) OVER w30 AS tickets_30d,
           sum(high_severity_tickets) OVER w30 AS high_severity_tickets_30d,
           max(max_severity) OVER w30 AS max_ticket_severity_30d
    FROM daily
    WINDOW w7 AS (PARTITION BY account_id ORDER BY feature_date RANGE BETWEEN INTERVAL 6 DAY PRECEDING AND CURRENT ROW),
           w30 AS (PARTITION BY account_id ORDER BY feature_date RANGE BETWEEN INTERVAL 29 DAY PRECEDING AND CURRENT ROW),
           w90 AS (PARTITION BY account_id ORDER BY feature_date RANGE BETWEEN INTERVAL 89 DAY PRECEDING AND CURRENT ROW)
)
SELECT w.account_id,
       w.feature_date,
       CAST(w.feature_date + INTERVAL 1 DAY AS TIMESTAMP) AS available_at,
       CAST(w.active_days_7d AS DOUBLE) AS active_days_7d,
       CAST(w.events_7d AS DOUBLE) AS events_7d,
       CAST(w.events_30d AS DOUBLE) AS events_30d,
       CASE WHEN w.events_30d > 0 THEN w.events_7d / (w.events_30d * 7.0 / 30.0) ELSE 0.0 END AS usage_trend_7d_vs_30d,
       CAST(w.sessions_30d AS DOUBLE) AS sessions_30d,
       w.avg_active_users_7d,
       w.avg_active_users_30d,
       w.avg_active_users_7d / a.seats AS seat_utilisation_7d,
       CAST(a.seats AS DOUBLE) AS seats,
       a.mrr,
       CAST(a.company_size AS DOUBLE) AS company_size,
       CAST(date_diff('day', CAST(a.signup_date AS DATE), w.feature_date) AS DOUBLE) AS tenure_days,
       CAST(w.payment_failures_30d AS DOUBLE) AS payment_failures_30d,
       CAST(w.payment_failures_90d AS DOUBLE) AS payment_failures_90d,
       CAST(w.tickets_30d AS DOUBLE) AS tickets_30d,
       CAST(w.high_severity_tickets_30d AS DOUBLE) AS high_severity_tickets_30d,
       CAST(w.max_ticket_severity_30d AS DOUBLE) AS max_ticket_severity_30d,
       a.plan,
       a.segment
FROM windowed w JOIN raw_accounts a USING (account_id)
WHERE w.feature_date BETWEEN CAST($lo AS DATE) AND CAST($hi AS DATE)
""".replace("(LOOKBACK)", str(LOOKBACK_DAYS))

# Labels: for each prediction date, every account live at that date; positive when it churns in
# the following LABEL_HORIZON_DAYS. Only mature labels (horizon fully observed) are produced.
LABELS_SQL = """
WITH bounds AS (
    SELECT min(event_date) AS first_day, max(event_date) AS last_day FROM raw_usage_events
),
prediction_dates AS (
    SELECT CAST(d AS TIMESTAMP) AS prediction_time
    FROM bounds, range(
        CAST(first_day AS TIMESTAMP) + INTERVAL (MIN_HISTORY) DAY,
        CAST(last_day AS TIMESTAMP) - INTERVAL (HORIZON) DAY + INTERVAL 1 DAY,
        INTERVAL (EVERY) DAY) t(d)
)
SELECT a.account_id, p.prediction_time,
       CAST(c.churned_at IS NOT NULL AND c.churned_at < p.prediction_time + INTERVAL (HORIZON) DAY AS INTEGER) AS churned
FROM prediction_dates p
JOIN raw_accounts a ON a.signup_date < p.prediction_time
LEFT JOIN raw_churn_events c USING (account_id)
WHERE c.churned_at IS NULL OR c.churned_at >= p.prediction_time
""".replace("(MIN_HISTORY)", str(MIN_HISTORY_DAYS)).replace("(HORIZON)", str(LABEL_HORIZON_DAYS)).replace(
    "(EVERY)", str(PREDICTION_EVERY_DAYS)
)

# The point-in-time join: a label at prediction_time sees only rows available at or before it.
TRAINING_SET_SQL = """
SELECT l.account_id, l.prediction_time, l.churned, f.* EXCLUDE (account_id)
FROM churn_labels l
ASOF JOIN account_features_daily f
  ON l.account_id = f.account_id AND l.prediction_time >= f.available_at
ORDER BY l.prediction_time, l.account_id
"""

FEATURE_VIEW_VERSION = hashlib.sha256(
    json.dumps([FEATURE_VIEW_SQL, LABELS_SQL, TRAINING_SET_SQL, FEATURE_COLUMNS, CATEGORICAL_FEATURES]).encode()
).hexdigest()[:16]


def compute_features(con: duckdb.DuckDBPyConnection, lo: dt.date, hi: dt.date) -> pd.DataFrame:
    """Feature rows for every account and every feature date in [lo, hi]."""
    return con.execute(FEATURE_VIEW_SQL, {"lo": lo, "hi": hi}).df()


def raw_date_range(con: duckdb.DuckDBPyConnection) -> tuple[dt.date, dt.date]:
    lo, hi = con.execute("SELECT min(event_date), max(event_date) FROM raw_usage_events").fetchone()
    if lo is None:
        raise ValueError("raw_usage_events is empty: there is nothing to build features from")
    return pd.Timestamp(lo).date(), pd.Timestamp(hi).date()


def to_model_frame(features: pd.DataFrame) -> pd.DataFrame:
    """The model's input matrix: feature columns in a fixed order, categories with fixed levels.

    Training and serving both call this, so the two can never disagree on encoding.
    """
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


def content_hash(frame: pd.DataFrame) -> str:
    """A stable content hash of a data frame (row order and dtypes included)."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    digest = hashlib.sha256(hashed.tobytes())
    digest.update(json.dumps([str(c) for c in frame.columns] + [str(t) for t in frame.dtypes]).encode())
    return digest.hexdigest()[:16]


class FeatureStore(dg.ConfigurableResource):
    """Builds offline features, training sets and online snapshots from the feature views."""

    settings: PlatformSettings
    catalog: TenantCatalog

    def build_daily_features(self, con: duckdb.DuckDBPyConnection) -> int:
        """(Re)build the offline table ``account_features_daily`` over the whole history."""
        lo, hi = raw_date_range(con)
        con.execute(
            "CREATE OR REPLACE TABLE account_features_daily AS " + FEATURE_VIEW_SQL,
            {"lo": lo, "hi": hi},
        )
        return con.execute("SELECT count(*) FROM account_features_daily").fetchone()[0]

    def build_training_set(self, con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
        """Mature labels joined point-in-time to the offline features; stored as ``churn_training_set``."""
        # The labels go in as a CTE: an ASOF join against a table created earlier in the same
        # transaction is planned without statistics and runs ~100x slower.
        con.execute(
            "CREATE OR REPLACE TABLE churn_training_set AS WITH churn_labels AS (" + LABELS_SQL + ") "
            + TRAINING_SET_SQL
        )
        con.execute("CREATE OR REPLACE TABLE churn_labels AS " + LABELS_SQL)
        return con.execute("SELECT * FROM churn_training_set").df()

    # --- online snapshot ------------------------------------------------------------------
    def online_dir(self, tenant: str) -> Path:
        spec = self.catalog.get(tenant)
        return self.settings.online_dir(spec.name, spec.region)

    def write_online_snapshot(self, tenant: str, con: duckdb.DuckDBPyConnection) -> dict:
        """Compute the latest feature row per account and publish it as a new immutable version.

        Only the last LOOKBACK_DAYS of events are read: this is the serving path, independent of
        the offline table, which is why the skew check compares the two.
        """
        _, hi = raw_date_range(con)
        snapshot = compute_features(con, hi, hi).sort_values("account_id").reset_index(drop=True)
        online = self.online_dir(tenant)
        online.mkdir(parents=True, exist_ok=True)
        version = _next_version(online)
        path = online / f"features-v{version:05d}.parquet"
        tmp = online / f".{path.name}.tmp"
        snapshot.to_parquet(tmp, index=False)
        tmp.replace(path)
        pointer = {
            "tenant": tenant,
            "version": version,
            "path": path.name,
            "feature_date": str(hi),
            "feature_view_version": FEATURE_VIEW_VERSION,
            "rows": len(snapshot),
            "content_hash": content_hash(snapshot),
        }
        write_atomic(online / "CURRENT.json", json.dumps(pointer, indent=2).encode())
        return pointer

    def current_snapshot_pointer(self, tenant: str) -> dict:
        pointer = self.online_dir(tenant) / "CURRENT.json"
        if not pointer.exists():
            raise FileNotFoundError(f"tenant {tenant!r} has no online feature snapshot yet")
        return json.loads(pointer.read_text())

    def read_online_snapshot(self, tenant: str) -> pd.DataFrame:
        pointer = self.current_snapshot_pointer(tenant)
        return pd.read_parquet(self.online_dir(tenant) / pointer["path"])


def _next_version(folder: Path) -> int:
    versions = [int(p.stem.split("-v")[-1]) for p in folder.glob("features-v*.parquet")]
    return max(versions, default=0) + 1


def offline_rows_at(con: duckdb.DuckDBPyConnection, account_ids: list[str], as_of: pd.Timestamp) -> pd.DataFrame:
    """Offline feature rows for ``account_ids`` as of ``as_of``, through the same ASOF join as training."""
    spine = pd.DataFrame({"account_id": account_ids, "as_of": as_of})
    con.register("skew_spine", spine)
    try:
        return con.execute(
            "SELECT f.* FROM skew_spine s ASOF JOIN account_features_daily f "
            "ON s.account_id = f.account_id AND s.as_of >= f.available_at ORDER BY f.account_id"
        ).df()
    finally:
        con.unregister("skew_spine")


def compare_feature_rows(online: pd.DataFrame, offline: pd.DataFrame, rtol: float = 1e-9) -> list[str]:
    """Describe every disagreement between two sets of feature rows keyed by account."""
    problems = []
    on = online.set_index("account_id")
    off = offline.set_index("account_id")
    for account in on.index.difference(off.index):
        problems.append(f"{account}: online only")
    for account in on.index.intersection(off.index):
        for col in FEATURE_COLUMNS:
            a, b = on.at[account, col], off.at[account, col]
            if col in CATEGORICAL_FEATURES:
                same = a == b
            else:
                same = bool(np.isclose(float(a), float(b), rtol=rtol, equal_nan=True))
            if not same:
                problems.append(f"{account}.{col}: online={a!r} offline={b!r}")
    return problems
