"""Jobs, sensors and schedules: the parts of the platform that act without a person.

The closed loop: ``daily_cycle`` (per tenant) refreshes data, features and the online snapshot,
ingests the prediction log and runs monitoring, the shadow comparison and promotion. When
``model_monitoring`` materializes with a decay alert, ``decay_retrain_sensor`` launches
``churn_retrain`` for that tenant only when the closed loop decided to retrain
(``mlops.core.loop``: one episode per decay, a bounded number of retrains, then a person), whose new
model goes through the gates to ``challenger`` and into shadow.
"""

import json
import time

import dagster as dg

from mlops.core.alerts import probe_readyz
from mlops.core.monitoring import record_health_check
from resources.inbox import move_aside, unknown_tenant_folders
from resources.monitoring import MonitoringPolicy
from resources.schemas import RAW_TABLES
from resources.settings import PlatformSettings
from resources.tenants import TENANT_PARTITIONS, TenantCatalog

RAW_ASSETS = list(RAW_TABLES)
# Small steps sharing one DuckDB file: the in-process executor is faster and keeps one writer.
_IN_PROCESS = dg.in_process_executor

churn_pipeline = dg.define_asset_job(
    "churn_pipeline",
    selection=dg.AssetSelection.groups("ingestion", "features", "training", "deployment")
    - dg.AssetSelection.assets("champion_promotion"),
    description="Ingest -> features -> train -> validation gates -> aliases -> serving manifest, for one tenant.",
    executor_def=_IN_PROCESS,
)

retrain_job = dg.define_asset_job(
    "churn_retrain",
    selection=dg.AssetSelection.assets(
        "account_features", "churn_training_set", "churn_model", "churn_model_aliases", "serving_manifest"),
    description="Retrain one tenant on its current data: features -> training -> gates -> challenger -> shadow.",
    executor_def=_IN_PROCESS,
)

daily_cycle = dg.define_asset_job(
    "daily_cycle",
    selection=dg.AssetSelection.assets(
        *RAW_ASSETS, "account_features", "online_feature_snapshot", "serving_manifest", "prediction_log",
        "model_monitoring", "operational_metrics", "shadow_comparison", "champion_promotion", "delivery_kpis"),
    description="One tenant's day: new data -> features -> online snapshot -> prediction log -> monitoring "
                "-> shadow comparison -> promotion -> KPIs.",
    executor_def=_IN_PROCESS,
)

prediction_log_job = dg.define_asset_job(
    "prediction_log_ingestion",
    selection=dg.AssetSelection.assets("prediction_log"),
    description="Ingest the service's closed prediction-log segments for one tenant.",
    executor_def=_IN_PROCESS,
)


def _every_tenant(context, job_name: str, tag: str):
    tenants = context.instance.get_dynamic_partitions(TENANT_PARTITIONS.name)
    stamp = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return [dg.RunRequest(run_key=f"{job_name}:{t}:{stamp}", partition_key=t, tags={"trigger": tag})
            for t in sorted(tenants)] or dg.SkipReason("no tenants yet")


@dg.schedule(job=daily_cycle, cron_schedule="15 0 * * *", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING)
def daily_cycle_schedule(context: dg.ScheduleEvaluationContext):
    """Every day, every tenant: refresh, monitor, compare the shadow, promote."""
    return _every_tenant(context, "daily_cycle", "daily_schedule")


@dg.schedule(job=retrain_job, cron_schedule="0 3 * * 0", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING)
def weekly_retrain_schedule(context: dg.ScheduleEvaluationContext):
    """Every week, every tenant is retrained regardless of alerts, through the same gates."""
    return _every_tenant(context, "churn_retrain", "weekly_schedule")


MONITORING_ASSET = dg.AssetKey("model_monitoring")
# A retrain the loop decided on is launched once (its run key names the decision). Should its run
# worker crash (killed, out of memory), Dagster's run retries re-execute it once, with the same tags
# and partition, linked to the failed run in the UI; a failed step (a gate) is not retried: the
# instance's ``run_retries.retry_on_asset_or_op_failure`` is false (resources/settings.py).
DECISION_RUN_RETRY = {"dagster/max_retries": "1"}


def build_decay_sensor(name: str, monitoring_asset: dg.AssetKey, job, run_key_prefix: str = "decay"):
    """An asset sensor on a use case's monitoring asset that retrains the decaying tenant (below)."""

    @dg.asset_sensor(name=name, asset_key=monitoring_asset, job=job, minimum_interval_seconds=2,
                     default_status=dg.DefaultSensorStatus.RUNNING)
    def decay_sensor(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry):
        """Asset sensor on the monitoring asset (every tenant partition): a materialization on which
        the closed loop decided ``retrain`` (``loop_action``, on a new decay alert or an open
        episode's standing one; ``mlops.core.loop`` decides: retrain, hold for the shadow or for new
        labels, or escalate to a person) launches
        the retraining job for that tenant only. The run key names the episode and the retrain
        (``loop_run_key``), so each decision launches one run, however often the sensor sees it;
        a run whose worker crashed is re-executed once by Dagster (``DECISION_RUN_RETRY``).

        Why ``@dg.asset_sensor`` and not ``@dg.multi_asset_sensor``: only an ``AssetSensorDefinition``
        names the asset it watches in the definitions the UI reads (``SensorMetadataSnap.asset_keys``
        is set for asset sensors alone; a multi-asset sensor's monitored assets are not in the
        snapshot, and ``MultiAssetSensorDefinition`` is ``@superseded``, warning at import). The
        asset sensor's cursor is the storage id of the last materialization it handled, so a running
        deployment neither replays nor skips events.

        An asset sensor calls this function once per tick with the *latest* new materialization only
        and then moves its cursor there. So that no alert is dropped when several monitoring runs
        (other tenants, or the same tenant twice) land between two ticks, this reads every
        materialization after the cursor up to and including ``asset_event``: the cursor is still
        the previous one while this runs (Dagster updates it after the function returns).
        """
        records = _materializations_through(context.instance, context.cursor, asset_event, monitoring_asset)
        requests, notes = [], []
        for record in records:
            materialization = record.asset_materialization
            metadata = materialization.metadata
            decay = metadata.get("decay_alert")
            action = metadata["loop_action"].value if "loop_action" in metadata else "none"
            # A retrain can be due without a new alert (an open episode's first retrain stands).
            if (decay is None or not decay.value) and action != "retrain":
                continue
            tenant = materialization.partition
            version = str(metadata["model_version"].value)
            if action != "retrain":
                reason = metadata["loop_reason"].value if "loop_reason" in metadata else "no loop decision recorded"
                notes.append(f"{tenant}: decay alert on v{version}, loop action {action!r}: {reason}")
                continue
            alerts = metadata["decay_alerts"].value if "decay_alerts" in metadata else []
            requests.append(dg.RunRequest(
                run_key=f"{run_key_prefix}:{tenant}:{metadata['loop_run_key'].value}",
                partition_key=tenant,
                tags={"trigger": "decay_alert", "decaying_version": version,
                      "alert": json.dumps(alerts)[:1000], "alert_storage_id": str(record.storage_id),
                      **DECISION_RUN_RETRY},
            ))
        for note in notes:
            context.log.info(note)
        return requests or dg.SkipReason(f"no retrain to launch for {len(records)} new monitoring result(s)")

    return decay_sensor


decay_retrain_sensor = build_decay_sensor("decay_retrain_sensor", MONITORING_ASSET, retrain_job)


def _materializations_through(instance: dg.DagsterInstance, cursor: str | None, last: dg.EventLogEntry,
                              asset_key: dg.AssetKey = MONITORING_ASSET) -> list[dg.EventLogRecord]:
    """Every materialization of the monitoring asset after the asset sensor's cursor (a storage id),
    oldest first, up to and including ``last`` (the one the asset sensor moves its cursor to)."""
    after = int(cursor) if cursor and cursor.isdigit() else None  # as the asset sensor reads it
    records: list[dg.EventLogRecord] = []
    page = None
    while True:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, after_storage_id=after),
            limit=200, cursor=page, ascending=True,
        )
        for record in result.records:
            records.append(record)
            if record.event_log_entry == last:
                return records
        if not result.has_more:
            return records
        page = result.cursor


@dg.sensor(minimum_interval_seconds=10, default_status=dg.DefaultSensorStatus.RUNNING)
def service_health_sensor(context: dg.SensorEvaluationContext, settings: PlatformSettings,
                          monitoring_policy: MonitoringPolicy):
    """Probes the serving endpoint's ``/readyz``; the probes are the uptime record of the KPIs (the
    alert to a person when it stops answering is ``assets.alerts.service_alert_sensor``'s)."""
    url = monitoring_policy.service_url.rstrip("/") + "/readyz"
    ok, detail = probe_readyz(url)
    record_health_check(settings.root, ok, detail, time.time())
    return dg.SkipReason(f"{url}: {detail}")


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def tenant_catalog_sensor(context: dg.SensorEvaluationContext, catalog: TenantCatalog, settings: PlatformSettings):
    """Adds a tenant partition for every tenant in the catalog, and rejects inbox folders of
    tenants nobody knows."""
    known = set(catalog.all())
    for folder in unknown_tenant_folders(settings.inbox_root, known):
        for path in [p for p in folder.iterdir() if p.is_file()]:
            move_aside(path, accepted=False, message=f"{path.name}: unknown tenant {folder.name!r}")
            context.log.warning(f"rejected {path}: unknown tenant {folder.name!r}")
    existing = set(context.instance.get_dynamic_partitions(TENANT_PARTITIONS.name))
    missing = sorted(known - existing)
    if not missing:
        return dg.SkipReason("every tenant in the catalog has a partition")
    return dg.SensorResult(dynamic_partitions_requests=[TENANT_PARTITIONS.build_add_request(missing)])
