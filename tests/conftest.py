"""Shared fixtures: every test gets real DuckDB files, a real MLflow registry and a real Dagster
instance inside a temporary MLOPS_HOME."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from dagster import DagsterInstance

from resources.tenants import TenantSpec

# A small tenant: big enough for a meaningful model, small enough for a fast suite.
TEST_TENANT = TenantSpec(name="testco", region="eu", n_accounts=1500, seed=11, days=150)


def pytest_xdist_make_scheduler(config, log):
    """How the two xdist workers share the suite (``-n 2 --dist loadfile``, pyproject.toml): a worker
    runs a whole module at a time (its module fixtures are built once), except that every module
    using the session's ``platform_home`` is one unit, run in file order on one worker: those modules
    see that home in the order one process gives them (some move its aliases, and later ones expect
    what earlier ones left), and it is built once instead of once per worker. (A scheduler, not
    ``xdist_group`` marks: xdist 3.8 renames node ids in a way pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesSharingTheSessionHome(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "platform_home" if _uses_platform_home(str(config.rootpath / module)) else module

    return ModulesSharingTheSessionHome(config, log)


@functools.cache
def _uses_platform_home(path: str) -> bool:
    return "platform_home" in Path(path).read_text()


def open_instance(home) -> DagsterInstance:
    """The real Dagster instance of a home (not whichever DAGSTER_HOME the process last set)."""
    return DagsterInstance.from_config(str(home / "dagster"))


@pytest.fixture(scope="session")
def platform_home(tmp_path_factory):
    """A home with the small test tenant registered and the whole churn pipeline materialized once."""
    from definitions import build_definitions

    home = tmp_path_factory.mktemp("mlops_home")
    defs = build_definitions(str(home))
    defs.resources["settings"].ensure_home()
    defs.resources["catalog"].add(TEST_TENANT)
    with open_instance(home) as instance:
        instance.add_dynamic_partitions("tenant", [TEST_TENANT.name])
        result = defs.resolve_job_def("churn_pipeline").execute_in_process(
            instance=instance, partition_key=TEST_TENANT.name, raise_on_error=False
        )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return {"home": home, "defs": defs, "run_id": result.run_id, "instance": lambda: open_instance(home)}


@pytest.fixture()
def defs_for(platform_home):
    """Definitions over the session home, optionally with other gate thresholds."""
    from definitions import build_definitions

    def make(**kwargs):
        return build_definitions(str(platform_home["home"]), **kwargs)

    return make
