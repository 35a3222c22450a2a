"""Ingestion: each tenant's raw SaaS data (simulated business plus files from its inbox) into its
DuckDB warehouse."""


import dagster as dg

from resources.inbox import InboxOutcome, InboxRejection, move_aside, pending_files, read_and_validate
from resources.schemas import ACCOUNTS_FILE, RAW_TABLES
from resources.settings import PlatformSettings
from resources.tenants import TENANT_PARTITIONS, TenantCatalog
from resources.warehouse import DuckDBWarehouse
from usecases.churn.simulator import TIME_COLUMNS, simulate_tenant, simulation_dates

RAW_ASSET_KEYS = {name: dg.AssetKey(name) for name in RAW_TABLES}
SIMULATOR_SOURCE = "simulator"


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            key,
            description=f"Raw `{name}` table of the tenant's warehouse: simulated business plus inbox files.",
            kinds={"duckdb"},
            partitions_def=TENANT_PARTITIONS,
            group_name="ingestion",
        )
        for name, key in RAW_ASSET_KEYS.items()
    ],
    check_specs=[
        dg.AssetCheckSpec("inbox_files_accepted", asset="raw_accounts",
                          description="Every file in the tenant's inbox passed schema validation.")
    ],
)
def raw_tenant_data(
    context: dg.AssetExecutionContext,
    warehouse: DuckDBWarehouse,
    settings: PlatformSettings,
    catalog: TenantCatalog,
):
    """Simulate the tenant's business (deterministic per tenant seed) and load its inbox files.

    Simulated rows are loaded in one transaction (only the new days once the world was loaded
    before: the simulated clock moves forward); each inbox file is validated and
    loaded in its own transaction, so a bad file changes nothing.
    """
    tenant = context.partition_key
    spec = catalog.get(tenant)
    tables = simulate_tenant(spec)
    counts = warehouse.sync_simulated_rows(tenant, tables, SIMULATOR_SOURCE, spec.world, TIME_COLUMNS)
    context.log.info(f"simulated {spec.name} ({spec.region}, scenario={spec.scenario}): {counts}")

    outcomes = ingest_inbox(warehouse, settings, catalog, tenant)
    totals = warehouse.table_counts(tenant)
    rejected = [o for o in outcomes if not o.accepted]
    for name, key in RAW_ASSET_KEYS.items():
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={
                "rows": dg.MetadataValue.int(totals.get(name, 0)),
                "simulated_rows_written": dg.MetadataValue.int(counts[name]),
                "simulated_until": str(simulation_dates(spec)[1]),
                "inbox_files_accepted": dg.MetadataValue.int(
                    sum(o.accepted and o.table == name for o in outcomes)),
                "scenario": spec.scenario,
                "region": spec.region,
            },
        )
    yield dg.AssetCheckResult(
        check_name="inbox_files_accepted",
        asset_key="raw_accounts",
        passed=not rejected,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "rejected": dg.MetadataValue.md(
                "\n".join(f"- {o.message}" for o in rejected) or "none"),
            "accepted_files": dg.MetadataValue.int(sum(o.accepted for o in outcomes)),
        },
        description="; ".join(o.message for o in rejected) or None,
    )


def ingest_inbox(
    warehouse: DuckDBWarehouse, settings: PlatformSettings, catalog: TenantCatalog, tenant: str
) -> list[InboxOutcome]:
    """Load every pending inbox file of a tenant, one transaction per file."""
    known = set(catalog.all())
    outcomes = []
    for path in pending_files(settings.inbox_dir(tenant)):
        try:
            table, frame = read_and_validate(path, tenant, known)
            with warehouse.transaction(tenant) as con:
                if table is ACCOUNTS_FILE:  # the accounts and their plan, seats and MRR as of now
                    rows = warehouse.upsert_accounts(con, frame, source=f"inbox:{path.name}")
                else:
                    rows = warehouse.upsert_rows(con, table, frame, source=f"inbox:{path.name}")
                _check_accounts_exist(con, table.name, path)
        except InboxRejection as exc:
            move_aside(path, accepted=False, message=str(exc))
            outcomes.append(InboxOutcome(path.name, None, False, 0, str(exc)))
            warehouse.audit(tenant, actor="ingestion", action="inbox_file", subject=path.name,
                            outcome="rejected", details={"reason": str(exc)})
            continue
        move_aside(path, accepted=True)
        outcomes.append(InboxOutcome(path.name, table.name, True, rows, f"{path.name}: {rows} rows"))
        warehouse.audit(tenant, actor="ingestion", action="inbox_file", subject=path.name,
                        outcome="accepted", details={"table": table.name, "rows": rows})
    return outcomes


def _check_accounts_exist(con, table_name: str, path) -> None:
    if table_name == "raw_accounts":
        return
    con.execute(RAW_TABLES["raw_accounts"].ddl())
    orphan = con.execute(
        f"SELECT t.account_id FROM {table_name} t WHERE t.source = ? "  # noqa: S608 - known table
        "AND NOT EXISTS (SELECT 1 FROM raw_accounts a WHERE a.account_id = t.account_id) LIMIT 3",
        [f"inbox:{path.name}"],
    ).fetchall()
    if orphan:
        raise InboxRejection(path, "account_id", f"unknown account(s) {[r[0] for r in orphan]}")
