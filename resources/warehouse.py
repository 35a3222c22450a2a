"""The DuckDB warehouse: one database file per tenant, under the tenant's region root.

DuckDB admits one writing process at a time. Only Dagster steps write (runs of one tenant are
serialised by the run coordinator, steps within a run by the in-process executor); the BentoML
service never opens a warehouse. Every write that others read happens in one transaction.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator

import dagster as dg
import duckdb
import pandas as pd

from mlops.core import audit
from mlops.core.usecase import TableSpec
from resources.schemas import ATTRIBUTE_NAMES, RAW_TABLES
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
            migrate_raw_tables(con)
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
            migrate_raw_tables(con)
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

    def upsert_rows(self, con: duckdb.DuckDBPyConnection, table: TableSpec, frame: pd.DataFrame, source: str) -> int:
        """Insert rows, replacing existing rows with the same key (caller owns the transaction)."""
        migrate_raw_tables(con)
        con.execute(table.ddl())
        con.register("incoming_keys", frame[list(table.key)])
        match = " AND ".join(f"t.{k} = i.{k}" for k in table.key)
        con.execute(
            f"DELETE FROM {table.name} t WHERE EXISTS (SELECT 1 FROM incoming_keys i WHERE {match})"  # noqa: S608
        )
        con.unregister("incoming_keys")
        return _insert(con, table, frame, source)

    def upsert_accounts(self, con: duckdb.DuckDBPyConnection, frame: pd.DataFrame, source: str,
                        today: dt.date | None = None) -> int:
        """Load an accounts file (``ACCOUNTS_FILE``): static attributes into ``raw_accounts``, plan,
        seats and MRR into the history ``raw_account_attributes`` (caller owns the transaction).

        A delivered state becomes a history row valid from the file's ``valid_from`` when given;
        otherwise from the account's signup day when the account has no history yet (the first
        state known), else from the day after the newest usage event (the delivery describes the
        state after the data already loaded, and the same data give the same history; with no
        usage yet, ``today``). A state equal to the one already in force then adds no row; a row
        with the same account and day replaces the one there. Returns the accounts delivered.
        """
        self.upsert_rows(con, RAW_TABLES["raw_accounts"], frame, source)
        history = RAW_TABLES["raw_account_attributes"]
        con.execute(history.ddl())
        con.execute(RAW_TABLES["raw_usage_events"].ddl())
        delivered = frame[["account_id", "signup_date", *ATTRIBUTE_NAMES]].assign(
            valid_from=frame["valid_from"] if "valid_from" in frame.columns else pd.NaT)
        con.register("delivered_accounts", delivered.astype({"valid_from": "datetime64[ns]"}))
        try:
            rows = con.execute(_DELIVERED_HISTORY_SQL, [today or dt.datetime.now(dt.UTC).date()]).df()
        finally:
            con.unregister("delivered_accounts")
        self.upsert_rows(con, history, rows, source)
        return len(frame)

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


def migrate_raw_tables(con: duckdb.DuckDBPyConnection) -> bool:
    """Move a warehouse written before the attribute history to it (caller owns the transaction).

    Such a warehouse kept plan, seats and MRR in raw_accounts, as of its last load. They become
    each account's first history row (valid from its signup day: nothing earlier is known) and
    leave raw_accounts; the simulator's rows are then reloaded in full by the next sync, with
    their real history. Returns whether anything was migrated.
    """
    columns = {r[0] for r in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = 'raw_accounts' "
        "AND database_name = current_database() AND schema_name = current_schema()").fetchall()}
    if not set(ATTRIBUTE_NAMES) <= columns:
        return False
    history = RAW_TABLES["raw_account_attributes"]
    con.execute(history.ddl())
    names = ", ".join(history.column_names)
    con.execute(f"INSERT INTO {history.name} ({names}, source) "  # noqa: S608 - declared names
                f"SELECT account_id, CAST(signup_date AS DATE), {', '.join(ATTRIBUTE_NAMES)}, source FROM raw_accounts")
    for column in ATTRIBUTE_NAMES:
        con.execute(f"ALTER TABLE raw_accounts DROP COLUMN {column}")
    con.execute("DROP TABLE IF EXISTS simulator_state")  # the next sync loads the simulated world in full
    return True


# The history rows an accounts delivery adds (see DuckDBWarehouse.upsert_accounts); $1 is today.
_DELIVERED_HISTORY_SQL = """
WITH dated AS (
    SELECT d.account_id, d.plan, d.seats, d.mrr,
           CAST(coalesce(
               CAST(d.valid_from AS DATE),
               CASE WHEN NOT EXISTS (SELECT 1 FROM raw_account_attributes h WHERE h.account_id = d.account_id)
                    THEN CAST(d.signup_date AS DATE) END,
               (SELECT CAST(max(event_date) AS DATE) + 1 FROM raw_usage_events),
               CAST($1 AS DATE)) AS DATE) AS valid_from
    FROM delivered_accounts d
)
SELECT n.account_id, n.valid_from, n.plan, n.seats, n.mrr
FROM dated n
ASOF LEFT JOIN raw_account_attributes h ON n.account_id = h.account_id AND n.valid_from >= h.valid_from
WHERE h.account_id IS NULL OR h.valid_from = n.valid_from
   OR n.plan <> h.plan OR n.seats <> h.seats OR n.mrr <> h.mrr
"""


def _insert(con: duckdb.DuckDBPyConnection, table: TableSpec, frame: pd.DataFrame, source: str) -> int:
    cols = table.column_names
    staged = frame[cols].copy()
    staged["source"] = source
    con.register("incoming_rows", staged)
    con.execute(
        f"INSERT INTO {table.name} ({', '.join(cols)}, source) SELECT {', '.join(cols)}, source FROM incoming_rows"  # noqa: S608
    )
    con.unregister("incoming_rows")
    return len(staged)
