"""End to end: the headless demo on two small tenants. A concept drift for ``acme`` must be noticed
and repaired by the platform alone: alert -> one retrain -> gates -> shadow -> promotion -> the
service answering with the new model, all audited in order; ``globex`` is left alone."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import duckdb
import pytest
from conftest import open_instance

from resources.closed_loop import demo_tenants
from resources.environment import PROJECT_ROOT

pytestmark = pytest.mark.timeout(900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("loop") / "home"
    proc = subprocess.run(
        [sys.executable, "-m", "resources.cli", "--home", str(home), "demo", "--headless", "--small",
         "--service-port", str(_free_port())],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=840,
    )
    timeline = json.loads((home / "demo_timeline.json").read_text()) if (home / "demo_timeline.json").exists() else []
    return {"home": home, "proc": proc, "timeline": timeline}


def _events(timeline, tenant=None, kind=None):
    return [e for e in timeline if (tenant is None or e["tenant"] == tenant) and (kind is None or e["kind"] == kind)]


def _audit(home, tenant: str) -> list[tuple[str, str]]:
    region = {s.name: s.region for s in demo_tenants(small=True)}[tenant]
    path = home / "regions" / region / tenant / "warehouse.duckdb"
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT action, outcome FROM audit_log ORDER BY seq").fetchall()


def test_demo_exits_zero_with_a_closed_loop(demo):
    proc = demo["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert _events(demo["timeline"], kind="loop closed")


def test_alert_only_for_the_drifted_tenant_within_a_week(demo):
    drift_day = {s.name: s.drift_day for s in demo_tenants(small=True)}["acme"]
    alerts = _events(demo["timeline"], "acme", "decay alert")
    assert alerts, "no decay alert for the drifted tenant"
    assert drift_day <= alerts[0]["day"] <= drift_day + 7
    assert not _events(demo["timeline"], "globex", "decay alert")


def test_one_retrain_then_shadow_then_promotion_in_order(demo):
    timeline = demo["timeline"]
    launched = _events(timeline, kind="retrain launched")
    assert [e["tenant"] for e in launched] == ["acme"], launched
    order = ["decay alert", "retrain launched", "retrain succeeded", "shadow: promote", "promoted",
             "new champion serving"]
    positions = [timeline.index(_events(timeline, "acme", kind)[0]) for kind in order]
    assert positions == sorted(positions), [timeline[p]["kind"] for p in positions]
    promoted = _events(timeline, "acme", "promoted")[0]["detail"]  # "champion v1 -> v2"
    new_version = promoted.rsplit("v", 1)[1]
    serving = _events(timeline, "acme", "new champion serving")[0]["detail"]
    assert serving.startswith(f"v{new_version} answers")
    assert _events(timeline, "acme", "serving")[-1]["detail"] == f"model v{new_version}"
    assert _events(timeline, "globex", "serving")[-1]["detail"] == "model v1"

    with open_instance(demo["home"]) as instance:
        from dagster import RunsFilter

        runs = instance.get_run_records(RunsFilter(job_name="churn_retrain", tags={"trigger": "decay_alert"}))
        assert [(r.dagster_run.tags["dagster/partition"], r.dagster_run.status.value) for r in runs] == [("acme", "SUCCESS")]


def test_audit_entries_tell_the_story_in_order(demo):
    actions = [a for a, _ in _audit(demo["home"], "acme")]
    first_alert = actions.index("decay_alert")
    retrained = actions.index("model_trained", first_alert)
    gates = [i for i, a in enumerate(actions) if a.startswith("gate:") and i > retrained]
    challenger = actions.index("alias_assigned", retrained)
    gate = actions.index("promotion_gate", challenger)
    promotion = actions.index("promotion", gate)
    assert first_alert < retrained < min(gates) <= max(gates) < challenger < gate < promotion
    assert ("promotion_gate", "passed") in _audit(demo["home"], "acme")
    globex = [a for a, _ in _audit(demo["home"], "globex")]
    assert "decay_alert" not in globex and "promotion" not in globex
