"""Monitoring: the service's prediction log, NannyML model monitoring, operational metrics, the
shadow comparison that gates promotion, and delivery KPIs, per tenant."""

import datetime as dt
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from assets.deployment import promote_challenger, publish_from_registry
from assets.training import HOLDOUT_TABLE, png_metadata
from resources.feature_store import LABEL_HORIZON_DAYS, FeatureStore, feature_origin
from resources.monitoring import (
    PREDICTED,
    SCORE,
    TARGET,
    TIMESTAMP,
    MonitoringPolicy,
    MonitoringReport,
    compute_kpis,
    decay_alerts,
    drift_plot,
    load_or_fit,
    operational_summary,
    performance_plot,
    prepare,
    read_health_checks,
    read_monitoring_alerts,
    read_monitoring_results,
    run_incremental,
    service_cpu_usage,
    store_report,
)
from resources.registry import CHALLENGER, CHAMPION, ModelRegistry, registered_model_name
from resources.serving import PREDICTION_LOG_COLUMNS, prediction_log_dir
from resources.settings import PlatformSettings
from resources.tenants import TENANT_PARTITIONS
from resources.warehouse import DuckDBWarehouse

PREDICTION_LOG_DDL = """
CREATE TABLE IF NOT EXISTS prediction_log (
    prediction_id VARCHAR NOT NULL, tenant VARCHAR NOT NULL, account_id VARCHAR NOT NULL,
    role VARCHAR NOT NULL, model_version VARCHAR NOT NULL, score DOUBLE NOT NULL, latency_ms DOUBLE NOT NULL,
    snapshot_version BIGINT NOT NULL, endpoint VARCHAR NOT NULL, requested_at TIMESTAMP NOT NULL,
    segment VARCHAR NOT NULL,
    PRIMARY KEY (prediction_id, role)
)
"""
SEGMENTS_DDL = """
CREATE TABLE IF NOT EXISTS ingested_log_segments (
    segment VARCHAR PRIMARY KEY, rows BIGINT NOT NULL, ingested_at TIMESTAMP NOT NULL
)
"""


@dg.asset(
    partitions_def=TENANT_PARTITIONS,
    group_name="monitoring",
    kinds={"duckdb", "parquet"},
)
def prediction_log(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, settings: PlatformSettings):
    """Closed prediction-log segments written by the service, ingested exactly once.

    A segment's name is recorded in the same transaction as its rows, so a segment is never
    loaded twice, even if moving it aside afterwards fails; the service only ever renames
    complete segments into ``closed/``, so a segment being written is never read.
    """
    tenant = context.partition_key
    folder = prediction_log_dir(settings.root, tenant)
    closed = sorted((folder / "closed").glob("segment-*.parquet"))
    loaded = skipped = rows = 0
    with warehouse.transaction(tenant) as con:
        con.execute(PREDICTION_LOG_DDL)
        con.execute(SEGMENTS_DDL)
        done = {r[0] for r in con.execute("SELECT segment FROM ingested_log_segments").fetchall()}
        for path in closed:
            if path.name in done:
                skipped += 1
                continue
            frame = pd.read_parquet(path)
            if (frame["tenant"] != tenant).any():
                raise dg.Failure(f"segment {path.name} holds rows of another tenant; refusing to ingest it")
            frame = frame[list(PREDICTION_LOG_COLUMNS)].assign(segment=path.name)
            con.register("segment_rows", frame)
            con.execute("INSERT INTO prediction_log BY NAME SELECT * FROM segment_rows")
            con.unregister("segment_rows")
            con.execute("INSERT INTO ingested_log_segments VALUES (?, ?, ?)",
                        [path.name, len(frame), dt.datetime.now(dt.UTC).replace(tzinfo=None)])
            loaded += 1
            rows += len(frame)
        total = con.execute("SELECT count(*) FROM prediction_log").fetchone()[0]
    archive = folder / "ingested"
    archive.mkdir(parents=True, exist_ok=True)
    for path in closed:
        path.replace(archive / path.name)
    return dg.MaterializeResult(
        metadata={
            "segments_ingested": dg.MetadataValue.int(loaded),
            "segments_already_ingested": dg.MetadataValue.int(skipped),
            "rows_ingested": dg.MetadataValue.int(rows),
            "rows_total": dg.MetadataValue.int(total),
        }
    )


# --- model monitoring (NannyML) -----------------------------------------------------------------
ANALYSIS_SQL = """
WITH snapshots AS (
    SELECT * EXCLUDE (filename),
           CAST(regexp_extract(filename, 'features-v([0-9]+)[.]parquet', 1) AS BIGINT) AS snapshot_version
    FROM read_parquet($files, filename = true)
),
predictions AS (
    SELECT p.prediction_id, p.account_id, p.score, p.snapshot_version, p.requested_at
    FROM prediction_log p
    WHERE p.role = $role AND p.model_version = $version
)
SELECT p.prediction_id, p.score, s.*  EXCLUDE (snapshot_version), s.available_at AS timestamp,
       CASE WHEN s.available_at + INTERVAL (HORIZON) DAY <= CAST($origin AS TIMESTAMP)
            THEN CAST(c.churned_at IS NOT NULL AND c.churned_at < s.available_at + INTERVAL (HORIZON) DAY AS INTEGER)
       END AS churned
FROM predictions p
JOIN snapshots s ON s.account_id = p.account_id AND s.snapshot_version = p.snapshot_version
LEFT JOIN raw_churn_events c ON c.account_id = p.account_id AND c.churned_at >= s.available_at
WHERE s.available_at >= CAST($origin AS TIMESTAMP) - INTERVAL (WINDOW) DAY
QUALIFY row_number() OVER (PARTITION BY p.prediction_id ORDER BY c.churned_at) = 1
"""


def analysis_frame(con, online_dir: Path, version: str, window_days: int, role: str = "champion") -> pd.DataFrame:
    """Logged predictions of one model version with the features they were scored from and, once
    mature, their label: the analysis data of monitoring."""
    con.execute(PREDICTION_LOG_DDL)
    versions = [r[0] for r in con.execute(
        "SELECT DISTINCT snapshot_version FROM prediction_log WHERE role = ? AND model_version = ?",
        [role, version]).fetchall()]
    files = [str(online_dir / f"features-v{v:05d}.parquet") for v in versions]
    files = [f for f in files if Path(f).exists()]
    if not files:
        return pd.DataFrame()
    origin, _ = feature_origin(con)
    sql = (ANALYSIS_SQL.replace("(HORIZON)", str(LABEL_HORIZON_DAYS)).replace("(WINDOW)", str(int(window_days))))
    return con.execute(sql, {"files": files, "role": role, "version": version, "origin": origin}).df()


def reference_frame(con, version: str) -> pd.DataFrame:
    """The reference of a model version: its training holdout, with scores and labels."""
    frame = con.execute(
        f"SELECT * FROM {HOLDOUT_TABLE} WHERE model_version = ?", [version]  # noqa: S608 - constant table
    ).df()
    if frame.empty:
        raise dg.Failure(f"model version {version} has no holdout scores to use as monitoring reference")
    return frame.rename(columns={"prediction_time": TIMESTAMP})


@dg.asset(
    deps=[prediction_log, "churn_model"],
    partitions_def=TENANT_PARTITIONS,
    group_name="monitoring",
    kinds={"nannyml", "duckdb"},
)
def model_monitoring(
    context: dg.AssetExecutionContext,
    warehouse: DuckDBWarehouse,
    registry: ModelRegistry,
    feature_store: FeatureStore,
    settings: PlatformSettings,
    monitoring_policy: MonitoringPolicy,
):
    """NannyML on the champion's prediction log: univariate and multivariate drift, CBPE estimated
    ROC AUC, realized ROC AUC once labels mature, and data quality, per chunk. A decay alert
    (performance under its threshold in consecutive chunks) is what the retraining sensor acts on."""
    tenant = context.partition_key
    champion = registry.alias_version(tenant, CHAMPION)
    if champion is None:
        raise dg.Failure(f"tenant {tenant!r} has no champion to monitor yet")
    version = str(champion.version)
    with warehouse.connect(tenant) as con:
        analysis = analysis_frame(con, feature_store.online_dir(tenant), version, monitoring_policy.analysis_window_days)
        monitor, fitted = load_or_fit(settings.root, tenant, version, monitoring_policy,
                                      lambda: reference_frame(con, version))
        stored = read_monitoring_results(con, version)
        raised = set(read_monitoring_alerts(con, version)[["metric", "chunk_key"]].itertuples(index=False, name=None))
    if analysis.empty:
        context.log.info(f"{tenant}: champion v{version} has no logged predictions yet")
        return dg.MaterializeResult(metadata={"model_version": version, "analysis_rows": dg.MetadataValue.int(0),
                                              "decay_alert": False})
    fresh, everything = run_incremental(monitor, analysis, stored, monitoring_policy)
    # A decay alert is raised once per alerting chunk, not again every day it stays the newest.
    decay = [a for a in decay_alerts(everything, monitoring_policy.consecutive_chunks)
             if (a["metric"], a["chunk"]) not in raised]
    report = MonitoringReport(everything, monitor.reference_roc_auc, decay)
    with warehouse.transaction(tenant) as con:
        store_report(con, MonitoringReport(fresh, monitor.reference_roc_auc, decay), version, context.run_id)
    results = everything
    for alert in report.decay:
        warehouse.audit(tenant, actor="monitoring", action="decay_alert",
                        subject=f"{registered_model_name(tenant)}/{version}", outcome="alert", details=alert)

    alerts = report.alerts
    latest_chunk = results["chunk_start"].max()
    drifting = alerts[(alerts["metric"] == "univariate_drift") & (alerts["chunk_start"] == latest_chunk)]
    title = f"{tenant} champion v{version}"

    def number(value):
        return dg.MetadataValue.float(float("nan") if value is None else value)

    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "monitor_fitted_now": fitted,
            "analysis_rows": dg.MetadataValue.int(len(analysis)),
            "chunks": dg.MetadataValue.int(int(results["chunk_key"].nunique())),
            "latest_chunk": str(results.sort_values("chunk_start")["chunk_key"].iloc[-1]),
            "reference_roc_auc": dg.MetadataValue.float(report.reference_roc_auc),
            "estimated_roc_auc": number(report.latest("estimated_roc_auc")),
            "realized_roc_auc": number(report.latest("realized_roc_auc")),
            "multivariate_drift": number(report.latest("multivariate_drift")),
            "features_drifting_latest_chunk": dg.MetadataValue.int(int(drifting["feature"].nunique())),
            "max_missing_values_rate": number(_max_latest(results, "missing_values_rate")),
            "max_unseen_values_rate": number(_max_latest(results, "unseen_values_rate")),
            "alerts": dg.MetadataValue.int(len(alerts)),
            "decay_alert": bool(report.decay),
            "decay_alerts": dg.MetadataValue.json(report.decay),
            "alert_table": dg.MetadataValue.md(_alert_markdown(alerts)),
            "performance_plot": png_metadata(performance_plot(results, f"{title}: ROC AUC per chunk")),
            "drift_plot": png_metadata(drift_plot(results, f"{title}: drift per chunk")),
        }
    )


def _max_latest(results: pd.DataFrame, metric: str) -> float | None:
    rows = results[(results["metric"] == metric) & results["value"].notna()]
    if rows.empty:
        return None
    return float(rows[rows["chunk_start"] == rows["chunk_start"].max()]["value"].max())


def _alert_markdown(alerts: pd.DataFrame, limit: int = 30) -> str:
    if alerts.empty:
        return "no alerts"
    shown = alerts.sort_values("chunk_start", ascending=False).head(limit)
    table = shown[["chunk_key", "metric", "feature", "method", "value", "lower_threshold", "upper_threshold"]]
    return table.to_markdown(index=False, floatfmt=".4f") + (
        f"\n\n... and {len(alerts) - limit} more" if len(alerts) > limit else "")


# --- operational monitoring --------------------------------------------------------------------
@dg.asset(
    deps=[prediction_log],
    partitions_def=TENANT_PARTITIONS,
    group_name="monitoring",
    kinds={"duckdb"},
)
def operational_metrics(
    context: dg.AssetExecutionContext,
    warehouse: DuckDBWarehouse,
    settings: PlatformSettings,
    monitoring_policy: MonitoringPolicy,
):
    """Latency p50/p95/p99 per model version and role, errors, requests, and the CPU cost of
    serving per 1,000 predictions (CPU time of the service's workers, from their status files)."""
    tenant = context.partition_key
    with warehouse.connect(tenant) as con:
        con.execute(PREDICTION_LOG_DDL)
        summary = operational_summary(con)
    usage = service_cpu_usage(settings.root)
    champion = summary[summary["role"] == "champion"]
    metadata = {
        "requests": dg.MetadataValue.int(int(champion["predictions"].sum()) if len(champion) else 0),
        "requests_last_24h": dg.MetadataValue.int(int(summary["last_24h"].sum())),
        "shadow_predictions": dg.MetadataValue.int(int(summary.loc[summary["role"] == "challenger", "predictions"].sum())),
        "errors": dg.MetadataValue.int(int(summary["errors"].sum()) if len(summary) else 0),
        "by_model_version": dg.MetadataValue.md(
            summary.to_markdown(index=False, floatfmt=".3f") if len(summary) else "no predictions yet"),
    }
    if len(champion):
        latest = champion.sort_values("model_version", key=lambda s: s.astype(int)).iloc[-1]
        metadata |= {f"champion_{k}": dg.MetadataValue.float(float(latest[k])) for k in ("p50_ms", "p95_ms", "p99_ms")}
    if usage is not None and usage["predictions"] > 0:
        per_thousand = usage["cpu_seconds"] / usage["predictions"] * 1000
        metadata |= {
            "cpu_seconds_per_1000_predictions": dg.MetadataValue.float(per_thousand),
            "cost_per_1000_predictions": dg.MetadataValue.float(per_thousand / 3600 * monitoring_policy.price_per_cpu_hour),
            "price_per_cpu_hour": dg.MetadataValue.float(monitoring_policy.price_per_cpu_hour),
        }
    return dg.MaterializeResult(metadata=metadata)


# --- shadow comparison and promotion -----------------------------------------------------------
SHADOW_DDL = """
CREATE TABLE IF NOT EXISTS shadow_comparisons (
    evaluated_at TIMESTAMP NOT NULL, champion_version VARCHAR NOT NULL, challenger_version VARCHAR,
    decision VARCHAR NOT NULL, reason VARCHAR NOT NULL, shadow_pairs BIGINT NOT NULL, details VARCHAR NOT NULL,
    dagster_run_id VARCHAR NOT NULL
)
"""
SHADOW_PAIRS_SQL = """
SELECT c.prediction_id, c.account_id, c.score AS champion_score, h.score AS challenger_score,
       c.latency_ms AS champion_latency_ms, h.latency_ms AS challenger_latency_ms, c.snapshot_version
FROM prediction_log c JOIN prediction_log h USING (prediction_id)
WHERE c.role = 'champion' AND h.role = 'challenger' AND c.model_version = ? AND h.model_version = ?
"""


@dg.asset(
    deps=[prediction_log, "churn_model_aliases"],
    partitions_def=TENANT_PARTITIONS,
    group_name="monitoring",
    kinds={"nannyml", "duckdb"},
    check_specs=[dg.AssetCheckSpec(
        "promotion_gate", asset="shadow_comparison", blocking=True,
        description="The challenger has enough shadow predictions, meets the latency budget and is not "
                    "worse than the champion (CBPE estimate on shadow traffic, realized ROC AUC on the "
                    "freshest labelled traffic).")],
)
def shadow_comparison(
    context: dg.AssetExecutionContext,
    warehouse: DuckDBWarehouse,
    registry: ModelRegistry,
    feature_store: FeatureStore,
    settings: PlatformSettings,
    monitoring_policy: MonitoringPolicy,
):
    """Champion versus shadow challenger on the same requests: agreement, latency, CBPE-estimated
    and realized ROC AUC. Decides: promote, retire (the challenger loses its alias), or wait."""
    tenant = context.partition_key
    policy = monitoring_policy
    champion = registry.alias_version(tenant, CHAMPION)
    challenger = registry.alias_version(tenant, CHALLENGER)
    if champion is None:
        raise dg.Failure(f"tenant {tenant!r} has no champion yet")
    champ_v = str(champion.version)
    chall_v = str(challenger.version) if challenger is not None else None
    comparison: dict = {"champion_version": champ_v, "challenger_version": chall_v}
    if chall_v is None or chall_v == champ_v:
        decision, reason, pairs = "no_challenger", "the tenant has no challenger in shadow", pd.DataFrame()
    else:
        with warehouse.connect(tenant) as con:
            con.execute(PREDICTION_LOG_DDL)
            pairs = con.execute(SHADOW_PAIRS_SQL, [champ_v, chall_v]).df()
            if len(pairs) >= policy.shadow_min_predictions:
                # The champion's logged features: the shadow pairs' rows and the labelled ones.
                logged = analysis_frame(con, feature_store.online_dir(tenant), champ_v,
                                        policy.analysis_window_days + LABEL_HORIZON_DAYS)
                references = {v: reference_frame(con, v) for v in (champ_v, chall_v)}
        if len(pairs) < policy.shadow_min_predictions:
            decision = "wait"
            reason = f"{len(pairs)} of {policy.shadow_min_predictions} shadow predictions so far"
        else:
            comparison |= compare_shadow(pairs, logged, references,
                                         {v: registry.load_booster(tenant, v) for v in (champ_v, chall_v)})
            decision, reason = promotion_decision(comparison, policy)
    comparison |= {"decision": decision, "reason": reason, "shadow_pairs": len(pairs)}
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with warehouse.transaction(tenant) as con:
        con.execute(SHADOW_DDL)
        con.execute("INSERT INTO shadow_comparisons VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [now, champ_v, chall_v, decision, reason, len(pairs), json.dumps(comparison, default=float),
                     context.run_id])
    if decision in ("promote", "retire"):
        warehouse.audit(tenant, actor="shadow_comparison", action="promotion_gate",
                        subject=f"{registered_model_name(tenant)}/{chall_v}",
                        outcome="passed" if decision == "promote" else "failed", details=comparison)
    if decision == "retire":
        registry.delete_alias(tenant, CHALLENGER)
        publish_from_registry(tenant, registry, feature_store, settings)
        warehouse.audit(tenant, actor="shadow_comparison", action="challenger_retired",
                        subject=f"{registered_model_name(tenant)}/{chall_v}", outcome="retired",
                        details={"reason": reason})

    numbers = {k: dg.MetadataValue.float(float(v)) for k, v in comparison.items()
               if isinstance(v, float | int) and not isinstance(v, bool) and k != "shadow_pairs"}
    yield dg.MaterializeResult(metadata={
        "decision": decision, "reason": reason, "champion_version": champ_v,
        "challenger_version": chall_v or "none", "shadow_pairs": dg.MetadataValue.int(len(pairs)), **numbers,
    })
    yield dg.AssetCheckResult(
        check_name="promotion_gate",
        passed=decision == "promote",
        # Waiting (or nothing in shadow) is not a failure: it does not block, and promotion does nothing.
        severity=dg.AssetCheckSeverity.ERROR if decision in ("promote", "retire") else dg.AssetCheckSeverity.WARN,
        description=f"{decision}: {reason}",
        metadata={"decision": decision, "reason": reason, "challenger_version": chall_v or "none"},
    )


def compare_shadow(pairs: pd.DataFrame, logged: pd.DataFrame, references: dict[str, pd.DataFrame],
                   boosters: dict) -> dict:
    """Agreement, latency and ROC AUC (estimated and, where labels exist, realized) of both models."""
    import nannyml as nml
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    champ_v, chall_v = list(references)
    out: dict = {
        "agreement": float(((pairs["champion_score"] >= 0.5) == (pairs["challenger_score"] >= 0.5)).mean()),
        "rank_correlation": float(spearmanr(pairs["champion_score"], pairs["challenger_score"]).statistic),
        "mean_abs_score_diff": float((pairs["champion_score"] - pairs["challenger_score"]).abs().mean()),
    }
    for role in ("champion", "challenger"):
        latency = pairs[f"{role}_latency_ms"]
        out[f"{role}_p95_ms"] = float(np.percentile(latency, 95))
        out[f"{role}_p99_ms"] = float(np.percentile(latency, 99))
    # CBPE: each model's estimate on the shadow requests, calibrated on its own reference.
    features = logged.drop(columns=["score"]).merge(pairs[["prediction_id", "champion_score", "challenger_score"]],
                                                          on="prediction_id")
    for role, version in (("champion", champ_v), ("challenger", chall_v)):
        data = prepare(features.rename(columns={f"{role}_score": SCORE}))
        estimator = nml.CBPE(metrics=["roc_auc"], y_pred_proba=SCORE, y_pred=PREDICTED, y_true=TARGET,
                             problem_type="classification_binary", chunk_number=1)
        estimator.fit(prepare(references[version]))
        result = estimator.estimate(data.drop(columns=[TARGET])).filter(period="analysis").to_df()
        out[f"{role}_estimated_roc_auc"] = float(result[("roc_auc", "value")].iloc[0])
    # Realized: both models scored on the freshest traffic whose labels have matured.
    mature = logged[logged[TARGET].notna()]
    if len(mature) and mature[TARGET].nunique() == 2:
        from resources.model_inputs import to_model_matrix

        matrix = to_model_matrix(mature)
        for role, version in (("champion", champ_v), ("challenger", chall_v)):
            out[f"{role}_realized_roc_auc"] = float(roc_auc_score(mature[TARGET], boosters[version].predict(matrix)))
        out["labelled_rows"] = len(mature)
    return out


def promotion_decision(comparison: dict, policy: MonitoringPolicy) -> tuple[str, str]:
    """Promote when the challenger is not worse than the champion beyond the tolerance and meets the
    latency budget; otherwise retire it. Returns (decision, reason).

    Realized ROC AUC on labelled traffic, where there is enough of it, decides: CBPE assumes the
    relation between features and churn has not changed, which is exactly what a concept drift
    breaks, and each model's estimate is calibrated on its own reference. Without labels, the CBPE
    estimates decide."""
    tol = policy.promotion_auc_tolerance
    labelled = comparison.get("labelled_rows", 0) >= policy.promotion_min_labelled_rows
    kind = "realized" if labelled and comparison.get("challenger_realized_roc_auc") is not None else "estimated"
    champ, chall = comparison.get(f"champion_{kind}_roc_auc"), comparison.get(f"challenger_{kind}_roc_auc")
    problems, evidence = [], []
    if champ is None or chall is None:
        problems.append("no ROC AUC evidence for the comparison")
    else:
        evidence.append(f"{kind} ROC AUC {chall:.4f} vs champion {champ:.4f}"
                        + (f" on {comparison['labelled_rows']} labelled predictions" if kind == "realized" else ""))
        if chall < champ - tol:
            problems.append(f"{kind} ROC AUC {chall:.4f} is worse than the champion's {champ:.4f} beyond {tol}")
    p99 = comparison["challenger_p99_ms"]
    evidence.append(f"shadow p99 {p99:.2f} ms")
    if p99 > policy.promotion_max_p99_ms:
        problems.append(f"shadow p99 {p99:.2f} ms is over the budget {policy.promotion_max_p99_ms} ms")
    if problems:
        return "retire", "; ".join(problems)
    return "promote", "; ".join(evidence)


@dg.asset(
    deps=[shadow_comparison],
    partitions_def=TENANT_PARTITIONS,
    group_name="deployment",
    kinds={"mlflow", "bentoml"},
)
def champion_promotion(
    context: dg.AssetExecutionContext,
    warehouse: DuckDBWarehouse,
    registry: ModelRegistry,
    feature_store: FeatureStore,
    settings: PlatformSettings,
):
    """Moves ``champion`` to the challenger that passed the promotion gate and republishes the
    deployment manifest; the running service swaps models without a restart."""
    tenant = context.partition_key
    with warehouse.connect(tenant) as con:
        con.execute(SHADOW_DDL)
        latest = con.execute("SELECT champion_version, challenger_version, decision, reason FROM shadow_comparisons "
                             "ORDER BY evaluated_at DESC LIMIT 1").fetchone()
    challenger = registry.alias_version(tenant, CHALLENGER)
    if latest is None or latest[2] != "promote" or challenger is None or str(challenger.version) != latest[1]:
        return dg.MaterializeResult(metadata={"promoted": False, "reason": "no challenger passed the promotion gate"})
    entry = promote_challenger(tenant, registry, feature_store, settings, warehouse,
                               reason=f"promotion gate passed: {latest[3]}")
    return dg.MaterializeResult(metadata={
        "promoted": True, "from_version": latest[0], "to_version": latest[1], "reason": latest[3],
        "serving_champion": entry["champion"]["version"],
    })


# --- delivery KPIs -----------------------------------------------------------------------------
@dg.asset(
    deps=[champion_promotion, model_monitoring],
    partitions_def=TENANT_PARTITIONS,
    group_name="monitoring",
    kinds={"duckdb"},
)
def delivery_kpis(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, settings: PlatformSettings):
    """Delivery KPIs from the audit log and run history: time from decay alert to promotion,
    deployments per week, rollbacks, gate failures, failed runs, and service uptime (health checks)."""
    tenant = context.partition_key
    audit_log = warehouse.audit_entries(tenant)
    runs = context.instance.get_runs(dg.RunsFilter(tags={"dagster/partition": tenant}), limit=1000)
    kpis = compute_kpis(audit_log, [r.status.value for r in runs], read_health_checks(settings.root))
    return dg.MaterializeResult(metadata={
        k: (dg.MetadataValue.float(float(v)) if isinstance(v, float) else dg.MetadataValue.int(int(v)))
        for k, v in kpis.items() if v is not None
    })
