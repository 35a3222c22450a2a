"""Monitoring: NannyML results through the platform equal NannyML's own, decay is detected within a
week of a concept drift and never without one, the retraining sensor's dedup and cooldown, the
promotion decision and the delivery KPIs."""

from __future__ import annotations

import json
import os
import uuid

import dagster as dg
import nannyml as nml
import numpy as np
import pandas as pd
import pytest
from nannyml.thresholds import ConstantThreshold

from assets.automation import decay_retrain_sensor, retrain_job
from mlops.core.model_inputs import CATEGORICAL_FEATURES, FEATURE_COLUMNS
from mlops.core.monitoring import (
    PREDICTED,
    SCORE,
    TARGET,
    TIMESTAMP,
    TenantMonitor,
    compute_kpis,
    decay_alerts,
    prepare,
)
from mlops.replay import first_decay_day, replay_tenant
from resources.monitoring import MonitoringPolicy
from resources.tenants import TenantSpec

START, DRIFT = 150, 182
SPEC = dict(name="mon", region="eu", n_accounts=900, seed=101, days=215)


@pytest.fixture(scope="module")
def drifted():
    spec = TenantSpec(**SPEC, scenario="concept_drift", drift_day=DRIFT)
    return replay_tenant(spec, START, DRIFT + 8)


@pytest.fixture(scope="module")
def stable():
    return replay_tenant(TenantSpec(**SPEC), START, START + 60)


def test_concept_drift_alert_fires_within_seven_days(drifted):
    found = first_decay_day(drifted, MonitoringPolicy(), DRIFT + 8)
    assert found is not None, "no decay alert within 8 days of the concept drift"
    day, alert = found
    assert DRIFT <= day <= DRIFT + 7, f"decay alert on day {day}, drift began on day {DRIFT}"
    assert alert["value"] < alert["threshold"]


def test_no_drift_means_no_decay_alert_in_sixty_days(stable):
    assert first_decay_day(stable, MonitoringPolicy(), START + 60) is None


def test_monitoring_equals_nannyml_called_directly(drifted):
    """Same reference and analysis, same settings: the platform's values and alerts are NannyML's."""
    policy = MonitoringPolicy()
    analysis = drifted.analysis_as_of(DRIFT + 5)
    report = TenantMonitor(policy, drifted.reference).run(analysis)

    reference, data = prepare(drifted.reference), prepare(analysis)
    floor = report.reference_roc_auc - policy.max_auc_drop
    common = dict(timestamp_column_name=TIMESTAMP, chunk_period=policy.chunk_period)
    cbpe = nml.CBPE(metrics=["roc_auc"], y_pred_proba=SCORE, y_pred=PREDICTED, y_true=TARGET,
                    problem_type="classification_binary", thresholds={"roc_auc": ConstantThreshold(lower=floor)},
                    **common).fit(reference)
    direct_cbpe = cbpe.estimate(data).filter(period="analysis").to_df()
    ours = report.results[report.results["metric"] == "estimated_roc_auc"].sort_values("chunk_start")
    np.testing.assert_allclose(ours["value"].to_numpy(), direct_cbpe[("roc_auc", "value")].to_numpy())
    assert ours["alert"].tolist() == direct_cbpe[("roc_auc", "alert")].tolist()

    realized = nml.PerformanceCalculator(metrics=["roc_auc"], y_pred_proba=SCORE, y_pred=PREDICTED, y_true=TARGET,
                                         problem_type="classification_binary",
                                         thresholds={"roc_auc": ConstantThreshold(lower=floor)}, **common).fit(reference)
    direct_real = realized.calculate(data).filter(period="analysis").to_df()
    ours = report.results[report.results["metric"] == "realized_roc_auc"].sort_values("chunk_start")
    np.testing.assert_allclose(ours["value"].to_numpy(), direct_real[("roc_auc", "value")].to_numpy(), equal_nan=True)
    assert ours["alert"].tolist() == direct_real[("roc_auc", "alert")].fillna(False).tolist()
    assert ours["alert"].any(), "the drifted analysis should contain alerting chunks"

    uni = nml.UnivariateDriftCalculator(
        column_names=list(FEATURE_COLUMNS), treat_as_categorical=list(CATEGORICAL_FEATURES),
        continuous_methods=policy.continuous_drift_methods, categorical_methods=policy.categorical_drift_methods,
        thresholds={"jensen_shannon": ConstantThreshold(upper=policy.jensen_shannon_threshold)}, **common).fit(reference)
    direct_uni = uni.calculate(data).filter(period="analysis").to_df()
    for feature, method in (("seat_utilisation_7d", "jensen_shannon"), ("plan", "chi2")):
        mine = report.results[(report.results["metric"] == "univariate_drift") & (report.results["feature"] == feature)]
        mine = mine.sort_values("chunk_start")
        np.testing.assert_allclose(mine["value"].to_numpy(), direct_uni[(feature, method, "value")].to_numpy())
        assert mine["alert"].tolist() == direct_uni[(feature, method, "alert")].tolist()

    monitor = TenantMonitor(policy, drifted.reference)
    multi = nml.DataReconstructionDriftCalculator(
        column_names=list(FEATURE_COLUMNS), threshold=ConstantThreshold(upper=monitor.multivariate_threshold),
        **common).fit(reference)
    direct_multi = multi.calculate(data).filter(period="analysis").to_df()
    mine = report.results[report.results["metric"] == "multivariate_drift"].sort_values("chunk_start")
    np.testing.assert_allclose(mine["value"].to_numpy(), direct_multi[("reconstruction_error", "value")].to_numpy(),
                               rtol=1e-6)
    assert mine["alert"].tolist() == direct_multi[("reconstruction_error", "alert")].tolist()


def test_incremental_monitoring_equals_a_full_run(drifted):
    """Day by day, only new chunks and newly matured labels are computed; the stored results equal
    one full run over the same data."""
    from mlops.core.monitoring import run_incremental

    policy = MonitoringPolicy()
    monitor = TenantMonitor(policy, drifted.reference)
    stored = pd.DataFrame()
    for today in range(START + 31, DRIFT + 6):
        fresh, stored = run_incremental(monitor, drifted.analysis_as_of(today), stored, policy)
    full = monitor.run(drifted.analysis_as_of(DRIFT + 5)).results
    key = ["metric", "feature", "chunk_key"]

    def valued(frame):  # a chunk without labels yet has no realized value either way
        return frame[~((frame["metric"] == "realized_roc_auc") & frame["value"].isna())]
    stored, full = valued(stored), valued(full)
    a = stored.sort_values(key, na_position="first").reset_index(drop=True)
    b = full.sort_values(key, na_position="first").reset_index(drop=True)
    assert a[key].astype(str).equals(b[key].astype(str))
    np.testing.assert_allclose(a["value"].to_numpy(dtype=float), b["value"].to_numpy(dtype=float), equal_nan=True)
    assert a["alert"].tolist() == b["alert"].tolist()


def test_rows_logged_late_are_monitored_as_if_they_had_come_on_time(drifted):
    """Half of a day's predictions reach the warehouse a day late (a log segment that missed the
    ingestion): the chunk is computed again with all its rows, so the results depend on the data
    alone, not on when it arrived."""
    from mlops.core.monitoring import run_incremental

    policy = MonitoringPolicy()
    monitor = TenantMonitor(policy, drifted.reference)
    today = START + 20
    complete = drifted.analysis_as_of(today)
    newest = complete[TIMESTAMP].max()
    day = complete[complete[TIMESTAMP] == newest]
    partial = complete.drop(index=day.index[: len(day) // 2])
    _, stored = run_incremental(monitor, partial, pd.DataFrame(), policy)
    estimated = stored[(stored["metric"] == "estimated_roc_auc") & (stored["chunk_start"] == newest)]
    assert estimated["chunk_rows"].tolist() == [len(day) - len(day) // 2]
    fresh, stored = run_incremental(monitor, complete, stored, policy)
    assert set(fresh["chunk_start"]) == {newest}, "only the chunk that gained rows is computed again"
    full = monitor.run(complete).results
    key = ["metric", "feature", "chunk_key"]
    a = stored.sort_values(key, na_position="first").reset_index(drop=True)
    b = full.sort_values(key, na_position="first").reset_index(drop=True)
    assert a[key].astype(str).equals(b[key].astype(str))
    np.testing.assert_allclose(a["value"].to_numpy(dtype=float), b["value"].to_numpy(dtype=float), equal_nan=True)


def test_data_quality_is_reported(drifted):
    analysis = drifted.analysis_as_of(DRIFT + 2).copy()
    day = analysis[TIMESTAMP].max()
    analysis.loc[analysis[TIMESTAMP] == day, "events_7d"] = np.nan
    analysis.loc[analysis[TIMESTAMP] == day, "plan"] = "platinum"  # a category the model never saw
    report = TenantMonitor(MonitoringPolicy(), drifted.reference).run(analysis)
    latest = report.results[report.results["chunk_start"] == day]
    missing = latest[(latest["metric"] == "missing_values_rate") & (latest["feature"] == "events_7d")]
    unseen = latest[(latest["metric"] == "unseen_values_rate") & (latest["feature"] == "plan")]
    assert missing["value"].iloc[0] == pytest.approx(1.0) and bool(missing["alert"].iloc[0])
    assert unseen["value"].iloc[0] == pytest.approx(1.0) and bool(unseen["alert"].iloc[0])


def test_decay_alert_needs_consecutive_chunks():
    def rows(alerts):
        return pd.DataFrame({"metric": "realized_roc_auc", "value": 0.6, "lower_threshold": 0.8,
                             "alert": alerts, "chunk_key": [f"d{i}" for i in range(len(alerts))],
                             "chunk_start": pd.date_range("2026-01-01", periods=len(alerts))})
    assert decay_alerts(rows([False, True, False, True]), 2) == []
    found = decay_alerts(rows([False, False, True, True]), 2)
    assert [(a["metric"], a["chunk"]) for a in found] == [("realized_roc_auc", "d3")]


# --- the retraining sensor ---------------------------------------------------------------------
def _report(instance, tenant: str, version: str, decay: bool, action: str = "retrain", run_key: str = "e1.r1") -> int:
    """A monitoring result for one tenant and the loop's decision on it; returns its storage id."""
    metadata = {"decay_alert": decay, "model_version": version,
                "decay_alerts": dg.MetadataValue.json([{"metric": "realized_roc_auc"}] if decay else [])}
    if decay:
        metadata |= {"loop_action": action, "loop_reason": f"the loop said {action}", "loop_run_key": run_key}
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key="model_monitoring", partition=tenant, metadata=metadata))
    return instance.fetch_materializations(dg.AssetKey("model_monitoring"), limit=1).records[0].storage_id


@pytest.fixture()
def evaluate(tmp_path, monkeypatch):
    """One tick through the asset sensor's own wrapper (which reads and moves the cursor), in the
    platform's definitions (they resolve the partitioned run requests) with the given policy."""
    from definitions import build_definitions

    for key in ("MLOPS_HOME", "DAGSTER_HOME", "BENTOML_HOME", "MLFLOW_TRACKING_URI"):
        # build_definitions points these at its home; put back what the session had afterwards.
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    defs = build_definitions(str(tmp_path / "home"))

    def tick(instance, cursor):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
        with dg.partition_loading_context(dynamic_partitions_store=instance):  # as the daemon does
            return decay_retrain_sensor.evaluate_tick(context)

    return tick


def test_decay_sensor_is_an_asset_sensor_on_model_monitoring():
    assert isinstance(decay_retrain_sensor, dg.AssetSensorDefinition)
    assert decay_retrain_sensor.asset_key == dg.AssetKey("model_monitoring")
    assert decay_retrain_sensor.job_name == retrain_job.name
    assert decay_retrain_sensor.minimum_interval_seconds == 2
    assert decay_retrain_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert decay_retrain_sensor.required_resource_keys == set()


def test_decay_sensor_retrains_only_what_the_loop_decided_once_per_decision(evaluate):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tenant", ["a", "b"])
        alert_id = _report(instance, "a", "3", decay=True)
        last_id = _report(instance, "b", "1", decay=False)
        result = evaluate(instance, None)
        assert [(r.partition_key, r.run_key) for r in result.run_requests] == [("a", "decay:a:e1.r1")]
        assert result.run_requests[0].tags == {
            "trigger": "decay_alert", "decaying_version": "3",
            "alert": json.dumps([{"metric": "realized_roc_auc"}]), "alert_storage_id": str(alert_id),
            "dagster/partition": "a", "dagster/partition_set": "churn_retrain_partition_set",
            "dagster/sensor_name": "decay_retrain_sensor"}
        assert result.cursor == str(last_id)

        # The next days' alerts of the same episode: the loop holds (a challenger in shadow, too few
        # new labels) or escalates to a person; none of them launches a run.
        _report(instance, "a", "3", decay=True, action="hold")
        _report(instance, "a", "3", decay=True, action="escalate")
        second = evaluate(instance, result.cursor)
        assert second.run_requests == [] and "no retrain to launch for 2" in second.skip_message

        # Another tenant's decision is its own.
        _report(instance, "b", "1", decay=True)
        third = evaluate(instance, second.cursor)
        assert [r.run_key for r in third.run_requests] == ["decay:b:e1.r1"]

        # The run key is the decision: replaying every event launches each decided retrain once
        # (Dagster drops run requests whose key it has seen), a second retrain of the episode apart.
        _report(instance, "a", "3", decay=True, run_key="e1.r2")
        again = evaluate(instance, None)
        assert sorted(r.run_key for r in again.run_requests) == ["decay:a:e1.r1", "decay:a:e1.r2", "decay:b:e1.r1"]


def test_decay_sensor_sees_every_alert_between_two_ticks(evaluate):
    """An asset sensor is called with the latest materialization only; the alerts before it must
    not be lost, even when the latest one alerts nothing."""
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tenant", ["a", "b", "c"])
        start = _report(instance, "c", "1", decay=False)
        first = evaluate(instance, None)
        assert first.run_requests == [] and first.cursor == str(start)

        a_id = _report(instance, "a", "2", decay=True)
        b_id = _report(instance, "b", "5", decay=True)
        last_id = _report(instance, "c", "1", decay=False)
        second = evaluate(instance, first.cursor)
        assert [(r.partition_key, r.run_key, r.tags["alert_storage_id"]) for r in second.run_requests] == [
            ("a", "decay:a:e1.r1", str(a_id)), ("b", "decay:b:e1.r1", str(b_id))]
        assert second.cursor == str(last_id)

        # The cursor moved past them: a tick with nothing new launches nothing.
        third = evaluate(instance, second.cursor)
        assert third.run_requests == [] and third.cursor == second.cursor


def test_decay_sensor_ignores_results_without_a_decay_alert(evaluate):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tenant", ["a"])
        _report(instance, "a", "1", decay=False)
        # A materialization with no decay_alert entry at all (reported by hand, say) is no alert either.
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key="model_monitoring", partition="a", metadata={"model_version": "1"}))
        result = evaluate(instance, None)
        assert result.run_requests == [] and "no retrain to launch for 2" in result.skip_message


def test_decay_sensor_reads_up_to_the_event_the_asset_sensor_hands_it():
    from assets.automation import _materializations_through

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tenant", ["a"])
        ids = [_report(instance, "a", str(v), decay=True) for v in range(4)]
        records = instance.fetch_materializations(dg.AssetKey("model_monitoring"), limit=10, ascending=True).records
        # A materialization stored after the asset sensor picked its latest event waits for the next tick.
        through = _materializations_through(instance, str(ids[0]), records[2].event_log_entry)
        assert [r.storage_id for r in through] == ids[1:3]
        assert [r.storage_id for r in _materializations_through(instance, None, records[3].event_log_entry)] == ids


# --- promotion and KPIs ------------------------------------------------------------------------
def test_promotion_decision():
    from mlops.core.shadow import promotion_decision

    policy = MonitoringPolicy(promotion_auc_tolerance=0.02, promotion_max_p99_ms=10, promotion_min_labelled_rows=200)
    good = {"champion_estimated_roc_auc": 0.94, "challenger_estimated_roc_auc": 0.91, "labelled_rows": 4000,
            "champion_realized_roc_auc": 0.70, "challenger_realized_roc_auc": 0.78, "challenger_p99_ms": 2.0}
    # Realized evidence decides when there is enough of it (CBPE cannot see a concept drift).
    decision, reason = promotion_decision(good, policy)
    assert decision == "promote" and "realized ROC AUC 0.7800 vs champion 0.7000 on 4000" in reason
    worse = good | {"challenger_realized_roc_auc": 0.60}
    decision, reason = promotion_decision(worse, policy)
    assert decision == "retire" and "realized ROC AUC 0.6000" in reason
    # Without enough labels, the CBPE estimates decide.
    unlabelled = good | {"labelled_rows": 50}
    decision, reason = promotion_decision(unlabelled, policy)
    assert decision == "retire" and "estimated ROC AUC 0.9100" in reason
    assert promotion_decision(unlabelled | {"challenger_estimated_roc_auc": 0.935}, policy)[0] == "promote"
    slow = good | {"challenger_p99_ms": 25.0}
    decision, reason = promotion_decision(slow, policy)
    assert decision == "retire" and "p99 25.00 ms" in reason


def test_promotion_decision_for_a_regression_and_a_binary_pr_auc_use_case():
    """The generic decision: regression compares RMSE (lower is better, tolerance relative to the
    champion's), a binary use case that declares ``min_pr_auc`` compares PR AUC."""
    from types import SimpleNamespace

    from mlops.core.shadow import PR_AUC, RMSE, ROC_AUC, promotion_decision, promotion_metric, shadow_table

    policy = MonitoringPolicy(promotion_auc_tolerance=0.02, promotion_rmse_tolerance=0.05, promotion_max_p99_ms=10,
                              promotion_min_labelled_rows=200)
    assert promotion_metric(SimpleNamespace(problem_type="regression", gates={})) == RMSE
    assert promotion_metric(SimpleNamespace(problem_type="binary", gates={"min_pr_auc": 0.25})) == PR_AUC
    assert promotion_metric(SimpleNamespace(problem_type="binary", gates={})) == ROC_AUC
    assert promotion_metric(None) == ROC_AUC  # churn
    assert (shadow_table(), shadow_table("fraud")) == ("shadow_comparisons", "shadow_comparisons_fraud")

    spend = {"champion_realized_rmse": 20.0, "challenger_realized_rmse": 16.0, "labelled_rows": 800,
             "champion_estimated_rmse": 15.0, "challenger_estimated_rmse": 18.0, "challenger_p99_ms": 1.0}
    decision, reason = promotion_decision(spend, policy, RMSE)
    assert decision == "promote" and "realized RMSE 16.0000 vs champion 20.0000 on 800" in reason
    # within 5% of the champion's RMSE: not worse beyond the tolerance; above it: retired
    assert promotion_decision(spend | {"challenger_realized_rmse": 20.9}, policy, RMSE)[0] == "promote"
    decision, reason = promotion_decision(spend | {"challenger_realized_rmse": 21.5}, policy, RMSE)
    assert decision == "retire" and "realized RMSE 21.5000 is worse than the champion's 20.0000" in reason
    # without labels the DLE estimates decide (here: the challenger is estimated 20% worse)
    decision, reason = promotion_decision(spend | {"labelled_rows": 10}, policy, RMSE)
    assert decision == "retire" and "estimated RMSE 18.0000" in reason

    fraud = {"champion_realized_average_precision": 0.30, "challenger_realized_average_precision": 0.62,
             "champion_realized_roc_auc": 0.99, "challenger_realized_roc_auc": 0.90,
             "labelled_rows": 2500, "challenger_p99_ms": 2.0}
    decision, reason = promotion_decision(fraud, policy, PR_AUC)
    assert decision == "promote" and "realized PR AUC 0.6200 vs champion 0.3000" in reason
    # the same evidence judged by ROC AUC would retire it: the metric is the use case's, not churn's
    assert promotion_decision(fraud, policy, ROC_AUC)[0] == "retire"
    decision, reason = promotion_decision(fraud | {"challenger_realized_average_precision": 0.25}, policy, PR_AUC)
    assert decision == "retire" and "PR AUC 0.2500 is worse" in reason
    decision, reason = promotion_decision({"labelled_rows": 0, "challenger_p99_ms": 2.0}, policy, PR_AUC)
    assert decision == "retire" and "no PR AUC evidence" in reason


def test_kpis_from_audit_log_and_health_checks():
    t0 = pd.Timestamp("2026-11-01 10:00:00")

    def entry(seq, minutes, action, outcome="ok", details=None):
        return {"seq": seq, "recorded_at": t0 + pd.Timedelta(minutes=minutes), "action": action,
                "outcome": outcome, "details": json.dumps(details or {})}
    audit_log = pd.DataFrame([
        entry(1, 0, "alias_assigned", details={"aliases": ["challenger", "champion"]}),
        entry(2, 60, "decay_alert"), entry(3, 61, "decay_alert"),
        entry(4, 62, "gate:roc_auc_gate", "failed"), entry(5, 63, "gate:roc_auc_gate", "passed"),
        entry(6, 65, "promotion_gate", "passed"), entry(7, 65, "promotion"),
        entry(8, 24 * 60 * 7, "rollback"),
    ])
    health = pd.DataFrame({"at": [0, 10, 20, 30, 40], "ok": [False, True, True, False, True], "detail": ""})
    kpis = compute_kpis(audit_log, ["SUCCESS", "FAILURE", "SUCCESS"], health)
    assert kpis["decay_alerts"] == 2 and kpis["promotions"] == 1 and kpis["deployments"] == 2
    assert kpis["mean_alert_to_promotion_s"] == pytest.approx(5 * 60)
    assert kpis["rollbacks"] == 1 and kpis["gate_failures"] == 1 and kpis["failed_runs"] == 1
    assert kpis["deployments_per_week"] == pytest.approx(2.0)
    assert kpis["uptime_ratio"] == pytest.approx(3 / 4)  # probes before the service first came up do not count


NO_NETWORK_SCRIPT = """
import os, socket
for key in ("NML_DISABLE_USAGE_LOGGING", "DO_NOT_TRACK"):
    os.environ.pop(key, None)
attempts = []
def guard(self, address):
    attempts.append(address)
    raise OSError("network disabled in this test")
socket.socket.connect = guard
real_getaddrinfo = socket.getaddrinfo
def resolve_guard(host, *args, **kwargs):
    if host not in ("localhost", "127.0.0.1", "::1", None):
        attempts.append(host)
        raise OSError("name resolution disabled in this test")
    return real_getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = resolve_guard
import numpy as np, pandas as pd
from mlops.core.model_inputs import CATEGORICAL_FEATURES, NUMERIC_FEATURES
from mlops.core.monitoring import TenantMonitor
from resources.monitoring import MonitoringPolicy
rng = np.random.default_rng(0)
def frame(n, start):
    data = {c: rng.gamma(2.0, 3.0, n) for c in NUMERIC_FEATURES}
    data |= {c: rng.choice(list(levels), n) for c, levels in CATEGORICAL_FEATURES.items()}
    data["score"] = rng.random(n)
    data["churned"] = (rng.random(n) < data["score"]).astype(int)
    data["timestamp"] = pd.Timestamp(start) + pd.to_timedelta(rng.integers(0, 5, n), unit="D")
    return pd.DataFrame(data)
TenantMonitor(MonitoringPolicy(), frame(3000, "2026-01-01")).run(frame(3000, "2026-02-01"))
import time; time.sleep(1)  # nannyml's analytics client sends from a background thread
assert not attempts, attempts
print("no network")
"""


def test_monitoring_never_calls_home():
    """NannyML reports usage to an analytics host unless told not to; importing the platform tells it."""
    import subprocess
    import sys

    from mlops.core.environment import PROJECT_ROOT

    proc = subprocess.run([sys.executable, "-c", NO_NETWORK_SCRIPT], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "no network" in proc.stdout, proc.stderr[-3000:]


def test_operational_summary_is_computed_in_duckdb_with_pandas_percentiles():
    import duckdb

    from mlops.core.monitoring import operational_summary
    from mlops.core.prediction_log import PREDICTION_LOG_DDL

    rng = np.random.default_rng(7)
    rows = []
    for version, role, n in (("1", "champion", 500), ("2", "challenger", 300), ("2", "champion", 40)):
        for i, latency in enumerate(rng.gamma(2.0, 0.5, n)):
            rows.append((uuid.uuid4().hex, "t", f"a{i}", role, version, float(rng.random()), float(latency), 1,
                         "predict", pd.Timestamp("2026-11-01") + pd.Timedelta(seconds=i), "s"))
    rows[3] = rows[3][:5] + (float("nan"),) + rows[3][6:]  # errors: not a probability
    rows[4] = rows[4][:5] + (1.5,) + rows[4][6:]
    rows[501] = rows[501][:5] + (float("inf"),) + rows[501][6:]
    recent = pd.Timestamp.now(tz="UTC").tz_localize(None) - pd.Timedelta(hours=1)
    for i in (0, 1, 2, 600):  # three champion v1 rows and one challenger row in the last 24 hours
        rows[i] = rows[i][:9] + (recent,) + rows[i][10:]
    con = duckdb.connect()
    con.execute(PREDICTION_LOG_DDL)
    assert operational_summary(con).empty
    con.executemany("INSERT INTO prediction_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    summary = operational_summary(con)
    log = pd.DataFrame(rows, columns=[c[0] for c in con.execute("DESCRIBE prediction_log").fetchall()])
    assert summary[["model_version", "role"]].values.tolist() == [["1", "champion"], ["2", "challenger"], ["2", "champion"]]
    for _, row in summary.iterrows():
        part = log[(log["model_version"] == row["model_version"]) & (log["role"] == row["role"])]
        assert row["predictions"] == len(part)
        assert np.allclose([row["p50_ms"], row["p95_ms"], row["p99_ms"]],
                           part["latency_ms"].quantile([0.5, 0.95, 0.99]).to_numpy(), rtol=1e-12)
    assert summary["errors"].tolist() == [2, 1, 0]
    assert summary["last_24h"].tolist() == [3, 1, 0]
