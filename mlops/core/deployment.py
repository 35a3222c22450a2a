"""Deployment operations: publish the aliased versions to the serving bundle, promote the
challenger, retire it, roll the champion back. Assets, the CLI and tests all call these.

They take the platform's registry, feature store, settings and warehouse objects (the Dagster
resources, used here as plain objects) and write an audit entry for every change.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlops.core.names import CHALLENGER, CHAMPION, registered_model_name
from mlops.core.serving import (
    NoPreviousChampionError,
    NotDeployedError,
    publish_tenant,
    read_manifest,
    rollback_tenant,
    serving_dir,
)


class NothingToDeployError(LookupError):
    pass


class RegistryUnavailableError(RuntimeError):
    """The model registry did not answer (its database locked past the busy timeout, unreadable,
    missing): the operation changed nothing, or was undone, and can be retried."""


class DeploymentMismatchError(RuntimeError):
    """The registry alias and the serving manifest could not be brought back into agreement after a
    failure (the registry failed twice in a row); the message says what each holds and how to repair."""


def publish_from_registry(tenant: str, registry, feature_store, settings) -> dict:
    """Export the aliased versions from MLflow and publish them with the current online snapshot."""
    champion = registry.alias_version(tenant, CHAMPION)
    if champion is None:
        raise NothingToDeployError(f"tenant {tenant!r} has no champion model to serve yet")
    challenger = registry.alias_version(tenant, CHALLENGER)
    return _publish_versions(tenant, registry, feature_store, settings, str(champion.version),
                             None if challenger is None else str(challenger.version))


def _publish_versions(tenant: str, registry, feature_store, settings, champion: str, challenger: str | None,
                      switch=None) -> dict:
    """Publish ``champion`` (and ``challenger`` unless it is the champion) with the current online
    snapshot. Everything read from the registry is read first; ``switch()``, the one registry write
    of the caller if any, runs next; the manifest, a local file, is switched last. So a registry
    that fails leaves the manifest as it was."""
    pointer = feature_store.current_snapshot_pointer(tenant)
    bundle_models = serving_dir(settings.root) / "models" / tenant
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for version in {champion, challenger} - {None}:
            published = bundle_models / f"v{version}.txt"
            if published.exists():  # model files in the bundle are immutable: no re-export
                files[version] = published
                continue
            path = Path(tmp) / f"v{version}.txt"
            registry.load_booster(tenant, version).save_model(str(path))
            files[version] = path
        if switch is not None:
            switch()
        chall = (challenger, files[challenger]) if challenger is not None and challenger != champion else None
        return publish_tenant(
            serving_dir(settings.root), tenant, champion=(champion, files[champion]), challenger=chall,
            snapshot=(pointer["version"], feature_store.online_dir(tenant) / pointer["path"]),
        )


def _undo(tenant: str, steps: list, failure: BaseException) -> None:
    """Undo registry writes (newest first) after ``failure``; raise ``DeploymentMismatchError`` if
    an undo fails too."""
    for describe, undo in reversed(steps):
        try:
            undo()
        except Exception as exc:
            raise DeploymentMismatchError(
                f"tenant {tenant!r}: {failure!r} after the registry {describe}, and undoing that failed too "
                f"({exc!r}): the registry's aliases and the serving manifest disagree until the tenant's "
                "serving_manifest asset is materialized again (it publishes what the aliases name)") from failure


def promote_challenger(tenant: str, registry, feature_store, settings, warehouse, reason: str,
                       actor: str = "deployment") -> dict:
    """Move ``champion`` to the current challenger and publish; the service swaps without a restart.

    The registry's alias moves, then the manifest switches; if switching the manifest fails, the
    alias is moved back, so the registry and what serves never disagree."""
    challenger = registry.alias_version(tenant, CHALLENGER)
    if challenger is None:
        raise NothingToDeployError(f"tenant {tenant!r} has no challenger to promote")
    previous = registry.alias_version(tenant, CHAMPION)
    version = str(challenger.version)
    moved = []

    def switch() -> None:
        registry.set_alias(tenant, CHAMPION, version)
        moved.append((f"moved {CHAMPION} to v{version}",
                      (lambda: registry.set_alias(tenant, CHAMPION, previous.version)) if previous is not None
                      else (lambda: registry.delete_alias(tenant, CHAMPION))))

    try:
        entry = _publish_versions(tenant, registry, feature_store, settings, version, None, switch=switch)
    except BaseException as exc:
        _undo(tenant, moved, exc)
        raise
    warehouse.audit(tenant, actor=actor, action="promotion",
                    subject=f"{registered_model_name(tenant)}/{challenger.version}", outcome="promoted",
                    details={"from": str(previous.version) if previous else None, "to": str(challenger.version),
                             "reason": reason})
    return entry


def retire_challenger(tenant: str, version: str, registry, feature_store, settings, warehouse, reason: str) -> None:
    """Take the challenger out of shadow: its alias goes, the manifest is republished without it."""
    champion = registry.alias_version(tenant, CHAMPION)
    if champion is None:
        raise NothingToDeployError(f"tenant {tenant!r} has no champion model to serve")
    removed = []

    def switch() -> None:
        registry.delete_alias(tenant, CHALLENGER)
        removed.append((f"deleted {CHALLENGER} (v{version})", lambda: registry.set_alias(tenant, CHALLENGER, version)))

    try:
        _publish_versions(tenant, registry, feature_store, settings, str(champion.version), None, switch=switch)
    except BaseException as exc:
        _undo(tenant, removed, exc)
        raise
    warehouse.audit(tenant, actor="shadow_comparison", action="challenger_retired",
                    subject=f"{registered_model_name(tenant)}/{version}", outcome="retired",
                    details={"reason": reason})


def rollback_champion(tenant: str, registry, settings, warehouse, reason: str,
                      actor: str = "deployment") -> tuple[str, str]:
    """Serve the previous champion again, audited. The manifest's champion history names it; the
    registry's aliases move first (champion back, challenger removed), the manifest switches last,
    and a failure at any step undoes the registry's, so the two never disagree."""
    current, previous = _rollback_target(serving_dir(settings.root), tenant)
    challenger = registry.alias_version(tenant, CHALLENGER)
    done = []
    try:
        registry.set_alias(tenant, CHAMPION, previous)
        done.append((f"moved {CHAMPION} to v{previous}", lambda: registry.set_alias(tenant, CHAMPION, current)))
        if challenger is not None:
            registry.delete_alias(tenant, CHALLENGER)
            done.append((f"deleted {CHALLENGER} (v{challenger.version})",
                         lambda: registry.set_alias(tenant, CHALLENGER, challenger.version)))
        rolled = rollback_tenant(serving_dir(settings.root), tenant)
    except BaseException as exc:
        _undo(tenant, done, exc)
        raise
    if rolled != (current, previous):  # the manifest changed in between: follow what it now serves
        registry.set_alias(tenant, CHAMPION, rolled[1])
        current, previous = rolled
    warehouse.audit(tenant, actor=actor, action="rollback", subject=registered_model_name(tenant),
                    outcome="rolled_back", details={"from": current, "to": previous, "reason": reason})
    return current, previous


def _rollback_target(folder: Path, tenant: str) -> tuple[str, str]:
    """(current, previous) champion of churn's ``tenant`` by the manifest's history, changing nothing."""
    entry = read_manifest(folder)["tenants"].get(tenant)
    if entry is None:
        raise NotDeployedError(f"tenant {tenant!r} is not deployed")
    history = entry["champion_history"]
    if len(history) < 2:
        raise NoPreviousChampionError(f"tenant {tenant!r} has no previous champion to roll back to")
    return history[-1], history[-2]


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
    try:
        entry = publish()
    except BaseException as exc:  # the manifest did not switch: the alias goes back
        _undo(tenant, [(f"moved {CHAMPION} to v{challenger.version}",
                        (lambda: registry.set_alias(tenant, CHAMPION, previous.version, use_case=name)) if previous
                        else (lambda: registry.delete_alias(tenant, CHAMPION, use_case=name)))], exc)
        raise
    warehouse.audit(tenant, actor=actor, action="promotion",
                    subject=f"{usecase.registered_model_name(tenant)}/{challenger.version}", outcome="promoted",
                    details={"from": str(previous.version) if previous else None, "to": str(challenger.version),
                             "reason": reason, "use_case": name})
    return entry


def retire_usecase_challenger(usecase, tenant: str, version: str, registry, warehouse, publish, reason: str) -> None:
    """Take a use case's challenger out of shadow: its alias goes, the manifest is republished without it."""
    registry.delete_alias(tenant, CHALLENGER, use_case=usecase.name)
    try:
        publish()
    except BaseException as exc:  # the manifest did not switch: the alias comes back
        _undo(tenant, [(f"deleted {CHALLENGER} (v{version})",
                        lambda: registry.set_alias(tenant, CHALLENGER, version, use_case=usecase.name))], exc)
        raise
    warehouse.audit(tenant, actor="shadow_comparison", action="challenger_retired",
                    subject=f"{usecase.registered_model_name(tenant)}/{version}", outcome="retired",
                    details={"reason": reason, "use_case": usecase.name})
