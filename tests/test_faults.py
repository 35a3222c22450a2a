"""Fault injection: the registry unavailable during promote and rollback, a run worker killed in the
middle of a retraining run, two runs of one tenant partition requested at once. Real parts only:
the MLflow SQLite registry locked by another connection, a real ``dagster-daemon`` with its code
server and run queue, ``kill -9``. Each test checks that nothing is lost or half-done: the registry
aliases and the serving manifest never disagree, and every run ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from mlops.core.environment import PROJECT_ROOT, TELEMETRY_OFF
from tests.conftest import TEST_TENANT, open_instance
from tests.servers import wait_until

pytestmark = pytest.mark.timeout(600)
TENANT = TEST_TENANT.name


def _relocated_copy(source: Path, target: Path) -> Path:
    """A copy of a home whose MLflow database names the copy's paths (artifacts, model sources)."""
    shutil.copytree(source, target)
    with sqlite3.connect(target / "mlflow" / "mlflow.db") as con:
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in [row[1] for row in con.execute(f'PRAGMA table_info("{table}")')]:
                con.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '  # noqa: S608 - schema names
                            f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0',
                            (str(source), str(target), str(source)))
    from resources.settings import DAGSTER_YAML

    (target / "dagster" / "dagster.yaml").write_text(DAGSTER_YAML)  # this version's instance config
    return target


@pytest.fixture(scope="module")
def home(platform_home, tmp_path_factory):
    return _relocated_copy(platform_home["home"], tmp_path_factory.mktemp("faults") / "home")


@pytest.fixture(scope="module")
def resources(home):
    from definitions import build_definitions

    return build_definitions(str(home)).resources


def _state(resources) -> dict:
    """What the registry's aliases and the serving manifest say for the tenant."""
    from mlops.core.serving import read_manifest, serving_dir

    registry = resources["registry"]
    entry = read_manifest(serving_dir(resources["settings"].root))["tenants"][TENANT]
    champion, challenger = registry.alias_version(TENANT, "champion"), registry.alias_version(TENANT, "challenger")
    return {
        "alias_champion": str(champion.version),
        "alias_challenger": None if challenger is None else str(challenger.version),
        "manifest_champion": entry["champion"]["version"],
        "manifest_challenger": (entry["challenger"] or {}).get("version"),
        "history": entry["champion_history"],
    }


def _assert_agree(state: dict) -> None:
    assert state["alias_champion"] == state["manifest_champion"], state
    shadowing = state["alias_challenger"] if state["alias_challenger"] != state["alias_champion"] else None
    assert shadowing == state["manifest_challenger"], state


def _new_version(resources) -> str:
    """Another registered version of the tenant's model (the champion's artifacts)."""
    registry = resources["registry"]
    champion = registry.alias_version(TENANT, "champion")
    # The artifacts' storage location, not the version's ``models:/m-...`` source: MLflow resolves a
    # logged model's id through the process-wide tracking URI, which another test may have set.
    location = registry.client.get_model_version_download_uri(champion.name, champion.version)
    return str(registry.client.create_model_version(champion.name, location, run_id=champion.run_id).version)


@pytest.fixture()
def champion_and_challenger(resources):
    """A promoted champion (so there is one to roll back to) and a challenger in shadow."""
    from mlops.core.deployment import promote_challenger, publish_from_registry

    r = resources
    r["registry"].set_alias(TENANT, "challenger", _new_version(r))
    promote_challenger(TENANT, r["registry"], r["feature_store"], r["settings"], r["warehouse"], reason="test setup")
    r["registry"].set_alias(TENANT, "challenger", _new_version(r))
    publish_from_registry(TENANT, r["registry"], r["feature_store"], r["settings"])
    state = _state(r)
    _assert_agree(state)
    assert state["manifest_challenger"] is not None and len(state["history"]) >= 2
    return state


class RegistryLock:
    """Another connection holding the MLflow database's write lock (as a long write would)."""

    def __init__(self, home: Path):
        self.con = sqlite3.connect(home / "mlflow" / "mlflow.db", isolation_level=None, check_same_thread=False)

    def __enter__(self):
        self.con.execute("BEGIN IMMEDIATE")
        return self

    def release(self) -> None:
        if self.con.in_transaction:
            self.con.execute("ROLLBACK")

    def __exit__(self, *exc):
        self.release()
        self.con.close()


def _mlops(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, **TELEMETRY_OFF, "PYTHONPATH": str(PROJECT_ROOT)}
    for key in ("MLOPS_HOME", "DAGSTER_HOME"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "mlops.cli", "--home", str(home), *args], cwd=PROJECT_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_locked_registry_fails_promote_and_rollback_clearly_and_changes_nothing(home, resources,
                                                                                  champion_and_challenger):
    before = champion_and_challenger
    audited = len(resources["warehouse"].audit_entries(TENANT))
    with RegistryLock(home):
        # Both commands at once: each waits out MLflow's SQLite busy timeout (20 s), then fails.
        promote, rollback = _mlops(home, "promote", TENANT), _mlops(home, "rollback", TENANT)
        outcomes = {name: (proc.wait(timeout=180), *proc.communicate()) for name, proc in
                    (("promote", promote), ("rollback", rollback))}
    for name, (code, out, err) in outcomes.items():
        assert code == 1, (name, out, err)
        assert "Error: the model registry (sqlite:///" in err and "did not answer setting churn-testco@champion" in err, (
            name, err)
        assert "database is locked" in err and "Traceback" not in err, (name, err)
    assert _state(resources) == before  # neither the aliases nor the manifest moved
    assert len(resources["warehouse"].audit_entries(TENANT)) == audited

    # Once the registry answers, the rollback completes, and both agree.
    from mlops.core.deployment import rollback_champion

    current, previous = rollback_champion(TENANT, resources["registry"], resources["settings"],
                                          resources["warehouse"], reason="after the lock")
    after = _state(resources)
    _assert_agree(after)
    assert (current, previous) == (before["history"][-1], before["history"][-2])
    assert after["alias_champion"] == previous and after["alias_challenger"] is None


def test_a_lost_registry_database_is_refused_not_recreated_empty(home, resources, champion_and_challenger):
    """MLflow would create an empty database in place of a missing one; in a home that has published
    models the rollback must refuse, naming the file, and create nothing."""
    before = champion_and_challenger
    database = home / "mlflow" / "mlflow.db"
    aside = database.with_name("mlflow.db.aside")
    database.rename(aside)
    try:
        rollback = _mlops(home, "rollback", TENANT)
        code, (out, err) = rollback.wait(timeout=180), rollback.communicate()
        assert code == 1, (out, err)
        assert f"the model registry's database {database} is missing" in err and "Traceback" not in err, err
        assert not database.exists()  # no empty registry created in its place
    finally:
        aside.rename(database)
    assert _state(resources) == before


def test_a_registry_lock_released_within_the_busy_timeout_lets_the_promotion_complete(home, resources,
                                                                                    champion_and_challenger):
    from mlops.core.deployment import promote_challenger

    r = resources
    with RegistryLock(home) as lock:
        threading.Timer(2.0, lock.release).start()
        started = time.monotonic()
        promote_challenger(TENANT, r["registry"], r["feature_store"], r["settings"], r["warehouse"], reason="test")
        waited = time.monotonic() - started
    after = _state(r)
    _assert_agree(after)
    assert after["manifest_champion"] == champion_and_challenger["manifest_challenger"] and waited >= 1.5


def test_a_failed_manifest_switch_moves_the_champion_alias_back(resources, champion_and_challenger):
    """The promotion's registry write succeeds, then publishing fails (the serving bundle's folder
    of the tenant's snapshots is broken: a file stands where the folder should be): the champion
    alias is moved back, so the registry and the service agree."""
    from mlops.core.deployment import promote_challenger
    from mlops.core.serving import serving_dir

    r = resources
    folder = serving_dir(r["settings"].root) / "online" / TENANT
    aside = folder.with_name(f"{TENANT}.aside")
    folder.rename(aside)
    folder.write_text("not a folder")
    try:
        with pytest.raises(FileExistsError):
            promote_challenger(TENANT, r["registry"], r["feature_store"], r["settings"], r["warehouse"], reason="test")
    finally:
        folder.unlink()
        aside.rename(folder)
    assert _state(r) == champion_and_challenger


# --- with a real daemon: the run queue, the decay sensor, run retries ---------------------------------
@pytest.fixture(scope="module")
def daemon(home, resources):
    env = {**os.environ, **TELEMETRY_OFF, "MLOPS_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "PYTHONPATH": str(PROJECT_ROOT)}
    log = home / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                                cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {"proc": proc, "log": log}
    finally:
        tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs(tree, timeout=10)
        for leftover in alive:
            leftover.kill()


def _runs(home, **filters):
    from dagster import RunsFilter

    with open_instance(home) as instance:
        return [r.dagster_run for r in instance.get_run_records(RunsFilter(**filters))]


def _finished(home, run_id):
    run = _runs(home, run_ids=[run_id])[0]
    return run if run.is_finished else None


def test_a_run_worker_killed_mid_retrain_fails_the_run_moves_no_alias_and_is_retried_once(home, resources, daemon):
    import dagster as dg

    before = _state(resources)
    _assert_agree(before)
    # The loop decides to retrain (what the monitoring step records); the decay sensor launches the run.
    with open_instance(home) as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key="model_monitoring", partition=TENANT,
            metadata={"decay_alert": True, "model_version": before["alias_champion"], "loop_action": "retrain",
                      "loop_run_key": "e1.r1", "loop_reason": "fault test",
                      "decay_alerts": dg.MetadataValue.json([{"metric": "estimated_roc_auc", "value": 0.5}])}))
    run = wait_until(lambda: next(iter(_runs(home, job_name="churn_retrain", tags={"trigger": "decay_alert"})), None),
                     "the decay sensor's retraining run", timeout_s=90, interval_s=0.5)
    assert run.tags["dagster/max_retries"] == "1"

    def worker_in_training():  # the run worker's pid, once it is training (features already written)
        with open_instance(home) as instance:
            for record in instance.all_logs(run.run_id):
                if record.is_dagster_event and record.dagster_event.event_type_value == "STEP_START" \
                        and record.step_key == "churn_model":
                    return record.dagster_event.pid
        if _finished(home, run.run_id):
            pytest.fail(f"the run ended before it was killed: {_finished(home, run.run_id).status}")
        return None

    pid = wait_until(worker_in_training, "the run worker to start training", timeout_s=120, interval_s=0.2)
    os.kill(pid, signal.SIGKILL)
    failed = wait_until(lambda: _finished(home, run.run_id), "the killed run to be marked finished", timeout_s=60)
    assert failed.status == dg.DagsterRunStatus.FAILURE
    assert _state(resources) == before  # no alias moved, nothing published

    retry = wait_until(lambda: next(iter(_runs(home, tags={"dagster/parent_run_id": run.run_id})), None),
                       "the retry of the killed run", timeout_s=60, interval_s=0.5)
    assert retry.tags["trigger"] == "decay_alert" and retry.tags["dagster/partition"] == TENANT
    done = wait_until(lambda: _finished(home, retry.run_id), "the retry to finish", timeout_s=240, interval_s=0.5)
    assert done.status == dg.DagsterRunStatus.SUCCESS, daemon["log"].read_text()[-3000:]
    assert len(_runs(home, job_name="churn_retrain")) == 2  # the decision launched one run, retried once
    after = _state(resources)
    _assert_agree(after)
    assert after["alias_challenger"] not in (before["alias_champion"], before["alias_challenger"])


def test_two_runs_of_one_partition_at_once_are_queued_and_both_succeed(home, daemon):
    """Requested together (``dagster job launch``, as the UI submits): the run queue's per-partition
    limit runs them one after the other; no DuckDB lock error reaches anyone."""
    env = {**os.environ, **TELEMETRY_OFF, "MLOPS_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "PYTHONPATH": str(PROJECT_ROOT)}
    launch = [str(Path(sys.executable).parent / "dagster"), "job", "launch", "-w", "workspace.yaml",
              "-j", "prediction_log_ingestion", "--tags", json.dumps({"dagster/partition": TENANT, "fault": "twice"})]
    procs = [subprocess.Popen(launch, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
    runs = wait_until(lambda: (rs := _runs(home, tags={"fault": "twice"})) and len(rs) == 2
                      and all(r.is_finished for r in rs) and rs, "both runs to finish", timeout_s=120, interval_s=0.5)
    from dagster import DagsterRunStatus

    assert [r.status for r in runs] == [DagsterRunStatus.SUCCESS] * 2
    with open_instance(home) as instance:
        records = sorted((instance.get_run_record_by_id(r.run_id) for r in runs), key=lambda r: r.start_time)
        messages = " ".join(str(e.message) for r in runs for e in instance.all_logs(r.run_id))
    assert records[0].end_time <= records[1].start_time, "the two runs of one partition overlapped"
    assert "lock" not in messages.lower()


def _publish_many(folder: str, model: str, snapshot: str, prefix: str, n: int) -> None:
    from mlops.core.serving import publish_tenant

    for i in range(n):
        publish_tenant(Path(folder), f"{prefix}{i}", champion=("1", Path(model)), challenger=None,
                       snapshot=(1, Path(snapshot)))


def test_publications_from_two_processes_at_once_lose_no_tenant(tmp_path):
    """Tenant workers (and run workers) publish to one manifest at the same time: every tenant
    each of them published is in it afterwards (no lost update of the read-modify-write)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from mlops.core.serving import read_manifest

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    model = tmp_path / "model.txt"
    lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(x, (x[:, 0] > 0).astype(int)),
              num_boost_round=3).save_model(str(model))
    snapshot = tmp_path / "snapshot-1.parquet"
    pd.DataFrame({"account_id": ["a"]}).to_parquet(snapshot)
    folder = tmp_path / "serving"
    n = 15
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        done = [pool.submit(_publish_many, str(folder), str(model), str(snapshot), prefix, n) for prefix in "ab"]
        for future in done:
            future.result(timeout=120)
    tenants = set(read_manifest(folder)["tenants"])
    assert tenants == {f"{p}{i}" for p in "ab" for i in range(n)}, sorted({f"{p}{i}" for p in "ab"
                                                                           for i in range(n)} - tenants)
