"""Online feature snapshots: how a snapshot version is named on disk, in one place.

A snapshot is immutable once written (``features-v00042.parquet``); the pointer ``CURRENT.json``
beside it names the current one. The service, the monitoring join and the feature store all derive
file names and versions from here.
"""

from __future__ import annotations

from pathlib import Path

SNAPSHOT_GLOB = "features-v*.parquet"
POINTER_FILE = "CURRENT.json"
# For SQL over file names (DuckDB regexp_extract): group 1 is the version.
SNAPSHOT_VERSION_REGEX = r"features-v([0-9]+)[.]parquet"


def snapshot_file_name(version: int) -> str:
    return f"features-v{int(version):05d}.parquet"


def snapshot_version(path: Path | str) -> int:
    """The version of a snapshot file, from its name."""
    return int(Path(path).stem.split("-v")[-1])


def next_snapshot_version(folder: Path) -> int:
    return max((snapshot_version(p) for p in folder.glob(SNAPSHOT_GLOB)), default=0) + 1
