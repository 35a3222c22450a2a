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
