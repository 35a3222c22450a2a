"""The DuckDB warehouse: one database file per tenant, under the tenant's region root.

DuckDB admits one writing process at a time. Only Dagster steps write (runs of one tenant are
serialised by the run coordinator, steps within a run by the in-process executor); the BentoML
service never opens a warehouse. Every write that others read happens in one transaction.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import dagster as dg
import duckdb
import pandas as pd

from mlops.core import audit
from resources.schemas import RAW_TABLES, RawTable
from resources.settings import PlatformSettings
from resources.tenants import TenantCatalog, TenantSpec


class WarehouseBusyError(RuntimeError):
    pass


class DuckDBWarehouse(dg.ConfigurableResource):
    """Per-tenant DuckDB warehouse: raw tables, features, training sets, gates and audit log."""

    settings: PlatformSettings
    catalog: TenantCatalog
    lock_timeout_s: float = 60.0

    def spec(self, tenant: str) -> TenantSpec:
        return self.catalog.get(tenant)

    def path(self, tenant: str):
        spec = self.spec(tenant)
        return self.settings.warehouse_path(spec.name, spec.region)

    @contextlib.contextmanager
    def connect(self, tenant: str, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the tenant's warehouse, waiting while another process holds the write lock."""
        path = self.path(tenant)
        if read_only and not path.exists():
            raise FileNotFoundError(
                f"tenant {tenant!r} has no warehouse yet at {path}; materialize its raw data first"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                con = duckdb.connect(str(path), read_only=read_only)
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise WarehouseBusyError(f"warehouse of tenant {tenant!r} is busy: {exc}") from exc
                time.sleep(0.2)
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self, tenant: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write transaction: committed on success, rolled back on any exception."""
        with self.connect(tenant) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # --- raw data ----------------------------------------------------------------------------
    def replace_source_rows(self, tenant: str, tables: dict[str, pd.DataFrame], source: str) -> dict[str, int]:
        """Replace all rows that came from ``source`` in every given raw table, atomically."""
        counts = {}
        with self.transaction(tenant) as con:
            for name, frame in tables.items():
                table = RAW_TABLES[name]
                con.execute(table.ddl())
                con.execute(f"DELETE FROM {table.name} WHERE source = ?", [source])  # noqa: S608 - known table
                _insert(con, table, frame, source)
                counts[name] = len(frame)
        return counts

    def sync_simulated_rows(self, tenant: str, tables: dict[str, pd.DataFrame], source: str, world: str,
                            time_columns: dict[str, str]) -> dict[str, int]:
        """Load a simulated world up to its clock, in one transaction.

        When the same world was loaded before, only rows from the last loaded day on are replaced
        (the clock moves forward a day at a time); otherwise every row of ``source`` is replaced.
        Returns the rows written per table.
        """
        counts = {}
        with self.transaction(tenant) as con:
            con.execute("CREATE TABLE IF NOT EXISTS simulator_state (source VARCHAR PRIMARY KEY, world VARCHAR, "
                        "loaded_until TIMESTAMP)")
            state = con.execute("SELECT world, loaded_until FROM simulator_state WHERE source = ?", [source]).fetchone()
            since = state[1] if state is not None and state[0] == world else None
            newest = None
            for name, frame in tables.items():
                table = RAW_TABLES[name]
                con.execute(table.ddl())
                column = time_columns.get(name)
                if since is None or column is None:
                    con.execute(f"DELETE FROM {table.name} WHERE source = ?", [source])  # noqa: S608 - known table
                    counts[name] = _insert(con, table, frame, source)
                else:
                    con.execute(f"DELETE FROM {table.name} WHERE source = ? AND {column} >= ?",  # noqa: S608
                                [source, since])
                    counts[name] = _insert(con, table, frame[frame[column] >= since], source)
                if name == "raw_usage_events" and len(frame):
                    newest = pd.Timestamp(frame[column].max()).normalize()
            con.execute("INSERT OR REPLACE INTO simulator_state VALUES (?, ?, ?)",
                        [source, world, newest.to_pydatetime() if newest is not None else None])
        return counts

    def upsert_rows(self, con: duckdb.DuckDBPyConnection, table: RawTable, frame: pd.DataFrame, source: str) -> int:
        """Insert rows, replacing existing rows with the same key (caller owns the transaction)."""
        con.execute(table.ddl())
        con.register("incoming_keys", frame[list(table.key)])
        match = " AND ".join(f"t.{k} = i.{k}" for k in table.key)
        con.execute(
            f"DELETE FROM {table.name} t WHERE EXISTS (SELECT 1 FROM incoming_keys i WHERE {match})"  # noqa: S608
        )
        con.unregister("incoming_keys")
        return _insert(con, table, frame, source)

    def table_counts(self, tenant: str) -> dict[str, int]:
        with self.connect(tenant, read_only=True) as con:
            existing = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            return {
                name: con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]  # noqa: S608 - known table
                for name in RAW_TABLES
                if name in existing
            }

    # --- audit ------------------------------------------------------------------------------
    def audit(self, tenant: str, *, actor: str, action: str, subject: str, outcome: str, details: dict) -> int:
        with self.transaction(tenant) as con:
            return audit.append_entry(
                con, tenant=tenant, actor=actor, action=action, subject=subject, outcome=outcome, details=details
            )

    def audit_entries(self, tenant: str) -> pd.DataFrame:
        with self.connect(tenant) as con:
            con.execute(audit.AUDIT_DDL)
            return con.execute("SELECT * FROM audit_log ORDER BY seq").df()


def _insert(con: duckdb.DuckDBPyConnection, table: RawTable, frame: pd.DataFrame, source: str) -> int:
    cols = table.column_names
    staged = frame[cols].copy()
    staged["source"] = source
    con.register("incoming_rows", staged)
    con.execute(
        f"INSERT INTO {table.name} ({', '.join(cols)}, source) SELECT {', '.join(cols)}, source FROM incoming_rows"  # noqa: S608
    )
    con.unregister("incoming_rows")
    return len(staged)
