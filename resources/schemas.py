"""The declared schema of every raw table: one definition, used for the DuckDB DDL, for validating
simulated data and for validating files users drop into the inbox (through pandera).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandera.pandas as pa

from mlops.core.vocabulary import (
    BILLING_EVENT_TYPES,
    PLANS,
    SEGMENTS,
    TICKET_CATEGORIES,
)


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    nullable: bool = False
    checks: tuple = ()

    @property
    def pandas_dtype(self) -> str:
        return {
            "VARCHAR": "str",
            "BIGINT": "int64",
            "INTEGER": "int64",
            "DOUBLE": "float64",
            "DATE": "datetime64[ns]",
            "TIMESTAMP": "datetime64[ns]",
        }[self.sql_type]


@dataclass(frozen=True)
class RawTable:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    time_column: str | None = None
    # Columns a delivered file may carry or leave out (validated when present; not stored as such).
    optional_columns: tuple[Column, ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def ddl(self) -> str:
        cols = ", ".join(
            f"{c.name} {c.sql_type}{'' if c.nullable else ' NOT NULL'}" for c in self.columns
        )
        # `source` records where each row came from: the simulator or an inbox file.
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({cols}, source VARCHAR NOT NULL)"

    def pandera_schema(self) -> pa.DataFrameSchema:
        return pa.DataFrameSchema(
            {
                c.name: pa.Column(c.pandas_dtype, checks=list(c.checks), nullable=c.nullable, coerce=True)
                for c in self.columns
            }
            | {
                c.name: pa.Column(c.pandas_dtype, checks=list(c.checks), nullable=True, coerce=True, required=False)
                for c in self.optional_columns
            },
            unique=list(self.key),
            strict="filter",
            report_duplicates="all",
            name=self.name,
        )


_non_negative = pa.Check.ge(0)

# The account attributes that change over time, kept as a history in raw_account_attributes.
ATTRIBUTE_COLUMNS = (
    Column("plan", "VARCHAR", checks=(pa.Check.isin(PLANS),)),
    Column("seats", "BIGINT", checks=(pa.Check.in_range(1, 100_000),)),
    Column("mrr", "DOUBLE", checks=(pa.Check.in_range(0, 10_000_000),)),
)
ATTRIBUTE_NAMES = tuple(c.name for c in ATTRIBUTE_COLUMNS)

RAW_TABLES: dict[str, RawTable] = {
    t.name: t
    for t in (
        # The attributes of an account that never change.
        RawTable(
            name="raw_accounts",
            columns=(
                Column("account_id", "VARCHAR", checks=(pa.Check.str_length(1, 64),)),
                Column("signup_date", "DATE"),
                Column("region", "VARCHAR", checks=(pa.Check.str_length(2, 8),)),
                Column("segment", "VARCHAR", checks=(pa.Check.isin(SEGMENTS),)),
                Column("company_size", "BIGINT", checks=(pa.Check.in_range(1, 1_000_000),)),
            ),
            key=("account_id",),
            time_column="signup_date",
        ),
        # The attributes that change (plan, seats, MRR), as a history: a row holds the values in
        # force from the day ``valid_from`` until the account's next row (its ``valid_to``, derived:
        # ATTRIBUTE_HISTORY_SQL), or until now. A change valid from day D counts like an event of
        # day D: a feature row sees it once its week ends on or after D.
        RawTable(
            name="raw_account_attributes",
            columns=(
                Column("account_id", "VARCHAR", checks=(pa.Check.str_length(1, 64),)),
                Column("valid_from", "DATE"),
                *ATTRIBUTE_COLUMNS,
            ),
            key=("account_id", "valid_from"),
            time_column="valid_from",
        ),
        RawTable(
            name="raw_usage_events",
            columns=(
                Column("account_id", "VARCHAR"),
                Column("event_date", "DATE"),
                Column("active_users", "BIGINT", checks=(_non_negative,)),
                Column("sessions", "BIGINT", checks=(_non_negative,)),
                Column("feature_events", "BIGINT", checks=(_non_negative,)),
            ),
            key=("account_id", "event_date"),
            time_column="event_date",
        ),
        RawTable(
            name="raw_billing_events",
            columns=(
                Column("event_id", "VARCHAR"),
                Column("account_id", "VARCHAR"),
                Column("event_time", "TIMESTAMP"),
                Column("event_type", "VARCHAR", checks=(pa.Check.isin(BILLING_EVENT_TYPES),)),
                Column("amount", "DOUBLE", checks=(_non_negative,)),
            ),
            key=("event_id",),
            time_column="event_time",
        ),
        RawTable(
            name="raw_support_tickets",
            columns=(
                Column("ticket_id", "VARCHAR"),
                Column("account_id", "VARCHAR"),
                Column("opened_at", "TIMESTAMP"),
                Column("severity", "BIGINT", checks=(pa.Check.in_range(1, 4),)),
                Column("category", "VARCHAR", checks=(pa.Check.isin(TICKET_CATEGORIES),)),
            ),
            key=("ticket_id",),
            time_column="opened_at",
        ),
        RawTable(
            name="raw_churn_events",
            columns=(
                Column("account_id", "VARCHAR"),
                Column("churned_at", "DATE"),
            ),
            key=("account_id",),
            time_column="churned_at",
        ),
    )
}

# What an accounts file (``accounts*.csv`` in the inbox) delivers: each account's static attributes
# and its current plan, seats and MRR, optionally with the day those became valid (``valid_from``).
# Ingestion splits it into raw_accounts and raw_account_attributes (DuckDBWarehouse.upsert_accounts).
ACCOUNTS_FILE = RawTable(
    name="raw_accounts",
    columns=(*RAW_TABLES["raw_accounts"].columns, *ATTRIBUTE_COLUMNS),
    key=("account_id",),
    time_column="signup_date",
    optional_columns=(Column("valid_from", "DATE", nullable=True),),
)

# The attribute history with each row's end: valid on the days [valid_from, valid_to); valid_to is
# NULL for the row in force now.
ATTRIBUTE_HISTORY_SQL = """
SELECT account_id, valid_from,
       lead(valid_from) OVER (PARTITION BY account_id ORDER BY valid_from) AS valid_to,
       plan, seats, mrr
FROM raw_account_attributes
"""
