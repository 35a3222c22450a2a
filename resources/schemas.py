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
            },
            unique=list(self.key),
            strict="filter",
            report_duplicates="all",
            name=self.name,
        )


_non_negative = pa.Check.ge(0)

RAW_TABLES: dict[str, RawTable] = {
    t.name: t
    for t in (
        RawTable(
            name="raw_accounts",
            columns=(
                Column("account_id", "VARCHAR", checks=(pa.Check.str_length(1, 64),)),
                Column("plan", "VARCHAR", checks=(pa.Check.isin(PLANS),)),
                Column("seats", "BIGINT", checks=(pa.Check.in_range(1, 100_000),)),
                Column("mrr", "DOUBLE", checks=(pa.Check.in_range(0, 10_000_000),)),
                Column("signup_date", "DATE"),
                Column("region", "VARCHAR", checks=(pa.Check.str_length(2, 8),)),
                Column("segment", "VARCHAR", checks=(pa.Check.isin(SEGMENTS),)),
                Column("company_size", "BIGINT", checks=(pa.Check.in_range(1, 1_000_000),)),
            ),
            key=("account_id",),
            time_column="signup_date",
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
