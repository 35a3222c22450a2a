"""Monitoring: the service's prediction log, NannyML model monitoring, operational metrics, the
shadow comparison that gates promotion, and delivery KPIs, per tenant."""

import datetime as dt
import json

import dagster as dg
import pandas as pd

from assets.training import png_metadata
from mlops.core.deployment import promote_challenger, retire_challenger
from mlops.core.loop import (
    LoopRules,
    active_episode,
    after_monitoring,
    audit_loop,
    data_clock,
    decay_floor,
    decide_promotion,
    episode_kpis,
    episodes,
    inherit_floor,
    loop_metadata,
    on_promotion,
)
from mlops.core.monitoring import (
    MonitoringReport,
    analysis_frame,
    compute_kpis,
    drift_plot,
    load_or_fit,
    monitoring_step,
    operational_summary,
    performance_plot,
    read_health_checks,
    read_monitoring_alerts,
    read_monitoring_results,
    reference_frame,
    service_cpu_usage,
    store_report,
)
from mlops.core.names import CHALLENGER, CHAMPION, CHURN, registered_model_name
from mlops.core.prediction_log import (
    PREDICTION_LOG_DDL,
    ForeignSegmentError,
    archive_segments,
    ingest_closed_segments,
)
from mlops.core.shadow import SHADOW_DDL, shadow_pairs
from resources.feature_store import LABEL_HORIZON_DAYS, MIN_OBSERVED_DAYS, FeatureStore, feature_origin
from resources.monitoring import MonitoringPolicy
from resources.registry import ModelRegistry
from resources.settings import PlatformSettings
from resources.tenants import TENANT_PARTITIONS
from resources.warehouse import DuckDBWarehouse


@dg.asset(
    partitions_def=TENANT_PARTITIONS,
    group_name="monitoring",
    kinds={"duckdb", "parquet"},
)
def prediction_log(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, settings: PlatformSettings):
    """Closed prediction-log segments written by the service, ingested exactly once.

    A segment's name is recorded in the same transaction as its rows (``mlops.core.prediction_log``),
    so a segment is never loaded twice, even if moving it aside afterwards fails.
    """
    return ingest_prediction_log(context, warehouse, settings, use_case=None)


def ingest_prediction_log(context, warehouse: DuckDBWarehouse, settings: PlatformSettings,
                          use_case: str | None) -> dg.MaterializeResult:
    """The ``prediction_log`` asset of churn and of every use case: dead workers' journals recovered,
    closed segments ingested exactly once (unreadable ones quarantined with a reason), then archived."""
    tenant = context.partition_key
    with warehouse.transaction(tenant) as con:
        try:
            ingestion = ingest_closed_segments(con, settings.root, tenant, use_case=use_case)
        except ForeignSegmentError as exc:
            raise dg.Failure(str(exc)) from exc
    archive_segments(settings.root, tenant, ingestion.closed, use_case=use_case)
    if ingestion.recovery_error:
        context.log.warning(f"{ingestion.recovery_error}; the closed segments were ingested, the next run retries")
    for path in ingestion.quarantined:
        context.log.warning(f"quarantined unreadable segment {path.name}: see {path.name}.reason beside it")
    recovered = ingestion.recovered
    return dg.MaterializeResult(
        metadata={
            "segments_ingested": dg.MetadataValue.int(ingestion.loaded),
            "segments_already_ingested": dg.MetadataValue.int(ingestion.skipped),
            "segments_quarantined": dg.MetadataValue.int(len(ingestion.quarantined)),
            "journal_rows_recovered": dg.MetadataValue.int(recovered.rows if recovered else 0),
            "rows_ingested": dg.MetadataValue.int(ingestion.rows),
            "rows_total": dg.MetadataValue.int(ingestion.total_rows),
        }
    )


# --- model monitoring (NannyML) -----------------------------------------------------------------
@dg.asset(
    # After the day's promotion: the loop decides on the champion that serves from today on (a
    # retrain decided before a promotion of the same day would supersede the promoted model).
    deps=[prediction_log, "churn_model", "champion_promotion"],
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
        origin = feature_origin(con)[0]
        analysis = analysis_frame(con, feature_store.online_dir(tenant), version, monitoring_policy.analysis_window_days,
                                  origin=origin, horizon_days=LABEL_HORIZON_DAYS)
        monitor, fitted = load_or_fit(settings.root, tenant, version, monitoring_policy,
                                      lambda: reference_frame(con, version))
        stored = read_monitoring_results(con, version)
        raised = set(read_monitoring_alerts(con, version)[["metric", "chunk_key"]].itertuples(index=False, name=None))
        floor = decay_floor(con, CHURN, version, monitor.own_bound)
    if analysis.empty:
        context.log.info(f"{tenant}: champion v{version} has no logged predictions yet")
        return dg.MaterializeResult(metadata={"model_version": version, "analysis_rows": dg.MetadataValue.int(0),
                                              "decay_alert": False})
    # Judged against the floor the version inherited (the last healthy champion's), not only its own;
    # a decay alert is raised once per alerting chunk, not again every day it stays the newest.
    fresh, everything, decay = monitoring_step(monitor, analysis, stored, raised, floor[0], monitoring_policy)
    report = MonitoringReport(everything, monitor.reference_roc_auc, decay)
    challenger = registry.alias_version(tenant, CHALLENGER)
    with warehouse.transaction(tenant) as con:
        store_report(con, MonitoringReport(fresh, monitor.reference_roc_auc, decay), version, context.run_id)
        loop = after_monitoring(
            con, CHURN, everything, decay, now=data_clock(origin), champion_version=version, floor=floor,
            challenger_in_shadow=challenger is not None and str(challenger.version) != version,
            labels_through=data_clock(origin) - pd.Timedelta(days=LABEL_HORIZON_DAYS),
            rules=LoopRules.of(monitoring_policy), realized_metric=monitor.realized_metric,
            evidence_days=MIN_OBSERVED_DAYS)
    results = everything
    audit_loop(warehouse, tenant, f"{registered_model_name(tenant)}/{version}", report.decay, loop, context.log)

    alerts = report.alerts
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
            "features_drifting_latest_chunk": dg.MetadataValue.int(len(report.drifting_latest())),
            "max_missing_values_rate": number(_max_latest(results, "missing_values_rate")),
            "max_unseen_values_rate": number(_max_latest(results, "unseen_values_rate")),
            "alerts": dg.MetadataValue.int(len(alerts)),
            "decay_alert": bool(report.decay),
            "decay_alerts": dg.MetadataValue.json(report.decay),
            "decay_floor": dg.MetadataValue.float(floor[0]),
            "decay_floor_source": floor[1],
            **loop_metadata(loop),
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
    champion = summary[summary["role"] == CHAMPION]
    metadata = {
        "requests": dg.MetadataValue.int(int(champion["predictions"].sum()) if len(champion) else 0),
        "requests_last_24h": dg.MetadataValue.int(int(summary["last_24h"].sum())),
        "shadow_predictions": dg.MetadataValue.int(int(summary.loc[summary["role"] == CHALLENGER, "predictions"].sum())),
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
@dg.asset(
    deps=[prediction_log, "churn_model_aliases"],
    partitions_def=TENANT_PARTITIONS,
    group_name="monitoring",
    kinds={"nannyml", "duckdb"},
    # Not blocking: a retired challenger must not stop the day's monitoring downstream;
    # champion_promotion promotes only a challenger whose recorded decision is "promote".
    check_specs=[dg.AssetCheckSpec(
        "promotion_gate", asset="shadow_comparison", blocking=False,
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
            origin = feature_origin(con)[0]
            # In a decay episode the challenger must restore performance: "not worse" is not enough.
            episode = active_episode(con, CHURN)
            pairs = shadow_pairs(con, champ_v, chall_v)
            if len(pairs) >= policy.shadow_min_predictions:
                # The champion's logged features: the shadow pairs' rows and the labelled ones.
                # Early labels (churned so far) are evidence too: a decay episode cannot wait a month.
                logged = analysis_frame(con, feature_store.online_dir(tenant), champ_v,
                                        policy.analysis_window_days + LABEL_HORIZON_DAYS,
                                        origin=origin, horizon_days=LABEL_HORIZON_DAYS,
                                        early_after_days=MIN_OBSERVED_DAYS if episode is not None else None)
                references = {v: reference_frame(con, v) for v in (champ_v, chall_v)}
        comparison["require_improvement"] = episode is not None
        if len(pairs) < policy.shadow_min_predictions:
            decision = "wait"
            reason = f"{len(pairs)} of {policy.shadow_min_predictions} shadow predictions so far"
        else:
            evidence, decision, reason = decide_promotion(
                pairs, logged, references, {v: registry.load_booster(tenant, v) for v in (champ_v, chall_v)}, policy,
                require_improvement=episode is not None, origin=origin)
            comparison |= evidence
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
        retire_challenger(tenant, chall_v, registry, feature_store, settings, warehouse, reason)

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
    monitoring_policy: MonitoringPolicy,
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
    old_v, new_v = str(latest[0]), str(latest[1])
    with warehouse.connect(tenant) as con:
        monitors = {v: load_or_fit(settings.root, tenant, v, monitoring_policy, lambda v=v: reference_frame(con, v))[0]
                    for v in (old_v, new_v)}
        old_floor = decay_floor(con, CHURN, old_v, monitors[old_v].own_bound)[0]
    entry = promote_challenger(tenant, registry, feature_store, settings, warehouse,
                               reason=f"promotion gate passed: {latest[3]}")
    with warehouse.transaction(tenant) as con:
        # The new champion is judged against the higher of its own floor and its predecessor's.
        floor, source = inherit_floor(con, CHURN, new_v, old_v, monitors[new_v].realized_metric,
                                      monitors[new_v].own_bound, old_floor)
        episode = on_promotion(con, CHURN, now=data_clock(feature_origin(con)[0]), new_version=new_v)
    return dg.MaterializeResult(metadata={
        "promoted": True, "from_version": latest[0], "to_version": latest[1], "reason": latest[3],
        "serving_champion": entry[CHAMPION]["version"], "decay_floor": dg.MetadataValue.float(floor),
        "decay_floor_source": source, "loop_episode": "" if episode is None else str(episode.episode),
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
    deployments per week, rollbacks, gate failures, failed runs, service uptime (health checks), and
    per decay episode the time to restore: days from the estimated onset to the alert, from the alert
    to a promoted version and to realized performance back above the floor, retrains and promotions."""
    tenant = context.partition_key
    audit_log = warehouse.audit_entries(tenant)
    runs = context.instance.get_runs(dg.RunsFilter(tags={"dagster/partition": tenant}), limit=1000)
    kpis = compute_kpis(audit_log, [r.status.value for r in runs], read_health_checks(settings.root))
    with warehouse.connect(tenant) as con:
        restore = episode_kpis(episodes(con))  # every use case of the tenant
    return dg.MaterializeResult(metadata={
        **{k: (dg.MetadataValue.float(float(v)) if isinstance(v, float) else dg.MetadataValue.int(int(v)))
           for k, v in kpis.items() if v is not None},
        **episode_metadata(restore),
    })


def episode_metadata(kpis: list[dict]) -> dict:
    """Time-to-restore KPIs as asset metadata: a table of every episode, and the latest one's figures."""
    if not kpis:
        return {"decay_episodes": dg.MetadataValue.int(0)}
    latest = kpis[-1]
    out = {"decay_episodes": dg.MetadataValue.int(len(kpis)),
           "episodes_table": dg.MetadataValue.md(pd.DataFrame(kpis).to_markdown(index=False)),
           "latest_episode_status": latest["status"],
           "latest_episode_retrains": dg.MetadataValue.int(latest["retrains"]),
           "latest_episode_promotions": dg.MetadataValue.int(latest["promotions"])}
    for key in ("onset_to_alert_days", "alert_to_promotion_days", "alert_to_restored_days"):
        if latest[key] is not None:
            out[f"latest_episode_{key}"] = dg.MetadataValue.int(latest[key])
    return out
