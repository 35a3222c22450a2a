"""Users' own data: CSV or Parquet files dropped into ``MLOPS_HOME/inbox/<tenant>/``.

A file's name says which raw table it feeds (``accounts*.csv``, ``usage_events*.parquet``, ...).
An accounts file holds each account's current state; its plan, seats and MRR go into the
attribute history (``raw_account_attributes``) as of the delivery (see
``DuckDBWarehouse.upsert_accounts``); ``account_attributes*`` files feed that history directly.
Each file is validated against the declared schema (pandera) and loaded in its own transaction:
a bad file is rejected with a message naming the file, the column and the reason, moved to
``rejected/`` beside a ``.error.txt``, and the warehouse stays exactly as it was.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaError, SchemaErrors

from mlops.core.usecase import TableSpec
from resources.schemas import ACCOUNTS_FILE, RAW_TABLES

# Accounts first, so that other files may refer to accounts delivered in the same batch.
FILE_PREFIXES: dict[str, str] = {
    "accounts": "raw_accounts",
    "account_attributes": "raw_account_attributes",
    "usage_events": "raw_usage_events",
    "billing_events": "raw_billing_events",
    "support_tickets": "raw_support_tickets",
    "churn_events": "raw_churn_events",
}
SUFFIXES = (".csv", ".parquet")
MAX_FILE_BYTES = 512 * 1024 * 1024


class InboxRejection(ValueError):
    """A file that cannot be ingested; the message names file, column and reason."""

    def __init__(self, file: Path, column: str | None, reason: str):
        self.file, self.column, self.reason = Path(file), column, reason
        where = f"column {column!r}: " if column else ""
        super().__init__(f"{Path(file).name}: {where}{reason}")


@dataclass(frozen=True)
class InboxOutcome:
    file: str
    table: str | None
    accepted: bool
    rows: int
    message: str


def table_for(path: Path) -> TableSpec:
    stem = path.name.lower()
    if path.suffix.lower() not in SUFFIXES:
        raise InboxRejection(path, None, f"unsupported file type {path.suffix!r}; use .csv or .parquet")
    for prefix, table in sorted(FILE_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if stem.startswith(prefix):
            return ACCOUNTS_FILE if table == ACCOUNTS_FILE.name else RAW_TABLES[table]
    raise InboxRejection(
        path, None, f"file name must start with one of {sorted(FILE_PREFIXES)} to say which table it feeds"
    )


def usecase_table_for(path: Path, tables) -> object:
    """The declared table (``mlops.core.usecase.TableSpec``) a use case's inbox file feeds, by the
    longest table prefix its name starts with (``orders*.csv`` feeds ``raw_orders``)."""
    if path.suffix.lower() not in SUFFIXES:
        raise InboxRejection(path, None, f"unsupported file type {path.suffix!r}; use .csv or .parquet")
    for table in sorted(tables, key=lambda t: -len(t.inbox_prefix)):
        if path.name.lower().startswith(table.inbox_prefix):
            return table
    raise InboxRejection(path, None, "file name must start with one of "
                                     f"{sorted(t.inbox_prefix for t in tables)} to say which table it feeds")


def read_and_validate(path: Path, tenant: str, known_tenants: set[str],
                      tables=None) -> tuple[TableSpec, pd.DataFrame]:
    """Parse and validate one inbox file; raise InboxRejection naming what is wrong. ``tables``: the
    declared tables of a use case (its inbox is ``inbox/<tenant>/<use case>/``); churn's otherwise."""
    table = table_for(path) if tables is None else usecase_table_for(path, tables)
    size = path.stat().st_size
    if size == 0:
        raise InboxRejection(path, None, "file is empty")
    if size > MAX_FILE_BYTES:
        raise InboxRejection(path, None, f"file is {size} bytes, over the {MAX_FILE_BYTES} byte limit")
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=True)
        else:
            frame = pd.read_parquet(path)
    except Exception as exc:  # any parser error is a malformed file, reported as such
        raise InboxRejection(path, None, f"cannot be parsed: {type(exc).__name__}: {exc}") from exc
    if frame.empty:
        raise InboxRejection(path, None, "file has a header but no rows")
    missing = [c for c in table.column_names if c not in frame.columns]
    if missing:
        raise InboxRejection(path, missing[0], f"required column is missing (all missing: {missing})")
    if "tenant" in frame.columns:
        values = set(frame["tenant"].dropna().astype(str))
        unknown = values - known_tenants
        if unknown:
            raise InboxRejection(path, "tenant", f"unknown tenant(s) {sorted(unknown)}")
        foreign = values - {tenant}
        if foreign:
            raise InboxRejection(path, "tenant", f"rows for tenant(s) {sorted(foreign)} in the inbox of {tenant!r}")
    if path.suffix.lower() == ".csv":
        frame = _parse_csv_types(path, table, frame)
    try:
        validated = table.pandera_schema().validate(frame, lazy=True)
    except SchemaErrors as exc:
        raise _rejection_from_pandera(path, table, exc.failure_cases) from exc
    except SchemaError as exc:
        raise InboxRejection(path, getattr(exc.schema, "name", None), str(exc).splitlines()[0]) from exc
    return table, validated.reset_index(drop=True)


def _parse_csv_types(path: Path, table: TableSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """CSV cells arrive as text; convert each declared column and name the first bad cell."""
    frame = frame.copy()
    for col in (*table.columns, *(c for c in table.optional_columns if c.name in frame.columns)):
        raw = frame[col.name]
        if col.sql_type in ("BIGINT", "INTEGER", "DOUBLE"):
            parsed = pd.to_numeric(raw, errors="coerce")
        elif col.sql_type in ("DATE", "TIMESTAMP"):
            parsed = pd.to_datetime(raw, errors="coerce", format="mixed")
        else:
            continue
        bad = parsed.isna() & raw.notna()
        if bad.any():
            first = int(bad.idxmax())
            raise InboxRejection(
                path, col.name,
                f"expected {col.sql_type.lower()}, got {raw[first]!r} on data row {first + 1} "
                f"({int(bad.sum())} bad cells)",
            )
        if col.sql_type in ("BIGINT", "INTEGER") and (parsed.dropna() % 1 != 0).any():
            raise InboxRejection(path, col.name, "expected whole numbers, found fractions")
        frame[col.name] = parsed
    return frame


def _rejection_from_pandera(path: Path, table: TableSpec, cases: pd.DataFrame) -> InboxRejection:
    first = cases.iloc[0]
    check = str(first["check"])
    column = first["column"] if isinstance(first["column"], str) else None
    failing = cases[cases["check"] == first["check"]]
    examples = ", ".join(repr(v) for v in failing["failure_case"].head(3))
    if "uniqueness" in check or "duplicates" in check:
        return InboxRejection(
            path, ",".join(table.key), f"duplicate keys ({len(failing)} rows), e.g. {examples}"
        )
    if check == "not_nullable":
        return InboxRejection(path, column, f"{len(failing)} missing values where a value is required")
    return InboxRejection(path, column, f"check {check} failed for {len(failing)} rows, e.g. {examples}")


def pending_files(inbox: Path) -> list[Path]:
    if not inbox.exists():
        return []
    order = list(FILE_PREFIXES)
    files = [p for p in inbox.iterdir() if p.is_file() and not p.name.startswith(".")]

    def rank(p: Path) -> tuple[int, str]:
        prefix = next((i for i, k in enumerate(order) if p.name.lower().startswith(k)), len(order))
        return prefix, p.name

    return sorted(files, key=rank)


def move_aside(path: Path, accepted: bool, message: str = "") -> Path:
    """Move a processed file out of the inbox; a rejected one gets an .error.txt beside it."""
    folder = path.parent / ("processed" if accepted else "rejected")
    folder.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    target = folder / f"{stamp}-{path.name}"
    shutil.move(str(path), target)
    if not accepted:
        target.with_name(target.name + ".error.txt").write_text(message + "\n")
    return target


def unknown_tenant_folders(inbox_root: Path, known_tenants: set[str]) -> list[Path]:
    if not inbox_root.exists():
        return []
    return [p for p in sorted(inbox_root.iterdir()) if p.is_dir() and p.name not in known_tenants]


# Re-exported so callers can catch the library's own type without importing pandera.
__all__ = ["InboxOutcome", "InboxRejection", "pa", "pending_files", "read_and_validate"]
