"""Point-in-time correctness: a label at time t sees only features known before t."""

import datetime as dt

import duckdb
import pandas as pd
import pytest

from resources.feature_store import (
    FEATURE_COLUMNS,
    FeatureStore,
    compare_feature_rows,
    offline_rows_at,
    to_model_frame,
)
from resources.schemas import RAW_TABLES
from resources.settings import PlatformSettings
from resources.tenants import TenantCatalog

START = dt.date(2026, 1, 1)
SPIKE_DAY = 44  # a prediction date: week boundaries count back from the day after the data (day 100)


def _load(con, name, frame):
    con.execute(RAW_TABLES[name].ddl())
    con.register("f", frame.assign(source="test"))
    con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM f")  # noqa: S608 - test table
    con.unregister("f")


@pytest.fixture()
def store(tmp_path):
    settings = PlatformSettings(home=str(tmp_path))
    return FeatureStore(settings=settings, catalog=TenantCatalog(tenants_file=str(tmp_path / "t.json")))


@pytest.fixture()
def con():
    """One account; on the prediction day itself usage explodes and a severe ticket is opened."""
    con = duckdb.connect()
    days = pd.date_range(START, periods=100, freq="D")
    _load(con, "raw_accounts", pd.DataFrame({
        "account_id": ["a1"], "signup_date": [pd.Timestamp(START)], "region": ["eu"], "segment": ["smb"],
        "company_size": [20]}))
    _load(con, "raw_account_attributes", pd.DataFrame({
        "account_id": ["a1"], "valid_from": [pd.Timestamp(START)], "plan": ["pro"], "seats": [10], "mrr": [450.0]}))
    events = [1_000_000 if i == SPIKE_DAY else 10 for i in range(100)]
    _load(con, "raw_usage_events", pd.DataFrame({
        "account_id": "a1", "event_date": days, "active_users": 5, "sessions": 8, "feature_events": events}))
    _load(con, "raw_billing_events", pd.DataFrame({
        "event_id": ["b1"], "account_id": ["a1"], "event_time": [days[SPIKE_DAY] + pd.Timedelta(hours=1)],
        "event_type": ["payment_failed"], "amount": [450.0]}))
    _load(con, "raw_support_tickets", pd.DataFrame({
        "ticket_id": ["t1"], "account_id": ["a1"], "opened_at": [days[SPIKE_DAY] + pd.Timedelta(hours=9)],
        "severity": [4], "category": ["outage"]}))
    _load(con, "raw_churn_events", pd.DataFrame({"account_id": ["a1"], "churned_at": [days[SPIKE_DAY + 20]]}))
    return con


def test_training_row_at_t_never_sees_events_of_day_t(con, store):
    store.build_features(con)
    training = store.build_training_set(con)
    row = training[training["prediction_time"] == pd.Timestamp(START) + pd.Timedelta(days=SPIKE_DAY)].iloc[0]
    # The churn comes 20 days later: inside the 30-day horizon.
    assert row["churned"] == 1
    # Features come from the day before the prediction date.
    assert row["feature_date"] == pd.Timestamp(START) + pd.Timedelta(days=SPIKE_DAY - 1)
    assert row["events_7d"] == 70  # 7 quiet days, not the spike
    assert row["payment_failures_28d"] == 0
    assert row["max_ticket_severity_28d"] == 0

    # A naive join on the week's first day (week start <= t) would leak the events of day t on.
    leaky = con.execute(
        "SELECT f.events_7d, f.max_ticket_severity_28d FROM churn_labels l ASOF JOIN account_features f "
        "ON l.account_id = f.account_id AND l.prediction_time >= f.feature_date - INTERVAL 6 DAY "
        "WHERE l.prediction_time = ?", [pd.Timestamp(START) + pd.Timedelta(days=SPIKE_DAY)]
    ).fetchone()
    assert leaky == (1_000_060, 4)

    # And one week later the spike is legitimately known.
    later = training[training["prediction_time"] == pd.Timestamp(START) + pd.Timedelta(days=SPIKE_DAY + 7)].iloc[0]
    assert later["events_7d"] == 1_000_060
    assert later["max_ticket_severity_28d"] == 4


def test_labels_are_only_produced_once_mature(con, store):
    store.build_features(con)
    training = store.build_training_set(con)
    last_event = pd.Timestamp(START) + pd.Timedelta(days=99)
    assert (training["prediction_time"] + pd.Timedelta(days=30) <= last_event + pd.Timedelta(days=1)).all()
    # After churning the account is no longer scored.
    assert (training["prediction_time"] <= pd.Timestamp(START) + pd.Timedelta(days=SPIKE_DAY + 20)).all()


def test_online_snapshot_equals_offline_features_at_the_same_time(con, store, tmp_path, monkeypatch):
    store.build_features(con)
    monkeypatch.setattr(FeatureStore, "online_dir", lambda self, tenant: tmp_path / "online")
    pointer = store.write_online_snapshot("t", con)
    online = store.read_online_snapshot("t")
    assert pointer["version"] == 1 and len(online) == 1
    offline = offline_rows_at(con, ["a1"], pd.Timestamp(online["available_at"].max()))
    assert compare_feature_rows(online, offline) == []
    # A real difference is reported, naming account and column.
    tampered = online.assign(events_28d=online["events_28d"] + 1)
    assert compare_feature_rows(tampered, offline) == [
        f"a1.events_28d: online={tampered['events_28d'][0]!r} offline={offline['events_28d'][0]!r}"]
    # A second publication is a new immutable version; the first file is untouched.
    second = store.write_online_snapshot("t", con)
    assert second["version"] == 2
    assert (tmp_path / "online" / pointer["path"]).exists()


def test_model_frame_has_fixed_columns_and_category_levels():
    rows = pd.DataFrame([{c: 1.0 for c in FEATURE_COLUMNS} | {"plan": "pro", "segment": "smb", "extra": 5}])
    frame = to_model_frame(rows)
    assert list(frame.columns) == list(FEATURE_COLUMNS)
    assert list(frame["plan"].cat.categories) == ["starter", "pro", "enterprise"]
    with pytest.raises(KeyError, match="lacks columns"):
        to_model_frame(rows.drop(columns=["mrr"]))


def test_feature_view_matches_an_independent_pandas_implementation():
    """FEATURE_VIEW_SQL against the benchmark's pandas implementation of the same features, on random
    data with the awkward cases: gaps, signups inside the history (with usage, payments and tickets
    before the signup week, which no window may count), events of unknown accounts, several tickets
    and failed payments in one week, an account signing up after the last week; an attribute
    history with several changes per account (some in one week, some before the first week read, some
    after the last), accounts without any history row and history rows of unknown accounts."""
    import numpy as np

    from benchmarks.features import OUTPUT_COLUMNS, compare, pandas_features
    from resources.feature_store import compute_features, feature_origin

    rng = np.random.default_rng(7)
    n, days = 60, 150
    start = pd.Timestamp(START)
    ids = [f"acc-{i:03d}" for i in range(n)]
    signup = start + pd.to_timedelta(
        np.where(rng.random(n) < 0.5, -rng.integers(1, 400, n), rng.integers(0, days + 10, n)), unit="D")
    con = duckdb.connect()
    _load(con, "raw_accounts", pd.DataFrame({
        "account_id": ids, "signup_date": signup, "region": "eu",
        "segment": rng.choice(["smb", "mid_market", "enterprise"], n), "company_size": rng.integers(1, 5000, n)}))
    all_ids = np.array([*ids, "ghost-1", "ghost-2", "ghost-3"])
    h = 250  # history rows: random days from 200 days before the data to 20 days after it
    history = pd.DataFrame({
        "account_id": rng.choice(all_ids[5:], h), "valid_from": start + pd.to_timedelta(rng.integers(-200, days + 20, h), "D"),
        "plan": rng.choice(["starter", "pro", "enterprise"], h), "seats": rng.integers(1, 50, h),
        "mrr": rng.uniform(10, 5000, h).round(2)}).drop_duplicates(["account_id", "valid_from"])
    first = pd.DataFrame({"account_id": ids[5:40], "valid_from": signup[5:40], "plan": "pro", "seats": 7, "mrr": 99.0})
    _load(con, "raw_account_attributes", pd.concat([first, history]).drop_duplicates(["account_id", "valid_from"]))
    day, acc = np.nonzero(rng.random((days, n + 3)) < 0.6)  # accounts n.. are unknown
    _load(con, "raw_usage_events", pd.DataFrame({
        "account_id": all_ids[acc], "event_date": start + pd.to_timedelta(day, unit="D"),
        "active_users": rng.integers(0, 40, len(day)), "sessions": rng.integers(0, 100, len(day)),
        "feature_events": rng.integers(0, 10_000, len(day))}))
    k = 500
    _load(con, "raw_billing_events", pd.DataFrame({
        "event_id": [f"b{i}" for i in range(k)], "account_id": rng.choice(all_ids, k),
        "event_time": start + pd.to_timedelta(rng.integers(-30, days * 86_400, k), unit="s"),
        "event_type": rng.choice(["invoice_paid", "payment_failed"], k), "amount": 10.0}))
    _load(con, "raw_support_tickets", pd.DataFrame({
        "ticket_id": [f"t{i}" for i in range(k)], "account_id": rng.choice(all_ids, k),
        "opened_at": start + pd.to_timedelta(rng.integers(0, days * 86_400, k), unit="s"),
        "severity": rng.integers(1, 5, k), "category": "billing"}))
    raw = {name: con.execute(f"SELECT * EXCLUDE (source) FROM {name}").df()  # noqa: S608 - test tables
           for name in ("raw_accounts", "raw_account_attributes", "raw_usage_events", "raw_billing_events",
                        "raw_support_tickets")}
    origin, weeks = feature_origin(con)
    for first, last in ((-weeks, -1), (-1, -1), (-9, -4)):
        duck = compute_features(con, origin, first, last).sort_values(["account_id", "feature_week"], ignore_index=True)
        pand = pandas_features(raw, origin, first, last).sort_values(["account_id", "feature_week"], ignore_index=True)
        assert list(duck.columns) == list(OUTPUT_COLUMNS)
        assert len(duck) > 0 and compare(duck, pand) == [], (first, last)
    assert not duck["account_id"].str.startswith("ghost").any()
    assert duck["seats"].isna().any() and duck["seats"].notna().sum() > 100  # accounts 0-4 have no history
