"""Process-wide paths and switches, free of Dagster so the serving process can import them cheaply.

``HomeLayout`` is the one definition of where everything lives under ``MLOPS_HOME``. Nothing here
touches the disk at import time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
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

def disable_telemetry() -> None:
    """Turn off usage reporting of dagster, mlflow, bentoml and nannyml for this process."""
    for key, value in TELEMETRY_OFF.items():
        os.environ[key] = value


def configure_environment(home: str | os.PathLike | None = None) -> Path:
    """Point every library of this process at one MLOPS_HOME and switch telemetry off.

    Sets environment variables only; it writes no file. Returns the resolved home.
    """
    disable_telemetry()
    layout = HomeLayout(Path(home or os.environ.get("MLOPS_HOME") or DEFAULT_HOME).resolve())
    os.environ["MLOPS_HOME"] = str(layout.root)
    # Everything derives from MLOPS_HOME, so one variable moves the whole platform.
    os.environ["DAGSTER_HOME"] = str(layout.dagster_home)
    os.environ["BENTOML_HOME"] = str(layout.bentoml_home)
    os.environ["MLFLOW_TRACKING_URI"] = layout.mlflow_tracking_uri
    return layout.root


SERVING_DIR_ENV = "MLOPS_SERVING_DIR"


@dataclass(frozen=True)
class HomeLayout:
    """Where each piece of state lives under one ``MLOPS_HOME`` (see README, "State")."""

    root: Path

    def tenant_dir(self, tenant: str, region: str) -> Path:
        # Data of a region stays under that region's storage root.
        return self.root / "regions" / region / tenant

    def warehouse_path(self, tenant: str, region: str) -> Path:
        return self.tenant_dir(tenant, region) / "warehouse.duckdb"

    def online_dir(self, tenant: str, region: str) -> Path:
        return self.tenant_dir(tenant, region) / "online"

    @property
    def inbox_root(self) -> Path:
        return self.root / "inbox"

    def inbox_dir(self, tenant: str) -> Path:
        return self.inbox_root / tenant

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
    def bentoml_home(self) -> Path:
        return self.root / "bentoml"

    @property
    def tenants_file(self) -> Path:
        return self.root / "tenants.json"

    @property
    def serving_dir(self) -> Path:
        """The bundle the service reads: ``$MLOPS_SERVING_DIR`` (inside a bento) or ``<home>/serving``."""
        configured = os.environ.get(SERVING_DIR_ENV)
        if configured:
            # Relative to the project root (inside a bento: its src/ folder), not the working directory.
            return (PROJECT_ROOT / configured).resolve()
        return self.root / "serving"

    @property
    def service_status_dir(self) -> Path:
        """Where each service worker writes its CPU usage (operational metrics read it)."""
        return self.root / "serving" / "status"

    @property
    def health_checks_file(self) -> Path:
        return self.root / "serving" / "health_checks.jsonl"

    def prediction_log_dir(self, tenant: str, use_case: str | None = None) -> Path:
        """Churn's ``prediction_logs/<tenant>``; another use case's ``prediction_logs/<use case>/<tenant>``."""
        if use_case is None:
            return self.root / "prediction_logs" / tenant
        return self.root / "prediction_logs" / use_case / tenant

    def monitoring_dir(self, tenant: str) -> Path:
        return self.root / "monitoring" / tenant

    def reports_dir(self, tenant: str) -> Path:
        return self.root / "reports" / tenant

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"


@contextlib.contextmanager
def atomic_path(path: Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` when the block succeeds,
    removed when it fails. Readers see the old file or the new one, never a partial one. The
    temporary name starts with a dot and holds ``.tmp-``, so globs of published files skip it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a partial one."""
    with atomic_path(path, fsync=True) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created, with its folder, if missing) for the block:
    one read-modify-write of a shared file at a time across processes *and* threads.

    Each call opens its own file description, and ``flock`` locks belong to the open file
    description, not to the process: a second open of the same file in the same process (another
    thread, or a nested call) waits like another process would. So no per-process threading lock is
    needed on top (``flock`` releases the GIL while it waits). Caveats: a nested call on the same
    path in one thread deadlocks (the lock is not reentrant); and on NFS, where Linux emulates
    ``flock`` with per-process POSIX locks, threads of one process would not exclude each other.

    The descriptor is close-on-exec, so a subprocess started inside the block does not inherit it;
    the lock is released explicitly (``LOCK_UN``) before closing, so a child forked inside the
    block, which shares the description, does not keep holding it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def platform_variables(home: str | os.PathLike | None = None) -> dict[str, str]:
    """The variables a library's own command line needs to run against this home with telemetry
    off (``mlops env``)."""
    configure_environment(home)
    keys = (*TELEMETRY_OFF, "MLOPS_HOME", "DAGSTER_HOME", "BENTOML_HOME", "MLFLOW_TRACKING_URI")
    return {key: os.environ[key] for key in keys}
