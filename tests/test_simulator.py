import numpy as np
import pytest

from mlops.core.hashing import content_hash
from resources.schemas import RAW_TABLES
from resources.tenants import DEFAULT_TENANTS, TenantSpec
from usecases.churn.simulator import simulate_tenant

SMALL = TenantSpec(name="simco", region="us", n_accounts=400, seed=5, days=120)


def test_same_seed_gives_identical_tables():
    a, b = simulate_tenant(SMALL), simulate_tenant(SMALL)
    assert {k: content_hash(v) for k, v in a.items()} == {k: content_hash(v) for k, v in b.items()}


def test_simulated_tables_satisfy_the_declared_schemas():
    for name, frame in simulate_tenant(SMALL).items():
        RAW_TABLES[name].pandera_schema().validate(frame, lazy=True)


def test_default_tenants_cover_sizes_regions_and_ten_thousand_accounts():
    assert sum(t.n_accounts for t in DEFAULT_TENANTS) >= 10_000
    assert len({t.region for t in DEFAULT_TENANTS}) >= 2
    assert len({t.n_accounts for t in DEFAULT_TENANTS}) == 3
    assert all(t.days >= 180 for t in DEFAULT_TENANTS)


def test_churned_accounts_stop_using_the_product():
    tables = simulate_tenant(SMALL)
    churn = tables["raw_churn_events"].set_index("account_id")["churned_at"]
    usage = tables["raw_usage_events"]
    joined = usage.join(churn, on="account_id", how="inner")
    assert len(churn) > 20
    assert (joined["event_date"] < joined["churned_at"]).all()


@pytest.mark.parametrize("scenario", ["covariate_shift", "concept_drift", "hard_concept_drift", "data_quality"])
def test_drift_scenarios_change_the_data_only_from_the_drift_day(scenario):
    base = simulate_tenant(SMALL)
    drifted = simulate_tenant(TenantSpec(**{**SMALL.__dict__, "scenario": scenario, "drift_day": 80}))
    from usecases.churn.simulator import TIME_COLUMNS

    day80 = np.datetime64("2026-04-01") + np.timedelta64(80, "D")
    for name, column in TIME_COLUMNS.items():  # every table, the attribute history included
        a, b = (t[name][t[name][column] < day80].reset_index(drop=True) for t in (base, drifted))
        assert len(a) and content_hash(a) == content_hash(b), name
    after = lambda t: t["raw_usage_events"][t["raw_usage_events"]["event_date"] >= day80]  # noqa: E731
    if scenario == "data_quality":
        assert len(after(drifted)) < 0.75 * len(after(base))
    elif scenario == "covariate_shift":
        def current_seats(t):
            return t["raw_account_attributes"].sort_values("valid_from").groupby("account_id")["seats"].last().sum()
        assert current_seats(drifted) > 1.3 * current_seats(base)
        history = drifted["raw_account_attributes"]
        assert (history["valid_from"] == day80).sum() > 0.3 * SMALL.n_accounts  # the doubling, dated
    elif scenario == "hard_concept_drift":
        assert len(drifted["raw_churn_events"]) > 1.3 * len(base["raw_churn_events"])
    else:  # the competitor's target leaves, the retention offer keeps starter accounts
        def churned_after(t, segment, plan):
            return len(_churn_after(t, day80, segment, plan))
        assert churned_after(drifted, "mid_market", "pro") > 3 * churned_after(base, "mid_market", "pro") + 10
        assert churned_after(drifted, None, "starter") < 0.5 * churned_after(base, None, "starter")


def _churn_after(tables, day, segment, plan):
    """Churn events on or after ``day`` of the accounts of ``segment`` (None: any) on ``plan`` then."""
    history = tables["raw_account_attributes"]
    plans = history[history["valid_from"] <= day].sort_values("valid_from").groupby("account_id")["plan"].last()
    accounts = tables["raw_accounts"].set_index("account_id")
    churn = tables["raw_churn_events"]
    churn = churn[churn["churned_at"] >= day]
    ids = churn["account_id"]
    mine = ids.map(plans) == plan
    if segment is not None:
        mine &= ids.map(accounts["segment"]) == segment
    return churn[mine.to_numpy()]


def test_learnable_concept_drift_shows_in_the_features_before_an_account_leaves():
    """Under concept_drift the competitor's targets use the product less in the weeks before they
    leave (a decline the usage features see), and the starter accounts the retention offer keeps
    use it again after their low point."""
    world = TenantSpec(name="simco", region="us", n_accounts=1000, seed=6, days=140)
    tables = simulate_tenant(TenantSpec(**{**world.__dict__, "scenario": "concept_drift", "drift_day": 80}))
    day80 = np.datetime64("2026-04-01") + np.timedelta64(80, "D")
    leavers = _churn_after(tables, day80, "mid_market", "pro")
    leavers = leavers[leavers["churned_at"] >= day80 + np.timedelta64(21, "D")]
    assert len(leavers) >= 30
    usage = tables["raw_usage_events"].merge(leavers, on="account_id")
    before = (usage["churned_at"] - usage["event_date"]).dt.days
    last_week = usage.loc[before <= 7, "active_users"].sum() / 7
    weeks_3_to_5 = usage.loc[(before > 21) & (before <= 35), "active_users"].sum() / 14
    assert last_week < 0.5 * weeks_3_to_5, (last_week, weeks_3_to_5)

    # The kept: starter accounts that leave after the drift day without the offer, and stay with it.
    would_leave = _churn_after(simulate_tenant(world), day80, None, "starter")
    kept = would_leave[~would_leave["account_id"].isin(tables["raw_churn_events"]["account_id"])]
    assert len(kept) > 0.6 * len(would_leave)
    kept = kept[kept["churned_at"] <= day80 + np.timedelta64(20, "D")]  # time to recover by day 140
    assert len(kept) >= 10
    usage = tables["raw_usage_events"].merge(kept, on="account_id")
    from_low_point = (usage["event_date"] - usage["churned_at"]).dt.days
    low_point = usage.loc[from_low_point.abs() <= 3, "active_users"].sum() / 7
    last_week = usage.loc[usage["event_date"] > usage["event_date"].max() - np.timedelta64(7, "D"), "active_users"]
    assert last_week.sum() / 7 > 2 * low_point, (last_week.sum() / 7, low_point)


def test_invalid_tenant_specs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="region 'mars'"):
        TenantSpec(name="x1", region="mars", n_accounts=100, seed=1)
    with pytest.raises(ValueError, match="tenant name"):
        TenantSpec(name="Bad Name!", region="eu", n_accounts=100, seed=1)
    with pytest.raises(ValueError, match="scenario"):
        TenantSpec(name="x2", region="eu", n_accounts=100, seed=1, scenario="meteor")


def test_attributes_change_as_dated_rows_from_the_signup_day():
    """Plan, seats and MRR are a history: a row from the signup day, then one per change."""
    tables = simulate_tenant(SMALL)
    history = tables["raw_account_attributes"]
    first = history.sort_values("valid_from").groupby("account_id").head(1).set_index("account_id")["valid_from"]
    signup = tables["raw_accounts"].set_index("account_id")["signup_date"]
    assert first.sort_index().equals(signup.sort_index())
    changed = history.groupby("account_id").size()
    assert 0.05 < (changed > 1).mean() < 0.5  # some accounts change, most do not
    assert not history.duplicated(["account_id", "valid_from"]).any()


def test_moving_the_clock_only_adds_rows():
    import dataclasses

    import pandas as pd

    from usecases.churn.simulator import SIMULATION_START, TIME_COLUMNS

    boundary = pd.Timestamp(SIMULATION_START) + pd.Timedelta(days=100)
    early = simulate_tenant(dataclasses.replace(SMALL, today=100))
    later = simulate_tenant(dataclasses.replace(SMALL, today=103))
    for name, column in TIME_COLUMNS.items():
        if name in ("raw_usage_events", "raw_billing_events"):
            assert later[name][column].max() > early[name][column].max()
        assert early[name][column].max() < boundary
        cut = later[name][later[name][column] < boundary]
        assert content_hash(cut.reset_index(drop=True)) == content_hash(early[name].reset_index(drop=True)), name
    assert set(early["raw_accounts"]["account_id"]) <= set(later["raw_accounts"]["account_id"])


@pytest.mark.parametrize("scenario", ["none", "covariate_shift"])
def test_incremental_daily_load_equals_a_full_load(tmp_path, scenario):
    """Also when the clock passes a drift day on which the attribute history changes."""
    import dataclasses

    from definitions import build_definitions
    from usecases.churn.simulator import TIME_COLUMNS

    spec0 = dataclasses.replace(SMALL, scenario=scenario, drift_day=None if scenario == "none" else 101)

    def load(home, days):
        defs = build_definitions(str(home))
        warehouse = defs.resources["warehouse"]
        for today in days:
            spec = dataclasses.replace(spec0, today=today)
            defs.resources["catalog"].add(spec)
            warehouse.sync_simulated_rows(SMALL.name, simulate_tenant(spec), "simulator", spec.world,
                                          TIME_COLUMNS)
        with warehouse.connect(SMALL.name) as con:
            return {name: con.execute(f"SELECT * FROM {name} ORDER BY ALL").df() for name in RAW_TABLES}  # noqa: S608

    stepwise = load(tmp_path / "a", [100, 101, 102, 103])
    at_once = load(tmp_path / "b", [103])
    for name in RAW_TABLES:
        assert content_hash(stepwise[name]) == content_hash(at_once[name]), name
