"""Process-wide paths and switches, free of Dagster so the serving process can import them cheaply.

Nothing here touches the disk at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
