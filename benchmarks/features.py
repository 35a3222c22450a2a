"""Benchmark: the DuckDB feature view against the same features computed with pandas.

Run from the repository root::

    .venv/bin/python -m benchmarks.features                  # ~10 million usage events
    .venv/bin/python -m benchmarks.features --events 200000  # quick run

It simulates one large tenant (deterministically, with numpy), loads the raw tables into an
in-memory DuckDB database, then times

- the platform's real feature path, ``resources.feature_store.compute_features`` over the whole
  history (``FEATURE_VIEW_SQL``, fetched as a pandas DataFrame), and
- an idiomatic, vectorised pandas implementation of the same features on the same data,

checks that both give the same values, and prints a table against the targets of the issue: the
DuckDB path at least 3x faster than pandas, and under 3 s for 10 million events.

Generating and loading the data is not measured. The exit status is 0 whether or not the targets
are met (this is a benchmark, not a test), and 1 when the two implementations disagree.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable

import duckdb
import numpy as np
import pandas as pd

from resources.feature_store import FEATURE_COLUMNS, LOOKBACK_DAYS, NUMERIC_FEATURES, compute_features
from resources.schemas import BILLING_EVENT_TYPES, PLANS, RAW_TABLES, SEGMENTS, TICKET_CATEGORIES
from resources.simulator import SIMULATION_START

DEFAULT_EVENTS = 10_000_000
DAYS = 180
SEED = 20_260_401
TARGET_SPEEDUP = 3.0
TARGET_SECONDS = 3.0  # for 10 million events
SOURCE = "benchmark"

OUTPUT_COLUMNS = ("account_id", "feature_date", "available_at", *FEATURE_COLUMNS)


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
            "plan": p["plan"],
            "seats": p["seats"],
            "mrr": p["mrr"],
            "signup_day": p["signup_day"].astype(np.int32),
            "segment": p["segment"],
            "company_size": p["company_size"],
        }
    )
    return {"accounts": accounts, "usage": usage, "billing": billing, "tickets": tickets}


def _sql_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


# How each raw table is filled from the simulated (integer-coded) frame registered as ``sim``: the
# strings are built in SQL, vectorised. Account ids have 12 characters, like the simulator's.
_LOAD_SQL = {
    "raw_accounts": (
        "accounts",
        """SELECT ACC_ID, PLANS[plan + 1], seats, mrr, START + signup_day, 'us', SEGMENTS[segment + 1],
                  company_size, 'SOURCE' FROM sim""",
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
def pandas_features(raw: dict[str, pd.DataFrame], lo: dt.date, hi: dt.date) -> pd.DataFrame:
    """FEATURE_VIEW_SQL, written as idiomatic vectorised pandas.

    A dense account x day grid from ``lo - LOOKBACK_DAYS`` (or the signup day) to ``hi``, the daily
    inputs reindexed onto it, and trailing 7/30/90-day windows per account. The grid has one row
    per account and day, so a window of k days is k rows: sums are cumulative sums minus the
    cumulative sum k rows earlier, the maximum is a grouped rolling max.
    """
    accounts = raw["raw_accounts"].set_index("account_id")
    usage = raw["raw_usage_events"]
    unit = usage["event_date"].dt.unit
    days = pd.date_range(
        pd.Timestamp(lo) - pd.Timedelta(days=LOOKBACK_DAYS), pd.Timestamp(hi), freq="D", unit=unit
    )

    # Daily inputs, keyed like the grid.
    keys = ["account_id", "feature_date"]
    usage_daily = usage.rename(columns={"event_date": "feature_date"}).set_index(keys)[
        ["active_users", "sessions", "feature_events"]
    ]
    usage_daily["active_day"] = 1
    billing = raw["raw_billing_events"]
    billing_daily = (
        billing.assign(
            feature_date=billing["event_time"].dt.floor("D").astype(f"datetime64[{unit}]"),
            payment_failures=billing["event_type"].eq("payment_failed").astype("int64"),
        )
        .groupby(keys)[["payment_failures"]]
        .sum()
    )
    tickets = raw["raw_support_tickets"]
    tickets_daily = (
        tickets.assign(
            feature_date=tickets["opened_at"].dt.floor("D").astype(f"datetime64[{unit}]"),
            high=tickets["severity"].ge(3).astype("int64"),
        )
        .groupby(keys)
        .agg(
            tickets=("severity", "size"),
            high_severity_tickets=("high", "sum"),
            max_severity=("severity", "max"),
        )
    )

    # The dense grid: every account, every day from the start of the look-back or its signup.
    grid = pd.MultiIndex.from_product([accounts.index, days], names=keys)
    signup = accounts["signup_date"].astype(f"datetime64[{unit}]").dt.floor("D")
    grid = grid[grid.get_level_values("feature_date") >= np.repeat(signup.to_numpy(), len(days))]
    daily = pd.concat(
        [frame.reindex(grid, fill_value=0) for frame in (usage_daily, billing_daily, tickets_daily)], axis=1
    )

    # Trailing windows over the per-account rows (one row per day).
    by_account = daily.groupby(level="account_id", sort=False)
    summed = [
        "active_day",
        "feature_events",
        "sessions",
        "active_users",
        "payment_failures",
        "tickets",
        "high_severity_tickets",
    ]
    cum = by_account[summed].cumsum()
    cum_by_account = cum.groupby(level="account_id", sort=False)
    n_rows = by_account.cumcount().to_numpy() + 1

    def window_sum(col: str, k: int) -> np.ndarray:
        return (cum[col] - cum_by_account[col].shift(k, fill_value=0)).to_numpy()

    events_7d = window_sum("feature_events", 7)
    events_30d = window_sum("feature_events", 30)
    avg_users_7d = window_sum("active_users", 7) / np.minimum(n_rows, 7)
    max_severity_30d = by_account["max_severity"].rolling(30, min_periods=1).max().to_numpy()

    out = pd.DataFrame(
        {
            "active_days_7d": window_sum("active_day", 7),
            "events_7d": events_7d,
            "events_30d": events_30d,
            "usage_trend_7d_vs_30d": np.where(
                events_30d > 0, events_7d / np.where(events_30d > 0, events_30d * 7.0 / 30.0, 1.0), 0.0
            ),
            "sessions_30d": window_sum("sessions", 30),
            "avg_active_users_7d": avg_users_7d,
            "avg_active_users_30d": window_sum("active_users", 30) / np.minimum(n_rows, 30),
            "payment_failures_30d": window_sum("payment_failures", 30),
            "payment_failures_90d": window_sum("payment_failures", 90),
            "tickets_30d": window_sum("tickets", 30),
            "high_severity_tickets_30d": window_sum("high_severity_tickets", 30),
            "max_ticket_severity_30d": max_severity_30d,
        },
        index=daily.index,
    ).astype("float64")
    out = out[(out.index.get_level_values("feature_date") >= pd.Timestamp(lo))].reset_index()

    # Account attributes.
    out = out.join(
        accounts[["plan", "seats", "mrr", "company_size", "signup_date", "segment"]], on="account_id"
    )
    out["available_at"] = out["feature_date"] + pd.Timedelta(days=1)
    out["seat_utilisation_7d"] = out["avg_active_users_7d"] / out["seats"]
    out["tenure_days"] = (out["feature_date"] - out["signup_date"]).dt.days.astype("float64")
    for col in ("seats", "mrr", "company_size"):
        out[col] = out[col].astype("float64")
    return out[list(OUTPUT_COLUMNS)]


# --- checking and timing ----------------------------------------------------------------------------
def compare(duck: pd.DataFrame, pand: pd.DataFrame) -> list[str]:
    """Every difference between the two feature frames, after sorting by (account_id, feature_date)."""
    if list(duck.columns) != list(pand.columns):
        return [f"columns differ: duckdb={list(duck.columns)} pandas={list(pand.columns)}"]
    if len(duck) != len(pand):
        return [f"row counts differ: duckdb={len(duck):,} pandas={len(pand):,}"]
    keys = ["account_id", "feature_date"]
    duck = duck.sort_values(keys, ignore_index=True)
    pand = pand.sort_values(keys, ignore_index=True)
    problems = []
    for col in OUTPUT_COLUMNS:
        a, b = duck[col], pand[col]
        if col in NUMERIC_FEATURES:
            x, y = a.to_numpy(dtype="float64"), b.to_numpy(dtype="float64")
            bad = ~np.isclose(x, y, equal_nan=True)
        elif col in ("feature_date", "available_at"):
            bad = a.astype("datetime64[ns]").to_numpy() != b.astype("datetime64[ns]").to_numpy()
        else:
            bad = a.astype(str).to_numpy() != b.astype(str).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            problems.append(
                f"{col}: {int(bad.sum()):,} rows differ, e.g. {duck.at[i, 'account_id']} {duck.at[i, 'feature_date']}:"
                f" duckdb={a.iat[i]} pandas={b.iat[i]}"
            )
    return problems


def timed(fn: Callable[[], object], repeat: int, label: str) -> tuple[list[float], object]:
    times, result = [], None
    for i in range(repeat):
        result = None  # let the previous result go before the next run
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        print(f"  {label} run {i + 1}/{repeat}: {times[-1]:.2f} s", flush=True)
    return times, result


def _fmt(times: list[float]) -> str:
    return f"{min(times):.2f} / {statistics.median(times):.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="usage event rows to simulate")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each path (at least 3)")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the SQL alone (CREATE TEMP TABLE AS) and the fetch of its result as a DataFrame",
    )
    args = parser.parse_args(argv)
    repeat = max(3, args.repeat)

    t0 = time.perf_counter()
    sim = simulate(args.events)
    t_sim = time.perf_counter() - t0
    con = duckdb.connect()  # in memory
    t0 = time.perf_counter()
    load(con, sim)
    raw = {
        name: con.execute(f"SELECT * EXCLUDE (source) FROM {name}").df()  # noqa: S608 - known tables
        for name in ("raw_accounts", "raw_usage_events", "raw_billing_events", "raw_support_tickets")
    }
    t_load = time.perf_counter() - t0
    del sim
    n_events = len(raw["raw_usage_events"])
    n_accounts = len(raw["raw_accounts"])
    lo, hi = (
        pd.Timestamp(x).date()
        for x in con.execute("SELECT min(event_date), max(event_date) FROM raw_usage_events").fetchone()
    )
    load_start = os.getloadavg()[0]
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    print(
        f"simulated {n_events:,} usage events, {n_accounts:,} accounts, {len(raw['raw_billing_events']):,} billing "
        f"events, {len(raw['raw_support_tickets']):,} tickets, {lo} .. {hi} in {t_sim:.1f} s; "
        f"loaded into DuckDB (and read back for pandas) in {t_load:.1f} s (neither is measured)",
        flush=True,
    )

    print(
        "timing DuckDB: resources.feature_store.compute_features (FEATURE_VIEW_SQL -> DataFrame)", flush=True
    )
    duck_times, duck = timed(lambda: compute_features(con, lo, hi), repeat, "duckdb")
    breakdown = {}
    if args.breakdown:
        from resources.feature_store import FEATURE_VIEW_SQL

        sql = "CREATE OR REPLACE TEMP TABLE bench_features AS " + FEATURE_VIEW_SQL
        breakdown["SQL only (CREATE TEMP TABLE AS)"], _ = timed(
            lambda: con.execute(sql, {"lo": lo, "hi": hi}), repeat, "duckdb sql only"
        )
        breakdown["fetch of the result as a DataFrame"], _ = timed(
            lambda: con.execute("SELECT * FROM bench_features").df(), repeat, "duckdb fetch .df()"
        )
        con.execute("DROP TABLE bench_features")
    print("timing pandas: benchmarks.features.pandas_features", flush=True)
    pandas_times, pand = timed(lambda: pandas_features(raw, lo, hi), repeat, "pandas")

    problems = compare(duck, pand)
    n_rows = len(duck)
    del duck, pand

    duck_best, pandas_best = min(duck_times), min(pandas_times)
    speedup = pandas_best / duck_best
    speed_ok = speedup >= TARGET_SPEEDUP
    if args.events >= DEFAULT_EVENTS:
        time_verdict = "PASS" if duck_best < TARGET_SECONDS else "FAIL"
    else:
        time_verdict = f"n/a (target is for {DEFAULT_EVENTS:,} events)"

    print()
    print(
        f"Features: {n_events:,} usage events ({n_accounts:,} accounts, {DAYS} days) -> {n_rows:,} feature rows "
        f"x {len(OUTPUT_COLUMNS)} columns; {os.cpu_count()} CPU cores, DuckDB {duckdb.__version__} "
        f"(threads={threads}), pandas {pd.__version__}, numpy {np.__version__}; {repeat} runs each, "
        f"seconds as best / median; 1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    print()
    print(
        "| input events | DuckDB s | pandas s | speed-up (best) | DuckDB >= 3x faster | DuckDB < 3 s at 10M |"
    )
    print("|---:|---:|---:|---:|:---|:---|")
    print(
        f"| {n_events:,} | {_fmt(duck_times)} | {_fmt(pandas_times)} | {speedup:.2f}x "
        f"| {'PASS' if speed_ok else 'FAIL'} | {time_verdict} |"
    )
    if breakdown:
        print()
        print("| DuckDB breakdown | s (best / median) |")
        print("|:---|---:|")
        print(f"| compute_features (SQL + fetch as DataFrame) | {_fmt(duck_times)} |")
        for label, times in breakdown.items():
            print(f"| {label} | {_fmt(times)} |")
    print()
    if problems:
        print(f"results match: NO ({len(problems)} columns differ)")
        for p in problems:
            print(f"  {p}")
        return 1
    print(
        f"results match: yes ({n_rows:,} rows, {len(OUTPUT_COLUMNS)} columns; np.isclose on numeric features, "
        "exact on keys, dates and categories, after sorting by account_id, feature_date)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
