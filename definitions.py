"""Root assembly of the platform's Dagster definitions (`dagster dev -w workspace.yaml`)."""

from __future__ import annotations

import dagster as dg

from assets import automation, deployment, features, ingestion, monitoring, reports, training, validation
from assets.alerts import platform_alerts_sensor, service_alert_sensor
from assets.usecases import usecase_definitions
from mlops.core.environment import configure_environment
from mlops.core.names import EXPERIMENT_NAME
from mlops.core.usecase import discover_usecases, usecase_roots
from resources.alerts import AlertWebhook
from resources.feature_store import FeatureStore
from resources.gates import GatePolicy
from resources.monitoring import MonitoringPolicy
from resources.notebooks import NotebookRunner
from resources.registry import ModelRegistry, mlflow_tracking_in_home
from resources.settings import PlatformSettings
from resources.tenants import TenantCatalog
from resources.warehouse import DuckDBWarehouse


def build_definitions(home: str | None = None, gates: GatePolicy | None = None,
                      monitoring_policy: MonitoringPolicy | None = None,
                      usecase_paths: list[str] | None = None) -> dg.Definitions:
    """All definitions, wired to one MLOPS_HOME: churn's, plus the lifecycle of every declared use
    case (``usecases/<name>/``, ``$MLOPS_USECASE_PATHS``, ``usecase_paths``). Tests build their own
    with a temporary home."""
    root = configure_environment(home)
    settings = PlatformSettings(home=str(root))
    catalog = TenantCatalog(tenants_file=str(settings.tenants_file))
    resources = {
        "settings": settings,
        "catalog": catalog,
        "warehouse": DuckDBWarehouse(settings=settings, catalog=catalog),
        "feature_store": FeatureStore(settings=settings, catalog=catalog),
        "registry": ModelRegistry(settings=settings),
        "gates": gates or GatePolicy(),
        "monitoring_policy": monitoring_policy or MonitoringPolicy(),
        "notebooks": NotebookRunner(settings=settings),
        "alerts": AlertWebhook.from_env(settings),  # off unless $MLOPS_ALERT_WEBHOOK_URL is set
        "mlflow": mlflow_tracking_in_home.configured(
            {"experiment_name": EXPERIMENT_NAME, "mlflow_tracking_uri": settings.mlflow_tracking_uri}
        ),
    }
    churn = dg.Definitions(
        # Each module sets its own group (ingestion, features, training, deployment, monitoring, reports).
        assets=dg.load_assets_from_modules([ingestion, features, training, deployment, monitoring, reports]),
        asset_checks=dg.load_asset_checks_from_modules([validation]),
        jobs=[automation.churn_pipeline, automation.retrain_job, automation.daily_cycle, automation.prediction_log_job],
        schedules=[automation.daily_cycle_schedule, automation.weekly_retrain_schedule],
        sensors=[automation.tenant_catalog_sensor, automation.decay_retrain_sensor, automation.service_health_sensor,
                 platform_alerts_sensor, service_alert_sensor],
        resources=resources,
    )
    declared = discover_usecases(usecase_roots(usecase_paths))
    return dg.Definitions.merge(churn, *(usecase_definitions(uc) for uc in declared.values()))


defs = build_definitions()
