"""Slowly-changing attributes (plan, seats, MRR) keep their history, and every feature row, training
row and online row sees the values in force at its own time, never later ones (issue 12, item 3)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import duckdb
import pandas as pd
import pytest

from assets.ingestion import ingest_inbox
from definitions import build_definitions
from mlops.core.hashing import content_hash
from mlops.core.monitoring import TIMESTAMP, TenantMonitor
from mlops.replay import replay_tenant
from resources.feature_store import (
    FeatureStore,
    build_feature_table,
    build_training_set,
    compare_feature_rows,
    compute_features,
    offline_rows_at,
)
from resources.monitoring import MonitoringPolicy
from resources.schemas import ATTRIBUTE_HISTORY_SQL, RAW_TABLES
from resources.settings import PlatformSettings
from resources.tenants import TenantCatalog, TenantSpec
from usecases.churn.simulator import SIMULATION_START, simulate_tenant

# --- 1. a drift scenario changes nothing before its drift day ----------------------------------
START, DRIFT, END = 150, 182, 185
WORLD = TenantSpec(name="hist", region="eu", n_accounts=700, seed=202, days=200)
DRIFT_DAY = pd.Timestamp(SIMULATION_START) + pd.Timedelta(days=DRIFT)


@pytest.fixture(scope="module")
def baseline():
    replayed = replay_tenant(WORLD, START, END)
    return replayed, TenantMonitor(MonitoringPolicy(), replayed.reference).run(replayed.analysis_as_of(DRIFT))


@pytest.mark.parametrize("scenario", ["covariate_shift", "concept_drift", "data_quality"])
def test_a_drift_scenario_gives_the_same_features_scores_and_monitoring_before_its_drift(baseline, scenario):
    """The replay loads the world up to END, after the drift: attributes that changed on the drift
    day must not reach the features, scores or monitoring of any earlier day."""
    base, base_report = baseline
    drifted = replay_tenant(dataclasses.replace(WORLD, scenario=scenario, drift_day=DRIFT), START, END)

    pd.testing.assert_frame_equal(drifted.reference, base.reference, check_exact=True)
    before = [r.predictions[r.predictions[TIMESTAMP] < DRIFT_DAY].reset_index(drop=True) for r in (drifted, base)]
    assert len(before[1]) > 10_000
    pd.testing.assert_frame_equal(before[0], before[1], check_exact=True)

    # What monitoring reported on the drift day's morning (labels matured by then): the same values
    # and alerts, chunk by chunk.
    report = TenantMonitor(MonitoringPolicy(), drifted.reference).run(drifted.analysis_as_of(DRIFT))
    assert report.reference_roc_auc == base_report.reference_roc_auc
    key = ["metric", "feature", "chunk_key"]
    ours, theirs = (r.results.sort_values(key, na_position="first").reset_index(drop=True)
                    for r in (report, base_report))
    assert len(ours) > 100 and pd.Timestamp(ours["chunk_start"].max()) < DRIFT_DAY
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)

    # Not vacuous: the world does change from the drift on.
    after = [r.predictions[r.predictions[TIMESTAMP] > DRIFT_DAY].reset_index(drop=True) for r in (drifted, base)]
    if scenario == "covariate_shift":
        assert (after[0]["seats"] > after[1]["seats"]).mean() > 0.3
    assert content_hash(after[0]) != content_hash(after[1])


# --- 2. a training row at t sees the attributes valid at t -----------------------------------
DAY0 = dt.date(2026, 1, 1)
CHANGE = 51  # on day 51 (a prediction time) the account goes from 10 seats on "pro" to 40 seats on "enterprise"


def _load(con, name, frame):
    con.execute(RAW_TABLES[name].ddl())
    con.register("f", frame.assign(source="test"))
    con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM f")  # noqa: S608 - test table
    con.unregister("f")


def _day(n: int) -> pd.Timestamp:
    return pd.Timestamp(DAY0) + pd.Timedelta(days=n)


@pytest.fixture()
def con():
    """One account, 100 days of steady usage (5 users a day), a seat and plan change on day 51."""
    con = duckdb.connect()
    _load(con, "raw_accounts", pd.DataFrame({
        "account_id": ["a1"], "signup_date": [_day(0)], "region": ["eu"], "segment": ["smb"], "company_size": [80]}))
    _load(con, "raw_account_attributes", pd.DataFrame({
        "account_id": ["a1", "a1"], "valid_from": [_day(0), _day(CHANGE)], "plan": ["pro", "enterprise"],
        "seats": [10, 40], "mrr": [450.0, 4400.0]}))
    _load(con, "raw_usage_events", pd.DataFrame({
        "account_id": "a1", "event_date": pd.date_range(DAY0, periods=100, freq="D"), "active_users": 5,
        "sessions": 8, "feature_events": 10}))
    _load(con, "raw_billing_events", pd.DataFrame({
        "event_id": ["b1"], "account_id": ["a1"], "event_time": [_day(3)], "event_type": ["invoice_paid"],
        "amount": [450.0]}))
    _load(con, "raw_support_tickets", pd.DataFrame({
        "ticket_id": ["t1"], "account_id": ["a1"], "opened_at": [_day(4)], "severity": [1], "category": ["billing"]}))
    _load(con, "raw_churn_events", pd.DataFrame({"account_id": ["a1"], "churned_at": [_day(200)]}))
    return con


def _expected(feature_date: pd.Timestamp) -> tuple:
    """(seats, plan, mrr, the seats that seat utilisation divides by) in force at the end of ``feature_date``."""
    return (10.0, "pro", 450.0, 10.0) if feature_date < _day(CHANGE) else (40.0, "enterprise", 4400.0, 40.0)


def _attributes(row) -> tuple:
    return (row["seats"], row["plan"], row["mrr"], round(row["avg_active_users_7d"] / row["seat_utilisation_7d"], 9))


def test_offline_features_and_training_rows_see_the_attributes_valid_at_their_time(con):
    history = con.execute(ATTRIBUTE_HISTORY_SQL + " ORDER BY valid_from").df()
    assert history["valid_to"].tolist()[:1] == [_day(CHANGE)] and pd.isna(history["valid_to"].iloc[1])

    build_feature_table(con)
    features = con.execute("SELECT * FROM account_features ORDER BY feature_date").df()
    assert len(features) == 15  # weeks ending on days 1, 8, ..., 99
    for _, row in features.iterrows():
        assert _attributes(row) == _expected(row["feature_date"]), row["feature_date"]
    # The week that ends the day before the change still has the old values; the next has the new.
    assert features["seats"].tolist() == [10.0] * 8 + [40.0] * 7

    training = build_training_set(con)
    assert training["seats"].tolist() == [10.0, 10.0, 10.0, 40.0, 40.0]  # labels on days 37, 44, ..., 65
    for _, row in training.iterrows():
        assert row["available_at"] <= row["prediction_time"]
        assert _attributes(row) == _expected(row["prediction_time"] - pd.Timedelta(days=1)), row["prediction_time"]
    on_the_day = training[training["prediction_time"] == _day(CHANGE)].iloc[0]
    assert on_the_day["seats"] == 10.0  # a change valid from day t is an event of day t: not seen at t


def test_online_snapshot_sees_the_attributes_valid_at_its_time(con, tmp_path, monkeypatch):
    # Computed as of a day before the change (as the replay does, over a warehouse that already
    # holds the later change), the online row has the old values; as of the day after, the new.
    before = compute_features(con, _day(CHANGE).date(), -1, -1).iloc[0]
    assert _attributes(before) == (10.0, "pro", 450.0, 10.0)
    after = compute_features(con, _day(CHANGE + 1).date(), -1, -1).iloc[0]
    assert _attributes(after) == (40.0, "enterprise", 4400.0, 40.0)

    settings = PlatformSettings(home=str(tmp_path))
    store = FeatureStore(settings=settings, catalog=TenantCatalog(tenants_file=str(tmp_path / "t.json")))
    monkeypatch.setattr(FeatureStore, "online_dir", lambda self, tenant: tmp_path / "online")
    store.build_features(con)
    store.write_online_snapshot("t", con)
    online = store.read_online_snapshot("t")
    assert _attributes(online.iloc[0]) == (40.0, "enterprise", 4400.0, 40.0)
    assert compare_feature_rows(online, offline_rows_at(con, ["a1"], online["available_at"].max())) == []
    # And the offline row of an earlier time keeps the values of that time.
    earlier = offline_rows_at(con, ["a1"], _day(CHANGE))
    assert _attributes(earlier.iloc[0]) == (10.0, "pro", 450.0, 10.0)


# --- 3. an inbox delivery that changes seats adds a history row --------------------------------
TENANT = TenantSpec(name="histco", region="us", n_accounts=200, seed=3, days=120)
NEXT_DAY = pd.Timestamp(SIMULATION_START) + pd.Timedelta(days=TENANT.days)  # the day after the newest usage


@pytest.fixture()
def platform(tmp_path):
    defs = build_definitions(str(tmp_path / "home"))
    defs.resources["settings"].ensure_home()
    defs.resources["catalog"].add(TENANT)
    warehouse = defs.resources["warehouse"]
    warehouse.replace_source_rows(TENANT.name, simulate_tenant(TENANT), "simulator")
    inbox = defs.resources["settings"].inbox_dir(TENANT.name)
    inbox.mkdir(parents=True)
    return defs, warehouse, inbox


def _ingest(defs):
    r = defs.resources
    return ingest_inbox(r["warehouse"], r["settings"], r["catalog"], TENANT.name)


def _current_state(warehouse, account: str) -> pd.DataFrame:
    with warehouse.connect(TENANT.name, read_only=True) as con:
        return con.execute(
            "SELECT a.*, h.plan, h.seats, h.mrr FROM raw_accounts a JOIN raw_account_attributes h USING (account_id) "
            "WHERE account_id = ? ORDER BY h.valid_from DESC LIMIT 1", [account]).df().drop(columns="source")


def _features(warehouse, account: str) -> pd.DataFrame:
    with warehouse.transaction(TENANT.name) as con:
        build_feature_table(con)
        return con.execute("SELECT * FROM account_features WHERE account_id = ? ORDER BY feature_date",
                           [account]).df()


def test_an_accounts_delivery_that_changes_seats_adds_a_history_row(platform):
    defs, warehouse, inbox = platform
    account = f"{TENANT.name}-000007"
    state = _current_state(warehouse, account)
    old_seats = int(state["seats"].iloc[0])
    before = _features(warehouse, account)
    assert (before["seats"] == old_seats).all()

    # The same state again adds nothing; a changed one adds a row valid from the next day.
    state.to_csv(inbox / "accounts_1_same.csv", index=False)
    state.assign(seats=old_seats + 25).to_csv(inbox / "accounts_2_more_seats.csv", index=False)
    outcomes = _ingest(defs)
    assert [o.accepted for o in outcomes] == [True, True]
    with warehouse.connect(TENANT.name, read_only=True) as con:
        history = con.execute("SELECT valid_from, seats, source FROM raw_account_attributes WHERE account_id = ? "
                              "ORDER BY valid_from", [account]).df()
    assert len(history) >= 2 and history["source"].iloc[-1] == "inbox:accounts_2_more_seats.csv"
    assert (pd.Timestamp(history["valid_from"].iloc[-1]), history["seats"].iloc[-1]) == (NEXT_DAY, old_seats + 25)
    assert (history["source"] == "inbox:accounts_1_same.csv").sum() == 0

    # Every feature row so far ends before the delivery: it keeps the old value.
    after = _features(warehouse, account)
    pd.testing.assert_frame_equal(after, before)

    # A delivery may say from when the new state holds: rows from then on see it, earlier ones not.
    change = pd.Timestamp(SIMULATION_START) + pd.Timedelta(days=80)
    state.assign(seats=old_seats + 50, valid_from=change.date()).to_csv(inbox / "accounts_dated.csv", index=False)
    assert _ingest(defs)[0].accepted
    dated = _features(warehouse, account)
    assert (dated.loc[dated["feature_date"] < change, "seats"] == old_seats).all()
    assert (dated.loc[dated["feature_date"] >= change, "seats"] == old_seats + 50).all()
    assert (dated["feature_date"] >= change).sum() >= 4


def test_a_bad_attribute_delivery_is_rejected_whole(platform):
    defs, warehouse, inbox = platform
    account = f"{TENANT.name}-000007"
    state = _current_state(warehouse, account)

    def snapshot():
        with warehouse.connect(TENANT.name, read_only=True) as con:
            return {name: content_hash(con.execute(f"SELECT * FROM {name} ORDER BY ALL").df())  # noqa: S608
                    for name in RAW_TABLES}

    before = snapshot()
    good = state.assign(seats=99)
    bad_date = pd.concat([good, good.assign(account_id="new-9")]).assign(valid_from=["2026-06-01", "someday"])
    bad_date.to_csv(inbox / "accounts_bad_date.csv", index=False)
    (inbox / "account_attributes_ghost.csv").write_text(
        "account_id,valid_from,plan,seats,mrr\nghost-1,2026-06-01,pro,3,135.0\n")
    outcomes = _ingest(defs)
    assert [o.accepted for o in outcomes] == [False, False]
    assert "column 'valid_from'" in outcomes[0].message
    assert "unknown account(s) ['ghost-1']" in outcomes[1].message
    assert snapshot() == before


def test_a_warehouse_from_before_the_history_is_migrated(platform, tmp_path):
    """raw_accounts used to hold plan, seats and MRR as of the last load: they move to the history
    (valid from signup for an inbox account), and the simulated world is reloaded with its real history."""
    from usecases.churn.simulator import TIME_COLUMNS

    defs, warehouse, _ = platform
    spec = dataclasses.replace(TENANT, scenario="covariate_shift", drift_day=100)
    defs.resources["catalog"].add(spec)
    tables = simulate_tenant(spec)
    with warehouse.transaction(TENANT.name) as con:
        con.execute("DROP TABLE raw_accounts")
        con.execute("DROP TABLE raw_account_attributes")
        con.execute("CREATE TABLE raw_accounts (account_id VARCHAR NOT NULL, plan VARCHAR NOT NULL, seats BIGINT NOT NULL, "
                    "mrr DOUBLE NOT NULL, signup_date DATE NOT NULL, region VARCHAR NOT NULL, segment VARCHAR NOT NULL, "
                    "company_size BIGINT NOT NULL, source VARCHAR NOT NULL)")
        current = tables["raw_account_attributes"].groupby("account_id").last().reset_index()
        old = tables["raw_accounts"].merge(current.drop(columns="valid_from"), on="account_id").assign(source="simulator")
        con.register("old", old)
        con.execute("INSERT INTO raw_accounts BY NAME SELECT * FROM old")
        con.execute("INSERT INTO raw_accounts VALUES ('mine-1', 'pro', 12, 540.0, DATE '2026-03-01', 'us', 'smb', 30, "
                    "'inbox:accounts.csv')")
        con.execute("CREATE TABLE simulator_state (source VARCHAR PRIMARY KEY, world VARCHAR, loaded_until TIMESTAMP)")
        con.execute("INSERT INTO simulator_state VALUES ('simulator', ?, TIMESTAMP '2026-07-29')", [spec.world])

    warehouse.sync_simulated_rows(TENANT.name, tables, "simulator", spec.world, TIME_COLUMNS)
    with warehouse.connect(TENANT.name, read_only=True) as con:
        assert [c for c in con.execute("SELECT * FROM raw_accounts LIMIT 0").df().columns] == [
            *RAW_TABLES["raw_accounts"].column_names, "source"]
        simulated = con.execute("SELECT * EXCLUDE (source) FROM raw_account_attributes WHERE source = 'simulator' "
                                "ORDER BY valid_from, account_id").df()
        mine = con.execute("SELECT valid_from, plan, seats, mrr FROM raw_account_attributes "
                           "WHERE account_id = 'mine-1'").fetchall()
    expected = tables["raw_account_attributes"].sort_values(["valid_from", "account_id"], ignore_index=True)
    assert content_hash(simulated.astype({"valid_from": "datetime64[ns]"})) == content_hash(expected)
    assert mine == [(dt.date(2026, 3, 1), "pro", 12, 540.0)]
