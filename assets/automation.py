"""Sensors and jobs that act without a person."""


import dagster as dg

from resources.inbox import move_aside, unknown_tenant_folders
from resources.settings import PlatformSettings
from resources.tenants import TENANT_PARTITIONS, TenantCatalog

churn_pipeline = dg.define_asset_job(
    "churn_pipeline",
    selection=dg.AssetSelection.groups("ingestion", "features", "training", "deployment"),
    description="Ingest -> features -> train -> validation gates -> aliases, for one tenant partition.",
    # Small steps that share one DuckDB file: in-process is faster and keeps one writer.
    executor_def=dg.in_process_executor,
)


prediction_log_job = dg.define_asset_job(
    "prediction_log_ingestion",
    selection=dg.AssetSelection.assets("prediction_log"),
    description="Ingest the service's closed prediction-log segments for one tenant.",
    executor_def=dg.in_process_executor,
)


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
