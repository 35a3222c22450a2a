"""Monitoring: the service's prediction log, ingested into each tenant's warehouse."""

import datetime as dt

import dagster as dg
import pandas as pd

from resources.serving import PREDICTION_LOG_COLUMNS, prediction_log_dir
from resources.settings import PlatformSettings
from resources.tenants import TENANT_PARTITIONS
from resources.warehouse import DuckDBWarehouse

PREDICTION_LOG_DDL = """
CREATE TABLE IF NOT EXISTS prediction_log (
    prediction_id VARCHAR NOT NULL, tenant VARCHAR NOT NULL, account_id VARCHAR NOT NULL,
    role VARCHAR NOT NULL, model_version VARCHAR NOT NULL, score DOUBLE NOT NULL, latency_ms DOUBLE NOT NULL,
    snapshot_version BIGINT NOT NULL, endpoint VARCHAR NOT NULL, requested_at TIMESTAMP NOT NULL,
    segment VARCHAR NOT NULL,
    PRIMARY KEY (prediction_id, role)
)
"""
SEGMENTS_DDL = """
CREATE TABLE IF NOT EXISTS ingested_log_segments (
    segment VARCHAR PRIMARY KEY, rows BIGINT NOT NULL, ingested_at TIMESTAMP NOT NULL
)
"""


@dg.asset(
    partitions_def=TENANT_PARTITIONS,
    group_name="monitoring",
    kinds={"duckdb", "parquet"},
)
def prediction_log(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, settings: PlatformSettings):
    """Closed prediction-log segments written by the service, ingested exactly once.

    A segment's name is recorded in the same transaction as its rows, so a segment is never
    loaded twice, even if moving it aside afterwards fails; the service only ever renames
    complete segments into ``closed/``, so a segment being written is never read.
    """
    tenant = context.partition_key
    folder = prediction_log_dir(settings.root, tenant)
    closed = sorted((folder / "closed").glob("segment-*.parquet"))
    loaded = skipped = rows = 0
    with warehouse.transaction(tenant) as con:
        con.execute(PREDICTION_LOG_DDL)
        con.execute(SEGMENTS_DDL)
        done = {r[0] for r in con.execute("SELECT segment FROM ingested_log_segments").fetchall()}
        for path in closed:
            if path.name in done:
                skipped += 1
                continue
            frame = pd.read_parquet(path)
            if (frame["tenant"] != tenant).any():
                raise dg.Failure(f"segment {path.name} holds rows of another tenant; refusing to ingest it")
            frame = frame[list(PREDICTION_LOG_COLUMNS)].assign(segment=path.name)
            con.register("segment_rows", frame)
            con.execute("INSERT INTO prediction_log BY NAME SELECT * FROM segment_rows")
            con.unregister("segment_rows")
            con.execute("INSERT INTO ingested_log_segments VALUES (?, ?, ?)",
                        [path.name, len(frame), dt.datetime.now(dt.UTC).replace(tzinfo=None)])
            loaded += 1
            rows += len(frame)
        total = con.execute("SELECT count(*) FROM prediction_log").fetchone()[0]
    archive = folder / "ingested"
    archive.mkdir(parents=True, exist_ok=True)
    for path in closed:
        path.replace(archive / path.name)
    return dg.MaterializeResult(
        metadata={
            "segments_ingested": dg.MetadataValue.int(loaded),
            "segments_already_ingested": dg.MetadataValue.int(skipped),
            "rows_ingested": dg.MetadataValue.int(rows),
            "rows_total": dg.MetadataValue.int(total),
        }
    )
