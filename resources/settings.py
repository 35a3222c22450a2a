"""Where the platform keeps its state, and the process-wide switches it needs.

Everything a run writes lives under one directory, ``MLOPS_HOME``. Nothing here touches the disk
at import time; ``PlatformSettings.ensure_home()`` creates the layout on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOME = PROJECT_ROOT / ".mlops"

# Every library in the stack reports usage by default. A customer's data platform must not phone
# home, so the project switches all of it off itself.
TELEMETRY_OFF = {
    "NML_DISABLE_USAGE_LOGGING": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DAGSTER_DISABLE_TELEMETRY": "1",
    "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false",
}

DAGSTER_YAML = """\
# Written by the platform. Telemetry off; one run per tenant partition at a time, because a
# tenant's DuckDB warehouse admits a single writing process.
telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 4
    tag_concurrency_limits:
      - key: "dagster/partition"
        value:
          applyLimitPerUniqueValue: true
        limit: 1
"""


def disable_telemetry() -> None:
    """Turn off usage reporting of dagster, mlflow, bentoml and nannyml for this process."""
    for key, value in TELEMETRY_OFF.items():
        os.environ[key] = value


def configure_environment(home: str | os.PathLike | None = None) -> Path:
    """Point every library of this process at one MLOPS_HOME and switch telemetry off.

    Sets environment variables only; it writes no file. Returns the resolved home.
    """
    disable_telemetry()
    resolved = Path(home or os.environ.get("MLOPS_HOME") or DEFAULT_HOME).resolve()
    os.environ["MLOPS_HOME"] = str(resolved)
    # Everything derives from MLOPS_HOME, so one variable moves the whole platform.
    os.environ["DAGSTER_HOME"] = str(resolved / "dagster")
    os.environ["BENTOML_HOME"] = str(resolved / "bentoml")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{resolved / 'mlflow' / 'mlflow.db'}"
    return resolved


class PlatformSettings(dg.ConfigurableResource):
    """Paths of the platform's state directory (``MLOPS_HOME``)."""

    home: str

    @property
    def root(self) -> Path:
        return Path(self.home).resolve()

    def tenant_dir(self, tenant: str, region: str) -> Path:
        # Data of a region stays under that region's storage root.
        return self.root / "regions" / region / tenant

    def warehouse_path(self, tenant: str, region: str) -> Path:
        return self.tenant_dir(tenant, region) / "warehouse.duckdb"

    def online_dir(self, tenant: str, region: str) -> Path:
        return self.tenant_dir(tenant, region) / "online"

    def artifacts_dir(self, tenant: str, region: str) -> Path:
        return self.tenant_dir(tenant, region) / "artifacts"

    def inbox_dir(self, tenant: str) -> Path:
        return self.root / "inbox" / tenant

    @property
    def inbox_root(self) -> Path:
        return self.root / "inbox"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifact_uri(self) -> str:
        return (self.mlflow_dir / "artifacts").as_uri()

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster"

    @property
    def tenants_file(self) -> Path:
        return self.root / "tenants.json"

    def ensure_home(self) -> Path:
        """Create the directory layout and the Dagster instance config (idempotent)."""
        for path in (self.root, self.mlflow_dir / "artifacts", self.dagster_home, self.inbox_root):
            path.mkdir(parents=True, exist_ok=True)
        dagster_yaml = self.dagster_home / "dagster.yaml"
        if not dagster_yaml.exists():
            write_atomic(dagster_yaml, DAGSTER_YAML.encode())
        return self.root


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
