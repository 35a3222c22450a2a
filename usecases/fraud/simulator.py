"""A deterministic, seeded simulator of the payments of one tenant's accounts, with fraud.

The world: each account (``raw_fraud_accounts``: plan, home country, signup date) pays a few times a
week with one of its saved instruments (cards, wallets, bank accounts), mostly at home, by day, for
amounts near its usual basket; now and then a card is renewed (a new card, legitimately). Fraud
comes in account-takeover episodes: for one to three days a fraudster pays with the account. Every
succeeded fraudulent payment is charged back (``raw_chargebacks``) 1 to 45 days later; declined
payments never settle, so they are never charged back.

The chargeback delay is right-skewed, as card networks' are: most cardholders notice a fraudulent
payment on their next statement or alert, a few only weeks later. It is 1 day plus an exponential
of scale ``CHARGEBACK_SCALE_DAYS`` (7 days) truncated to the 45-day window: a median of about 6
days, 58% reported within a week, 84% within two, 98% within four, every one within 45 (the label
horizon). A uniform 1-45-day delay (what this simulator drew before) would leave only 30% of the
frauds known two weeks after the payment, so early labels (``label.early_after_days``) would hold
little of a new tactic. Matured labels do not depend on the delay at all.

The fraud tactic before any drift ("new card"): a card added in the last few days, amounts well
above the account's usual, often abroad (most often from a few cross-border hot spots), often at
night, often declined. Under ``concept_drift`` a "new fraud tactic" starts on ``drift_day``: most
episodes then pay with the account's own OLD card, small amounts, by day, mostly from one country
that fraud never used before (``NEW_TACTIC_COUNTRY``), in bursts of more payments. The features
still express it (the request's country, and the account's payment counts, countries and amounts
over the last days), so a model retrained on post-drift labels recovers.

Under ``hard_concept_drift`` the new tactic (``mimic``) cannot be learnt: from ``drift_day`` most
episodes are one or a few payments drawn exactly as the account's own legitimate ones (one of its
instruments, at home, by day, near its usual basket, rarely declined), so no feature tells them
from legitimate payments and no retrained model recovers; the remaining episodes keep the old
tactic. Other scenarios leave the payments as they are. ``benchmarks/oracle.py`` measures both.

The country codes are labels of a simulation and say nothing about real countries.

Determinism and the clock: the whole horizon (``spec.days``) is simulated from ``spec.seed`` and cut
at the tenant's clock (``spec.visible_days``): a payment is visible once made, a chargeback once
reported, so moving the clock forward only adds rows. Scenario effects draw from their own random
stream and only change episodes that start on or after ``drift_day``; every per-payment draw is
made in time order, so the days before ``drift_day`` are identical to scenario ``none``.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

START = pd.Timestamp("2026-04-01")
PLANS = ("free", "standard", "premium")
METHODS = ("card", "wallet", "bank_transfer")
STATUSES = ("succeeded", "failed")
CURRENCY = {"US": "USD", "CA": "CAD", "MX": "MXN", "BR": "BRL", "GB": "GBP", "DE": "EUR", "FR": "EUR",
            "NL": "EUR", "ES": "EUR", "IT": "EUR", "PL": "PLN", "RO": "RON", "IN": "INR", "SG": "SGD",
            "JP": "JPY", "AU": "AUD", "VN": "VND", "NG": "NGN", "PH": "PHP"}
COUNTRIES = tuple(CURRENCY)
CURRENCIES = tuple(dict.fromkeys(CURRENCY.values()))
HOME_COUNTRIES = {"eu": ("DE", "FR", "GB", "NL", "ES", "IT", "PL"), "us": ("US", "CA", "MX", "BR"),
                  "apac": ("IN", "SG", "JP", "AU")}
# Cross-border hot spots of the old tactic, and the country of the new one (rare before the drift).
HOT_SPOTS = ("RO", "VN", "NG")
NEW_TACTIC_COUNTRY = "PH"
CHARGEBACK_MIN_DAYS, CHARGEBACK_MAX_DAYS = 1, 45
CHARGEBACK_SCALE_DAYS = 7.0  # the exponential part of the delay (module docstring)
EPISODE_HAZARD = 0.00045  # account takeovers per account and day
NEW_TACTIC_SHARE = 0.8
MAX_EPISODE_PAYMENTS = 16  # of the episodes that start on or after drift_day, under concept_drift
# A payment's tactic (``fraud_truth``'s ``tactic``), and the new tactic of each drift scenario.
TACTICS = ("legit", "new_card", "old_card", "mimic")
NEW_TACTICS = {"concept_drift": "old_card", "hard_concept_drift": "mimic"}


def _world(spec):
    """The whole horizon of the spec's world; scenarios other than the two tactics change nothing."""
    drift_day = spec.drift_day if spec.scenario in NEW_TACTICS else None
    return _simulate_horizon(spec.name, spec.region, spec.n_accounts, spec.seed, spec.days, drift_day,
                             NEW_TACTICS.get(spec.scenario, "old_card"))


def simulate(spec) -> dict[str, pd.DataFrame]:
    """The tenant's raw tables as of its clock: ``raw_fraud_accounts``, ``raw_payments``,
    ``raw_chargebacks``. The same spec always gives the same tables."""
    world = _world(spec)
    until = START + pd.Timedelta(days=spec.visible_days)
    accounts, payments, chargebacks, _ = world
    return {
        "raw_fraud_accounts": accounts[accounts["signup_date"] < until].reset_index(drop=True),
        "raw_payments": payments[payments["paid_at"] < until].reset_index(drop=True),
        "raw_chargebacks": chargebacks[chargebacks["reported_at"] < until].reset_index(drop=True),
    }


def fraud_truth(spec) -> pd.DataFrame:
    """Every payment of the horizon with its truth (``is_fraud``, ``tactic``): for tests and demos only."""
    return _world(spec)[3]


@functools.lru_cache(maxsize=4)
def _simulate_horizon(name: str, region: str, n: int, seed: int, days: int, drift_day: int | None,
                      new_tactic: str = "old_card"):
    rng = np.random.default_rng([seed, 0])  # the world as scenario "none" has it
    drift_rng = np.random.default_rng([seed, 1])  # scenario effects only

    # --- accounts and their saved instruments ---------------------------------------------------
    homes = HOME_COUNTRIES.get(region, HOME_COUNTRIES["us"])
    home = np.array(homes)[rng.integers(0, len(homes), n)]
    plan = rng.choice(3, n, p=[0.55, 0.33, 0.12])
    new = rng.random(n) < 0.15
    signup_day = np.where(new, rng.integers(0, max(days - 60, 1), n), -rng.integers(30, 1500, n))
    rate = rng.gamma(2.0, 0.15, n) * np.array([0.8, 1.2, 1.6])[plan]  # payments per day
    basket = np.exp(rng.normal(3.3, 0.7, n)) * np.array([1.0, 1.4, 2.2])[plan]  # usual amount
    n_inst = rng.integers(1, 4, n)
    inst_added = np.maximum(signup_day[:, None], -rng.integers(1, 1200, (n, 3)))  # day each was saved
    inst_method = rng.choice(3, (n, 3), p=[0.72, 0.2, 0.08])
    inst_method[:, 0] = 0  # the first instrument is a card
    renewal = rng.integers(-200, days + 200, n)  # the day card 0 is renewed (a new card, legitimately)

    # --- legitimate payments ------------------------------------------------------------------------
    day = np.arange(days)
    open_ = day[None, :] > signup_day[:, None]
    counts = rng.poisson(rate[:, None] * open_)
    acc, pday = np.nonzero(counts)
    rep = counts[acc, pday]
    legit = pd.DataFrame({"acc": np.repeat(acc, rep), "day": np.repeat(pday, rep), "episode": -1})

    # --- fraud episodes (account takeovers) ------------------------------------------------------
    starts = (rng.random((n, days)) < EPISODE_HAZARD) & open_
    e_acc, e_day = np.nonzero(starts)
    m = len(e_acc)
    e_len = rng.integers(1, 4, m)
    e_k = 1 + rng.poisson(2.5, m)
    e_hot = rng.random(m)
    e_country = rng.integers(0, len(COUNTRIES), m)
    e_mult = np.exp(rng.normal(0.8, 0.6, m))
    e_method = np.where(rng.random(m) < 0.75, 0, 1)
    e_card_lag = rng.integers(0, 10, m)  # the fraudster saved the card this many days before
    # the new tactic, drawn for every episode from the scenario's stream, used from drift_day on
    n_new = drift_rng.random(m) < NEW_TACTIC_SHARE
    n_k = 2 + drift_rng.poisson(3.0, m)
    n_mult = np.exp(drift_rng.normal(-1.0, 0.35, m))
    n_home = drift_rng.random(m) < 0.15
    n_method = np.where(drift_rng.random(m) < 0.6, 1, 0)
    n_mimic_k = 1 + drift_rng.poisson(1.0, m)  # drawn last: the draws above stay those of concept_drift
    new_code = TACTICS.index(new_tactic)
    tactic = np.where((drift_day is not None) & (e_day >= (drift_day or 0)) & n_new, new_code, 1)
    k = np.minimum(np.where(tactic == 2, n_k, np.where(tactic == 3, n_mimic_k, e_k)), MAX_EPISODE_PAYMENTS)
    slot_u = rng.random((m, MAX_EPISODE_PAYMENTS))  # the day of each payment within its episode
    ep = np.repeat(np.arange(m), k)
    nth = np.arange(len(ep)) - np.repeat(np.cumsum(k) - k, k)
    fraud = pd.DataFrame({"acc": e_acc[ep], "day": e_day[ep] + (slot_u[ep, nth] * e_len[ep]).astype(int),
                          "episode": ep})
    fraud = fraud[fraud["day"] < days]

    # --- every payment, in time order; per-payment draws follow that order ----------------------------
    pay = pd.concat([legit, fraud], ignore_index=True)
    pay = pay.sort_values(["day", "acc", "episode"], kind="stable").reset_index(drop=True)
    N = len(pay)
    u = np.random.default_rng([seed, 2]).random((N, 10)).T  # row by row: day d's draws never move
    a, d, e = pay["acc"].to_numpy(), pay["day"].to_numpy(), pay["episode"].to_numpy()
    is_fraud = e >= 0
    t = np.where(is_fraud, tactic[np.maximum(e, 0)], 0)

    # legitimate: one of the account's instruments, at home (4% abroad), by day, near the basket
    acc_code = np.char.mod("%06d", a)
    slot = (u[0] * n_inst[a]).astype(int)
    renewed = (slot == 0) & (d >= renewal[a])
    added = np.where(renewed, renewal[a], inst_added[a, slot])
    instrument = np.char.add(np.char.add(acc_code, "-i"),
                             np.char.add(slot.astype(str), np.where(renewed, "r", "")))
    method = inst_method[a, slot]
    # a new card now and then (lost, replaced, a second one): legitimate payments with young cards too
    fresh = u[8] < 0.015
    added = np.where(fresh, d - (u[9] * 6).astype(int), added)
    instrument = np.where(fresh, np.char.add(np.char.add(acc_code, "-n"), d.astype(str)), instrument)
    abroad = u[1] < 0.06
    travel = np.where(u[2] < 0.15, pd.Index(COUNTRIES).get_indexer(np.array(HOT_SPOTS)[(u[9] * 3).astype(int)]),
                      (u[2] * len(COUNTRIES)).astype(int))
    country = np.where(abroad, travel, pd.Index(COUNTRIES).get_indexer(home[a]))
    hour = np.where(u[3] < 0.9, 8 + u[4] * 14, u[4] * 24)
    amount = basket[a] * np.exp(0.35 * np.sqrt(-2 * np.log(np.maximum(u[5], 1e-12))) * np.cos(2 * np.pi * u[6]))
    fail = u[7] < 0.03

    # the old tactic: a card saved days ago, big amounts, abroad (hot spots), at night, declined often
    old = t == 1
    eo = np.maximum(e, 0)
    hot = e_hot[eo]
    old_country = np.where(hot < 0.4, pd.Index(COUNTRIES).get_indexer(np.array(HOT_SPOTS)[(u[2] * 3).astype(int)]),
                           np.where(hot < 0.65, e_country[eo], pd.Index(COUNTRIES).get_indexer(home[a])))
    country = np.where(old, old_country, country)
    added = np.where(old, e_day[eo] - e_card_lag[eo], added)
    instrument = np.where(old, np.char.add(np.char.add(acc_code,
                                                       "-x"), eo.astype(str)), instrument)
    method = np.where(old, e_method[eo], method)
    hour = np.where(old, np.where(u[3] < 0.35, u[4] * 6, u[4] * 24), hour)
    amount = np.where(old, amount * e_mult[eo], amount)
    fail = np.where(old, u[7] < 0.2, fail)

    # the new tactic: the account's own old card, small amounts, by day, from the new country
    new_t = t == 2
    country = np.where(new_t, np.where(n_home[eo], pd.Index(COUNTRIES).get_indexer(home[a]),
                                       COUNTRIES.index(NEW_TACTIC_COUNTRY)), country)
    old_card = np.argmin(inst_added[a], axis=1) if N else np.zeros(0, int)
    old_card = np.where(old_card < n_inst[a], old_card, 0)
    added = np.where(new_t, inst_added[a, old_card], added)
    instrument = np.where(new_t, np.char.add(np.char.add(acc_code,
                                                         "-i"), old_card.astype(str)), instrument)
    method = np.where(new_t, np.where(n_method[eo] == 1, inst_method[a, old_card], 0), method)
    hour = np.where(new_t, 9 + u[4] * 12, hour)
    amount = np.where(new_t, amount * n_mult[eo], amount)
    fail = np.where(new_t, u[7] < 0.1, fail)
    # the mimic tactic (hard_concept_drift) overrides nothing: its payments are drawn exactly as the
    # account's own legitimate ones (instrument, home country, hour, amount, failures)

    paid_at = START + pd.to_timedelta(d, unit="D") + pd.to_timedelta(np.minimum(hour * 3600, 86_399).astype(int),
                                                                      unit="s")
    account_ids = np.array([f"{name}-{i:06d}" for i in range(n)])
    country_codes = np.array(COUNTRIES)[country]
    payments = pd.DataFrame({
        "account_id": account_ids[a],
        "paid_at": paid_at.astype("datetime64[ns]"),
        "amount": np.round(np.clip(amount, 0.5, 50_000), 2),
        "currency": pd.Series(country_codes).map(CURRENCY).to_numpy(),
        "country": country_codes,
        "payment_method": np.array(METHODS)[method],
        "instrument_id": np.char.add(f"{name}-", instrument),
        "card_age_days": np.maximum(d - added, 0).astype(np.int64),
        "status": np.where(fail, "failed", "succeeded"),
        "_fraud": is_fraud,
        "_tactic": np.array(TACTICS)[t],
    })
    order = np.lexsort((np.arange(N), payments["paid_at"].to_numpy()))
    payments = payments.iloc[order].reset_index(drop=True)
    payments.insert(0, "payment_id", [f"{name}-pay-{i:08d}" for i in range(N)])

    # --- chargebacks: every settled fraud, reported 1 to 45 days later ---------------------------------
    delay_u = np.random.default_rng([seed, 3]).random(N)  # in time order too
    charged = (payments["_fraud"] & (payments["status"] == "succeeded")).to_numpy()
    # inverse CDF of the exponential truncated to [0, MAX - MIN]: right-skewed, within the window
    span = CHARGEBACK_MAX_DAYS - CHARGEBACK_MIN_DAYS
    days_after = -CHARGEBACK_SCALE_DAYS * np.log1p(-delay_u * -np.expm1(-span / CHARGEBACK_SCALE_DAYS))
    delay = pd.to_timedelta((CHARGEBACK_MIN_DAYS + np.clip(days_after, 0, span)) * 86_400, unit="s").round("s")
    chargebacks = pd.DataFrame({
        "payment_id": payments.loc[charged, "payment_id"].to_numpy(),
        "reported_at": (payments["paid_at"] + delay)[charged].to_numpy().astype("datetime64[ns]"),
    })
    chargebacks = chargebacks.sort_values(["reported_at", "payment_id"]).reset_index(drop=True)
    truth = payments[["payment_id", "account_id", "paid_at", "status", "_fraud", "_tactic"]].rename(
        columns={"_fraud": "is_fraud", "_tactic": "tactic"})
    accounts = pd.DataFrame({
        "account_id": account_ids,
        "plan": np.array(PLANS)[plan],
        "home_country": home,
        "signup_date": (START + pd.to_timedelta(signup_day, unit="D")).astype("datetime64[ns]"),
    })
    return accounts, payments.drop(columns=["_fraud", "_tactic"]), chargebacks, truth
