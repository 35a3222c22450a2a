"""Benchmark: the platform's DuckDB feature build against the same weekly features in pandas.

Run from the repository root::

    .venv/bin/python -m benchmarks.features                  # ~10 million usage events
    .venv/bin/python -m benchmarks.features --events 200000  # quick run
    .venv/bin/python -m benchmarks.features --profile        # also print EXPLAIN ANALYZE of the build

It simulates one large tenant (deterministically, with numpy), loads the raw tables into an
in-memory DuckDB database, then times

- the platform's real feature build, ``resources.feature_store.build_feature_table`` (the
  ``CREATE OR REPLACE TABLE account_features AS feature_view_sql(...)`` over the whole history that the
  ``account_features`` asset runs): the headline figure;
- ``resources.feature_store.compute_features(con, origin, -weeks, -1)``, the same query fetched as
  a pandas DataFrame: a secondary figure;
- the same build in a DuckDB database file (the raw tables copied into a fresh file in a temporary
  folder first), with the ``CHECKPOINT`` that writes the compressed table to disk: what the
  ``account_features`` asset does in a tenant's ``warehouse.duckdb``. A secondary figure: the
  targets are for the in-memory build above (``--no-file`` skips it);
- a vectorised pandas implementation of the same weekly features on the same raw data
  (``pandas_features``),

checks that pandas gives the same rows and values as the table DuckDB built, and prints a table
against the targets of the issue: the DuckDB build at least 3x faster than pandas, and under 3 s
for 10 million events. It also prints the process CPU seconds of each path (DuckDB's over all its
threads, pandas' on one) and the load average: the machine it runs on may be shared.

Generating and loading the data is not measured. The exit status is 0 whether or not the targets
are met (this is a benchmark, not a test), and 1 when the two implementations disagree.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from resources.feature_store import (
    FEATURE_COLUMNS,
    FEATURE_TABLE,
    LOOKBACK_WEEKS,
    NUMERIC_FEATURES,
    _view_params,
    build_feature_table,
    compute_features,
    feature_origin,
    feature_view_sql,
)
from resources.schemas import BILLING_EVENT_TYPES, PLANS, RAW_TABLES, SEGMENTS, TICKET_CATEGORIES
from usecases.churn.simulator import SIMULATION_START

DEFAULT_EVENTS = 10_000_000
DAYS = 180
SEED = 20_260_401
TARGET_SPEEDUP = 3.0
TARGET_SECONDS = 3.0  # for 10 million events
SOURCE = "benchmark"

KEYS = ["account_id", "feature_week"]
OUTPUT_COLUMNS = ("account_id", "feature_week", "feature_date", "available_at", *FEATURE_COLUMNS)


# --- data ---------------------------------------------------------------------------------------
def _account_params(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    segment = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    company_size = np.round(np.exp(rng.normal(np.array([3.0, 5.0, 7.5])[segment], 0.6))).astype(np.int64)
    company_size = company_size.clip(1, 1_000_000)
    # Plan given segment, by inverse CDF (vectorised rng.choice with per-row probabilities).
    plan_cdf = np.cumsum([[0.7, 0.27, 0.03], [0.25, 0.6, 0.15], [0.05, 0.35, 0.6]], axis=1)[segment]
    plan = (rng.random(n)[:, None] > plan_cdf).sum(axis=1).clip(0, 2)
    seats = np.maximum(1, np.round(company_size * rng.uniform(0.2, 0.8, n))).astype(np.int64)
    mrr = np.round(seats * np.array([15.0, 45.0, 110.0])[plan] * rng.uniform(0.8, 1.1, n), 2)
    # 90% signed up before the simulated window (up to three years earlier), 10% during it.
    new = rng.random(n) < 0.10
    signup_day = np.where(new, rng.integers(0, DAYS - 30, n), -rng.integers(1, 1100, n))
    first_day = np.maximum(signup_day, 0)
    # About 8% of accounts stop using the product during the window.
    churn_day = np.where(rng.random(n) < 0.08, first_day + rng.integers(14, DAYS, n), DAYS)
    utilisation = rng.beta(4, 3, n)
    return {
        "segment": segment,
        "company_size": company_size,
        "plan": plan,
        "seats": seats,
        "mrr": mrr,
        "signup_day": signup_day,
        "first_day": first_day,
        "churn_day": np.minimum(churn_day, DAYS),
        "utilisation": utilisation,
    }


# Days on which an active account records no usage at all: rarer on weekdays than at weekends.
_P_IDLE_WEEKDAY, _P_IDLE_WEEKEND = 0.01, 0.08


def _weekend() -> np.ndarray:
    dates = np.datetime64(SIMULATION_START, "D") + np.arange(DAYS)
    return (dates.astype("datetime64[D]").view("int64") + 3) % 7 >= 5  # 1970-01-01 was a Thursday


def _rows_per_account() -> float:
    """Expected usage rows per account, from a fixed pilot draw (to size the tenant)."""
    p = _account_params(np.random.default_rng(SEED + 1), 50_000)
    day = np.arange(DAYS)
    live = (day[None, :] >= p["first_day"][:, None]) & (day[None, :] < p["churn_day"][:, None])
    p_use = 1 - np.where(_weekend(), _P_IDLE_WEEKEND, _P_IDLE_WEEKDAY)
    return float((live * p_use[None, :]).sum() / len(live))


def simulate(n_events: int) -> dict[str, pd.DataFrame]:
    """Numeric (integer-coded) tables for one tenant with about ``n_events`` daily usage rows."""
    n = max(50, round(n_events / _rows_per_account()))
    rng = np.random.default_rng(SEED)
    p = _account_params(rng, n)
    weekend = _weekend()

    # Usage, generated day-major (the order in which a daily ingest appends it).
    day = np.arange(DAYS, dtype=np.int16)
    live = (day[:, None] >= p["first_day"][None, :]) & (day[:, None] < p["churn_day"][None, :])
    idle = (
        rng.random((DAYS, n), dtype=np.float32) < np.where(weekend, _P_IDLE_WEEKEND, _P_IDLE_WEEKDAY)[:, None]
    )
    day_idx, acc_idx = np.nonzero(live & ~idle)
    expected_users = (p["seats"] * p["utilisation"])[acc_idx] * np.where(weekend, 0.35, 1.0)[day_idx]
    active_users = np.maximum(rng.poisson(expected_users), 1)
    sessions = rng.poisson(active_users * 2.5)
    feature_events = rng.poisson(sessions * 6.0)
    usage = pd.DataFrame(
        {
            "acc": acc_idx.astype(np.int32),
            "day": day_idx.astype(np.int32),
            "active_users": active_users.astype(np.int64),
            "sessions": sessions.astype(np.int64),
            "feature_events": feature_events.astype(np.int64),
        }
    )

    # Billing: a monthly invoice on the signup anniversary; about 4% of payments fail.
    inv_day, inv_acc = np.nonzero(live & (((day[:, None] - p["signup_day"][None, :]) % 30) == 0))
    billing = pd.DataFrame(
        {
            "acc": inv_acc.astype(np.int32),
            "day": inv_day.astype(np.int32),
            "second": rng.integers(0, 86_400, len(inv_acc)),
            "failed": rng.random(len(inv_acc)) < 0.04,
            "amount": p["mrr"][inv_acc],
        }
    )

    # Support tickets: about one per account every 80 days, some severe; several a day happen.
    n_tickets = rng.poisson(live.sum() / 80)
    live_day, live_acc = np.nonzero(live)
    pick = rng.integers(0, len(live_acc), n_tickets)
    severe = rng.random(n_tickets) < 0.15
    tickets = pd.DataFrame(
        {
            "ticket": np.arange(n_tickets),
            "acc": live_acc[pick].astype(np.int32),
            "day": live_day[pick].astype(np.int32),
            "second": rng.integers(0, 86_400, n_tickets),
            "severity": np.where(severe, rng.integers(3, 5, n_tickets), rng.integers(1, 3, n_tickets)),
            "category": rng.integers(0, len(TICKET_CATEGORIES), n_tickets),
        }
    )

    accounts = pd.DataFrame(
        {
            "acc": np.arange(n, dtype=np.int32),
            "signup_day": p["signup_day"].astype(np.int32),
            "segment": p["segment"],
            "company_size": p["company_size"],
        }
    )

    # Attribute history: a row from the signup day; about 25% of accounts change their seats once
    # in the window and 10% move up a plan (MRR follows), some of them twice in one week. From
    # their own stream, so the usage above does not depend on them.
    crng = np.random.default_rng(SEED + 2)
    seat_change = (crng.random(n) < 0.25) & (p["first_day"] + 1 < DAYS)
    seat_day = crng.integers(p["first_day"] + 1, DAYS)
    new_seats = np.maximum(1, np.round(p["seats"] * crng.uniform(0.5, 1.8, n))).astype(np.int64)
    plan_change = (crng.random(n) < 0.10) & (p["plan"] < 2) & (p["first_day"] + 1 < DAYS)
    plan_day = np.minimum(np.where(crng.random(n) < 0.3, seat_day + crng.integers(0, 7, n),
                                   crng.integers(p["first_day"] + 1, DAYS)), DAYS - 1)
    plan_day = np.where(plan_day == seat_day, plan_day + 1, plan_day)
    price = np.array([15.0, 45.0, 110.0])
    discount = p["mrr"] / (p["seats"] * price[p["plan"]])
    acc = np.arange(n)
    seat_rows = pd.DataFrame({"acc": acc, "day": seat_day, "seats": new_seats})[seat_change]
    plan_rows = pd.DataFrame({"acc": acc, "day": plan_day, "plan": p["plan"] + 1})[plan_change & (plan_day < DAYS)]
    changes = pd.concat([seat_rows, plan_rows]).sort_values(["acc", "day"], kind="stable")
    first = pd.DataFrame({"acc": acc, "day": p["signup_day"], "seats": p["seats"], "plan": p["plan"]})
    history = pd.concat([first, changes]).sort_values(["acc", "day"], kind="stable", ignore_index=True)
    history[["seats", "plan"]] = history.groupby("acc")[["seats", "plan"]].ffill()
    history = history.astype({"seats": "int64", "plan": "int64"})
    history["mrr"] = np.round(history["seats"] * price[history["plan"].to_numpy()] * discount[history["acc"].to_numpy()], 2)
    attributes = history.astype({"acc": "int32", "day": "int32"}).sort_values(["day", "acc"], ignore_index=True)
    return {"accounts": accounts, "attributes": attributes, "usage": usage, "billing": billing, "tickets": tickets}


def _sql_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


# How each raw table is filled from the simulated (integer-coded) frame registered as ``sim``: the
# strings are built in SQL, vectorised. Account ids have 12 characters, like the simulator's.
_LOAD_SQL = {
    "raw_accounts": (
        "accounts",
        "SELECT ACC_ID, START + signup_day, 'us', SEGMENTS[segment + 1], company_size, 'SOURCE' FROM sim",
    ),
    "raw_account_attributes": (
        "attributes",
        "SELECT ACC_ID, START + day, PLANS[plan + 1], seats, mrr, 'SOURCE' FROM sim",
    ),
    "raw_usage_events": (
        "usage",
        "SELECT ACC_ID, START + day, active_users, sessions, feature_events, 'SOURCE' FROM sim",
    ),
    "raw_billing_events": (
        "billing",
        """SELECT printf('bench-inv-%06d-%03d', acc, day), ACC_ID, CAST(START + day AS TIMESTAMP) + to_seconds(second),
                  BILLING_EVENT_TYPES[CAST(failed AS INTEGER) + 1], amount, 'SOURCE' FROM sim""",
    ),
    "raw_support_tickets": (
        "tickets",
        """SELECT printf('bench-tkt-%08d', ticket), ACC_ID, CAST(START + day AS TIMESTAMP) + to_seconds(second),
                  severity, TICKET_CATEGORIES[category + 1], 'SOURCE' FROM sim""",
    ),
}
_LOAD_TOKENS = {
    "ACC_ID": "printf('bench-%06d', acc)",
    "START": f"DATE '{SIMULATION_START.isoformat()}'",
    "SOURCE": SOURCE,
    "BILLING_EVENT_TYPES": _sql_list(BILLING_EVENT_TYPES),
    "TICKET_CATEGORIES": _sql_list(TICKET_CATEGORIES),
    "SEGMENTS": _sql_list(SEGMENTS),
    "PLANS": _sql_list(PLANS),
}


RAW_TABLE_NAMES = tuple(_LOAD_SQL)  # the raw tables the benchmark fills (and the feature view reads)


def load(con: duckdb.DuckDBPyConnection, sim: dict[str, pd.DataFrame]) -> None:
    """Create the raw tables from their declared DDL (resources.schemas) and fill them."""
    for name, (key, select) in _LOAD_SQL.items():
        for token, value in _LOAD_TOKENS.items():
            select = select.replace(token, value)
        con.register("sim", sim[key])
        try:
            con.execute(RAW_TABLES[name].ddl())
            con.execute("INSERT INTO " + name + " " + select)
        finally:
            con.unregister("sim")


# --- the same features, in pandas -----------------------------------------------------------------
_WEEKLY_COLUMNS = (
    "active_days",
    "user_days",
    "sessions",
    "events",
    "payment_failures",
    "tickets",
    "high_severity_tickets",
    "max_severity",
)


def pandas_features(raw: dict[str, pd.DataFrame], origin: dt.date, first_week: int, last_week: int) -> pd.DataFrame:
    """FEATURE_VIEW_SQL, written as idiomatic vectorised pandas.

    Events are summed per account and week (``groupby`` over the raw rows), the weekly sums laid
    out on a dense account x week grid (one row per account, one column per week from
    ``first_week - (LOOKBACK_WEEKS - 1)`` to ``last_week``; cells before the account's signup
    week are zero, so they count in no window, as in the SQL), and
    the 1/4/13-week windows taken along the weeks: sums as a cumulative sum minus the cumulative
    sum k weeks earlier, the maximum as the maximum of the last four weeks. The rows returned are
    the grid cells of weeks ``first_week..last_week``, in (account, week) order. Plan, seats and
    MRR are joined to each row from the attribute history with ``pd.merge_asof`` on the week's last
    day.
    """
    accounts = raw["raw_accounts"].set_index("account_id")
    origin_ts = pd.Timestamp(origin)
    lo_week = first_week - (LOOKBACK_WEEKS - 1)
    weeks = pd.RangeIndex(lo_week, last_week + 1, name="week")
    scan_from = origin_ts + pd.Timedelta(days=7 * lo_week)
    scan_to = origin_ts + pd.Timedelta(days=7 * (last_week + 1))
    seven_days = pd.Timedelta(days=7)

    def scanned(frame: pd.DataFrame, time_col: str) -> pd.DataFrame:
        t = frame[time_col]
        frame = frame.loc[(t >= scan_from) & (t < scan_to)]
        # floor((t - origin) / 7 days) == floor(date_diff('day', origin, CAST(t AS DATE)) / 7)
        return frame.assign(week=((frame[time_col] - origin_ts) // seven_days).astype("int64"))

    keys = ["account_id", "week"]
    usage = scanned(raw["raw_usage_events"], "event_date")
    usage_weekly = usage.groupby(keys, sort=False).agg(
        active_days=("active_users", "size"),
        user_days=("active_users", "sum"),
        sessions=("sessions", "sum"),
        events=("feature_events", "sum"),
    )
    billing = scanned(raw["raw_billing_events"], "event_time")
    billing_weekly = (
        billing.assign(payment_failures=billing["event_type"].eq("payment_failed").astype("int64"))
        .groupby(keys, sort=False)[["payment_failures"]]
        .sum()
    )
    tickets = scanned(raw["raw_support_tickets"], "opened_at")
    tickets_weekly = (
        tickets.assign(high=tickets["severity"].ge(3).astype("int64"))
        .groupby(keys, sort=False)
        .agg(tickets=("severity", "size"), high_severity_tickets=("high", "sum"), max_severity=("severity", "max"))
    )

    # The grid: an account exists in a week whose last day is on or after its signup day.
    signup_offset = (accounts["signup_date"] - origin_ts) // pd.Timedelta(days=1)
    in_grid = pd.DataFrame(
        signup_offset.to_numpy()[:, None] < 7 * (weeks.to_numpy()[None, :] + 1), index=accounts.index, columns=weeks
    )

    def dense(weekly: pd.DataFrame, col: str) -> pd.DataFrame:
        wide = weekly[col].unstack("week", fill_value=0).reindex(index=accounts.index, columns=weeks, fill_value=0)
        return wide.where(in_grid, 0).astype("int64")

    grid = {col: dense(frame, col) for frame in (usage_weekly, billing_weekly, tickets_weekly) for col in frame}

    def window_sum(col: str, k: int) -> pd.DataFrame:
        cum = grid[col].cumsum(axis=1)
        return cum - cum.shift(k, axis=1, fill_value=0)

    sev = grid["max_severity"]
    max_severity_28d = np.maximum.reduce([sev.shift(k, axis=1, fill_value=0).to_numpy() for k in range(4)])
    wide = {
        "active_days_7d": grid["active_days"],
        "events_7d": grid["events"],
        "user_days_7d": grid["user_days"],
        "events_28d": window_sum("events", 4),
        "sessions_28d": window_sum("sessions", 4),
        "user_days_28d": window_sum("user_days", 4),
        "payment_failures_28d": window_sum("payment_failures", 4),
        "payment_failures_91d": window_sum("payment_failures", 13),
        "tickets_28d": window_sum("tickets", 4),
        "high_severity_tickets_28d": window_sum("high_severity_tickets", 4),
        "max_ticket_severity_28d": pd.DataFrame(max_severity_28d, index=accounts.index, columns=weeks),
    }

    # Back to one row per (account, week) of the returned weeks, in grid order.
    returned = in_grid.loc[:, first_week:last_week]
    acc_idx, week_idx = np.nonzero(returned.to_numpy())
    col_idx = week_idx + (first_week - lo_week)
    out = pd.DataFrame(
        {name: frame.to_numpy()[acc_idx, col_idx].astype("float64") for name, frame in wide.items()}
    )
    week = returned.columns.to_numpy()[week_idx]
    attrs = accounts.iloc[acc_idx]
    account_ids = accounts.index.to_numpy()[acc_idx]
    feature_date = origin_ts + pd.to_timedelta(7 * week + 6, unit="D")
    available_at = origin_ts + pd.to_timedelta(7 * (week + 1), unit="D")
    # Plan, seats and MRR in force on the week's last day: the newest history row valid from that
    # day or earlier (NaN before the account's first row).
    history = raw["raw_account_attributes"][["account_id", "valid_from", "plan", "seats", "mrr"]]
    history = history.astype({"valid_from": "datetime64[ns]", "seats": "float64", "mrr": "float64"})
    spine = pd.DataFrame({"account_id": account_ids, "feature_date": feature_date.astype("datetime64[ns]"),
                          "row": np.arange(len(account_ids))})
    in_force = pd.merge_asof(
        spine.sort_values("feature_date", kind="stable"), history.sort_values("valid_from", kind="stable"),
        left_on="feature_date", right_on="valid_from", by="account_id", direction="backward",
    ).sort_values("row")
    seats = in_force["seats"].to_numpy()
    events_28d = out["events_28d"].to_numpy()
    return pd.DataFrame(
        {
            "account_id": account_ids,
            "feature_week": week.astype("int32"),
            "feature_date": feature_date,
            "available_at": available_at,
            "active_days_7d": out["active_days_7d"],
            "events_7d": out["events_7d"],
            "events_28d": events_28d,
            "usage_trend_7d_vs_28d": np.where(
                events_28d > 0, out["events_7d"] / np.where(events_28d > 0, events_28d / 4.0, 1.0), 0.0
            ),
            "sessions_28d": out["sessions_28d"],
            "avg_active_users_7d": out["user_days_7d"] / 7.0,
            "avg_active_users_28d": out["user_days_28d"] / 28.0,
            "seat_utilisation_7d": out["user_days_7d"] / 7.0 / seats,
            "seats": seats,
            "mrr": in_force["mrr"].to_numpy(),
            "company_size": attrs["company_size"].to_numpy().astype("float64"),
            "tenure_days": ((available_at - pd.DatetimeIndex(attrs["signup_date"])) // pd.Timedelta(days=1)).to_numpy(
                dtype="float64"
            ),
            "payment_failures_28d": out["payment_failures_28d"],
            "payment_failures_91d": out["payment_failures_91d"],
            "tickets_28d": out["tickets_28d"],
            "high_severity_tickets_28d": out["high_severity_tickets_28d"],
            "max_ticket_severity_28d": out["max_ticket_severity_28d"],
            "plan": in_force["plan"].astype(object).where(in_force["plan"].notna(), None).to_numpy(),  # NULL: None
            "segment": attrs["segment"].to_numpy(),
        }
    )[list(OUTPUT_COLUMNS)]


# --- checking and timing ----------------------------------------------------------------------------
def compare(duck: pd.DataFrame, pand: pd.DataFrame) -> list[str]:
    """Every difference between two feature frames already sorted by (account_id, feature_week).

    Keys, dates and categories must be equal exactly, numeric features within np.isclose.
    """
    if list(duck.columns) != list(pand.columns):
        return [f"columns differ: duckdb={list(duck.columns)} pandas={list(pand.columns)}"]
    if len(duck) != len(pand):
        return [f"row counts differ: duckdb={len(duck):,} pandas={len(pand):,}"]
    problems = []
    for col in OUTPUT_COLUMNS:
        a, b = duck[col], pand[col]
        if col in NUMERIC_FEATURES:
            x, y = a.to_numpy(dtype="float64"), b.to_numpy(dtype="float64")
            bad = ~np.isclose(x, y, equal_nan=True)
        elif col in ("feature_date", "available_at"):
            bad = a.astype("datetime64[ns]").to_numpy() != b.astype("datetime64[ns]").to_numpy()
        elif col == "feature_week":
            bad = a.to_numpy(dtype="int64") != b.to_numpy(dtype="int64")
        else:
            bad = a.astype(str).to_numpy() != b.astype(str).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            problems.append(
                f"{col}: {int(bad.sum()):,} rows differ, e.g. {duck.at[i, 'account_id']} week {duck.at[i, 'feature_week']}:"
                f" duckdb={a.iat[i]} pandas={b.iat[i]}"
            )
    return problems


def copy_to_file(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Copy the raw tables of ``con`` into a new database file, attached to ``con`` as ``wh``."""
    quoted = str(path).replace("'", "''")
    con.execute(f"ATTACH '{quoted}' AS wh")  # a literal: DuckDB 1.x takes no parameter here
    for name in RAW_TABLE_NAMES:
        con.execute(f"CREATE TABLE wh.{name} AS SELECT * FROM memory.{name}")  # noqa: S608 - known tables
    con.execute("CHECKPOINT wh")


def build_in_file(con: duckdb.DuckDBPyConnection) -> int:
    """``build_feature_table`` in the attached file ``wh``, checkpointed (the table compressed and on disk)."""
    con.execute("USE wh")
    try:
        rows = build_feature_table(con)
        con.execute("CHECKPOINT wh")
    finally:
        con.execute("USE memory")
    return rows


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of the process (DuckDB's too)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], object], repeat: int, label: str) -> tuple[list[float], list[float], object]:
    """Wall and process CPU seconds of ``repeat`` runs of ``fn``, and its last result."""
    times, cpu_times, result = [], [], None
    for i in range(repeat):
        result = None  # let the previous result go before the next run
        cpu_start, start = _cpu_seconds(), time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(_cpu_seconds() - cpu_start)
        print(f"  {label} run {i + 1}/{repeat}: {times[-1]:.2f} s (CPU {cpu_times[-1]:.2f} s)", flush=True)
    return times, cpu_times, result


def _fmt(times: list[float]) -> str:
    return f"{min(times):.2f} / {statistics.median(times):.2f}"


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def time_declared(con: duckdb.DuckDBPyConnection, repeat: int) -> tuple[list[float], list[str]]:
    """Time churn's declared feature view, built by the declared use cases' store, and compare its
    table with the hand-written ``account_features`` (built just before): every row, exactly."""
    from mlops.core import usecase_store
    from mlops.core.environment import PROJECT_ROOT
    from mlops.core.usecase import load_usecase

    churn = load_usecase(PROJECT_ROOT / "usecases" / "churn", file="declaration.yaml")
    print("timing DuckDB: churn's declared feature view (mlops.core.usecase_store.build_feature_table)")
    times, _, _ = timed(lambda: usecase_store.build_feature_table(con, churn), repeat, "declared CTAS")
    columns = ", ".join(["account_id", "available_at", *churn.features.columns])
    problems = []
    for a, b in ((usecase_store.feature_table(churn), FEATURE_TABLE), (FEATURE_TABLE, usecase_store.feature_table(churn))):
        extra = con.execute(f"SELECT count(*) FROM (SELECT {columns} FROM {a} EXCEPT ALL "  # noqa: S608 - known tables
                            f"SELECT {columns} FROM {b})").fetchone()[0]
        if extra:
            problems.append(f"{extra:,} rows of {a} are not in {b}")
    return times, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="usage event rows to simulate")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each path (at least 3)")
    parser.add_argument(
        "--profile", action="store_true", help="also print EXPLAIN ANALYZE of the feature build (CTAS)"
    )
    parser.add_argument("--no-file", action="store_true", help="skip the build in a DuckDB database file")
    parser.add_argument("--declared", action="store_true",
                        help="also time churn's declared feature view (usecases/churn/declaration.yaml, run by "
                             "mlops.core.usecase_store.build_feature_table) and check it builds the same table")
    args = parser.parse_args(argv)
    repeat = max(3, args.repeat)

    t0 = time.perf_counter()
    sim = simulate(args.events)
    t_sim = time.perf_counter() - t0
    con = duckdb.connect()  # in memory
    t0 = time.perf_counter()
    load(con, sim)
    del sim
    raw = {
        name: con.execute(f"SELECT * EXCLUDE (source) FROM {name}").df()  # noqa: S608 - known tables
        for name in RAW_TABLE_NAMES
    }
    t_load = time.perf_counter() - t0
    n_events = len(raw["raw_usage_events"])
    n_accounts = len(raw["raw_accounts"])
    origin, weeks = feature_origin(con)
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    print(
        f"simulated {n_events:,} usage events, {n_accounts:,} accounts, {len(raw['raw_billing_events']):,} billing "
        f"events, {len(raw['raw_support_tickets']):,} tickets in {t_sim:.1f} s; loaded into DuckDB (and read "
        f"back for pandas) in {t_load:.1f} s (neither is measured); origin {origin}, {weeks} weeks",
        flush=True,
    )
    load_start = os.getloadavg()[0]

    print(f"timing DuckDB: resources.feature_store.build_feature_table (CREATE OR REPLACE TABLE {FEATURE_TABLE} AS ...)")
    ctas_times, ctas_cpu, n_rows = timed(lambda: build_feature_table(con), repeat, "duckdb CTAS")
    declared_times: list[float] = []
    declared_problems: list[str] = []
    if args.declared:
        declared_times, declared_problems = time_declared(con, repeat)
    print(f"timing DuckDB: resources.feature_store.compute_features(con, {origin}, {-weeks}, -1) -> DataFrame")
    query_times, _, _ = timed(lambda: compute_features(con, origin, -weeks, -1), repeat, "duckdb query+df")
    file_times: list[float] = []
    if not args.no_file:
        with tempfile.TemporaryDirectory(prefix="features-bench-") as folder:
            copy_to_file(con, Path(folder) / "warehouse.duckdb")
            print("timing DuckDB: the same build in a database file, then CHECKPOINT")
            file_times, _, _ = timed(lambda: build_in_file(con), repeat, "duckdb file CTAS+checkpoint")
            con.execute("DETACH wh")
    print("timing pandas: benchmarks.features.pandas_features")
    pandas_times, pandas_cpu, pand = timed(lambda: pandas_features(raw, origin, -weeks, -1), repeat, "pandas")
    load_end = os.getloadavg()[0]

    profile = None
    if args.profile:
        sql = f"EXPLAIN ANALYZE CREATE OR REPLACE TABLE {FEATURE_TABLE} AS " + feature_view_sql(-weeks, -1)
        profile = con.execute(sql, _view_params(origin, -weeks, -1)).fetchall()[0][1]

    duck = con.execute(f"SELECT * FROM {FEATURE_TABLE} ORDER BY account_id, feature_week").df()  # noqa: S608 - constant
    pand.sort_values(KEYS, ignore_index=True, inplace=True)
    problems = compare(duck, pand)
    del duck, pand

    ctas_best, pandas_best = min(ctas_times), min(pandas_times)
    speedup = pandas_best / ctas_best
    speed_verdict = "PASS" if speedup >= TARGET_SPEEDUP else "FAIL"
    if args.events >= DEFAULT_EVENTS:
        time_verdict = "PASS" if ctas_best < TARGET_SECONDS else "FAIL"
    else:
        time_verdict = f"n/a (target is for {DEFAULT_EVENTS:,} events)"

    if profile:
        print()
        print(profile)
    print()
    print(
        f"Features: {n_events:,} usage events ({n_accounts:,} accounts, {DAYS} days, {weeks} weeks) -> "
        f"{n_rows:,} feature rows x {len(OUTPUT_COLUMNS)} columns; {os.cpu_count()} CPU cores, DuckDB "
        f"{duckdb.__version__} (threads={threads}), pandas {pd.__version__}, numpy {np.__version__}; {repeat} runs "
        f"each, seconds as best / median; peak RSS {_peak_rss_gib():.1f} GiB"
    )
    print(
        f"process CPU seconds, best / median: DuckDB build {_fmt(ctas_cpu)} (on {threads} threads), "
        f"pandas {_fmt(pandas_cpu)} (one thread)"
    )
    print(f"1-minute load average: {load_start:.2f} before the timed runs, {load_end:.2f} after them")
    if max(load_start, load_end) > 1.0:
        print(
            f"WARNING: the 1-minute load average was above 1.0 on {os.cpu_count()} cores: the machine is shared "
            "with other work, so these figures are pessimistic"
        )
    print()
    file_cell = _fmt(file_times) if file_times else "not run"
    print(
        "| events | DuckDB build (CTAS) s | DuckDB query + DataFrame s | DuckDB build in a file + checkpoint s "
        "| pandas s | speed-up CTAS vs pandas (best) | DuckDB >= 3x faster | DuckDB < 3 s at 10M |"
    )
    print("|---:|---:|---:|---:|---:|---:|:---|:---|")
    print(
        f"| {n_events:,} | {_fmt(ctas_times)} | {_fmt(query_times)} | {file_cell} | {_fmt(pandas_times)} "
        f"| {speedup:.2f}x | {speed_verdict} | {time_verdict} |"
    )
    if declared_times:
        print(f"churn's declared feature view (usecase_store.build_feature_table, a full build), best / median: "
              f"{_fmt(declared_times)} s against {_fmt(ctas_times)} s for the hand-written view "
              f"({min(declared_times) / ctas_best:.2f}x its time); "
              + ("the same rows: yes" if not declared_problems else "the same rows: NO: " + "; ".join(declared_problems)))
    if file_times:
        print(
            f"in a database file (the asset's case), best: {min(file_times):.2f} s, "
            f"{pandas_best / min(file_times):.2f}x faster than pandas (the targets apply to the in-memory build)"
        )
    print()
    if declared_problems:
        return 1
    if problems:
        print(f"results match: NO ({len(problems)} columns differ)")
        for p in problems:
            print(f"  {p}")
        return 1
    print(
        f"results match: yes ({n_rows:,} rows, {len(OUTPUT_COLUMNS)} columns; {FEATURE_TABLE} read back and sorted "
        "by account_id, feature_week; np.isclose on numeric features, exact on keys, dates and categories)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
