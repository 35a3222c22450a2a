"""The category levels of the SaaS domain, as churn's raw tables declare them
(``usecases/churn/tables.yaml``): one definition, shared by schemas, features and serving."""

from mlops.core.environment import PROJECT_ROOT
from mlops.core.usecase import load_tables

# Churn's raw tables (resources.schemas builds the warehouse's and the inbox's from them). A file,
# not an import: the service's bento carries it beside this module.
CHURN_TABLES_FILE = PROJECT_ROOT / "usecases" / "churn" / "tables.yaml"
CHURN_TABLES = load_tables(CHURN_TABLES_FILE)


def _levels(table: str, column: str) -> tuple[str, ...]:
    levels = CHURN_TABLES[table].column(column).isin
    if not levels:
        raise ValueError(f"{CHURN_TABLES_FILE}: {table}.{column} declares no levels (isin)")
    return levels


PLANS = _levels("raw_account_attributes", "plan")
SEGMENTS = _levels("raw_accounts", "segment")
BILLING_EVENT_TYPES = _levels("raw_billing_events", "event_type")
TICKET_CATEGORIES = _levels("raw_support_tickets", "category")
