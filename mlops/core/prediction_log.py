"""The prediction log in the warehouse: the table the service's segments are ingested into, and the
ingestion itself (each closed segment exactly once).

The columns are declared once, in ``mlops.core.serving.PREDICTION_LOG_COLUMNS``: the service writes
segments with them and this table is derived from them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mlops.core.serving import (
    PREDICTION_LOG_COLUMNS,
    QUARANTINE_FOLDER,
    JournalRecovery,
    prediction_log_dir,
    quarantine,
    recover_journals,
)

_SQL_TYPES = {"string": "VARCHAR", "float64": "DOUBLE", "int64": "BIGINT", "datetime64[us]": "TIMESTAMP"}
PREDICTION_LOG_TABLE = "prediction_log"
# Churn's log keeps the table name it always had; the table of any other use case is named after it.
CHURN_USECASE = "churn"


def prediction_log_table(usecase: str | None = None) -> str:
    """The warehouse table of a use case's prediction log: churn's ``prediction_log``, another use
    case's ``prediction_log_<name>`` (use-case names are ``[a-z][a-z0-9_]*``), the same columns.

    A table per use case rather than a ``use_case`` column: the columns, the segments the service
    writes and every existing table and query over churn's log stay as they are (no migration of a
    table with a primary key), and a use case's monitoring reads only its own rows."""
    if usecase in (None, CHURN_USECASE):
        return PREDICTION_LOG_TABLE
    if not usecase.replace("_", "").isalnum() or not usecase[:1].isalpha() or usecase.lower() != usecase:
        raise ValueError(f"not a use-case name: {usecase!r}")
    return f"{PREDICTION_LOG_TABLE}_{usecase}"


def prediction_log_ddl(table: str = PREDICTION_LOG_TABLE) -> str:
    """The prediction log's table, from ``PREDICTION_LOG_COLUMNS`` (the entity key in ``account_id``)."""
    return (
        f"CREATE TABLE IF NOT EXISTS {table} ("
        + ", ".join(f"{name} {_SQL_TYPES[dtype]} NOT NULL" for name, dtype in PREDICTION_LOG_COLUMNS.items())
        # the segment a row came from; a prediction has one row per role (champion, shadow challenger)
        + ", segment VARCHAR NOT NULL, PRIMARY KEY (prediction_id, role))"
    )


PREDICTION_LOG_DDL = prediction_log_ddl()
SEGMENTS_DDL = """
CREATE TABLE IF NOT EXISTS ingested_log_segments (
    segment VARCHAR PRIMARY KEY, rows BIGINT NOT NULL, ingested_at TIMESTAMP NOT NULL
)
"""


class ForeignSegmentError(ValueError):
    pass


@dataclass(frozen=True)
class Ingestion:
    closed: list[Path]  # every closed segment seen (to be archived once the transaction commits)
    loaded: int
    skipped: int
    rows: int
    total_rows: int
    quarantined: list[Path] = field(default_factory=list)  # unreadable segments moved to ``quarantine/``
    recovered: JournalRecovery | None = None  # dead workers' journals converted to segments first
    recovery_error: str | None = None  # why that recovery failed (it is tried again on the next run)


def ingest_closed_segments(con, home: Path, tenant: str, use_case: str | None = None) -> Ingestion:
    """Load the tenant's closed segments not loaded before (caller's transaction).

    A segment's name is recorded in the same transaction as its rows, so a segment is never loaded
    twice, even if moving it aside afterwards fails; the service only ever renames complete
    segments into ``closed/``, so a segment being written is never read.

    First, the journals of dead workers (a crashed service) are converted into closed segments
    (``recover_journals``, exactly once). A segment that cannot be read (damaged, truncated, not a
    prediction-log segment) is moved to ``quarantine/`` with a ``.reason`` file and the others are
    loaded.
    """
    log_use_case = _log_folder_use_case(use_case)
    folder = prediction_log_dir(home, tenant, log_use_case)
    table = prediction_log_table(use_case)
    con.execute(prediction_log_ddl(table))
    con.execute(SEGMENTS_DDL)
    done = {r[0] for r in con.execute("SELECT segment FROM ingested_log_segments").fetchall()}
    try:
        recovered = recover_journals(home)
    except Exception as exc:  # the closed segments are still ingested; the next run tries again
        recovered, recovery_error = None, f"recovering the journals of dead workers failed: {exc!r}"
    else:
        recovery_error = None
    closed = sorted((folder / "closed").glob("segment-*.parquet"))
    loaded = skipped = rows = 0
    quarantined: list[Path] = []
    for path in list(closed):
        if path.name in done:
            skipped += 1
            continue
        try:
            frame = _read_segment(path)
        except _UnreadableSegment as exc:
            quarantined.append(quarantine(path, folder / QUARANTINE_FOLDER, str(exc)))
            closed.remove(path)
            continue
        if (frame["tenant"] != tenant).any():
            raise ForeignSegmentError(f"segment {path.name} holds rows of another tenant; refusing to ingest it")
        frame = frame[list(PREDICTION_LOG_COLUMNS)].assign(segment=path.name)
        con.register("segment_rows", frame)
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM segment_rows")  # noqa: S608 - derived name
        con.unregister("segment_rows")
        con.execute("INSERT INTO ingested_log_segments VALUES (?, ?, ?)",
                    [path.name, len(frame), dt.datetime.now(dt.UTC).replace(tzinfo=None)])
        loaded += 1
        rows += len(frame)
    total = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 - derived name
    return Ingestion(closed, loaded, skipped, rows, total, quarantined, recovered, recovery_error)


class _UnreadableSegment(ValueError):
    pass


def _read_segment(path: Path) -> pd.DataFrame:
    """A segment's rows, or ``_UnreadableSegment`` naming why it cannot be ingested."""
    import pyarrow as pa

    try:
        frame = pd.read_parquet(path)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise _UnreadableSegment(f"not a readable Parquet file (damaged or truncated): {exc}") from exc
    missing = [c for c in PREDICTION_LOG_COLUMNS if c not in frame.columns]
    if missing:
        raise _UnreadableSegment(f"not a prediction-log segment: no column(s) {', '.join(missing)}")
    nulls = [c for c in PREDICTION_LOG_COLUMNS if frame[c].isna().any()]
    if nulls:
        raise _UnreadableSegment(f"missing values in column(s) {', '.join(nulls)}")
    return frame


def archive_segments(home: Path, tenant: str, segments: list[Path], use_case: str | None = None) -> None:
    """Move ingested segments out of ``closed/`` (after the ingesting transaction committed)."""
    archive = prediction_log_dir(home, tenant, _log_folder_use_case(use_case)) / "ingested"
    archive.mkdir(parents=True, exist_ok=True)
    for path in segments:
        path.replace(archive / path.name)


def _log_folder_use_case(use_case: str | None) -> str | None:
    """Churn's segments lie in ``prediction_logs/<tenant>``, another use case's in ``<use case>/<tenant>``."""
    return None if use_case in (None, CHURN_USECASE) else use_case
