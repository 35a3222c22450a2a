"""Online feature snapshots: how a snapshot version is named on disk, in one place.

A snapshot is immutable once written (``features-v00042.parquet``); the pointer ``CURRENT.json``
beside it names the current one. The service, the monitoring join and the feature store all derive
file names and versions from here.
"""

from __future__ import annotations

import json
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


def publish_snapshot(folder: Path, snapshot, about: dict) -> dict:
    """Write ``snapshot`` (a data frame) as the next immutable version in ``folder`` and point
    ``CURRENT.json`` at it, atomically both; the pointer is ``about`` plus version, file name, rows and
    content hash. One folder per use case and tenant."""
    from mlops.core.environment import atomic_path, write_atomic
    from mlops.core.hashing import content_hash

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    version = next_snapshot_version(folder)
    path = folder / snapshot_file_name(version)
    with atomic_path(path, fsync=True) as tmp:
        snapshot.to_parquet(tmp, index=False)
    pointer = {**about, "version": version, "path": path.name, "rows": len(snapshot),
               "content_hash": content_hash(snapshot)}
    write_atomic(folder / POINTER_FILE, json.dumps(pointer, indent=2).encode())
    return pointer


def compare_rows(online, offline, key: str, columns, categorical, rtol: float = 1e-9) -> list[str]:
    """Every disagreement between online and offline feature rows keyed by ``key``: rows on one side
    only, and columns that differ (numbers within ``rtol``, categories exactly): the skew check."""
    import numpy as np
    import pandas as pd

    on, off = online.set_index(key), offline.set_index(key)
    problems = [f"{k}: online only" for k in on.index.difference(off.index)]
    problems += [f"{k}: offline only" for k in off.index.difference(on.index)]
    for k in on.index.intersection(off.index):
        for col in columns:
            a, b = on.at[k, col], off.at[k, col]
            if col in categorical:
                same = (a == b) or (pd.isna(a) and pd.isna(b))
            else:
                same = bool(np.isclose(float(a), float(b), rtol=rtol, atol=0.0, equal_nan=True))
            if not same:
                problems.append(f"{k}.{col}: online={a!r} offline={b!r}")
    return problems
