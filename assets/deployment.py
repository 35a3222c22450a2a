"""Deployment: registry aliases for a model version that passed every gate, and the serving
manifest that the running service follows."""


import dagster as dg

from assets.training import churn_model
from mlops.core.candidates import failed_or_missing_gates, latest_candidate
from mlops.core.deployment import publish_from_registry
from mlops.core.names import CHALLENGER, CHAMPION, registered_model_name
from mlops.core.serving import serving_dir
from resources.feature_store import FeatureStore
from resources.registry import ModelRegistry
from resources.settings import PlatformSettings
from resources.tenants import TENANT_PARTITIONS
from resources.warehouse import DuckDBWarehouse


@dg.asset(
    deps=[churn_model],
    partitions_def=TENANT_PARTITIONS,
    group_name="deployment",
    kinds={"mlflow"},
)
def churn_model_aliases(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, registry: ModelRegistry):
    """Gives the newest model version the ``challenger`` alias, and ``champion`` too when the tenant
    has none yet. Refuses any version that has not passed every validation gate."""
    tenant = context.partition_key
    name = registered_model_name(tenant)
    with warehouse.connect(tenant) as con:
        candidate = latest_candidate(con)
        version = str(candidate["model_version"])
        problems = failed_or_missing_gates(con, version)
    if problems:
        reason = "; ".join(f"{gate}: {why}" for gate, why in sorted(problems.items()))
        warehouse.audit(tenant, actor="deployment", action="alias_refused", subject=f"{name}/{version}",
                        outcome="refused", details=problems)
        raise dg.Failure(f"{name} v{version} is kept away from the aliases: {reason}")

    registry.set_alias(tenant, CHALLENGER, version)
    assigned = [CHALLENGER]
    champion = registry.alias_version(tenant, CHAMPION)
    if champion is None:
        registry.set_alias(tenant, CHAMPION, version)
        assigned.append(CHAMPION)
        champion_version = version
    else:
        champion_version = str(champion.version)
    warehouse.audit(tenant, actor="deployment", action="alias_assigned", subject=f"{name}/{version}",
                    outcome="assigned", details={"aliases": assigned, "champion_version": champion_version})
    return dg.MaterializeResult(
        metadata={
            "model_name": name,
            "challenger_version": version,
            "champion_version": champion_version,
            "aliases_assigned": ", ".join(assigned),
        }
    )


@dg.asset(
    deps=[churn_model_aliases, "online_feature_snapshot"],
    partitions_def=TENANT_PARTITIONS,
    group_name="deployment",
    kinds={"bentoml"},
)
def serving_manifest(
    context: dg.AssetExecutionContext,
    warehouse: DuckDBWarehouse,
    registry: ModelRegistry,
    feature_store: FeatureStore,
    settings: PlatformSettings,
):
    """Publishes the tenant's champion, challenger and online snapshot to the serving bundle and
    switches the deployment manifest atomically; the running service swaps models on its own."""
    tenant = context.partition_key
    entry = publish_from_registry(tenant, registry, feature_store, settings)
    warehouse.audit(tenant, actor="deployment", action="manifest_published", subject=registered_model_name(tenant),
                    outcome="published", details=entry)
    return dg.MaterializeResult(
        metadata={
            "champion_version": entry[CHAMPION]["version"],
            "challenger_version": (entry[CHALLENGER] or {}).get("version", "none"),
            "snapshot_version": dg.MetadataValue.int(entry["snapshot"]["version"]),
            "manifest": dg.MetadataValue.path(str(serving_dir(settings.root) / "manifest.json")),
        }
    )
