"""The declared schema of every raw table of churn: one definition (``usecases/churn/tables.yaml``,
read by ``mlops.core.vocabulary``), used for the DuckDB DDL, for validating simulated data and for
validating files users drop into the inbox (through pandera).
"""

from __future__ import annotations

from mlops.core.usecase import ColumnSpec, TableSpec
from mlops.core.vocabulary import (
    BILLING_EVENT_TYPES,
    CHURN_TABLES,
    PLANS,
    SEGMENTS,
    TICKET_CATEGORIES,
)

RAW_TABLES: dict[str, TableSpec] = dict(CHURN_TABLES)

# The account attributes that change over time, kept as a history in raw_account_attributes: every
# column after its key.
_HISTORY = RAW_TABLES["raw_account_attributes"]
ATTRIBUTE_COLUMNS: tuple[ColumnSpec, ...] = tuple(c for c in _HISTORY.columns if c.name not in _HISTORY.key)
ATTRIBUTE_NAMES = tuple(c.name for c in ATTRIBUTE_COLUMNS)

# What an accounts file (``accounts*.csv`` in the inbox) delivers: each account's static attributes
# and its current plan, seats and MRR, optionally with the day those became valid (``valid_from``).
# Ingestion splits it into raw_accounts and raw_account_attributes (DuckDBWarehouse.upsert_accounts).
ACCOUNTS_FILE = TableSpec(
    name="raw_accounts",
    columns=(*RAW_TABLES["raw_accounts"].columns, *ATTRIBUTE_COLUMNS),
    key=("account_id",),
    time_column="signup_date",
    optional_columns=(ColumnSpec(name="valid_from", type="DATE", nullable=True),),
)

__all__ = ["ACCOUNTS_FILE", "ATTRIBUTE_COLUMNS", "ATTRIBUTE_HISTORY_SQL", "ATTRIBUTE_NAMES", "BILLING_EVENT_TYPES",
           "PLANS", "RAW_TABLES", "SEGMENTS", "TICKET_CATEGORIES"]

# The attribute history with each row's end: valid on the days [valid_from, valid_to); valid_to is
# NULL for the row in force now.
ATTRIBUTE_HISTORY_SQL = f"""
SELECT account_id, valid_from,
       lead(valid_from) OVER (PARTITION BY account_id ORDER BY valid_from) AS valid_to,
       {", ".join(ATTRIBUTE_NAMES)}
FROM raw_account_attributes
"""  # noqa: S608 - the declared column names
