"""A deterministic, seeded simulator of a B2B SaaS business.

It produces the raw tables of ``resources.schemas`` for one tenant: accounts, the history of their
plan, seats and MRR, daily product usage, billing events, support tickets and churn events. Churn
is driven by a latent account health that the features see only in part (seat utilisation, usage
trend, payment failures, tickets), so a good model reaches a realistic ROC AUC, not 1.0.

Accounts change over time: some buy or cancel seats, some upgrade their plan (MRR follows); each
change is a dated row of ``raw_account_attributes`` and usage follows the new seats.

Named drift scenarios start on ``drift_day``:
- ``covariate_shift``: a seat-expansion campaign doubles seats for half the accounts (history rows
  valid from ``drift_day``); utilisation halves while the churn mechanism stays the same;
- ``concept_drift`` (learnable): a competitor targets the ``mid_market`` accounts on the ``pro``
  plan (``COMPETITOR_SEGMENT``, ``COMPETITOR_PLAN``): whatever their health they now leave at a high
  rate (``COMPETITOR_HAZARD`` a day), their usage declining over one to three weeks before they go.
  Meanwhile a retention offer keeps most starter-plan accounts that head for the door
  (``RETENTION_SHARE``): their activity declines and their tickets and failed payments pile up as
  usual, then they recover and stay. The old model misses the first and flags the second; the
  features (segment, plan, ``usage_trend_7d_vs_28d``, ``events_7d``...) express the new relation,
  so a model retrained on post-drift labels recovers (``benchmarks/oracle.py`` measures it);
- ``hard_concept_drift`` (not learnable): a competitor poaches heavy users; they leave abruptly at
  a high rate, their usage, billing and tickets showing none of the usual warning signs;
- ``data_quality``: the usage event feed drops for 40% of accounts;
- ``none``: no change.
"""

from __future__ import annotations

import datetime as dt
import functools

import numpy as np
import pandas as pd

from resources.schemas import PLANS, RAW_TABLES, SEGMENTS, TICKET_CATEGORIES
from resources.tenants import TenantSpec

SIMULATION_START = dt.date(2026, 4, 1)
# concept_drift: the competitor's target (a segment on a plan), the daily rate at which it poaches
# those accounts, and the share of leaving starter-plan accounts that the retention offer keeps.
COMPETITOR_SEGMENT, COMPETITOR_PLAN = "mid_market", "pro"
COMPETITOR_HAZARD = 0.035
RETENTION_SHARE = 0.8
NEVER = 1_000_000  # the churn day of an account that does not churn
_PLAN_PRICE = {"starter": 15.0, "pro": 45.0, "enterprise": 110.0}


def simulation_dates(spec: TenantSpec) -> tuple[dt.date, dt.date]:
    """First and last simulated day that has happened (inclusive), by the tenant's clock."""
    return SIMULATION_START, SIMULATION_START + dt.timedelta(days=spec.visible_days - 1)


def simulate_tenant(spec: TenantSpec) -> dict[str, pd.DataFrame]:
    """Simulate one tenant's business up to its clock (``spec.today``); the same spec always gives
    the same tables, and moving the clock forward only adds rows."""
    horizon = _simulate_horizon(spec.name, spec.region, spec.n_accounts, spec.seed, spec.days,
                                spec.scenario, spec.drift_day)
    return _cut(horizon, spec)


# Every raw table is cut at the clock by its time column (accounts by signup day, attribute
# history by valid_from): what happens later is not visible yet.
TIME_COLUMNS = {name: table.time_column for name, table in RAW_TABLES.items()}


def _cut(horizon: dict[str, pd.DataFrame], spec: TenantSpec) -> dict[str, pd.DataFrame]:
    """The part of the simulated world that has happened before the tenant's clock."""
    until = pd.Timestamp(SIMULATION_START) + pd.Timedelta(days=spec.visible_days)
    return {name: _before(horizon[name], column, until) for name, column in TIME_COLUMNS.items()}


def _before(frame: pd.DataFrame, column: str, until: pd.Timestamp) -> pd.DataFrame:
    if frame.empty or frame[column].max() < until:
        return frame.copy()  # never hand out the cached frame itself
    return frame[frame[column] < until].reset_index(drop=True)


# The demo moves the clock one day at a time in one process: keep the last few worlds.
@functools.lru_cache(maxsize=4)
def _simulate_horizon(name: str, region: str, n_accounts: int, seed: int, days: int, scenario: str,
                      drift_day: int | None) -> dict[str, pd.DataFrame]:
    spec = TenantSpec(name=name, region=region, n_accounts=n_accounts, seed=seed, days=days,
                      scenario=scenario, drift_day=drift_day)
    rng = np.random.default_rng(spec.seed)
    # Scenario draws come from their own stream, so the days before drift_day are identical to
    # those of scenario "none".
    drift_rng = np.random.default_rng([spec.seed, 1])
    n, days = spec.n_accounts, spec.days
    start = np.datetime64(SIMULATION_START, "D")

    # --- accounts -------------------------------------------------------------------------
    segment_idx = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    company_size = np.round(
        np.exp(rng.normal([3.0, 5.0, 7.5], 0.6, size=(n, 3))[np.arange(n), segment_idx])
    ).astype(np.int64).clip(1, 1_000_000)
    plan_probs = np.array([[0.7, 0.27, 0.03], [0.25, 0.6, 0.15], [0.05, 0.35, 0.6]])
    plan_idx = np.array([rng.choice(3, p=plan_probs[s]) for s in segment_idx])
    seats = np.maximum(1, np.round(company_size * rng.uniform(0.2, 0.8, n))).astype(np.int64)
    price_of = np.array([_PLAN_PRICE[p] for p in PLANS])
    discount = rng.uniform(0.8, 1.1, n)  # the account's price relative to the list price
    # 85% signed up before the window (up to three years), 15% during it.
    new = rng.random(n) < 0.15
    signup_day = np.where(new, rng.integers(0, max(days - 60, 1), n), -rng.integers(1, 1100, n))

    # Latent health: partly visible through utilisation, tickets and billing, partly not.
    health = rng.normal(0, 1, n)
    utilisation = 1 / (1 + np.exp(-(0.9 * health + rng.normal(0, 0.6, n) - 0.3)))
    tenure_at_start = -np.minimum(signup_day, 0)
    risk = (
        -0.9 * health
        + 0.55 * (plan_idx == 0)
        - 0.45 * (segment_idx == 2)
        + 0.5 * (tenure_at_start < 120)
        + rng.normal(0, 0.5, n)
    )
    hazard = 0.0009 * np.exp(risk)

    first_day = np.maximum(signup_day, 0)
    churn_day = first_day + rng.geometric(np.clip(hazard, 1e-6, 0.5)) - 1
    ramp = rng.integers(10, 60, n)  # activity declines over this many days before churning

    # The usual path to churn (declining usage, failed payments, tickets) follows this day.
    trajectory_day = churn_day
    if spec.scenario == "hard_concept_drift" and spec.drift_day is not None:
        # Heavy users now leave for a competitor at a high rate, abruptly: their usage, billing
        # and tickets show none of the usual warning signs before they go.
        d0 = spec.drift_day
        heavy = (utilisation > np.quantile(utilisation, 0.5)) & (churn_day >= d0) & (first_day < d0)
        redraw = d0 + drift_rng.geometric(0.012, n) - 1
        churn_day = np.where(heavy, np.minimum(churn_day, redraw), churn_day)

    # --- plan, seats and MRR by day ------------------------------------------------------------
    # Organic changes come from their own stream, the same in every scenario: about one account in
    # eight changes its seats once in the window (healthy ones tend to grow), about one in twenty
    # moves up a plan; MRR follows seats and plan; usage follows seats.
    day = np.arange(days)
    change_rng = np.random.default_rng([spec.seed, 3])
    u_seat, u_plan = change_rng.random((2, n))
    seat_day = first_day + change_rng.integers(7, 2 * days, n)
    plan_day = first_day + change_rng.integers(7, 2 * days, n)
    seat_factor = np.exp(change_rng.normal(0.15 * health, 0.25))
    new_seats = np.maximum(1, np.round(seats * seat_factor)).astype(np.int64)
    seats_org = np.where((u_seat < 0.25)[:, None] & (day[None, :] >= seat_day[:, None]),
                         new_seats[:, None], seats[:, None])
    plan_by_day = np.where((u_plan < 0.1)[:, None] & (day[None, :] >= plan_day[:, None]),
                           np.minimum(plan_idx + 1, 2)[:, None], plan_idx[:, None])
    mrr_by_day = np.round(seats_org * price_of[plan_by_day] * discount[:, None], 2)
    seats_by_day = seats_org.copy()
    if spec.scenario == "covariate_shift" and spec.drift_day is not None:
        # Free extra seats: MRR and usage stay as they were.
        expand = drift_rng.random(n) < 0.5
        seats_by_day[expand, spec.drift_day :] *= 2
    learnable = spec.scenario == "concept_drift" and spec.drift_day is not None
    if learnable:
        # A competitor targets one segment on one plan: such accounts now leave at a high rate
        # whatever their health, their usage declining over one to three weeks before they go (but
        # never before drift_day). Meanwhile a retention offer keeps most starter-plan accounts
        # that head for the door: their usage declines as usual, then recovers, and they stay.
        d0 = spec.drift_day
        plan_at_drift = plan_by_day[:, d0]
        targeted = ((segment_idx == SEGMENTS.index(COMPETITOR_SEGMENT))
                    & (plan_at_drift == PLANS.index(COMPETITOR_PLAN)) & (churn_day >= d0))
        poach_day = np.maximum(first_day, d0) + drift_rng.geometric(COMPETITOR_HAZARD, n) - 1
        lead = drift_rng.integers(7, 22, n)
        poached = targeted & (poach_day < churn_day)
        offered = (plan_at_drift == PLANS.index("starter")) & (churn_day >= d0)
        kept = offered & (drift_rng.random(n) < RETENTION_SHARE)
        churn_day = np.where(poached, poach_day, np.where(kept, NEVER, churn_day))

    # --- daily usage ----------------------------------------------------------------------
    active = (day[None, :] >= first_day[:, None]) & (day[None, :] < churn_day[:, None])
    decline = np.clip((trajectory_day[:, None] - day[None, :]) / ramp[:, None], 0.1, 1.0)
    if learnable:
        after_drift = day[None, :] >= d0
        poach_decline = np.clip((churn_day[:, None] - day[None, :]) / lead[:, None], 0.1, 1.0)
        decline = np.where(poached[:, None] & after_drift, np.minimum(decline, poach_decline), decline)
        # the retained recover from their low point (trajectory_day, on or after drift_day)
        recovered = kept[:, None] & (day[None, :] >= trajectory_day[:, None])
        recovery = np.clip((day[None, :] - trajectory_day[:, None]) / ramp[:, None], 0.1, 1.0)
        decline = np.where(recovered, recovery, decline)
    weekday = np.where(((day + start.astype("datetime64[D]").view("int64") + 3) % 7) >= 5, 0.35, 1.0)
    expected_users = seats_org * utilisation[:, None] * decline * weekday[None, :]
    # Drawn day by day, so that a scenario changing day d onwards leaves days before d untouched.
    active_users = np.empty((n, days), dtype=np.int64)
    sessions = np.empty((n, days), dtype=np.int64)
    feature_events = np.empty((n, days), dtype=np.int64)
    for d in range(days):
        active_users[:, d] = rng.poisson(expected_users[:, d] * active[:, d])
        sessions[:, d] = rng.poisson(active_users[:, d] * 2.5)
        feature_events[:, d] = rng.poisson(sessions[:, d] * 6.0)
    # Per-cell draws for billing and tickets, independent of the scenario.
    cell_rng = np.random.default_rng([spec.seed, 2])
    u_fail, u_ticket, u_severe, u_severity, u_category = cell_rng.random((5, n, days))
    u_b_seconds, u_t_seconds = cell_rng.integers(0, 86_400, (2, n, days))
    keep = active.copy()
    if spec.scenario == "data_quality" and spec.drift_day is not None:
        dropped = drift_rng.random(n) < 0.4
        keep[dropped, spec.drift_day :] = False
    acc_idx, day_idx = np.nonzero(keep)
    account_ids = np.array([f"{spec.name}-{i:06d}" for i in range(n)])

    usage = pd.DataFrame(
        {
            "account_id": account_ids[acc_idx],
            "event_date": start + day_idx.astype("timedelta64[D]"),
            "active_users": active_users[acc_idx, day_idx],
            "sessions": sessions[acc_idx, day_idx],
            "feature_events": feature_events[acc_idx, day_idx],
        }
    )
    usage["event_date"] = usage["event_date"].astype("datetime64[ns]")

    # --- billing: a monthly invoice; failures are likelier for risky and leaving accounts ----
    invoice = active & (((day[None, :] - signup_day[:, None]) % 30) == 0)
    near_churn = (trajectory_day[:, None] - day[None, :]) < 45
    if learnable:  # the retained are no longer heading for the door once they recover
        near_churn &= ~recovered
    p_fail = np.clip(0.03 * np.exp(0.6 * risk)[:, None] * np.where(near_churn, 2.5, 1.0), 0, 0.9)
    failed = invoice & (u_fail < p_fail)
    b_acc, b_day = np.nonzero(invoice)
    billing = pd.DataFrame(
        {
            "event_id": [f"{spec.name}-inv-{a}-{d}" for a, d in zip(b_acc, b_day, strict=True)],
            "account_id": account_ids[b_acc],
            "event_time": (start + b_day.astype("timedelta64[D]")).astype("datetime64[ns]")
            + pd.to_timedelta(u_b_seconds[b_acc, b_day], unit="s"),
            "event_type": np.where(failed[b_acc, b_day], "payment_failed", "invoice_paid"),
            "amount": mrr_by_day[b_acc, b_day],
        }
    )

    # --- support tickets: more, and more severe, as an account heads for the door ----------
    ticket_rate = 0.01 * (1 + np.log1p(seats))[:, None] / 4 * np.where(near_churn, 2.5, 1.0)
    opened = active & (u_ticket < ticket_rate)
    t_acc, t_day = np.nonzero(opened)
    severe = u_severe[t_acc, t_day] < np.where(near_churn[t_acc, t_day], 0.45, 0.12)
    severity = np.where(severe, 3, 1) + (u_severity[t_acc, t_day] < 0.5)
    tickets = pd.DataFrame(
        {
            "ticket_id": [f"{spec.name}-tkt-{a}-{d}" for a, d in zip(t_acc, t_day, strict=True)],
            "account_id": account_ids[t_acc],
            "opened_at": (start + t_day.astype("timedelta64[D]")).astype("datetime64[ns]")
            + pd.to_timedelta(u_t_seconds[t_acc, t_day], unit="s"),
            "severity": severity.astype(np.int64),
            "category": np.array(TICKET_CATEGORIES)[(u_category[t_acc, t_day] * len(TICKET_CATEGORIES)).astype(int)],
        }
    )

    # --- accounts, their attribute history and churn events --------------------------------
    signup_date = (start + signup_day.astype("timedelta64[D]")).astype("datetime64[ns]")
    accounts = pd.DataFrame(
        {
            "account_id": account_ids,
            "signup_date": signup_date,
            "region": spec.region,
            "segment": np.array(SEGMENTS)[segment_idx],
            "company_size": company_size,
        }
    )
    # A row valid from the signup day (the values of the account's first day in the window), then
    # one for every day on which plan, seats or MRR changed while the account was a customer.
    changed = np.zeros((n, days), dtype=bool)
    changed[:, 1:] = ((np.diff(seats_by_day, axis=1) != 0) | (np.diff(plan_by_day, axis=1) != 0)
                      | (np.diff(mrr_by_day, axis=1) != 0))
    changed &= (day[None, :] > first_day[:, None]) & (day[None, :] < churn_day[:, None])
    c_acc, c_day = np.nonzero(changed)
    first = np.minimum(first_day, days - 1)
    attr_acc = np.concatenate([np.arange(n), c_acc])
    attr_day = np.concatenate([first, c_day])
    attributes = pd.DataFrame(
        {
            "account_id": account_ids[attr_acc],
            "valid_from": np.concatenate([signup_date, (start + c_day.astype("timedelta64[D]")).astype("datetime64[ns]")]),
            "plan": np.array(PLANS)[plan_by_day[attr_acc, attr_day]],
            "seats": seats_by_day[attr_acc, attr_day].astype(np.int64),
            "mrr": mrr_by_day[attr_acc, attr_day],
        }
    ).sort_values(["valid_from", "account_id"], kind="stable", ignore_index=True)
    churned = churn_day < days
    churn = pd.DataFrame(
        {
            "account_id": account_ids[churned],
            "churned_at": (start + churn_day[churned].astype("timedelta64[D]")).astype("datetime64[ns]"),
        }
    )
    return {
        "raw_accounts": accounts,
        "raw_account_attributes": attributes,
        "raw_usage_events": usage,
        "raw_billing_events": billing,
        "raw_support_tickets": tickets,
        "raw_churn_events": churn,
    }
