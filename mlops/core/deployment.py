"""Deployment operations: publish the aliased versions to the serving bundle, promote the
challenger, retire it, roll the champion back. Assets, the CLI and tests all call these.

They take the platform's registry, feature store, settings and warehouse objects (the Dagster
resources, used here as plain objects) and write an audit entry for every change.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlops.core.names import CHALLENGER, CHAMPION, registered_model_name
from mlops.core.serving import publish_tenant, rollback_tenant, serving_dir


class NothingToDeployError(LookupError):
    pass


def publish_from_registry(tenant: str, registry, feature_store, settings) -> dict:
    """Export the aliased versions from MLflow and publish them with the current online snapshot."""
    champion = registry.alias_version(tenant, CHAMPION)
    if champion is None:
        raise NothingToDeployError(f"tenant {tenant!r} has no champion model to serve yet")
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


def promote_challenger(tenant: str, registry, feature_store, settings, warehouse, reason: str,
                       actor: str = "deployment") -> dict:
    """Move ``champion`` to the current challenger and publish; the service swaps without a restart."""
    challenger = registry.alias_version(tenant, CHALLENGER)
    if challenger is None:
        raise NothingToDeployError(f"tenant {tenant!r} has no challenger to promote")
    previous = registry.alias_version(tenant, CHAMPION)
    registry.set_alias(tenant, CHAMPION, challenger.version)
    entry = publish_from_registry(tenant, registry, feature_store, settings)
    warehouse.audit(tenant, actor=actor, action="promotion",
                    subject=f"{registered_model_name(tenant)}/{challenger.version}", outcome="promoted",
                    details={"from": str(previous.version) if previous else None, "to": str(challenger.version),
                             "reason": reason})
    return entry


def retire_challenger(tenant: str, version: str, registry, feature_store, settings, warehouse, reason: str) -> None:
    """Take the challenger out of shadow: its alias goes, the manifest is republished without it."""
    registry.delete_alias(tenant, CHALLENGER)
    publish_from_registry(tenant, registry, feature_store, settings)
    warehouse.audit(tenant, actor="shadow_comparison", action="challenger_retired",
                    subject=f"{registered_model_name(tenant)}/{version}", outcome="retired",
                    details={"reason": reason})


def rollback_champion(tenant: str, registry, settings, warehouse, reason: str,
                      actor: str = "deployment") -> tuple[str, str]:
    """Serve the previous champion again (manifest first, then the registry alias), audited."""
    current, previous = rollback_tenant(serving_dir(settings.root), tenant)
    registry.set_alias(tenant, CHAMPION, previous)
    registry.delete_alias(tenant, CHALLENGER)
    warehouse.audit(tenant, actor=actor, action="rollback", subject=registered_model_name(tenant),
                    outcome="rolled_back", details={"from": current, "to": previous, "reason": reason})
    return current, previous


# --- declared use cases: the same operations, published by the caller's ``publish`` ----------------
def promote_usecase_challenger(usecase, tenant: str, registry, warehouse, publish, reason: str,
                               actor: str = "deployment") -> dict:
    """Move a use case's ``champion`` to its challenger and republish (``publish()``: the use case's
    ``publish_usecase`` from the registry); the service swaps without a restart. Audited."""
    name = usecase.name
    challenger = registry.alias_version(tenant, CHALLENGER, use_case=name)
    if challenger is None:
        raise NothingToDeployError(f"{usecase.registered_model_name(tenant)} has no challenger to promote")
    previous = registry.alias_version(tenant, CHAMPION, use_case=name)
    registry.set_alias(tenant, CHAMPION, challenger.version, use_case=name)
    entry = publish()
    warehouse.audit(tenant, actor=actor, action="promotion",
                    subject=f"{usecase.registered_model_name(tenant)}/{challenger.version}", outcome="promoted",
                    details={"from": str(previous.version) if previous else None, "to": str(challenger.version),
                             "reason": reason, "use_case": name})
    return entry


def retire_usecase_challenger(usecase, tenant: str, version: str, registry, warehouse, publish, reason: str) -> None:
    """Take a use case's challenger out of shadow: its alias goes, the manifest is republished without it."""
    registry.delete_alias(tenant, CHALLENGER, use_case=usecase.name)
    publish()
    warehouse.audit(tenant, actor="shadow_comparison", action="challenger_retired",
                    subject=f"{usecase.registered_model_name(tenant)}/{version}", outcome="retired",
                    details={"reason": reason, "use_case": usecase.name})
