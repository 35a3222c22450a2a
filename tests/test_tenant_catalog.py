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
