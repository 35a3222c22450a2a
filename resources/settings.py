"""Where the platform keeps its state: the ``PlatformSettings`` resource over ``MLOPS_HOME``.

Nothing here touches the disk at import time; ``PlatformSettings.ensure_home()`` creates the layout
on first use. The layout itself, telemetry switches and atomic writes are Dagster-free and live in
``mlops.core.environment``.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mlops.core.environment import HomeLayout, write_atomic

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
# A run whose worker dies (killed, out of memory) is marked failed by the code server that
# launched it. Run monitoring also fails a run stuck starting or running past any sane length, and
# never resumes one (the default run launcher cannot).
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  max_runtime_seconds: 7200
  max_resume_run_attempts: 0
  poll_interval_seconds: 5
# A run tagged ``dagster/max_retries`` (the decay sensor's retraining) is re-executed once when
# its worker crashed, never when a step failed (a gate failing again on the same data).
run_retries:
  enabled: true
  max_retries: 0
  retry_on_asset_or_op_failure: false
"""


class PlatformSettings(dg.ConfigurableResource):
    """Paths of the platform's state directory (``MLOPS_HOME``), laid out by ``HomeLayout``."""

    home: str

    @property
    def root(self) -> Path:
        return Path(self.home).resolve()

    @property
    def layout(self) -> HomeLayout:
        return HomeLayout(self.root)

    def tenant_dir(self, tenant: str, region: str) -> Path:
        return self.layout.tenant_dir(tenant, region)

    def warehouse_path(self, tenant: str, region: str) -> Path:
        return self.layout.warehouse_path(tenant, region)

    def online_dir(self, tenant: str, region: str) -> Path:
        return self.layout.online_dir(tenant, region)

    def inbox_dir(self, tenant: str) -> Path:
        return self.layout.inbox_dir(tenant)

    @property
    def inbox_root(self) -> Path:
        return self.layout.inbox_root

    @property
    def mlflow_dir(self) -> Path:
        return self.layout.mlflow_dir

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.layout.mlflow_tracking_uri

    @property
    def mlflow_artifact_uri(self) -> str:
        return self.layout.mlflow_artifact_uri

    @property
    def dagster_home(self) -> Path:
        return self.layout.dagster_home

    @property
    def tenants_file(self) -> Path:
        return self.layout.tenants_file

    def ensure_home(self) -> Path:
        """Create the directory layout and the Dagster instance config (idempotent)."""
        layout = self.layout
        for path in (layout.root, layout.mlflow_dir / "artifacts", layout.dagster_home, layout.inbox_root):
            path.mkdir(parents=True, exist_ok=True)
        dagster_yaml = layout.dagster_home / "dagster.yaml"
        # A file the platform wrote (its first line says so) follows the platform's config when that
        # changes (an existing home gains run monitoring and retries); one a person edited is kept.
        current = dagster_yaml.read_text() if dagster_yaml.exists() else None
        platform_written = current is not None and current.startswith(DAGSTER_YAML.splitlines()[0])
        if current is None or (platform_written and current != DAGSTER_YAML):
            write_atomic(dagster_yaml, DAGSTER_YAML.encode())
        return self.root
