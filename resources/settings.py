"""Where the platform keeps its state: the ``PlatformSettings`` resource over ``MLOPS_HOME``.

Nothing here touches the disk at import time; ``PlatformSettings.ensure_home()`` creates the layout
on first use. The Dagster-free pieces (paths, telemetry switches, atomic writes) live in
``resources.environment`` and are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from resources.environment import (  # noqa: F401 - re-exported
    DEFAULT_HOME,
    PROJECT_ROOT,
    TELEMETRY_OFF,
    configure_environment,
    disable_telemetry,
    write_atomic,
)

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
    # Retraining after a decay alert should start within a second, not the default five.
    dequeue_interval_seconds: 1
    tag_concurrency_limits:
      - key: "dagster/partition"
        value:
          applyLimitPerUniqueValue: true
        limit: 1
"""


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
