"""Deployment: registry aliases for a model version that passed every gate."""


import dagster as dg

from assets.training import churn_model, latest_candidate
from assets.validation import failed_or_missing_gates
from resources.registry import CHALLENGER, CHAMPION, ModelRegistry, registered_model_name
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
