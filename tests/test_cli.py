"""The ``mlops`` command as `uv sync` installs it: a real process per call, on a real home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlops.core.environment import TELEMETRY_OFF
from tests.conftest import TEST_TENANT

MLOPS = Path(sys.executable).with_name("mlops")


def mlops(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLOPS_HOME", "DAGSTER_HOME")}
    return subprocess.run([str(MLOPS), "--home", str(home), *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_the_command_is_installed_and_lists_every_command(tmp_path):
    assert MLOPS.exists(), "uv sync installs the project's `mlops` command into the environment"
    result = mlops("--help", home=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("build", "demo", "promote", "rollback", "api-key", "add-tenant", "verify-audit", "ui", "serve"):
        assert command in result.stdout


def test_the_demo_seed_draws_another_world_for_the_drifted_tenant_only(tmp_path):
    """``mlops demo --seed`` (and ``benchmarks.loop --demo --seed``): acme's world, nothing else."""
    from mlops.demo import DRIFTED_SEED, demo_tenants

    for small in (True, False):
        default, other = demo_tenants(small), demo_tenants(small, seed=7)
        assert default[0].scenario != "none" and default[0].seed == DRIFTED_SEED and other[0].seed == 7
        assert [s.scenario for s in default[1:]] == ["none"] * (len(default) - 1) and default[1:] == other[1:]
    result = mlops("demo", "--help", home=tmp_path)
    assert result.returncode == 0 and "--seed" in result.stdout, result.stdout


def test_env_points_library_clis_at_the_home_with_telemetry_off(tmp_path):
    result = mlops("env", home=tmp_path)
    assert result.returncode == 0, result.stderr
    variables = dict(item.split("=", 1) for item in result.stdout.split())
    assert variables["MLOPS_HOME"] == str(tmp_path.resolve())
    assert variables["DAGSTER_HOME"] == str(tmp_path.resolve() / "dagster")
    assert {k: variables[k] for k in TELEMETRY_OFF} == TELEMETRY_OFF


def test_add_tenant_then_init_write_the_catalog(tmp_path):
    result = mlops("add-tenant", "umbrella", "--region", "us", "--accounts", "200", "--seed", "9", home=tmp_path)
    assert result.returncode == 0, result.stderr
    catalog = json.loads((tmp_path / "tenants.json").read_text())
    assert catalog["umbrella"]["region"] == "us" and catalog["umbrella"]["n_accounts"] == 200


@pytest.mark.parametrize(("args", "message"), [
    (("add-tenant", "Bad Name"), "tenant name 'Bad Name' is invalid"),
    (("add-tenant", "ok-name", "--region", "mars"), "region 'mars' is not one of"),
    (("verify-audit", "nobody"), "unknown tenant 'nobody'"),
    (("promote", "nobody"), "unknown tenant 'nobody'"),
    (("api-key", "create", "nobody"), "unknown tenant 'nobody'"),
])
def test_bad_input_is_refused_with_a_message_naming_it(tmp_path, args, message):
    result = mlops(*args, home=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_promote_and_rollback_without_models_fail_clearly(tmp_path):
    assert mlops("add-tenant", "umbrella", home=tmp_path).returncode == 0
    result = mlops("promote", "umbrella", home=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "tenant 'umbrella' has no challenger to promote" in result.stderr
    assert "Traceback" not in result.stderr
    result = mlops("rollback", "umbrella", home=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "tenant 'umbrella' is not deployed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_verify_audit_reads_the_chain(platform_home):
    result = mlops("verify-audit", TEST_TENANT.name, home=platform_home["home"])
    assert result.returncode == 0, result.stderr
    assert "chain intact" in result.stdout


def test_a_person_reads_and_closes_an_escalated_episode(tmp_path, monkeypatch):
    """``mlops loop status`` shows what the loop did; ``mlops loop close`` ends an escalated episode
    (audited), so that the next decay alert opens a new one."""
    import pandas as pd

    from definitions import build_definitions
    from mlops.core import loop

    for key in ("MLOPS_HOME", "DAGSTER_HOME", "BENTOML_HOME", "MLFLOW_TRACKING_URI"):
        # build_definitions points these at its home; put back what the session had afterwards.
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    warehouse = build_definitions(str(home)).resources["warehouse"]
    rules = loop.LoopRules(max_retrains=1, first_retrain_after_days=0)
    alert = {"metric": "realized_roc_auc", "chunk": "2026-10-01", "value": 0.6, "threshold": 0.79}
    with warehouse.transaction("acme") as con:
        for day, action in ((0, "retrain"), (8, "escalate")):
            decision = loop.on_decay_alert(
                con, "churn", alert, now=pd.Timestamp("2026-10-02") + pd.Timedelta(days=day), champion_version="1",
                floor=(0.79, "v1 reference"), challenger_in_shadow=False, labels_through=pd.Timestamp("2026-09-01"),
                rules=rules)
            assert decision.action == action
    status = mlops("loop", "status", "acme", home=home)
    assert status.returncode == 0, status.stderr
    assert "escalated" in status.stdout and "mlops loop close acme" in status.stdout

    closed = mlops("loop", "close", "acme", "--note", "accepted the lower level after the price change", home=home)
    assert closed.returncode == 0, closed.stderr
    assert "episode 1 closed" in closed.stdout
    audit = warehouse.audit_entries("acme")
    assert audit.iloc[-1][["action", "outcome"]].tolist() == ["loop_episode_closed", "closed"]
    with warehouse.connect("acme") as con:
        assert loop.active_episode(con, "churn") is None
    again = mlops("loop", "close", "acme", "--note", "twice", home=home)
    assert again.returncode != 0 and "no open or escalated decay episode" in again.stderr
    unknown = mlops("loop", "status", "nobody", home=home)
    assert unknown.returncode != 0 and "unknown tenant" in unknown.stderr
