"""Feature views, declared once, and everything built from them.

The feature views are SQL over the raw tables, keyed by ``(account_id, feature_week)``: a row holds
what was known at the end of the week's last day ``feature_date`` and becomes available at
``available_at`` (the next midnight). From the same SQL the store builds:

- the offline feature table, over the whole history;
- point-in-time correct training sets: an ASOF join gives a label at time t the latest feature row
  with ``available_at <= t``, never one computed from events at or after t;
- the online snapshot (the latest row per account), computed over a bounded look-back window and
  written atomically as a versioned Parquet file for the serving layer.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd

from mlops.core.model_inputs import (  # noqa: F401 - re-exported for callers of the feature store
    CATEGORICAL_FEATURES,
    FEATURE_COLUMNS,
    NUMERIC_FEATURES,
    encode_records,
    to_model_frame,
    to_model_matrix,
)
from mlops.core.online import POINTER_FILE, compare_rows, publish_snapshot
from resources.settings import PlatformSettings
from resources.tenants import TenantCatalog

FEATURE_TABLE = "account_features"
# Features are weekly: week w covers the days [origin + 7w, origin + 7w + 6], where the origin is
# the day after the newest event, so the newest week always ends with the newest data. Windows
# are 1, 4 and 13 weeks; the widest needs LOOKBACK_WEEKS of history.
LOOKBACK_WEEKS = 13
LABEL_HORIZON_DAYS = 30
MIN_HISTORY_DAYS = 35

# One definition of every feature. $origin: DATE; $first_week..$last_week: the (negative) weeks
# returned; $scan_from/$scan_to: the days read (the returned weeks plus LOOKBACK_WEEKS - 1 weeks
# before them). Inside the query a week is its index ``idx`` from $scan_from (idx 0 is week
# $first_week - (LOOKBACK_WEEKS - 1)), computed with integer arithmetic, and an account is a dense
# integer ``k``: the joins hash one BIGINT ``key = k * 2^32 + idx`` instead of a string and a week,
# and ``key - n`` is the same account n weeks earlier. There is no window function and no sort:
# - usage is summed per account and week; a row's 4-week sums are its 2-week sums (the week and
#   the one before) plus those of two weeks earlier, found by key;
# - payment failures and tickets are sparse, so each one is counted straight into every window
#   that contains its week (13 weeks for failures, 4 for tickets);
# - the grid has a row for every account and week whose last day is on or after the signup day;
#   weeks before the signup week count in no window (``idx >= signup_idx``), nor do events of
#   accounts missing from raw_accounts;
# - plan, seats and MRR are those in force on the week's last day (``feature_date``), from the
#   attribute history raw_account_attributes, never the current values: a history row valid from
#   day D applies from the week containing D (the first whose last day is on or after D) to the
#   week of the account's next row, so each row is a span of week indexes [idx_from, idx_to) that
#   the final select joins by account and range (most accounts have one or two rows, so this costs
#   about what a join by account does). Of several rows in one week the last wins; the others span
#   no week. A week before the account's first row has NULL attributes.
# The usage sums run as one aggregate per week, grouped by account alone (the week is a constant)
# and reading only the row groups of its seven days (usage is appended day by day): each hash
# table holds one week's accounts and stays in cache, where one aggregate over every account-week
# would not (about 40% less time for this step at 10M events). Only the weeks the windows need are
# read: from LOOKBACK_WEEKS - 4, the start of the first returned week's 4-week window.
_USAGE_WEEK_SQL = """
        SELECT account_id, CAST(@IDX@ AS INTEGER) AS idx,
               -- BIGINT, not the HUGEINT that sum() of BIGINT gives
               count(*) AS active_days, CAST(sum(active_users) AS BIGINT) AS user_days,
               CAST(sum(sessions) AS BIGINT) AS sessions, CAST(sum(feature_events) AS BIGINT) AS events
        FROM raw_usage_events
        WHERE event_date >= CAST($scan_from AS DATE) + 7 * @IDX@ AND event_date < CAST($scan_from AS DATE) + 7 * (@IDX@ + 1)
        GROUP BY account_id"""


FEATURE_VIEW_SQL = """
WITH accounts AS (
    SELECT account_id, CAST(row_number() OVER () AS BIGINT) AS k,
           -- the signup week's index, or 0 when it is before the first week read
           CAST(greatest(0, (CAST(signup_date AS DATE) - CAST($scan_from AS DATE)) // 7) AS INTEGER) AS signup_idx,
           company_size, signup_date, segment
    FROM raw_accounts
),
attribute_spans AS (
    SELECT * FROM (
        SELECT a.k, h.idx_from, h.plan, h.seats, h.mrr,
               coalesce(lead(h.idx_from) OVER (PARTITION BY a.k ORDER BY h.valid_from), 2147483647) AS idx_to
        FROM (
            SELECT account_id, valid_from, plan, seats, mrr,
                   CAST(greatest(0, (CAST(valid_from AS DATE) - CAST($scan_from AS DATE)) // 7) AS INTEGER) AS idx_from
            FROM raw_account_attributes
            WHERE valid_from < CAST($scan_to AS DATE)
        ) h
        JOIN accounts a ON a.account_id = h.account_id
    )
    WHERE idx_to > idx_from AND idx_to > LOOKBACK_WEEKS - 1
),
usage_weekly AS (
    SELECT a.k * 4294967296 + u.idx AS key, u.active_days, u.user_days, u.sessions, u.events
    FROM (USAGE_WEEKS_SQL
    ) u
    JOIN accounts a ON a.account_id = u.account_id AND u.idx >= a.signup_idx
),
event_windows AS (
    SELECT a.k * 4294967296 + e.idx + j AS key,
           count(*) FILTER (WHERE e.is_failure AND j < 4) AS payment_failures_28d,
           count(*) FILTER (WHERE e.is_failure) AS payment_failures_91d,
           count(*) FILTER (WHERE NOT e.is_failure) AS tickets_28d,
           count(*) FILTER (WHERE NOT e.is_failure AND e.severity >= 3) AS high_severity_tickets_28d,
           max(e.severity) AS max_ticket_severity_28d
    FROM (
        SELECT account_id, CAST((CAST(event_time AS DATE) - CAST($scan_from AS DATE)) // 7 AS INTEGER) AS idx,
               true AS is_failure, CAST(NULL AS BIGINT) AS severity
        FROM raw_billing_events
        WHERE event_type = 'payment_failed'
          AND event_time >= CAST($scan_from AS DATE) AND event_time < CAST($scan_to AS DATE)
        UNION ALL
        SELECT account_id, CAST((CAST(opened_at AS DATE) - CAST($scan_from AS DATE)) // 7 AS INTEGER) AS idx,
               false AS is_failure, severity
        FROM raw_support_tickets
        WHERE opened_at >= CAST($scan_from AS DATE) AND opened_at < CAST($scan_to AS DATE)
    ) e
    JOIN accounts a ON a.account_id = e.account_id AND e.idx >= a.signup_idx,
    range(LOOKBACK_WEEKS) r(j)  -- the event's week counts in the windows of the weeks idx + j
    WHERE (e.is_failure OR j < 4) AND e.idx + j >= LOOKBACK_WEEKS - 1
    GROUP BY ALL
),
grid AS (
    -- every week an account existed in (its last day on or after the signup day): the returned
    -- weeks and the two before them
    SELECT a.k, CAST(w.idx AS INTEGER) AS idx, a.k * 4294967296 + w.idx AS key
    FROM accounts a,
         range(LOOKBACK_WEEKS - 3, CAST($last_week AS INTEGER) - CAST($first_week AS INTEGER) + LOOKBACK_WEEKS) w(idx)
    WHERE w.idx >= a.signup_idx
),
two_weeks AS (
    SELECT g.k, g.idx, g.key, u0.active_days, u0.events, u0.user_days,
           coalesce(u0.events, 0) + coalesce(u1.events, 0) AS events_2w,
           coalesce(u0.sessions, 0) + coalesce(u1.sessions, 0) AS sessions_2w,
           coalesce(u0.user_days, 0) + coalesce(u1.user_days, 0) AS user_days_2w
    FROM grid g
    LEFT JOIN usage_weekly u0 ON u0.key = g.key
    LEFT JOIN usage_weekly u1 ON u1.key = g.key - 1
),
windowed AS (
    SELECT t.k, t.idx, CAST(t.idx + CAST($first_week AS INTEGER) - (LOOKBACK_WEEKS - 1) AS INTEGER) AS week,
           coalesce(t.active_days, 0) AS active_days_7d, coalesce(t.events, 0) AS events_7d,
           coalesce(t.user_days, 0) AS user_days_7d,
           t.events_2w + coalesce(p.events_2w, 0) AS events_28d,
           t.sessions_2w + coalesce(p.sessions_2w, 0) AS sessions_28d,
           t.user_days_2w + coalesce(p.user_days_2w, 0) AS user_days_28d,
           coalesce(e.payment_failures_28d, 0) AS payment_failures_28d,
           coalesce(e.payment_failures_91d, 0) AS payment_failures_91d,
           coalesce(e.tickets_28d, 0) AS tickets_28d,
           coalesce(e.high_severity_tickets_28d, 0) AS high_severity_tickets_28d,
           coalesce(e.max_ticket_severity_28d, 0) AS max_ticket_severity_28d
    FROM two_weeks t
    LEFT JOIN two_weeks p ON p.key = t.key - 2
    LEFT JOIN event_windows e ON e.key = t.key
    WHERE t.idx >= LOOKBACK_WEEKS - 1
)
SELECT a.account_id,
       w.week AS feature_week,
       CAST($origin AS DATE) + CAST(7 * w.week + 6 AS INTEGER) AS feature_date,
       CAST(CAST($origin AS DATE) + CAST(7 * (w.week + 1) AS INTEGER) AS TIMESTAMP) AS available_at,
       CAST(w.active_days_7d AS DOUBLE) AS active_days_7d,
       CAST(w.events_7d AS DOUBLE) AS events_7d,
       CAST(w.events_28d AS DOUBLE) AS events_28d,
       CASE WHEN w.events_28d > 0 THEN w.events_7d / (w.events_28d / 4.0) ELSE 0.0 END AS usage_trend_7d_vs_28d,
       CAST(w.sessions_28d AS DOUBLE) AS sessions_28d,
       w.user_days_7d / 7.0 AS avg_active_users_7d,
       w.user_days_28d / 28.0 AS avg_active_users_28d,
       w.user_days_7d / 7.0 / s.seats AS seat_utilisation_7d,
       CAST(s.seats AS DOUBLE) AS seats,
       s.mrr,
       CAST(a.company_size AS DOUBLE) AS company_size,
       CAST(date_diff('day', CAST(a.signup_date AS DATE), CAST($origin AS DATE) + CAST(7 * (w.week + 1) AS INTEGER)) AS DOUBLE) AS tenure_days,
       CAST(w.payment_failures_28d AS DOUBLE) AS payment_failures_28d,
       CAST(w.payment_failures_91d AS DOUBLE) AS payment_failures_91d,
       CAST(w.tickets_28d AS DOUBLE) AS tickets_28d,
       CAST(w.high_severity_tickets_28d AS DOUBLE) AS high_severity_tickets_28d,
       CAST(w.max_ticket_severity_28d AS DOUBLE) AS max_ticket_severity_28d,
       s.plan,
       a.segment
FROM windowed w JOIN accounts a USING (k)
LEFT JOIN attribute_spans s ON s.k = w.k AND w.idx >= s.idx_from AND w.idx < s.idx_to
""".replace("LOOKBACK_WEEKS", str(LOOKBACK_WEEKS))


@functools.lru_cache(maxsize=64)
def feature_view_sql(first_week: int, last_week: int) -> str:
    """FEATURE_VIEW_SQL for the weeks [first_week, last_week]: one usage aggregate per week read."""
    if first_week > last_week:
        raise ValueError(f"first_week {first_week} is after last_week {last_week}")
    weeks_read = last_week - first_week + LOOKBACK_WEEKS
    usage_weeks = "\n        UNION ALL".join(
        _USAGE_WEEK_SQL.replace("@IDX@", str(idx)) for idx in range(LOOKBACK_WEEKS - 4, weeks_read)
    )
    return FEATURE_VIEW_SQL.replace("USAGE_WEEKS_SQL", usage_weeks)


# Labels: at every week boundary (prediction time) with enough history, every account live at
# that time; positive when it churns in the following LABEL_HORIZON_DAYS. Only mature labels.
LABELS_SQL = """
WITH bounds AS (
    SELECT CAST(min(event_date) AS DATE) AS first_day, CAST(max(event_date) AS DATE) + 1 AS origin FROM raw_usage_events
),
prediction_dates AS (
    SELECT CAST(origin - CAST(7 * k AS INTEGER) AS TIMESTAMP) AS prediction_time
    FROM bounds, range(1, 1000) t(k)
    WHERE origin - CAST(7 * k AS INTEGER) >= first_day + (MIN_HISTORY)
      AND origin - CAST(7 * k AS INTEGER) + (HORIZON) <= origin
)
SELECT a.account_id, p.prediction_time,
       CAST(c.churned_at IS NOT NULL AND c.churned_at < p.prediction_time + INTERVAL (HORIZON) DAY AS INTEGER) AS churned
FROM prediction_dates p
JOIN raw_accounts a ON a.signup_date < p.prediction_time
LEFT JOIN raw_churn_events c USING (account_id)
WHERE c.churned_at IS NULL OR c.churned_at >= p.prediction_time
""".replace("(MIN_HISTORY)", str(MIN_HISTORY_DAYS)).replace("(HORIZON)", str(LABEL_HORIZON_DAYS))

# Early labels (censoring-aware): at the week boundaries whose label window has not closed yet but
# that have been observed for at least (MIN_OBSERVED) days, a churn that already happened is a known
# positive; every other account is a provisional negative ("not churned so far"). A retrain in a
# decay episode learns the new concept from them weeks before the full window closes.
PROVISIONAL_LABELS_SQL = """
WITH bounds AS (
    SELECT CAST(min(event_date) AS DATE) AS first_day, CAST(max(event_date) AS DATE) + 1 AS origin FROM raw_usage_events
),
prediction_dates AS (
    SELECT CAST(origin - CAST(7 * k AS INTEGER) AS TIMESTAMP) AS prediction_time,
           CAST(origin AS TIMESTAMP) AS observed_until
    FROM bounds, range(1, 10) t(k)
    WHERE origin - CAST(7 * k AS INTEGER) >= first_day + (MIN_HISTORY)
      AND origin - CAST(7 * k AS INTEGER) + (HORIZON) > origin
      AND origin - CAST(7 * k AS INTEGER) + (MIN_OBSERVED) <= origin
)
SELECT a.account_id, p.prediction_time,
       CAST(c.churned_at IS NOT NULL AND c.churned_at < p.observed_until AS INTEGER) AS churned
FROM prediction_dates p
JOIN raw_accounts a ON a.signup_date < p.prediction_time
LEFT JOIN raw_churn_events c USING (account_id)
WHERE c.churned_at IS NULL OR c.churned_at >= p.prediction_time
""".replace("(MIN_HISTORY)", str(MIN_HISTORY_DAYS)).replace("(HORIZON)", str(LABEL_HORIZON_DAYS))
MIN_OBSERVED_DAYS = 7

# The point-in-time join: a label at prediction_time sees only rows available at or before it.
TRAINING_SET_SQL = """
SELECT l.account_id, l.prediction_time, l.churned, f.* EXCLUDE (account_id)
FROM churn_labels l
ASOF JOIN account_features f
  ON l.account_id = f.account_id AND l.prediction_time >= f.available_at
ORDER BY l.prediction_time, l.account_id
"""

FEATURE_VIEW_VERSION = hashlib.sha256(
    json.dumps([FEATURE_VIEW_SQL, _USAGE_WEEK_SQL, LABELS_SQL, TRAINING_SET_SQL, FEATURE_COLUMNS, CATEGORICAL_FEATURES]).encode()
).hexdigest()[:16]


def feature_origin(con: duckdb.DuckDBPyConnection) -> tuple[dt.date, int]:
    """The origin (day after the newest event) and the number of weeks of history."""
    lo, hi = con.execute("SELECT min(event_date), max(event_date) FROM raw_usage_events").fetchone()
    if lo is None:
        raise ValueError("raw_usage_events is empty: there is nothing to build features from")
    lo, hi = pd.Timestamp(lo).date(), pd.Timestamp(hi).date()
    return hi + dt.timedelta(days=1), -(-((hi - lo).days + 1) // 7)


def _view_params(origin: dt.date, first_week: int, last_week: int) -> dict:
    return {
        "origin": origin,
        "first_week": first_week,
        "last_week": last_week,
        "scan_from": origin + dt.timedelta(days=7 * (first_week - (LOOKBACK_WEEKS - 1))),
        "scan_to": origin + dt.timedelta(days=7 * (last_week + 1)),
    }


def compute_features(con: duckdb.DuckDBPyConnection, origin: dt.date, first_week: int, last_week: int) -> pd.DataFrame:
    """Feature rows for every account and every week in [first_week, last_week] (weeks are < 0)."""
    return con.execute(feature_view_sql(first_week, last_week), _view_params(origin, first_week, last_week)).df()


def build_feature_table(con: duckdb.DuckDBPyConnection) -> int:
    """(Re)build the offline table ``account_features`` over the whole history; returns its rows."""
    origin, weeks = feature_origin(con)
    con.execute(f"CREATE OR REPLACE TABLE {FEATURE_TABLE} AS " + feature_view_sql(-weeks, -1), _view_params(origin, -weeks, -1))
    return con.execute(f"SELECT count(*) FROM {FEATURE_TABLE}").fetchone()[0]  # noqa: S608 - constant


def build_training_set(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Mature labels joined point-in-time to the offline features; stored as ``churn_training_set``."""
    # The labels go in as a CTE: an ASOF join against a table created earlier in the same
    # transaction is planned without statistics and runs ~100x slower.
    con.execute(
        "CREATE OR REPLACE TABLE churn_training_set AS WITH churn_labels AS (" + LABELS_SQL + ") "
        + TRAINING_SET_SQL
    )
    con.execute("CREATE OR REPLACE TABLE churn_labels AS " + LABELS_SQL)
    return con.execute("SELECT * FROM churn_training_set").df()


def build_provisional_set(con: duckdb.DuckDBPyConnection, min_observed_days: int = MIN_OBSERVED_DAYS) -> pd.DataFrame:
    """Early (censoring-aware) labels joined point-in-time to the offline features, with the days
    each was observed (``observed_days``); stored as ``churn_provisional_set``."""
    labels = PROVISIONAL_LABELS_SQL.replace("(MIN_OBSERVED)", str(int(min_observed_days)))
    con.execute("CREATE OR REPLACE TABLE churn_provisional_set AS WITH churn_labels AS (" + labels + ") "
                + TRAINING_SET_SQL)
    frame = con.execute("SELECT * FROM churn_provisional_set ORDER BY prediction_time, account_id").df()
    origin = feature_origin(con)[0]
    return frame.assign(observed_days=(pd.Timestamp(origin) - frame["prediction_time"]).dt.days)


class FeatureStore(dg.ConfigurableResource):
    """Builds offline features, training sets and online snapshots from the feature views."""

    settings: PlatformSettings
    catalog: TenantCatalog

    def build_features(self, con: duckdb.DuckDBPyConnection) -> int:
        """(Re)build the offline feature table over the whole history."""
        return build_feature_table(con)

    def build_training_set(self, con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
        """Mature labels joined point-in-time to the offline features; stored as ``churn_training_set``."""
        return build_training_set(con)

    # --- online snapshot ------------------------------------------------------------------
    def online_dir(self, tenant: str) -> Path:
        spec = self.catalog.get(tenant)
        return self.settings.online_dir(spec.name, spec.region)

    def write_online_snapshot(self, tenant: str, con: duckdb.DuckDBPyConnection) -> dict:
        """Compute the latest feature row per account and publish it as a new immutable version.

        Only the last LOOKBACK_WEEKS of events are read: this is the serving path, independent of
        the offline table, which is why the skew check compares the two.
        """
        origin, _ = feature_origin(con)
        snapshot = compute_features(con, origin, -1, -1).sort_values("account_id").reset_index(drop=True)
        return publish_snapshot(self.online_dir(tenant), snapshot, {
            "tenant": tenant,
            "feature_date": str(origin - dt.timedelta(days=1)),
            "feature_view_version": FEATURE_VIEW_VERSION,
        })

    def current_snapshot_pointer(self, tenant: str) -> dict:
        pointer = self.online_dir(tenant) / POINTER_FILE
        if not pointer.exists():
            raise FileNotFoundError(f"tenant {tenant!r} has no online feature snapshot yet")
        return json.loads(pointer.read_text())

    def read_online_snapshot(self, tenant: str) -> pd.DataFrame:
        pointer = self.current_snapshot_pointer(tenant)
        return pd.read_parquet(self.online_dir(tenant) / pointer["path"])


def offline_rows_at(con: duckdb.DuckDBPyConnection, account_ids: list[str], as_of: pd.Timestamp) -> pd.DataFrame:
    """Offline feature rows for ``account_ids`` as of ``as_of``, through the same ASOF join as training."""
    spine = pd.DataFrame({"account_id": account_ids, "as_of": as_of})
    con.register("skew_spine", spine)
    try:
        return con.execute(
            "SELECT f.* FROM skew_spine s ASOF JOIN account_features f "
            "ON s.account_id = f.account_id AND s.as_of >= f.available_at ORDER BY f.account_id"
        ).df()
    finally:
        con.unregister("skew_spine")


def compare_feature_rows(online: pd.DataFrame, offline: pd.DataFrame, rtol: float = 1e-9) -> list[str]:
    """Describe every disagreement between two sets of churn feature rows keyed by account."""
    return compare_rows(online, offline, "account_id", FEATURE_COLUMNS, CATEGORICAL_FEATURES, rtol)
