"""The MLflow model registry: one registered model per tenant (``churn-<tenant>``), aliases only.

``challenger`` marks a candidate that passed every gate; ``champion`` marks what serves.
Tracking is SQLite under MLOPS_HOME; artifacts go under MLOPS_HOME too, never into the cwd.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import subprocess
import sys
import tempfile
from functools import cached_property

import dagster as dg
import lightgbm as lgb
import mlflow
from dagster_mlflow import mlflow_tracking
from dagster_mlflow.resources import CONFIG_SCHEMA as MLFLOW_CONFIG_SCHEMA
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlops.core.deployment import RegistryUnavailableError
from mlops.core.environment import PROJECT_ROOT
from mlops.core.names import EXPERIMENT_NAME, registered_model_name
from mlops.core.pyfunc_model import booster_from_model_dir
from mlops.core.serving import MANIFEST, read_manifest, serving_dir
from resources.settings import PlatformSettings

# The registry's answers for a model or alias that does not exist (``INVALID_PARAMETER_VALUE``: an
# alias not found); any other error means the registry did not answer.
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")

LINEAGE_TAGS = (
    "tenant",
    "use_case",
    "dataset_version",
    "feature_view_version",
    "code_version",
    "lock_hash",
    "python_version",
    "platform",
    "dagster_run_id",
)



def code_version() -> str:
    """The git commit of the code that runs, with '-dirty' when the work tree has changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def lock_hash() -> str:
    lock = PROJECT_ROOT / "uv.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.exists() else "missing"


def runtime_tags() -> dict[str, str]:
    return {
        "code_version": code_version(),
        "lock_hash": lock_hash(),
        "python_version": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
    }


class ModelRegistry(dg.ConfigurableResource):
    """Registered models (``<use_case>-<tenant>``) and their aliases, in the MLflow registry under
    MLOPS_HOME. Every method takes the tenant and the use case (churn unless named)."""

    settings: PlatformSettings

    @cached_property
    def client(self) -> MlflowClient:
        # MLflow logs a database error with its traceback before raising it; every one reaches the
        # caller as an exception naming the operation (``RegistryUnavailableError``), once.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self._refuse_a_lost_database()
        return MlflowClient(tracking_uri=self.settings.mlflow_tracking_uri,
                            registry_uri=self.settings.mlflow_tracking_uri)

    def _refuse_a_lost_database(self) -> None:
        """MLflow creates an empty database where its file is missing. In a home that has published
        models (the serving manifest names some) a missing file is a lost registry, not a new one:
        refuse, naming it, instead of promoting or rolling back against an empty registry."""
        database = self.settings.mlflow_dir / "mlflow.db"
        manifest = serving_dir(self.settings.root) / MANIFEST
        if database.exists() or not manifest.exists():
            return
        published = read_manifest(serving_dir(self.settings.root))
        if published.get("tenants") or published.get("use_cases"):
            raise RegistryUnavailableError(
                f"the model registry's database {database} is missing, but {manifest} names published "
                "models: restore the database (e.g. from a backup) before promoting, rolling back or "
                "training; an empty registry is not created in its place")

    def ensure_experiment(self) -> str:
        """Create the experiment with its artifact root under MLOPS_HOME (idempotent)."""
        self.settings.ensure_home()
        existing = self.client.get_experiment_by_name(EXPERIMENT_NAME)
        if existing is not None:
            return existing.experiment_id
        try:
            return self.client.create_experiment(EXPERIMENT_NAME, artifact_location=self.settings.mlflow_artifact_uri)
        except MlflowException:  # created concurrently by another run
            return self.client.get_experiment_by_name(EXPERIMENT_NAME).experiment_id

    def alias_version(self, tenant: str, alias: str, use_case: str = "churn") -> ModelVersion | None:
        """The version the alias names; None when the model or the alias does not exist. A registry
        that does not answer raises ``RegistryUnavailableError``: read as "no champion", it would
        let the next version take the champion alias."""
        name = registered_model_name(tenant, use_case)
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                return None
            raise self._unavailable(f"reading {name}@{alias}", exc) from exc

    def set_alias(self, tenant: str, alias: str, version: str | int, use_case: str = "churn") -> None:
        name = registered_model_name(tenant, use_case)
        try:
            self.client.set_registered_model_alias(name, alias, str(version))
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                raise
            raise self._unavailable(f"setting {name}@{alias} to v{version}", exc) from exc

    def delete_alias(self, tenant: str, alias: str, use_case: str = "churn") -> None:
        name = registered_model_name(tenant, use_case)
        try:
            self.client.delete_registered_model_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                raise
            raise self._unavailable(f"deleting {name}@{alias}", exc) from exc

    def _unavailable(self, what: str, exc: MlflowException) -> RegistryUnavailableError:
        detail = str(exc.message).splitlines()[0][:300]
        return RegistryUnavailableError(
            f"the model registry ({self.settings.mlflow_tracking_uri}) did not answer {what}: {detail}. "
            "That change was not made; retry when the registry is available")

    def version(self, tenant: str, version: str | int, use_case: str = "churn") -> ModelVersion:
        return self.client.get_model_version(registered_model_name(tenant, use_case), str(version))

    def load_booster(self, tenant: str, version: str | int, use_case: str = "churn") -> lgb.Booster:
        """The LightGBM booster of a registered version (the model text logged inside its pyfunc)."""
        mlflow.set_tracking_uri(self.settings.mlflow_tracking_uri)
        mlflow.set_registry_uri(self.settings.mlflow_tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{registered_model_name(tenant, use_case)}/{version}", dst_path=tmp)
            return booster_from_model_dir(model_dir)

    def tag_version(self, tenant: str, version: str | int, tags: dict[str, str], use_case: str = "churn") -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(registered_model_name(tenant, use_case), str(version), key, str(value))


@dg.resource(
    config_schema=MLFLOW_CONFIG_SCHEMA,
    required_resource_keys={"registry"},
    description="dagster-mlflow's tracking resource, started after the experiment exists under MLOPS_HOME.",
)
def mlflow_tracking_in_home(context):
    # dagster-mlflow creates a missing experiment with MLflow's default artifact root (./mlruns in
    # the working directory); creating it first keeps artifacts under MLOPS_HOME.
    registry = context.resources.registry
    registry.ensure_experiment()
    # MLflow's URIs are process-wide, and dagster-mlflow sets only the tracking one: registering
    # the model would otherwise go to whichever registry this process used last.
    mlflow.set_tracking_uri(registry.settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(registry.settings.mlflow_tracking_uri)
    return mlflow_tracking.resource_fn(context)
