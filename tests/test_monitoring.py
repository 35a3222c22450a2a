"""Monitoring: NannyML results through the platform equal NannyML's own, decay is detected within
twelve days of a concept drift (with evidence beyond the accounts' noise) and never without one, the retraining sensor's dedup and cooldown, the
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
    TIMESTAMP,
    TenantMonitor,
    compute_kpis,
    decay_alerts,
)
from mlops.replay import first_decay_day, replay_tenant
from resources.monitoring import MonitoringPolicy
from resources.tenants import TenantSpec

START, DRIFT = 150, 182
SPEC = dict(name="mon", region="eu", n_accounts=900, seed=101, days=215)


@pytest.fixture(scope="module")
def drifted():
    spec = TenantSpec(**SPEC, scenario="concept_drift", drift_day=DRIFT)
    return replay_tenant(spec, START, DRIFT + 13)


@pytest.fixture(scope="module")
def stable():
    return replay_tenant(TenantSpec(**SPEC), START, START + 60)


def platform_decay_alerts(replayed, first: int, last: int, policy: MonitoringPolicy) -> list[tuple[int, dict]]:
    """The decay alerts the monitoring asset would raise, day by day from ``first`` to ``last``: each
    day the platform's own step (``monitoring_step``: incremental results judged against the version's
    floor from ``decay_floor``, each alerting chunk alerted once) over the predictions logged before
    that day and the labels matured by then. What a day finds stored is cut from one full run (chunks
    before the day; realized values only where the labels had matured), which the incremental step
    equals (test_incremental_monitoring_equals_a_full_run): the daily steps then recompute nothing,
    and decide exactly as the asset does."""
    import duckdb

    from mlops.core.loop import decay_floor
    from mlops.core.monitoring import monitoring_step
    from resources.feature_store import LABEL_HORIZON_DAYS
    from usecases.churn.simulator import SIMULATION_START

    monitor = TenantMonitor(policy, replayed.reference)
    with duckdb.connect() as con:
        floor, _ = decay_floor(con, "churn", "1", monitor.own_bound)
    full = monitor.run(replayed.analysis_as_of(last)).results
    realized = full["metric"] == monitor.realized_metric
    raised, found = set(), []
    for today in range(first, last + 1):
        now = pd.Timestamp(SIMULATION_START) + pd.Timedelta(days=today)
        analysis = replayed.analysis_as_of(today)
        analysis = analysis[analysis[TIMESTAMP] >= now - pd.Timedelta(days=policy.analysis_window_days)]
        mature = full["chunk_start"] + pd.Timedelta(days=LABEL_HORIZON_DAYS) <= now
        stored = full[(full["chunk_start"] < now) & (~realized | mature)]
        fresh, _, decay = monitoring_step(monitor, analysis, stored, raised, floor, policy)
        assert fresh.empty, f"day {today}: the stored cut is not what the platform would have stored"
        raised |= {(a["metric"], a["chunk"]) for a in decay}
        found += [(today, a) for a in decay]
    return found


def test_concept_drift_alert_fires_within_twelve_days(drifted):
    """The default policy asks for evidence beyond the accounts' noise (``decay_confidence``): the
    same world alerts 5 days earlier without it, on chunks that alone would not be evidence."""
    found = platform_decay_alerts(drifted, DRIFT - 10, DRIFT + 13, MonitoringPolicy())
    assert found, "no decay alert within 13 days of the concept drift"
    day, alert = found[0]
    assert DRIFT <= day <= DRIFT + 12, f"decay alert on day {day}, drift began on day {DRIFT}"
    assert alert["value"] < alert["threshold"]
    # the offline shortcut (one run, the rule applied afterwards) agrees with the platform's daily steps
    assert first_decay_day(drifted, MonitoringPolicy(), DRIFT + 13)[0] == day
    # without the evidence the rule alerts earlier, on the first three chunks under the floor
    quick = platform_decay_alerts(drifted, DRIFT - 10, DRIFT + 13, MonitoringPolicy(decay_confidence=0.0))
    assert quick and DRIFT <= quick[0][0] < day
    assert first_decay_day(drifted, MonitoringPolicy(decay_confidence=0.0), DRIFT + 13)[0] == quick[0][0]


def test_no_drift_means_no_decay_alert_in_sixty_days(stable):
    found = platform_decay_alerts(stable, START + 1, START + 60, MonitoringPolicy())
    assert found == [], f"decay alerts without a drift: {found[:3]}"


def _nannyml_inputs(drifted, today: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference and analysis as NannyML reads them, built here from the replay's raw frames (the
    scores logged per account and day, the churn events), not by the platform's ``prepare`` or
    ``analysis_as_of``: a label is known once its 30-day window has closed by ``today``."""
    from mlops.core.monitoring import DECISION_THRESHOLD
    from resources.feature_store import LABEL_HORIZON_DAYS
    from usecases.churn.simulator import SIMULATION_START

    def nannyml_frame(frame: pd.DataFrame, label: pd.Series) -> pd.DataFrame:
        out = pd.DataFrame({c: frame[c].astype("float64") for c in FEATURE_COLUMNS if c not in CATEGORICAL_FEATURES})
        out = out.assign(**{c: frame[c].astype(object) for c in CATEGORICAL_FEATURES},
                         timestamp=pd.to_datetime(frame["timestamp"]), score=frame["score"].astype("float64"),
                         predicted=(frame["score"] >= DECISION_THRESHOLD).astype(int), label=label.astype("float64"))
        return out.sort_values("timestamp", kind="stable").reset_index(drop=True)

    reference = nannyml_frame(drifted.reference, drifted.reference["churned"])
    now = pd.Timestamp(SIMULATION_START) + pd.Timedelta(days=today)
    logged = drifted.predictions[drifted.predictions["timestamp"] < now]
    churned = dict(zip(drifted.churn["account_id"], drifted.churn["churned_at"], strict=True))
    window_end = logged["timestamp"] + pd.Timedelta(days=LABEL_HORIZON_DAYS)
    churned_at = pd.to_datetime(logged["account_id"].map(churned))
    label = (churned_at < window_end).astype(float).where(window_end <= now)
    return reference, nannyml_frame(logged, label)


def test_monitoring_equals_nannyml_called_directly(drifted):
    """Same reference and analysis, same settings: every value and alert the platform reports (each
    feature's univariate drift, multivariate drift, estimated and realized ROC AUC, missing and unseen
    values per column) is NannyML's own, with inputs built independently of the platform's code."""
    from sklearn.metrics import roc_auc_score

    policy = MonitoringPolicy()
    today = DRIFT + 5
    report = TenantMonitor(policy, drifted.reference).run(drifted.analysis_as_of(today))
    ours = report.results

    reference, data = _nannyml_inputs(drifted, today)
    assert len(data) == int(ours.loc[ours["metric"] == "estimated_roc_auc", "chunk_rows"].sum())
    floor = roc_auc_score(reference["label"], reference["score"]) - policy.max_auc_drop
    assert report.reference_roc_auc - policy.max_auc_drop == pytest.approx(floor, abs=1e-12)
    common = dict(timestamp_column_name="timestamp", chunk_period=policy.chunk_period)
    classification = dict(y_pred_proba="score", y_pred="predicted", y_true="label", metrics=["roc_auc"],
                          problem_type="classification_binary", thresholds={"roc_auc": ConstantThreshold(lower=floor)})
    features, categorical = list(FEATURE_COLUMNS), list(CATEGORICAL_FEATURES)
    # NannyML's own calculators, each column of each result a (metric, feature, method) of ours
    direct = {
        "estimated_roc_auc": nml.CBPE(**classification, **common).fit(reference).estimate(data),
        "realized_roc_auc": nml.PerformanceCalculator(**classification, **common).fit(reference).calculate(data),
        "missing_values_rate": nml.MissingValuesCalculator(column_names=features, **common)
        .fit(reference).calculate(data),
        "unseen_values_rate": nml.UnseenValuesCalculator(column_names=categorical, **common)
        .fit(reference).calculate(data),
        "univariate_drift": nml.UnivariateDriftCalculator(
            column_names=features, treat_as_categorical=categorical,
            continuous_methods=["jensen_shannon"], categorical_methods=["chi2"],
            thresholds={"jensen_shannon": ConstantThreshold(upper=policy.jensen_shannon_threshold)},
            **common).fit(reference).calculate(data),
    }
    probe = nml.DataReconstructionDriftCalculator(column_names=features, **common).fit(reference)
    reference_error = probe.calculate(reference).to_df()[("reconstruction_error", "value")].mean()
    direct["multivariate_drift"] = nml.DataReconstructionDriftCalculator(
        column_names=features, threshold=ConstantThreshold(upper=reference_error * (1 + policy.multivariate_drift_margin)),
        **common).fit(reference).calculate(data)

    expected = {}
    for metric, result in direct.items():
        frame = result.filter(period="analysis").to_df()
        keys = frame[next(c for c in frame.columns if c[0] == "chunk" and c[-1] == "key")].astype(str).tolist()
        columns = {c[:-1] for c in frame.columns if c[0] != "chunk" and c[-1] == "value"}
        for column in columns:
            feature = {"estimated_roc_auc": None, "realized_roc_auc": None, "multivariate_drift": None}.get(
                metric, column[0])
            def col(name, column=column, frame=frame):
                found = frame[(*column, name)] if (*column, name) in frame.columns else pd.Series(np.nan, frame.index)
                return pd.to_numeric(found, errors="coerce")
            for key, *row in zip(keys, col("value"), col("lower_threshold"), col("upper_threshold"),
                                 frame[(*column, "alert")].fillna(False), strict=True):
                expected[(metric, feature, key)] = (*map(float, row[:3]), bool(row[3]))
    mine = {(r.metric, None if pd.isna(r.feature) else r.feature, r.chunk_key):
            (float(r.value), float(r.lower_threshold), float(r.upper_threshold), bool(r.alert))
            for r in ours.itertuples()}
    # every metric the platform reports, and for every feature, is one NannyML computed here
    assert set(mine) == set(expected), (set(mine) ^ set(expected))
    assert {m for m, _, _ in mine} == set(direct)
    assert {f for m, f, _ in mine if m == "univariate_drift"} == set(features)
    keys = sorted(expected, key=str)
    for i, what in enumerate(("value", "lower threshold", "upper threshold")):
        np.testing.assert_allclose([mine[k][i] for k in keys], [expected[k][i] for k in keys], rtol=1e-6,
                                   equal_nan=True, err_msg=what)
    assert [mine[k][3] for k in keys] == [expected[k][3] for k in keys]
    assert any(mine[k][3] for k in keys if k[0] == "realized_roc_auc"), "the drifted analysis should alert"
    assert any(mine[k][3] for k in keys if k[0] == "univariate_drift")


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


def test_a_chunk_of_one_row_is_monitored_without_numpy_warnings(drifted):
    """The first day of a new champion can hold a single request: its chunk gets a reconstruction
    error (its sampling error is NaN) and monitoring prints no numpy RuntimeWarning."""
    import warnings

    monitor = TenantMonitor(MonitoringPolicy(), drifted.reference)
    analysis = drifted.analysis_as_of(START + 20)
    newest = analysis[TIMESTAMP].max()
    analysis = pd.concat([analysis[analysis[TIMESTAMP] < newest], analysis[analysis[TIMESTAMP] == newest].head(1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        results = monitor.run(analysis).results
    one = results[(results["metric"] == "multivariate_drift") & (results["chunk_start"] == newest)]
    assert one["chunk_rows"].tolist() == [1] and np.isfinite(one["value"]).all()


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


def test_a_realized_decay_alert_must_be_beyond_the_noise_of_its_accounts():
    """The same accounts are scored every day and one label window spans many daily chunks, so three
    consecutive chunks are nearly one observation: a pooled ROC AUC of 0.74 over 36 churners is not
    evidence against a 0.81 floor, over 360 it is, and a model at chance is at once."""
    from types import SimpleNamespace

    from mlops.core.monitoring import CHURN_SPEC, decay_evidence

    def evidence(n_accounts: int, separation: float):
        rng = np.random.default_rng(3)
        churns = rng.random(n_accounts) < 0.04
        scores = churns * separation + rng.normal(size=n_accounts)  # per account, the same every day
        days = pd.date_range("2026-03-01", periods=3)
        analysis = pd.concat([pd.DataFrame({"account_id": np.arange(n_accounts), TIMESTAMP: day,
                                            CHURN_SPEC.target: churns.astype(float), "score": scores})
                              for day in days], ignore_index=True)
        results = pd.DataFrame({"metric": "realized_roc_auc", "value": 0.7, "chunk_start": days,
                                "chunk_end": days + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)})
        alert = {"metric": "realized_roc_auc", "consecutive_chunks": 3}
        return decay_evidence(SimpleNamespace(spec=CHURN_SPEC), analysis, results, alert, bound=0.81,
                              confidence=0.99)

    noise, upper = evidence(900, 1.2)  # ROC AUC 0.738 over 35 churners
    assert not noise and upper > 0.81
    assert evidence(9000, 1.05)[0]  # ROC AUC 0.744 over ten times the accounts
    assert evidence(900, 0.0)[0]  # at chance


def test_a_label_free_alert_needs_enough_expected_positives_to_be_beyond_the_noise():
    """A label-free (CBPE-estimated) alert is judged on what the realized metric would be if the
    calibrated probabilities hold: 1,800 payments of a week that expect 0.6 frauds in all (a small
    tenant's fraud) cannot carry an alert on a 0.59 PR AUC floor, however low the point estimate;
    ten times the payments at ten times the rate, with a model barely above chance, can."""
    from types import SimpleNamespace

    from mlops.core.monitoring import CHURN_SPEC, decay_evidence

    monitor = SimpleNamespace(spec=CHURN_SPEC, estimator=SimpleNamespace(needs_calibration=False, calibrator=None))

    def evidence(n_rows: int, mean_rate: float, spread: float, metric: str, bound: float):
        rng = np.random.default_rng(5)
        days = pd.date_range("2026-03-01", periods=7)
        proba = np.clip(mean_rate * np.exp(spread * rng.normal(size=n_rows)) / np.exp(spread**2 / 2), 0, 1)
        analysis = pd.DataFrame({"account_id": np.arange(n_rows), TIMESTAMP: days[np.arange(n_rows) % 7],
                                 CHURN_SPEC.target: np.nan, "score": proba})
        results = pd.DataFrame({"metric": metric, "value": 0.02, "chunk_start": days,
                                "chunk_end": days + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)})
        alert = {"metric": metric, "consecutive_chunks": 7}
        return decay_evidence(monitor, analysis, results, alert, bound=bound, confidence=0.99)

    rare, upper = evidence(1800, 0.6 / 1800, 1.0, "estimated_average_precision", bound=0.59)
    assert not rare and upper > 0.59
    assert evidence(18000, 60 / 18000, 0.3, "estimated_average_precision", bound=0.59)[0]
    # churn's ROC AUC: a model whose calibrated probabilities barely separate is under a 0.81 floor
    significant, upper = evidence(2700, 0.05, 0.2, "estimated_roc_auc", bound=0.81)
    assert significant and upper < 0.81
    # ...and one that separates well is not
    assert not evidence(2700, 0.05, 2.0, "estimated_roc_auc", bound=0.81)[0]


# --- the retraining sensor ---------------------------------------------------------------------
def _report(instance, tenant: str, version: str, decay: bool, action: str = "retrain", run_key: str = "e1.r1",
            standing: bool = False) -> int:
    """A monitoring result for one tenant and the loop's decision on it (``standing``: a decision
    without a new alert, an open episode's due first retrain); returns its storage id."""
    metadata = {"decay_alert": decay, "model_version": version,
                "decay_alerts": dg.MetadataValue.json([{"metric": "realized_roc_auc"}] if decay else [])}
    if decay or standing:
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
            "dagster/sensor_name": "decay_retrain_sensor", "dagster/max_retries": "1"}
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

        # An open episode's first retrain falls due on a day without a new alert: it is launched too.
        _report(instance, "b", "1", decay=False, run_key="e2.r1", standing=True)
        due = evaluate(instance, third.cursor)
        assert [r.run_key for r in due.run_requests] == ["decay:b:e2.r1"]

        # The run key is the decision: replaying every event launches each decided retrain once
        # (Dagster drops run requests whose key it has seen), a second retrain of the episode apart.
        _report(instance, "a", "3", decay=True, run_key="e1.r2")
        again = evaluate(instance, None)
        assert sorted(r.run_key for r in again.run_requests) == ["decay:a:e1.r1", "decay:a:e1.r2", "decay:b:e1.r1",
                                                                 "decay:b:e2.r1"]


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
import os, sys
import numpy as np, pandas as pd
import segment.analytics as segment  # nannyml's analytics client
from mlops.core.model_inputs import CATEGORICAL_FEATURES, NUMERIC_FEATURES
from mlops.core.monitoring import TenantMonitor
from resources.monitoring import MonitoringPolicy
if sys.argv[1] == "undo":  # the control: the platform's switch undone after import
    os.environ.pop("NML_DISABLE_USAGE_LOGGING")
tracked = []
real_track = segment.track
segment.track = lambda *a, **k: (tracked.append(a[1]), real_track(*a, **k))
rng = np.random.default_rng(0)
def frame(n, start):
    data = {c: rng.gamma(2.0, 3.0, n) for c in NUMERIC_FEATURES}
    data |= {c: rng.choice(list(levels), n) for c, levels in CATEGORICAL_FEATURES.items()}
    data["score"] = rng.random(n)
    data["churned"] = (rng.random(n) < data["score"]).astype(int)
    data["timestamp"] = pd.Timestamp(start) + pd.to_timedelta(rng.integers(0, 5, n), unit="D")
    return pd.DataFrame(data)
TenantMonitor(MonitoringPolicy(), frame(1000, "2026-01-01")).run(frame(1000, "2026-02-01"))
if segment.default_client is not None:
    segment.flush()  # returns once every queued event was sent (here: refused by the socket guard)
print("tracked", len(tracked))
"""


def test_monitoring_never_calls_home(tmp_path):
    """NannyML reports usage to an analytics host (Segment) unless told not to; importing the platform
    tells it. A monitoring run under the socket guard (tests/socket_guard.py), with no telemetry
    variable set by the caller, queues no usage event and opens no connection off the machine; the
    analytics queue is flushed before the check, so a late send from its background thread cannot
    slip past. The control (run alongside) undoes the platform's switch: events are queued and the
    guard records the attempt to send them."""
    import subprocess
    import sys

    from mlops.core.environment import TELEMETRY_OFF
    from tests.socket_guard import guarded_env, read_record

    runs = {}
    for switch in ("platform", "undo"):
        env, record = guarded_env(tmp_path / switch)
        for key in TELEMETRY_OFF:
            env.pop(key, None)
        proc = subprocess.Popen([sys.executable, "-c", NO_NETWORK_SCRIPT, switch], cwd=tmp_path / switch, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[switch] = (proc, record)
    found = {}
    for switch, (proc, record) in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        loaded, attempts = read_record(record)
        assert loaded, "the socket guard was not loaded"
        found[switch] = (int(out.split("tracked")[-1]), attempts)
    assert found["platform"] == (0, []), found["platform"]
    tracked, attempts = found["undo"]
    assert tracked > 0 and any("segment.io" in a["target"] for a in attempts), (tracked, attempts)


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


# --- the fitted-monitor cache and the delivery KPIs asset ----------------------------------------
def test_fitted_monitor_is_cached_per_version_and_policy(drifted, tmp_path):
    """``load_or_fit`` fits a version's monitor once and reuses the stored one after (the reference
    is not even read again); another version (another reference) or another policy fits anew."""
    from mlops.core.monitoring import load_or_fit, monitor_path

    loads = []

    def loader(frame):
        return lambda: loads.append(len(frame)) or frame

    policy, reference = MonitoringPolicy(), drifted.reference
    analysis = drifted.analysis_as_of(START + 40)
    first, fitted = load_or_fit(tmp_path, "mon", "1", policy, loader(reference))
    assert fitted and loads == [len(reference)] and monitor_path(tmp_path, "mon", "1", policy).exists()
    stored = monitor_path(tmp_path, "mon", "1", policy).stat().st_mtime_ns
    again, fitted = load_or_fit(tmp_path, "mon", "1", policy, loader(reference))
    assert not fitted and loads == [len(reference)], "a cached monitor must not read its reference again"
    assert again is not first and monitor_path(tmp_path, "mon", "1", policy).stat().st_mtime_ns == stored
    pd.testing.assert_frame_equal(again.run(analysis).results, first.run(analysis).results)

    # version 2: its own reference (here: the newer half of the holdout), fitted on first use
    newer = reference[reference[TIMESTAMP] >= reference[TIMESTAMP].median()]
    second, fitted = load_or_fit(tmp_path, "mon", "2", policy, loader(newer))
    assert fitted and loads == [len(reference), len(newer)]
    assert second.reference_roc_auc != pytest.approx(first.reference_roc_auc, abs=1e-9)
    # another policy of the same version: another file, fitted anew with the new thresholds
    stricter = MonitoringPolicy(max_auc_drop=0.01)
    third, fitted = load_or_fit(tmp_path, "mon", "1", stricter, loader(reference))
    assert fitted and len(loads) == 3 and third.auc_floor == pytest.approx(first.reference_roc_auc - 0.01)
    assert monitor_path(tmp_path, "mon", "1", stricter) != monitor_path(tmp_path, "mon", "1", policy)


def test_delivery_kpis_asset_counts_what_the_audit_log_and_runs_say(platform_home):
    """The delivery KPIs asset, materialized in the session home, reports the figures of the tenant's
    audit log (read here with SQL) and of its Dagster runs."""
    from assets.monitoring import delivery_kpis
    from tests.conftest import TEST_TENANT

    tenant, defs = TEST_TENANT.name, platform_home["defs"]
    warehouse = defs.resources["warehouse"]
    with warehouse.connect(tenant, read_only=True) as con:
        log = con.execute("SELECT seq, action, outcome, details, recorded_at FROM audit_log ORDER BY seq").df()
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        episodes = con.execute("SELECT count(*) FROM loop_episodes").fetchone()[0] if "loop_episodes" in tables else 0
    champions = sum("champion" in json.loads(d or "{}").get("aliases", []) for d, a in
                    zip(log["details"], log["action"], strict=True) if a == "alias_assigned")
    assert champions >= 1, "the session pipeline assigns a first champion"
    gate_failures = int((log["action"].str.startswith("gate:") | (log["action"] == "promotion_gate"))
                        .where(log["outcome"] == "failed", False).sum())
    with platform_home["instance"]() as instance:
        runs_before = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": tenant}))
        result = dg.materialize([delivery_kpis], partition_key=tenant, instance=instance,
                                resources={k: defs.resources[k] for k in ("warehouse", "settings")})
        assert result.success
        stored = instance.fetch_materializations(dg.AssetKey("delivery_kpis"), limit=1).records[0]
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("delivery_kpis")[0].metadata.items()}
    assert stored.event_log_entry.asset_materialization.partition == tenant
    promotions = int((log["action"] == "promotion").sum())
    assert metadata["decay_alerts"] == int((log["action"] == "decay_alert").sum())
    assert metadata["promotions"] == promotions
    assert metadata["deployments"] == promotions + champions
    assert metadata["rollbacks"] == int((log["action"] == "rollback").sum())
    assert metadata["gate_failures"] == gate_failures
    span_days = max((log["recorded_at"].max() - log["recorded_at"].min()).total_seconds() / 86400, 1.0)
    assert metadata["deployments_per_week"] == pytest.approx((promotions + champions) / span_days * 7)
    # the run history: every run of the tenant's partition before, and this one (in progress)
    assert metadata["runs"] == len(runs_before) + 1
    assert metadata["failed_runs"] == sum(r.status == dg.DagsterRunStatus.FAILURE for r in runs_before)
    assert metadata["decay_episodes"] == episodes


@pytest.mark.parametrize("metric", ["realized_average_precision", "realized_roc_auc"])
def test_the_batched_bootstrap_metric_is_sklearns(metric):
    """``batched_binary_metric`` (the bootstraps of ``decay_evidence``, hundreds of draws scored at
    once) gives sklearn's average precision and ROC AUC: tied scores, sample weights with zeros (a
    resampled entity drawn no time), many label vectors or many weight vectors, and NaN for a draw
    with one class, which sklearn refuses."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from mlops.core.monitoring import batched_binary_metric

    sk = average_precision_score if metric.endswith("average_precision") else roc_auc_score
    rng = np.random.default_rng(3)
    for _ in range(40):
        n = int(rng.integers(5, 300))
        score = np.round(rng.random(n), int(rng.integers(1, 4)))  # ties
        labels = (rng.random((12, n)) < rng.uniform(0.02, 0.5)).astype(float)
        weights = rng.multinomial(n, np.full(n, 1 / n), size=12).astype(float)
        for y, w in ((labels, None), (labels[0], weights)):
            got = batched_binary_metric(metric, y, score, w)
            assert got.shape == (12,)
            for b in range(12):
                yb = labels[b] if w is None else labels[0]
                keep = np.ones(n, bool) if w is None else w[b] > 0
                if len(np.unique(yb[keep])) < 2:
                    assert np.isnan(got[b])
                    continue
                expected = sk(yb[keep], score[keep], sample_weight=None if w is None else w[b][keep])
                assert abs(got[b] - expected) < 1e-12, (b, got[b], expected)
