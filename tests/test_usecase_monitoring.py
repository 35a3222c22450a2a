"""Monitoring of any declared use case, by problem type: the ``spend`` regression use case is
monitored with DLE and realized RMSE/MAE equal to NannyML's own, a spend drift raises a decay alert
within a few chunks and an undrifted period none, incremental runs equal a full run, and churn's
monitoring is the binary case of the same monitor."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import duckdb
import lightgbm as lgb
import nannyml as nml
import numpy as np
import pandas as pd
import pytest
import yaml
from nannyml.thresholds import ConstantThreshold

from mlops.core.environment import PROJECT_ROOT
from mlops.core.model_inputs import CATEGORICAL_FEATURES, NUMERIC_FEATURES, ModelInputs
from mlops.core.monitoring import (
    CHURN_SPEC,
    DECAY_DEFAULTS,
    RESULTS_DDL,
    SCORE,
    TIMESTAMP,
    MonitorSpec,
    TenantMonitor,
    decay_thresholds,
    run_incremental,
    usecase_analysis_frame,
    usecase_monitor,
)
from mlops.core.online import snapshot_file_name
from mlops.core.prediction_log import PREDICTION_LOG_DDL, prediction_log_ddl, prediction_log_table
from mlops.core.usecase import UseCase, UseCaseError, load_usecase
from resources.monitoring import MonitoringPolicy
from resources.tenants import TenantSpec
from tests.usecase_fixtures import USECASE_YAML, write_spend_usecase

DAY = pd.Timedelta(days=1)
START = pd.Timestamp("2026-04-01")  # the spend simulator's first day
ORIGIN = START + 180 * DAY  # the day after the newest order: the clock of the whole test
TRAIN_AS_OF = ORIGIN - 70 * DAY  # the model is trained (and its holdout scored) as of this day
SNAPSHOT_DAYS = [TRAIN_AS_OF + 7 * k * DAY for k in range(1, 10)]  # weekly snapshots, one chunk each
DRIFT_DAY = TRAIN_AS_OF + 14 * DAY


def _simulate(usecase: UseCase, drift: bool) -> dict[str, pd.DataFrame]:
    module = importlib.util.spec_from_file_location("spend_simulator", usecase.folder / usecase.simulator.module)
    simulator = importlib.util.module_from_spec(module)
    module.loader.exec_module(simulator)
    tables = getattr(simulator, usecase.simulator.function)(
        TenantSpec(name="acme", region="eu", n_accounts=400, seed=3, days=180, today=180))
    if drift:  # half the customers start spending three times as much (a drift of inputs and labels)
        orders = tables["raw_orders"].copy()
        half = orders["customer_id"].str[-5:].astype(int) % 2 == 0
        orders.loc[half & (orders["ordered_at"] >= DRIFT_DAY), "amount"] *= 3
        tables = {**tables, "raw_orders": orders}
    return tables


def _warehouse(usecase: UseCase, tables: dict[str, pd.DataFrame]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for spec in usecase.tables:
        con.execute(spec.ddl())
        con.register("rows", tables[spec.name].assign(source="simulator"))
        con.execute(f"INSERT INTO {spec.name} BY NAME SELECT * FROM rows")  # noqa: S608 - declared names
        con.unregister("rows")
    return con


def _features(con, usecase: UseCase, as_of: pd.Timestamp, since: pd.Timestamp) -> pd.DataFrame:
    return con.execute(usecase.feature_sql, {"as_of": as_of, "since": since}).df()


def _labels(con, usecase: UseCase, as_of: pd.Timestamp) -> pd.DataFrame:
    labels = con.execute(usecase.labels_sql, {"as_of": as_of, "horizon_days": usecase.label.horizon_days}).df()
    return labels[labels["prediction_time"] + usecase.label.horizon_days * DAY <= as_of]


def _train(con, usecase: UseCase):
    """A LightGBM regression on the weeks before the holdout; the reference is the holdout (the
    latest three labelled weeks) with the model's predictions."""
    inputs = ModelInputs.of(usecase)
    rows = _features(con, usecase, TRAIN_AS_OF, START).merge(
        _labels(con, usecase, TRAIN_AS_OF), left_on=[usecase.entity.key, "available_at"],
        right_on=[usecase.entity.key, "prediction_time"])
    cut = np.sort(rows["available_at"].unique())[-3]
    train, holdout = rows[rows["available_at"] < cut], rows[rows["available_at"] >= cut]
    booster = lgb.train(dict(usecase.model.params, objective=usecase.model.objective),
                        lgb.Dataset(inputs.to_model_frame(train), train[usecase.label.column]),
                        num_boost_round=usecase.model.num_boost_round)
    reference = holdout.assign(**{TIMESTAMP: holdout["available_at"],
                                  SCORE: booster.predict(inputs.to_model_frame(holdout))})
    return booster, reference.reset_index(drop=True)


def _serve(con, usecase: UseCase, booster, online_dir) -> None:
    """Weekly online snapshots (the newest feature row per customer) and the champion's logged
    prediction for every customer in each, in the use case's prediction-log table."""
    inputs = ModelInputs.of(usecase)
    table = prediction_log_table(usecase.name)
    con.execute(prediction_log_ddl(table))
    online_dir.mkdir(parents=True, exist_ok=True)
    for version, day in enumerate(SNAPSHOT_DAYS, start=1):
        snapshot = _features(con, usecase, day, day - usecase.features.lookback_days * DAY)
        snapshot = snapshot[snapshot["available_at"] == day].reset_index(drop=True)
        snapshot.to_parquet(online_dir / snapshot_file_name(version))
        log = pd.DataFrame({
            "prediction_id": [f"v{version}-{i}" for i in range(len(snapshot))], "tenant": "acme",
            "account_id": snapshot[usecase.entity.key], "role": "champion", "model_version": "1",
            "score": booster.predict(inputs.to_model_frame(snapshot)), "latency_ms": 1.0,
            "snapshot_version": version, "endpoint": "predict", "requested_at": day + pd.Timedelta(hours=1),
            "segment": "segment-1"})
        con.register("log_rows", log)
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM log_rows")  # noqa: S608 - derived name
        con.unregister("log_rows")


@pytest.fixture(scope="module")
def spend(tmp_path_factory):
    """The spend use case on one simulated tenant: the model's reference, and the analysis of an
    undrifted and a drifted business (the same model, trained before the drift)."""
    root = tmp_path_factory.mktemp("spend")
    usecase = load_usecase(write_spend_usecase(root / "usecases"))
    out = {"usecase": usecase}
    for name, drift in (("stable", False), ("drifted", True)):
        con = _warehouse(usecase, _simulate(usecase, drift))
        if not drift:
            booster, out["reference"] = _train(con, usecase)
        _serve(con, usecase, booster, root / name / "online")
        out[name] = usecase_analysis_frame(con, usecase, root / name / "online", "1", window_days=365,
                                           origin=ORIGIN)
        out[f"{name}_con"], out[f"{name}_online"] = con, root / name / "online"
    return out


@pytest.fixture(scope="module")
def monitor(spend):
    return usecase_monitor(MonitoringPolicy(), spend["reference"], spend["usecase"])


@pytest.fixture(scope="module")
def replays(spend, monitor):
    """Week by week, as the platform would: the analysis as of each day (predictions made before
    it, labels matured by it), monitored incrementally; the decay alerts of each day."""
    policy, out = MonitoringPolicy(), {}
    for name in ("stable", "drifted"):
        stored, decays = pd.DataFrame(), []
        for origin in [*SNAPSHOT_DAYS[1:], ORIGIN]:
            frame = usecase_analysis_frame(spend[f"{name}_con"], spend["usecase"], spend[f"{name}_online"], "1",
                                           window_days=365, origin=origin)
            _, stored = run_incremental(monitor, frame[frame[TIMESTAMP] < origin], stored, policy)
            decays.append((origin, monitor.decay_alerts(stored)))
        out[name] = stored, decays
    return out


def test_analysis_frame_joins_predictions_snapshots_and_matured_labels(spend):
    usecase, frame = spend["usecase"], spend["stable"]
    label = usecase.label.column
    assert len(frame) == 400 * len(SNAPSHOT_DAYS) and frame["prediction_id"].is_unique
    assert {*ModelInputs.of(usecase).columns, TIMESTAMP, SCORE, label, usecase.entity.key} <= set(frame.columns)
    mature = frame[TIMESTAMP] + usecase.label.horizon_days * DAY <= ORIGIN
    assert frame.loc[mature, label].notna().all() and frame.loc[~mature, label].isna().all()
    expected = frame[mature].merge(_labels(spend["stable_con"], usecase, ORIGIN), how="left",
                                   left_on=[usecase.entity.key, TIMESTAMP],
                                   right_on=[usecase.entity.key, "prediction_time"], suffixes=("", "_sql"))
    np.testing.assert_array_equal(expected[label].to_numpy(), expected[f"{label}_sql"].to_numpy())
    # The use case's log is a table of its own; churn's prediction_log is not created or read.
    tables = {r[0] for r in spend["stable_con"].execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert "prediction_log_spend" in tables and "prediction_log" not in tables


def test_regression_monitoring_equals_nannyml_called_directly(spend, monitor):
    """The same reference and analysis handed to NannyML by hand: DLE, realized RMSE and MAE and
    univariate drift of every feature give the platform's values and alerts."""
    usecase, policy = spend["usecase"], MonitoringPolicy()
    label, categorical = usecase.label.column, list(usecase.features.categorical)
    features = [*usecase.features.numeric, *categorical]
    report = monitor.run(spend["drifted"])
    results = report.results
    assert sorted(results.columns) == sorted(_result_columns())  # the tidy schema of monitoring_results
    assert {"estimated_rmse", "estimated_mae", "realized_rmse", "realized_mae"} <= set(results["metric"])

    def own(frame):
        return (frame[[*features, TIMESTAMP, SCORE, label]].astype({c: object for c in categorical})
                .sort_values(TIMESTAMP, kind="stable").reset_index(drop=True))
    reference, data = own(spend["reference"]), own(spend["drifted"])
    rmse = float(np.sqrt(np.mean((reference[label] - reference[SCORE]) ** 2)))
    assert report.reference_performance["rmse"] == pytest.approx(rmse)
    common = dict(timestamp_column_name=TIMESTAMP, chunk_period=policy.chunk_period)
    thresholds = {"rmse": ConstantThreshold(upper=rmse * (1 + DECAY_DEFAULTS["max_rmse_increase"])),
                  "mae": ConstantThreshold()}
    dle = nml.DLE(feature_column_names=features, y_pred=SCORE, y_true=label, metrics=["rmse", "mae"],
                  thresholds=thresholds, **common).fit(reference)
    realized = nml.PerformanceCalculator(metrics=["rmse", "mae"], y_true=label, y_pred=SCORE, problem_type="regression",
                                         thresholds=thresholds, **common).fit(reference)
    direct = {"estimated": dle.estimate(data).filter(period="analysis").to_df(),
              "realized": realized.calculate(data).filter(period="analysis").to_df()}
    for kind, metric in ((k, m) for k in direct for m in ("rmse", "mae")):
        mine = results[results["metric"] == f"{kind}_{metric}"].sort_values("chunk_start")
        assert mine["chunk_key"].tolist() == direct[kind][("chunk", "key")].tolist()
        np.testing.assert_allclose(mine["value"].to_numpy(), direct[kind][(metric, "value")].to_numpy(),
                                   equal_nan=True)
        assert mine["alert"].tolist() == direct[kind][(metric, "alert")].fillna(False).tolist()
    assert results.loc[results["metric"] == "realized_rmse", "alert"].any()

    uni = nml.UnivariateDriftCalculator(
        column_names=features, treat_as_categorical=categorical, continuous_methods=policy.continuous_drift_methods,
        categorical_methods=policy.categorical_drift_methods,
        thresholds={"jensen_shannon": ConstantThreshold(upper=policy.jensen_shannon_threshold)}, **common).fit(reference)
    direct_uni = uni.calculate(data).filter(period="analysis").to_df()
    drift = results[results["metric"] == "univariate_drift"]
    assert sorted(drift["feature"].unique()) == sorted(features)
    for feature in features:
        method = "chi2" if feature in categorical else "jensen_shannon"
        mine = drift[drift["feature"] == feature].sort_values("chunk_start")
        assert mine["method"].unique().tolist() == [method]
        np.testing.assert_allclose(mine["value"].to_numpy(), direct_uni[(feature, method, "value")].to_numpy())
        assert mine["alert"].tolist() == direct_uni[(feature, method, "alert")].tolist()
    assert set(results.loc[results["metric"] == "unseen_values_rate", "feature"]) == set(categorical)
    assert set(results.loc[results["metric"] == "missing_values_rate", "feature"]) == set(features)


def test_spend_drift_raises_a_decay_alert_within_a_few_chunks_and_no_drift_none(replays, monitor):
    stable_decays, drifted_decays = replays["stable"][1], replays["drifted"][1]
    assert all(not decay for _, decay in stable_decays), [d for d in stable_decays if d[1]]
    first = next((origin, decay) for origin, decay in drifted_decays if decay)
    # The labels of a chunk mature 14 days after it: two weekly chunks after the drift began.
    assert first[0] - DRIFT_DAY <= 14 * DAY, first
    alert = first[1][0]
    assert set(alert) == {"metric", "chunk", "value", "threshold", "consecutive_chunks"}
    assert alert["metric"] == "realized_rmse" and alert["consecutive_chunks"] == 2
    assert alert["threshold"] == pytest.approx(monitor.reference_performance["rmse"] * 1.25)
    assert alert["value"] > alert["threshold"]
    # The label-free estimate (DLE) sees it too, once the drifted spend is in the features.
    assert any(a["metric"] == "estimated_rmse" for a in drifted_decays[-1][1])


def test_incremental_monitoring_equals_a_full_run_for_regression(spend, monitor, replays):
    stored = replays["drifted"][0]
    full = monitor.run(spend["drifted"]).results
    key = ["metric", "feature", "chunk_key"]

    def valued(frame):  # a chunk without labels yet has no realized value either way
        return frame[~(frame["metric"].str.startswith("realized_") & frame["value"].isna())]
    a = valued(stored).sort_values(key, na_position="first").reset_index(drop=True)
    b = valued(full).sort_values(key, na_position="first").reset_index(drop=True)
    assert a[key].astype(str).equals(b[key].astype(str))
    np.testing.assert_allclose(a["value"].to_numpy(dtype=float), b["value"].to_numpy(dtype=float), equal_nan=True)
    assert a["alert"].tolist() == b["alert"].tolist()
    assert (a["metric"] == "realized_rmse").sum() == len(SNAPSHOT_DAYS) - 1  # every matured chunk, once


# --- churn is the binary case ------------------------------------------------------------------
def _churn_like(n: int, start: str, seed: int, decayed: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    data = {c: rng.gamma(2.0, 3.0, n) for c in NUMERIC_FEATURES}
    data |= {c: rng.choice(list(levels), n) for c, levels in CATEGORICAL_FEATURES.items()}
    data[SCORE] = rng.random(n)
    noise = rng.random(n)
    data["churned"] = (noise < (0.5 if decayed else data[SCORE])).astype(float)
    data[TIMESTAMP] = pd.Timestamp(start) + pd.to_timedelta(rng.integers(0, 6, n), unit="D")
    return pd.DataFrame(data)


def _binary_usecase(prefix: str, label: str) -> UseCase:
    raw = yaml.safe_load(USECASE_YAML)
    raw.pop("monitoring", None)  # spend's own thresholds (weekly chunks); churn has none
    raw.update(name=f"{prefix}churn", problem_type="binary", model={"objective": "binary"},
               label={"sql": "labels.sql", "column": label, "horizon_days": 30},
               features={**raw["features"], "numeric": [prefix + c for c in NUMERIC_FEATURES],
                         "categorical": {prefix + c: list(v) for c, v in CATEGORICAL_FEATURES.items()}})
    return UseCase(**raw)


def test_churn_is_the_binary_case_of_the_use_case_monitor():
    """A binary use case declared with churn's columns is monitored exactly as churn is, and one
    with other column names gives the same numbers under its own names."""
    policy = MonitoringPolicy()
    reference = _churn_like(3000, "2026-01-01", 0)
    analysis = pd.concat([_churn_like(3000, "2026-02-01", 1), _churn_like(3000, "2026-02-07", 2, decayed=True)])
    churn = TenantMonitor(policy, reference).run(analysis)
    assert churn.decay, "the decayed days should raise a decay alert"

    usecase = _binary_usecase("", "churned")
    assert MonitorSpec.of(usecase) == CHURN_SPEC
    same = usecase_monitor(policy, reference, usecase).run(analysis)
    pd.testing.assert_frame_equal(same.results, churn.results)
    assert same.decay == churn.decay and same.reference_roc_auc == churn.reference_roc_auc

    renamed = {c: f"x_{c}" for c in (*NUMERIC_FEATURES, *CATEGORICAL_FEATURES)} | {"churned": "left"}
    other = usecase_monitor(policy, reference.rename(columns=renamed), _binary_usecase("x_", "left"))
    report = other.run(analysis.rename(columns=renamed))
    back = {new: old for old, new in renamed.items()}
    pd.testing.assert_frame_equal(report.results.replace({"feature": back}), churn.results)
    assert report.decay == churn.decay


# --- multiclass --------------------------------------------------------------------------------
def _multiclass(n: int, start: str, seed: int, decayed: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, 3))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    drawn = (proba.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    labels = rng.integers(0, 3, n) if decayed else drawn
    frame = pd.DataFrame({"x1": logits[:, 0] + rng.normal(0, 1, n), "x2": logits[:, 1] + rng.normal(0, 1, n),
                          "tier": rng.choice(["a", "b"], n), "kind": np.array(["low", "mid", "high"])[labels],
                          TIMESTAMP: pd.Timestamp(start) + pd.to_timedelta(rng.integers(0, 4, n), unit="D")})
    for i, cls in enumerate(("low", "mid", "high")):
        frame[f"{SCORE}_{cls}"] = proba[:, i]
    return frame


def test_multiclass_monitoring_macro_roc_auc_and_f1_with_decay():
    from sklearn.metrics import f1_score, roc_auc_score

    spec = MonitorSpec("multiclass", ("x1", "x2"), ("tier",), "kind", classes=("low", "mid", "high"), name="kinds")
    monitor = TenantMonitor(MonitoringPolicy(), _multiclass(3000, "2026-01-01", 0), spec)
    analysis = pd.concat([_multiclass(2000, "2026-02-01", 1), _multiclass(2000, "2026-02-05", 2, decayed=True)])
    report = monitor.run(analysis)
    results = report.results
    assert {"estimated_roc_auc", "estimated_f1", "realized_roc_auc", "realized_f1"} <= set(results["metric"])
    day = analysis[analysis[TIMESTAMP] == analysis[TIMESTAMP].max()]
    classes = sorted(spec.classes)
    proba = day[[f"{SCORE}_{c}" for c in classes]].to_numpy()
    latest = results[results["chunk_start"] == day[TIMESTAMP].max()].set_index("metric")["value"]
    assert latest["realized_roc_auc"] == pytest.approx(roc_auc_score(day["kind"], proba, multi_class="ovr",
                                                                     average="macro", labels=classes))
    predicted = np.array(classes)[proba.argmax(axis=1)]
    assert latest["realized_f1"] == pytest.approx(f1_score(day["kind"], predicted, average="macro"))
    assert [a["metric"] for a in report.decay] == ["realized_roc_auc"]
    assert report.decay[0]["threshold"] == pytest.approx(report.reference_roc_auc - DECAY_DEFAULTS["max_auc_drop"])


# --- binary with rare positives: decay on average precision -------------------------------------
FRAUD_SPEC = MonitorSpec("binary", ("x1", "x2"), ("tier",), "is_fraud", name="fraudish", decay_on="average_precision")


def _fraud_like(n: int, start: str, seed: int, days: int = 4, new_tactic: bool = False) -> pd.DataFrame:
    """Payments with rare positives (about 3%) and a calibrated model: a few payments scored high,
    the rest near zero, each fraudulent with its score's probability. A new tactic: most fraud moves
    to payments the model scores as legitimate (among the legitimate payments' top 5%); the scores do
    not change, ROC AUC barely moves and average precision collapses."""
    rng = np.random.default_rng(seed)
    high = rng.random(n) < 0.03
    score = np.where(high, rng.beta(6.0, 1.5, n), rng.beta(0.3, 150.0, n))
    fraud = rng.random(n) < score
    if new_tactic:
        moved = fraud & (rng.random(n) < 0.7)
        fraud &= ~moved
        top = ~high & (score >= np.quantile(score[~high], 0.95))
        fraud |= top & (rng.random(n) < moved.sum() / top.sum())
    return pd.DataFrame({"x1": score * 3 + rng.normal(0, 1, n), "x2": rng.normal(0, 1, n),
                         "tier": rng.choice(["a", "b"], n), SCORE: score, "is_fraud": fraud.astype(float),
                         TIMESTAMP: pd.Timestamp(start) + pd.to_timedelta(rng.integers(0, days, n), unit="D")})


@pytest.fixture(scope="module")
def fraud_case():
    reference = _fraud_like(8000, "2026-01-01", 10)
    analysis = pd.concat([_fraud_like(8000, "2026-02-01", 11),
                          _fraud_like(8000, "2026-02-05", 12, new_tactic=True)], ignore_index=True)
    monitor = TenantMonitor(MonitoringPolicy(), reference, FRAUD_SPEC)
    return reference, analysis, monitor, monitor.run(analysis)


def test_a_binary_spec_may_decay_on_average_precision():
    assert CHURN_SPEC.decay_metric == "roc_auc" and CHURN_SPEC.metrics == ("roc_auc",)
    assert FRAUD_SPEC.metrics == ("roc_auc", "average_precision")
    assert FRAUD_SPEC.decay_metric == "average_precision"
    assert FRAUD_SPEC.decay_metrics == {"estimated_average_precision": "lower_threshold",
                                        "realized_average_precision": "lower_threshold"}
    # Naming the default is the default spec (same monitor, same stored name).
    named = MonitorSpec("binary", ("x1", "x2"), ("tier",), "is_fraud", name="fraudish", decay_on="roc_auc")
    default = MonitorSpec("binary", ("x1", "x2"), ("tier",), "is_fraud", name="fraudish")
    assert named == default and named.fingerprint(object()) == default.fingerprint(object())
    # The decay metric and its threshold are part of the fitted monitor's name; a spec on ROC AUC
    # does not depend on max_ap_drop (its monitors keep their names).
    assert FRAUD_SPEC.fingerprint(object()) != default.fingerprint(object())
    loose = SimpleNamespace(max_ap_drop=0.5)
    assert FRAUD_SPEC.fingerprint(loose) != FRAUD_SPEC.fingerprint(object())
    assert default.fingerprint(loose) == default.fingerprint(object())
    assert CHURN_SPEC.fingerprint(loose) == CHURN_SPEC.fingerprint(MonitoringPolicy())
    for problem, kwargs in (("regression", {}), ("multiclass", {"classes": ("a", "b", "c")})):
        with pytest.raises(ValueError, match=f"decay_metric 'average_precision' does not fit problem_type '{problem}'"):
            MonitorSpec(problem, ("x1",), (), "y", decay_on="average_precision", **kwargs)
    with pytest.raises(ValueError, match="decay_metric 'pr_auc' is not a decay metric"):
        MonitorSpec("binary", ("x1",), (), "y", decay_on="pr_auc")


def test_average_precision_monitoring_equals_nannyml_called_directly(fraud_case):
    """CBPE and realized ROC AUC and average precision as NannyML computes them, the constant floor
    (reference AP times 1 - max_ap_drop) on average precision alone."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    reference, analysis, monitor, report = fraud_case
    ref_ap = average_precision_score(reference["is_fraud"], reference[SCORE])
    assert report.reference_performance == pytest.approx(
        {"roc_auc": roc_auc_score(reference["is_fraud"], reference[SCORE]), "average_precision": ref_ap})
    floor = ref_ap * (1 - DECAY_DEFAULTS["max_ap_drop"])
    assert monitor.own_bound == pytest.approx(floor)
    assert monitor.realized_metric == "realized_average_precision"
    assert monitor.estimated_metric == "estimated_average_precision"

    def own(frame):
        return (frame.assign(predicted_label=(frame[SCORE] >= 0.5).astype("int64"), tier=frame["tier"].astype(object))
                .sort_values(TIMESTAMP, kind="stable").reset_index(drop=True))
    thresholds = {"roc_auc": ConstantThreshold(), "average_precision": ConstantThreshold(lower=floor)}
    common = dict(y_pred_proba=SCORE, y_pred="predicted_label", y_true="is_fraud", problem_type="classification_binary",
                  metrics=["roc_auc", "average_precision"], thresholds=thresholds, timestamp_column_name=TIMESTAMP,
                  chunk_period=MonitoringPolicy().chunk_period)
    data = own(analysis)
    direct = {"estimated": nml.CBPE(**common).fit(own(reference)).estimate(data).filter(period="analysis").to_df(),
              "realized": nml.PerformanceCalculator(**common).fit(own(reference)).calculate(data)
              .filter(period="analysis").to_df()}
    results = report.results
    for kind, metric in ((k, m) for k in direct for m in ("roc_auc", "average_precision")):
        mine = results[results["metric"] == f"{kind}_{metric}"].sort_values("chunk_start")
        assert mine["chunk_key"].tolist() == direct[kind][("chunk", "key")].tolist()
        np.testing.assert_allclose(mine["value"].to_numpy(), direct[kind][(metric, "value")].to_numpy(),
                                   equal_nan=True)
        assert mine["alert"].tolist() == direct[kind][(metric, "alert")].fillna(False).tolist()
        if metric == "average_precision":
            np.testing.assert_allclose(mine["lower_threshold"].to_numpy(), floor)
        else:  # reported without a threshold: it never alerts
            assert mine["lower_threshold"].isna().all() and not mine["alert"].any()


def test_a_collapse_of_average_precision_raises_a_decay_alert_where_roc_auc_would_not(fraud_case):
    reference, analysis, monitor, report = fraud_case
    results = report.results
    realized = results[results["metric"].str.startswith("realized_")].pivot(
        index="chunk_start", columns="metric", values="value")
    before, after = realized[realized.index < "2026-02-05"], realized[realized.index >= "2026-02-05"]
    ref = monitor.reference_performance
    # The new tactic: AP collapses far under its floor, ROC AUC stays within max_auc_drop of the reference.
    assert (before["realized_average_precision"] > monitor.own_bound).all()
    assert (after["realized_average_precision"] < monitor.own_bound).all()
    assert (realized["realized_roc_auc"] > ref["roc_auc"] - DECAY_DEFAULTS["max_auc_drop"]).all()
    assert [a["metric"] for a in report.decay] == ["realized_average_precision"]
    alert = report.decay[0]
    assert alert["threshold"] == pytest.approx(monitor.own_bound) and alert["value"] < alert["threshold"]
    # The same data monitored on ROC AUC (the binary default) raises nothing.
    on_auc = TenantMonitor(MonitoringPolicy(), reference,
                           MonitorSpec("binary", ("x1", "x2"), ("tier",), "is_fraud", name="fraudish"))
    assert on_auc.own_bound == pytest.approx(ref["roc_auc"] - DECAY_DEFAULTS["max_auc_drop"])
    assert on_auc.run(analysis).decay == []
    # An inherited floor applies to the realized AP, as it does to ROC AUC.
    lifted = monitor.apply_bound(results, 0.99)
    assert (lifted.loc[lifted["metric"] == "realized_average_precision", "lower_threshold"] == 0.99).all()
    assert lifted.loc[lifted["metric"] == "realized_average_precision", "alert"].all()


def test_the_pooled_decay_rule_alerts_where_a_rare_class_daily_chunks_never_stay_under_the_floor():
    """Rare positives: a day holds a handful of frauds and its realized AP swings across the floor. After
    a new tactic the daily values straddle the floor, so seven chunks in a row never all alert; the
    same seven days pooled are far under it, beyond the noise (``decay_rule: pooled``). Without the
    tactic the pooled rule raises nothing."""
    import dataclasses

    from mlops.core.monitoring import describe_alert, monitoring_step

    reference = _fraud_like(8000, "2026-01-01", 10, days=10)
    policy = MonitoringPolicy()

    def step(spec, analysis):
        monitor = TenantMonitor(policy, reference, spec)
        _, everything, decay = monitoring_step(monitor, analysis, pd.DataFrame(), set(), monitor.own_bound, policy)
        return monitor, everything, decay

    consecutive = dataclasses.replace(FRAUD_SPEC, overrides={"consecutive_chunks": 7})
    pooled = dataclasses.replace(consecutive, decay_rule="pooled")
    tactic = _fraud_like(2800, "2026-02-05", 20, days=14, new_tactic=True)
    monitor, everything, decay = step(consecutive, tactic)
    daily = everything[everything["metric"] == "realized_average_precision"].sort_values("chunk_start")
    assert not daily["alert"].tail(7).all() and daily["alert"].mean() > 0.5
    assert decay == []
    _, _, decay = step(pooled, tactic)
    assert [(a["metric"], a["chunk"], a["rule"]) for a in decay] == [
        ("realized_average_precision", "2026-02-18", "pooled")]
    alert = decay[0]
    assert alert["value"] < alert["upper_bound"] < monitor.own_bound == pytest.approx(alert["threshold"])
    assert describe_alert(alert, "1").endswith(f"(7 chunks pooled to 2026-02-18, 99% bound {alert['upper_bound']:.3f}, v1)")
    assert pd.Timestamp(alert["onset"]) <= pd.Timestamp("2026-02-12")  # the window's first chunk, or an earlier run of alerting chunks
    for seed in (30, 31, 32):
        assert step(pooled, _fraud_like(2800, "2026-02-05", seed, days=14))[2] == []
    # The rule is declared in the monitoring block; a regression has no pooled binary metric.
    assert MonitorSpec.of(load_usecase(PROJECT_ROOT / "usecases" / "fraud")).decay_rule == "pooled"
    assert dataclasses.replace(FRAUD_SPEC, decay_rule="consecutive") == FRAUD_SPEC
    assert pooled.fingerprint(policy) != consecutive.fingerprint(policy)
    with pytest.raises(ValueError, match="decay_rule 'pooled' judges a binary metric"):
        MonitorSpec("regression", ("x1",), (), "y", decay_rule="pooled")
    with pytest.raises(ValueError, match="decay_rule 'sliding' is not a decay rule"):
        MonitorSpec("binary", ("x1",), (), "y", decay_rule="sliding")


def test_an_unknown_key_of_the_monitoring_block_is_an_error(tmp_path):
    raw = yaml.safe_load(USECASE_YAML)
    with pytest.raises(ValueError, match=r"monitoring: unknown key\(s\) \['chunk_period', 'consecutive'\]"):
        UseCase(**{**raw, "monitoring": {"consecutive": 5, "chunk_period": "W", "max_rmse_increase": 0.2}})
    assert UseCase(**{**raw, "monitoring": {"consecutive_chunks": 5}}).monitoring == {"consecutive_chunks": 5}
    from mlops.core.usecase import MONITORING_KEYS

    assert set(DECAY_DEFAULTS) <= set(MONITORING_KEYS)  # every decay threshold may be declared


def test_max_ap_drop_use_case_over_policy_over_defaults():
    assert decay_thresholds(object())["max_ap_drop"] == DECAY_DEFAULTS["max_ap_drop"] == 0.3
    assert decay_thresholds(SimpleNamespace(max_ap_drop=0.5))["max_ap_drop"] == 0.5
    assert decay_thresholds(SimpleNamespace(max_ap_drop=0.5), {"max_ap_drop": 0.2})["max_ap_drop"] == 0.2
    reference = _fraud_like(4000, "2026-01-01", 10)
    spec = MonitorSpec("binary", ("x1", "x2"), ("tier",), "is_fraud", overrides={"max_ap_drop": 0.5},
                       name="fraudish", decay_on="average_precision")
    monitor = TenantMonitor(MonitoringPolicy(), reference, spec)
    assert monitor.own_bound == pytest.approx(monitor.reference_performance["average_precision"] * 0.5)


def test_the_decay_metric_is_declared_in_the_monitoring_block(tmp_path):
    usecase = _binary_usecase("", "churned")
    chosen = usecase.model_copy(update={"monitoring": {"decay_metric": "average_precision", "max_ap_drop": 0.4,
                                                       "chunk_period": "W"}})
    spec = MonitorSpec.of(chosen)
    assert spec.decay_metric == "average_precision" and dict(spec.overrides) == {"max_ap_drop": 0.4}
    assert MonitorSpec.of(usecase.model_copy(update={"monitoring": {"decay_metric": "roc_auc"}})) == CHURN_SPEC
    fraud = MonitorSpec.of(load_usecase(PROJECT_ROOT / "usecases" / "fraud"))
    assert fraud.decay_metric == "average_precision" and fraud.metrics == ("roc_auc", "average_precision")

    raw = yaml.safe_load(USECASE_YAML)  # spend: a regression
    with pytest.raises(ValueError, match="monitoring.decay_metric 'average_precision' does not fit problem_type "
                                         "'regression'"):
        UseCase(**{**raw, "monitoring": {"decay_metric": "average_precision"}})
    assert UseCase(**{**raw, "monitoring": {"decay_metric": "rmse"}}).monitoring == {"decay_metric": "rmse"}
    folder = write_spend_usecase(tmp_path)
    raw["monitoring"] = {"decay_metric": "pr_auc"}
    (folder / "usecase.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UseCaseError) as err:
        load_usecase(folder)
    assert "monitoring.decay_metric 'pr_auc' is not a decay metric" in str(err.value)
    assert str(folder / "usecase.yaml") in str(err.value)


# --- thresholds and the prediction-log table ---------------------------------------------------
def test_decay_thresholds_use_case_over_policy_over_defaults(spend):
    assert decay_thresholds(object()) == DECAY_DEFAULTS
    policy = MonitoringPolicy(max_auc_drop=0.05)
    assert decay_thresholds(policy)["max_auc_drop"] == 0.05
    assert decay_thresholds(policy, {"max_auc_drop": 0.1, "consecutive_chunks": 3}) == {
        **DECAY_DEFAULTS, "max_auc_drop": 0.1, "consecutive_chunks": 3}
    with pytest.raises(ValueError, match="unknown decay thresholds"):
        decay_thresholds(policy, {"max_rmse_drop": 0.1})
    usecase = spend["usecase"].model_copy(update={"monitoring": {"max_rmse_increase": 0.1, "chunk_period": "W"}})
    spec = MonitorSpec.of(usecase)
    assert dict(spec.overrides) == {"max_rmse_increase": 0.1}
    assert spec.fingerprint(policy) != MonitorSpec.of(spend["usecase"]).fingerprint(policy)


def test_prediction_log_table_per_use_case():
    assert prediction_log_table() == prediction_log_table("churn") == "prediction_log"
    assert prediction_log_table("spend") == "prediction_log_spend"
    assert prediction_log_ddl("prediction_log_spend") == PREDICTION_LOG_DDL.replace(
        "prediction_log (", "prediction_log_spend (")
    for bad in ("Spend", "spend; DROP TABLE x", "1abc", ""):
        with pytest.raises(ValueError):
            prediction_log_table(bad)


def _result_columns() -> list[str]:
    with duckdb.connect() as con:
        con.execute(RESULTS_DDL.format(table="monitoring_results"))
        names = [r[0] for r in con.execute("DESCRIBE monitoring_results").fetchall()]
    return [n for n in names if n not in ("model_version", "dagster_run_id")]
