"""Users' own files: validated against the declared schema; bad files are rejected with a reason
and leave the warehouse exactly as it was."""

import pandas as pd
import pytest

from assets.ingestion import ingest_inbox
from definitions import build_definitions
from mlops.core.hashing import content_hash
from resources.inbox import InboxRejection, read_and_validate
from resources.schemas import RAW_TABLES
from resources.tenants import TenantSpec
from usecases.churn.simulator import simulate_tenant

TENANT = TenantSpec(name="inboxco", region="us", n_accounts=200, seed=3, days=120)

GOOD_ACCOUNTS = (
    "account_id,plan,seats,mrr,signup_date,region,segment,company_size\n"
    "new-001,pro,12,540.0,2026-03-01,us,smb,30\n"
    "new-002,enterprise,80,8800.5,2025-11-15,us,enterprise,400\n"
)


@pytest.fixture()
def platform(tmp_path):
    defs = build_definitions(str(tmp_path / "home"))
    defs.resources["settings"].ensure_home()
    defs.resources["catalog"].add(TENANT)
    warehouse = defs.resources["warehouse"]
    warehouse.replace_source_rows(TENANT.name, simulate_tenant(TENANT), "simulator")
    inbox = defs.resources["settings"].inbox_dir(TENANT.name)
    inbox.mkdir(parents=True)
    return defs, warehouse, inbox


def snapshot(warehouse):
    """Every raw table's full content, hashed: proof that nothing changed."""
    with warehouse.connect(TENANT.name, read_only=True) as con:
        return {
            name: content_hash(con.execute(f"SELECT * FROM {name} ORDER BY ALL").df())  # noqa: S608 - known table
            for name in RAW_TABLES
        }


def ingest(defs):
    r = defs.resources
    return ingest_inbox(r["warehouse"], r["settings"], r["catalog"], TENANT.name)


def test_a_good_csv_is_loaded_and_moved_to_processed(platform):
    defs, warehouse, inbox = platform
    (inbox / "accounts_2026-11.csv").write_text(GOOD_ACCOUNTS)
    (inbox / "usage_events_2026-11.csv").write_text(
        "account_id,event_date,active_users,sessions,feature_events\nnew-001,2026-07-01,4,9,50\n")
    outcomes = ingest(defs)
    assert [(o.table, o.accepted, o.rows) for o in outcomes] == [
        ("raw_accounts", True, 2), ("raw_usage_events", True, 1)]
    assert warehouse.table_counts(TENANT.name)["raw_accounts"] == TENANT.n_accounts + 2
    assert not list(inbox.glob("*.csv"))
    assert len(list((inbox / "processed").glob("*accounts_2026-11.csv"))) == 1


def test_re_delivering_rows_replaces_them_instead_of_duplicating(platform):
    defs, warehouse, inbox = platform
    (inbox / "accounts_a.csv").write_text(GOOD_ACCOUNTS)
    ingest(defs)
    (inbox / "accounts_again.csv").write_text(GOOD_ACCOUNTS)
    ingest(defs)
    with warehouse.connect(TENANT.name, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM raw_accounts WHERE account_id LIKE 'new-%'").fetchone() == (2,)
        history = con.execute("SELECT valid_from, seats FROM raw_account_attributes WHERE account_id = 'new-001'")
        assert history.fetchall() == [(pd.Timestamp("2026-03-01").date(), 12)]  # from the signup day
    # A changed state is a new history row (see tests/test_attribute_history.py), the old one stays.
    (inbox / "accounts_b.csv").write_text(GOOD_ACCOUNTS.replace("pro,12,540.0", "pro,15,675.0"))
    ingest(defs)
    with warehouse.connect(TENANT.name, read_only=True) as con:
        rows = con.execute("SELECT seats FROM raw_account_attributes WHERE account_id = 'new-001' "
                           "ORDER BY valid_from").fetchall()
    assert rows == [(12,), (15,)]


BAD_FILES = {
    "missing column": ("accounts_x.csv", GOOD_ACCOUNTS.replace(",company_size", "").replace(",30\n", "\n")
                       .replace(",400\n", "\n"), "column 'company_size': required column is missing"),
    "wrong type": ("accounts_x.csv", GOOD_ACCOUNTS.replace(",12,", ",twelve,"),
                   "column 'seats': expected bigint, got 'twelve' on data row 1"),
    "out of range": ("accounts_x.csv", GOOD_ACCOUNTS.replace(",12,", ",-4,"), "column 'seats': check"),
    "unknown category": ("accounts_x.csv", GOOD_ACCOUNTS.replace(",pro,", ",platinum,"), "column 'plan'"),
    "unknown tenant": ("accounts_x.csv",
                       GOOD_ACCOUNTS.replace("company_size\n", "company_size,tenant\n").replace(",30\n", ",30,nosuch\n")
                       .replace(",400\n", ",400,nosuch\n"), "column 'tenant': unknown tenant(s) ['nosuch']"),
    "duplicate keys": ("accounts_x.csv", GOOD_ACCOUNTS + "new-001,pro,1,45.0,2026-01-01,us,smb,3\n",
                       "column 'account_id': duplicate keys"),
    "empty": ("accounts_x.csv", "", "accounts_x.csv: file is empty"),
    "header only": ("accounts_x.csv", GOOD_ACCOUNTS.splitlines()[0] + "\n", "header but no rows"),
    "malformed": ("accounts_x.csv", 'account_id,plan\n"unterminated,pro\n', "cannot be parsed"),
    "NaN in required": ("accounts_x.csv", GOOD_ACCOUNTS.replace(",540.0,", ",NaN,"), "column 'mrr'"),
    "unknown account": ("usage_events_x.csv",
                        "account_id,event_date,active_users,sessions,feature_events\nghost-9,2026-07-01,1,1,1\n",
                        "column 'account_id': unknown account(s) ['ghost-9']"),
    "unknown table": ("invoices.csv", GOOD_ACCOUNTS, "file name must start with one of"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_rejected_with_a_reason_and_nothing_changes(platform, case):
    defs, warehouse, inbox = platform
    name, content, expected = BAD_FILES[case]
    before = snapshot(warehouse)
    (inbox / name).write_text(content)
    outcomes = ingest(defs)
    assert len(outcomes) == 1 and not outcomes[0].accepted
    assert name in outcomes[0].message
    assert expected in outcomes[0].message
    assert snapshot(warehouse) == before
    rejected = list((inbox / "rejected").glob(f"*{name}"))
    assert len(rejected) == 1
    assert expected in rejected[0].with_name(rejected[0].name + ".error.txt").read_text()
    entries = warehouse.audit_entries(TENANT.name)
    assert entries.iloc[-1]["outcome"] == "rejected" and entries.iloc[-1]["subject"] == name


def test_a_parquet_file_is_validated_the_same_way(platform, tmp_path):
    defs, warehouse, inbox = platform
    frame = pd.read_csv(pd.io.common.StringIO(GOOD_ACCOUNTS), parse_dates=["signup_date"])
    frame.to_parquet(inbox / "accounts.parquet")
    frame.assign(seats=frame["seats"].astype(float) * -1).to_parquet(tmp_path / "accounts_bad.parquet")
    assert ingest(defs)[0].accepted
    with pytest.raises(InboxRejection, match="column 'seats'"):
        read_and_validate(tmp_path / "accounts_bad.parquet", TENANT.name, {TENANT.name})


def test_files_for_an_unknown_tenant_folder_are_rejected_by_the_sensor(platform):
    from dagster import DagsterInstance, build_sensor_context

    from assets.automation import tenant_catalog_sensor

    defs, _, _ = platform
    settings = defs.resources["settings"]
    stray = settings.inbox_dir("ghostco")
    stray.mkdir(parents=True)
    (stray / "accounts.csv").write_text(GOOD_ACCOUNTS)
    with DagsterInstance.get() as instance:
        context = build_sensor_context(
            instance=instance, resources={"catalog": defs.resources["catalog"], "settings": settings})
        result = tenant_catalog_sensor(context)
    assert not (stray / "accounts.csv").exists()
    rejected = list((stray / "rejected").glob("*accounts.csv.error.txt"))
    assert len(rejected) == 1 and "unknown tenant 'ghostco'" in rejected[0].read_text()
    # The sensor also adds a partition for every catalog tenant.
    added = result.dynamic_partitions_requests[0].partition_keys
    assert {"acme", "globex", "initech", TENANT.name} <= set(added)
