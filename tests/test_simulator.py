import numpy as np
import pytest

from resources.feature_store import content_hash
from resources.schemas import RAW_TABLES
from resources.simulator import simulate_tenant
from resources.tenants import DEFAULT_TENANTS, TenantSpec

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


@pytest.mark.parametrize("scenario", ["covariate_shift", "concept_drift", "data_quality"])
def test_drift_scenarios_change_the_data_only_from_the_drift_day(scenario):
    base = simulate_tenant(SMALL)
    drifted = simulate_tenant(TenantSpec(**{**SMALL.__dict__, "scenario": scenario, "drift_day": 80}))
    day80 = np.datetime64("2026-04-01") + np.timedelta64(80, "D")
    before = lambda t: t["raw_usage_events"][t["raw_usage_events"]["event_date"] < day80]  # noqa: E731
    assert content_hash(before(base).reset_index(drop=True)) == content_hash(before(drifted).reset_index(drop=True))
    after = lambda t: t["raw_usage_events"][t["raw_usage_events"]["event_date"] >= day80]  # noqa: E731
    if scenario == "data_quality":
        assert len(after(drifted)) < 0.75 * len(after(base))
    elif scenario == "covariate_shift":
        assert drifted["raw_accounts"]["seats"].sum() > 1.3 * base["raw_accounts"]["seats"].sum()
    else:
        assert len(drifted["raw_churn_events"]) > 1.3 * len(base["raw_churn_events"])


def test_invalid_tenant_specs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="region 'mars'"):
        TenantSpec(name="x1", region="mars", n_accounts=100, seed=1)
    with pytest.raises(ValueError, match="tenant name"):
        TenantSpec(name="Bad Name!", region="eu", n_accounts=100, seed=1)
    with pytest.raises(ValueError, match="scenario"):
        TenantSpec(name="x2", region="eu", n_accounts=100, seed=1, scenario="meteor")


def test_moving_the_clock_only_adds_rows():
    import dataclasses

    import pandas as pd

    from resources.simulator import SIMULATION_START, TIME_COLUMNS

    boundary = pd.Timestamp(SIMULATION_START) + pd.Timedelta(days=100)
    early = simulate_tenant(dataclasses.replace(SMALL, today=100))
    later = simulate_tenant(dataclasses.replace(SMALL, today=103))
    for name, column in TIME_COLUMNS.items():
        assert later[name][column].max() > early[name][column].max() or name == "raw_churn_events"
        assert early[name][column].max() < boundary
        cut = later[name][later[name][column] < boundary]
        assert content_hash(cut.reset_index(drop=True)) == content_hash(early[name].reset_index(drop=True)), name
    assert set(early["raw_accounts"]["account_id"]) <= set(later["raw_accounts"]["account_id"])


def test_incremental_daily_load_equals_a_full_load(tmp_path):
    import dataclasses

    from definitions import build_definitions
    from resources.simulator import TIME_COLUMNS, world_fingerprint

    def load(home, days):
        defs = build_definitions(str(home))
        warehouse = defs.resources["warehouse"]
        for today in days:
            spec = dataclasses.replace(SMALL, today=today)
            defs.resources["catalog"].add(spec)
            warehouse.sync_simulated_rows(SMALL.name, simulate_tenant(spec), "simulator", world_fingerprint(spec),
                                          TIME_COLUMNS)
        with warehouse.connect(SMALL.name) as con:
            return {name: con.execute(f"SELECT * FROM {name} ORDER BY ALL").df() for name in RAW_TABLES}  # noqa: S608

    stepwise = load(tmp_path / "a", [100, 101, 102, 103])
    at_once = load(tmp_path / "b", [103])
    for name in RAW_TABLES:
        assert content_hash(stepwise[name]) == content_hash(at_once[name]), name
