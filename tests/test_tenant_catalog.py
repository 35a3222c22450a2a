"""The tenant catalog's file is shared by processes (the demo's tenant workers move their clocks in
parallel): concurrent updates of different tenants must all survive."""

from __future__ import annotations

import multiprocessing

from resources.tenants import TenantCatalog, TenantSpec


def _advance(path: str, name: str, days: int) -> None:
    catalog = TenantCatalog(tenants_file=path)
    for day in range(61, 61 + days):
        catalog.set_today(name, day)
        # Every write of the other process must have kept this tenant's clock where it was set.
        assert catalog.get(name).today == day


def test_two_processes_moving_their_tenants_clocks_never_undo_each_other(tmp_path):
    path = str(tmp_path / "tenants.json")
    catalog = TenantCatalog(tenants_file=path)
    for name in ("t-a", "t-b"):
        catalog.add(TenantSpec(name=name, region="eu", n_accounts=50, seed=1, days=400, today=60))
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_advance, args=(path, name, 150)) for name in ("t-a", "t-b")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert {n: s.today for n, s in TenantCatalog(tenants_file=path).all().items() if n.startswith("t-")} == {"t-a": 210, "t-b": 210}


def test_a_use_case_can_simulate_another_number_of_accounts_and_the_catalog_keeps_it(tmp_path):
    """The small demo's acme simulates 900 accounts for churn and 3,000 for fraud (rare frauds need
    more payments to carry a floor): the catalog stores the override, the use case's simulator
    gets it, the other use cases keep ``n_accounts``, and a bad count is refused by name."""
    import pytest

    from mlops.core.environment import PROJECT_ROOT
    from mlops.core.usecase import load_usecase
    from mlops.core.usecase_store import load_simulator

    catalog = TenantCatalog(tenants_file=str(tmp_path / "tenants.json"))
    catalog.add(TenantSpec(name="t-a", region="eu", n_accounts=60, seed=1, days=100, use_case_accounts={"fraud": 120}))
    spec = catalog.set_today("t-a", 90)  # a read-modify-write keeps it
    assert spec.use_case_accounts == {"fraud": 120} and spec.n_accounts == 60
    assert spec.for_use_case("churn") is spec
    fraud = spec.for_use_case("fraud")
    assert (fraud.n_accounts, fraud.today, fraud.seed) == (120, 90, 1)
    world = load_simulator(load_usecase(PROJECT_ROOT / "usecases" / "fraud"))(fraud)
    assert world["raw_fraud_accounts"]["account_id"].nunique() == 120
    with pytest.raises(ValueError, match=r"use_case_accounts\['fraud'\] must be an integer of at least 50, got 10"):
        TenantSpec(name="t-b", region="eu", n_accounts=60, seed=1, use_case_accounts={"fraud": 10})
