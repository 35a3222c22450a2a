"""Deployment: registry aliases for a model version that passed every gate, and the serving
manifest that the running service follows."""

import tempfile
from pathlib import Path

import dagster as dg

from assets.training import churn_model, latest_candidate
from assets.validation import failed_or_missing_gates
from resources.feature_store import FeatureStore
from resources.registry import CHALLENGER, CHAMPION, ModelRegistry, registered_model_name
from resources.serving import publish_tenant, rollback_tenant, serving_dir
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
            "champion_version": entry["champion"]["version"],
            "challenger_version": (entry["challenger"] or {}).get("version", "none"),
            "snapshot_version": dg.MetadataValue.int(entry["snapshot"]["version"]),
            "manifest": dg.MetadataValue.path(str(serving_dir(settings.root) / "manifest.json")),
        }
    )


def publish_from_registry(tenant: str, registry: ModelRegistry, feature_store: FeatureStore,
                          settings: PlatformSettings) -> dict:
    """Export the aliased versions from MLflow and publish them with the current online snapshot."""
    champion = registry.alias_version(tenant, CHAMPION)
    if champion is None:
        raise dg.Failure(f"tenant {tenant!r} has no champion model to serve yet")
    challenger = registry.alias_version(tenant, CHALLENGER)
    pointer = feature_store.current_snapshot_pointer(tenant)
    bundle_models = serving_dir(settings.root) / "models" / tenant
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for mv in (champion, challenger):
            if mv is not None and str(mv.version) not in files:
                published = bundle_models / f"v{mv.version}.txt"
                if published.exists():  # model files in the bundle are immutable: no re-export
                    files[str(mv.version)] = published
                    continue
                path = Path(tmp) / f"v{mv.version}.txt"
                registry.load_booster(tenant, mv.version).save_model(str(path))
                files[str(mv.version)] = path
        champ = (str(champion.version), files[str(champion.version)])
        chall = None
        if challenger is not None and str(challenger.version) != str(champion.version):
            chall = (str(challenger.version), files[str(challenger.version)])
        return publish_tenant(
            serving_dir(settings.root), tenant, champion=champ, challenger=chall,
            snapshot=(pointer["version"], feature_store.online_dir(tenant) / pointer["path"]),
        )


def promote_challenger(tenant: str, registry: ModelRegistry, feature_store: FeatureStore,
                       settings: PlatformSettings, warehouse: DuckDBWarehouse, reason: str) -> dict:
    """Move ``champion`` to the current challenger and publish; the service swaps without a restart."""
    challenger = registry.alias_version(tenant, CHALLENGER)
    if challenger is None:
        raise ValueError(f"tenant {tenant!r} has no challenger to promote")
    previous = registry.alias_version(tenant, CHAMPION)
    registry.set_alias(tenant, CHAMPION, challenger.version)
    entry = publish_from_registry(tenant, registry, feature_store, settings)
    warehouse.audit(tenant, actor="deployment", action="promotion",
                    subject=f"{registered_model_name(tenant)}/{challenger.version}", outcome="promoted",
                    details={"from": str(previous.version) if previous else None, "to": str(challenger.version),
                             "reason": reason})
    return entry


def rollback_champion(tenant: str, registry: ModelRegistry, settings: PlatformSettings,
                      warehouse: DuckDBWarehouse, reason: str) -> tuple[str, str]:
    """Serve the previous champion again (manifest first, then the registry alias), audited."""
    current, previous = rollback_tenant(serving_dir(settings.root), tenant)
    registry.set_alias(tenant, CHAMPION, previous)
    registry.delete_alias(tenant, CHALLENGER)
    warehouse.audit(tenant, actor="deployment", action="rollback", subject=registered_model_name(tenant),
                    outcome="rolled_back", details={"from": current, "to": previous, "reason": reason})
    return current, previous
