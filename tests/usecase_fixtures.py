"""A small use case that tests declare in a temporary folder, from files they write: a regression
("how much will this customer spend in the next 14 days?") over its own raw tables, with its own
feature SQL, label SQL and simulator. Adding a use case to the platform is adding such a folder."""

from __future__ import annotations

import textwrap
from pathlib import Path

USECASE_YAML = """\
name: spend
title: Customer spend forecast
description: Spend of each customer in the next 14 days (regression), from their recent orders.
entity: {name: customer, key: customer_id}
problem_type: regression
tables:
  - name: raw_customers
    key: [customer_id]
    time_column: signup_date
    columns:
      - {name: customer_id, type: VARCHAR, min_length: 1, max_length: 64}
      - {name: region, type: VARCHAR, isin: [north, south, west]}
      - {name: signup_date, type: DATE}
  - name: raw_orders
    key: [order_id]
    time_column: ordered_at
    columns:
      - {name: order_id, type: VARCHAR}
      - {name: customer_id, type: VARCHAR}
      - {name: ordered_at, type: TIMESTAMP}
      - {name: amount, type: DOUBLE, min: 0, max: 100000}
      - {name: channel, type: VARCHAR, isin: [web, app, store]}
features:
  sql: features.sql
  numeric: [orders_7d, spend_7d, orders_28d, spend_28d]
  categorical: {region: [north, south, west]}
  clock_table: raw_orders
  clock_column: ordered_at
  lookback_days: 14
label:
  sql: labels.sql
  column: spend_next_14d
  horizon_days: 14
model:
  objective: regression
  num_boost_round: 60
  params: {learning_rate: 0.1, num_leaves: 15, min_data_in_leaf: 20, seed: 7, deterministic: true,
           force_row_wise: true, num_threads: 2, verbose: -1}
gates: {min_r2: 0.2}
serving: {lookup: true}
simulator: {module: simulator.py, function: simulate}
"""

FEATURES_SQL = """\
-- Weekly feature rows per customer: the week boundaries count back from $as_of.
WITH bounds AS (
    SELECT greatest(CAST($since AS TIMESTAMP), CAST(CAST(min(ordered_at) AS DATE) + 28 AS TIMESTAMP)) AS lo
    FROM raw_orders
),
grid AS (
    SELECT c.customer_id, c.region, CAST($as_of AS TIMESTAMP) - INTERVAL (7 * k) DAY AS available_at
    FROM raw_customers c, range(0, 520) t(k), bounds b
    WHERE CAST($as_of AS TIMESTAMP) - INTERVAL (7 * k) DAY >= b.lo
)
SELECT g.customer_id, g.available_at,
       CAST(count(o.order_id) FILTER (WHERE o.ordered_at >= g.available_at - INTERVAL 7 DAY) AS DOUBLE) AS orders_7d,
       coalesce(sum(o.amount) FILTER (WHERE o.ordered_at >= g.available_at - INTERVAL 7 DAY), 0.0) AS spend_7d,
       CAST(count(o.order_id) AS DOUBLE) AS orders_28d,
       coalesce(sum(o.amount), 0.0) AS spend_28d,
       g.region
FROM grid g
LEFT JOIN raw_orders o
  ON o.customer_id = g.customer_id AND o.ordered_at < g.available_at
 AND o.ordered_at >= g.available_at - INTERVAL 28 DAY
GROUP BY g.customer_id, g.available_at, g.region
"""

LABELS_SQL = """\
SELECT g.customer_id, g.prediction_time, coalesce(sum(o.amount), 0.0) AS spend_next_14d
FROM (
    SELECT c.customer_id, CAST($as_of AS TIMESTAMP) - INTERVAL (7 * k) DAY AS prediction_time
    FROM raw_customers c, range(1, 520) t(k)
) g
LEFT JOIN raw_orders o
  ON o.customer_id = g.customer_id AND o.ordered_at >= g.prediction_time
 AND o.ordered_at < g.prediction_time + INTERVAL ($horizon_days) DAY
WHERE g.prediction_time >= (SELECT CAST(CAST(min(ordered_at) AS DATE) + 28 AS TIMESTAMP) FROM raw_orders)
GROUP BY g.customer_id, g.prediction_time
"""

SIMULATOR_PY = '''\
"""Customers with a latent spend rate (by region, drifting slowly) who order a few times a month."""

import numpy as np
import pandas as pd

START = pd.Timestamp("2026-04-01")
REGIONS = ("north", "south", "west")
CHANNELS = ("web", "app", "store")


def simulate(spec):
    rng = np.random.default_rng(spec.seed)
    n, days = spec.n_accounts, spec.visible_days
    region = rng.choice(len(REGIONS), n, p=[0.5, 0.3, 0.2])
    rate = rng.gamma(2.0, 0.08, n) * np.array([1.0, 1.6, 0.7])[region]  # orders per day
    basket = rng.lognormal(3.0, 0.4, n)  # typical amount
    counts = rng.poisson(np.outer(rate, np.ones(days)))  # customers x days
    cust, day = np.nonzero(counts)
    repeat = counts[cust, day]
    cust, day = np.repeat(cust, repeat), np.repeat(day, repeat)
    seconds = rng.integers(0, 86_400, len(cust))
    ids = np.array([f"{spec.name}-c{i:05d}" for i in range(n)])
    orders = pd.DataFrame({
        "order_id": [f"{spec.name}-o{i:07d}" for i in range(len(cust))],
        "customer_id": ids[cust],
        "ordered_at": START + pd.to_timedelta(day, unit="D") + pd.to_timedelta(seconds, unit="s"),
        "amount": np.round(basket[cust] * rng.lognormal(0.0, 0.25, len(cust)), 2),
        "channel": np.array(CHANNELS)[rng.integers(0, 3, len(cust))],
    })
    customers = pd.DataFrame({
        "customer_id": ids,
        "region": np.array(REGIONS)[region],
        "signup_date": START - pd.to_timedelta(rng.integers(1, 400, n), unit="D"),
    })
    return {"raw_customers": customers, "raw_orders": orders}
'''


def write_spend_usecase(root: Path) -> Path:
    """Write the ``spend`` use case into ``root/spend`` (``root`` is a use-case root) and return its folder."""
    folder = Path(root) / "spend"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("usecase.yaml", USECASE_YAML), ("features.sql", FEATURES_SQL),
                       ("labels.sql", LABELS_SQL), ("simulator.py", SIMULATOR_PY)):
        (folder / name).write_text(textwrap.dedent(text))
    return folder
