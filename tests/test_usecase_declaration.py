"""Use-case declarations: a folder of YAML and SQL is read, checked, and every mistake is named."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlops.core.model_inputs import ModelInputs
from mlops.core.usecase import UseCaseError, discover_usecases, load_usecase
from tests.usecase_fixtures import write_spend_usecase

MLOPS = Path(sys.executable).with_name("mlops")


def edited(folder: Path, change) -> Path:
    declaration = yaml.safe_load((folder / "usecase.yaml").read_text())
    change(declaration)
    (folder / "usecase.yaml").write_text(yaml.safe_dump(declaration))
    return folder


def test_the_spend_declaration_loads_with_everything_the_lifecycle_needs(tmp_path):
    uc = load_usecase(write_spend_usecase(tmp_path))
    assert (uc.name, uc.problem_type, uc.entity.key) == ("spend", "regression", "customer_id")
    assert [t.name for t in uc.tables] == ["raw_customers", "raw_orders"]
    assert uc.features.columns == ("orders_7d", "spend_7d", "orders_28d", "spend_28d", "region")
    assert uc.registered_model_name("acme") == "spend-acme"
    assert "$as_of" in uc.feature_sql and "$horizon_days" in uc.labels_sql
    assert ModelInputs.of(uc).columns == uc.features.columns
    ddl = uc.table("raw_orders").ddl()
    assert ddl.startswith("CREATE TABLE IF NOT EXISTS raw_orders (order_id VARCHAR NOT NULL")
    assert uc.table("raw_orders").pandera_schema().columns["channel"].checks  # isin declared once


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(name="other"), "name 'other' must be the folder's name 'spend'"),
    (lambda d: d["model"].update(objective="binary"), "model.objective 'binary' does not fit problem_type 'regression'"),
    (lambda d: d["features"].update(sql="nowhere.sql"), "features.sql: no file 'nowhere.sql'"),
    (lambda d: d["features"]["numeric"].append("spend_next_14d"), "label.column 'spend_next_14d' is also a feature"),
    (lambda d: d["features"].update(clock_table="raw_payments"), "clock_table 'raw_payments' is not one of the declared tables"),
    (lambda d: d["features"]["numeric"].append("orders_7d"), "['orders_7d'] declared more than once"),
    (lambda d: d["tables"][1].update(key=["nope"]), "key or time column 'nope' is not one of its columns"),
    (lambda d: d["tables"][1]["columns"][0].update(type="TEXT"), "tables.1.columns.0.type"),
    (lambda d: d.update(problem_type="ranking"), "problem_type"),
    (lambda d: d.update(surprise=1), "surprise: Extra inputs are not permitted"),
])
def test_a_bad_declaration_is_refused_naming_the_file_and_field(tmp_path, change, message):
    folder = edited(write_spend_usecase(tmp_path), change)
    with pytest.raises(UseCaseError) as err:
        load_usecase(folder)
    assert message in str(err.value)
    assert str(folder / "usecase.yaml") in str(err.value)


def test_the_tables_may_be_a_file_of_the_folder_and_a_missing_or_bad_one_is_named(tmp_path):
    folder = write_spend_usecase(tmp_path)
    declaration = yaml.safe_load((folder / "usecase.yaml").read_text())
    (folder / "tables.yaml").write_text(yaml.safe_dump({"tables": declaration["tables"]}))
    edited(folder, lambda d: d.update(tables="tables.yaml"))
    assert [t.name for t in load_usecase(folder).tables] == ["raw_customers", "raw_orders"]

    for name, message in (("nowhere.yaml", "tables: no file 'nowhere.yaml'"), ("../tables.yaml", "tables: no file")):
        edited(folder, lambda d, name=name: d.update(tables=name))
        with pytest.raises(UseCaseError, match=message):
            load_usecase(folder)
    edited(folder, lambda d: d.update(tables="tables.yaml"))
    (folder / "tables.yaml").write_text(yaml.safe_dump({"tables": [{**declaration["tables"][0], "key": ["nope"]}]}))
    with pytest.raises(UseCaseError) as err:
        load_usecase(folder)
    assert str(folder / "tables.yaml") in str(err.value) and "nope" in str(err.value)
    # Another file name: the declaration a folder keeps beside (churn's, until it is discovered).
    (folder / "usecase.yaml").rename(folder / "draft.yaml")
    with pytest.raises(UseCaseError, match="no usecase.yaml"):
        load_usecase(folder)
    (folder / "tables.yaml").write_text(yaml.safe_dump({"tables": declaration["tables"]}))
    assert load_usecase(folder, file="draft.yaml").name == "spend"


def test_sql_that_is_not_a_select_is_refused(tmp_path):
    folder = write_spend_usecase(tmp_path)
    (folder / "labels.sql").write_text("DROP TABLE raw_orders")
    with pytest.raises(UseCaseError, match="label.sql: labels.sql must be one SELECT"):
        load_usecase(folder)


def test_discovery_refuses_two_declarations_of_one_table_that_differ(tmp_path):
    write_spend_usecase(tmp_path / "a")
    other = write_spend_usecase(tmp_path / "b").rename(tmp_path / "b" / "spend2")
    edited(other, lambda d: (d.update(name="spend2"), d["tables"][1]["columns"].pop()))
    assert set(discover_usecases([tmp_path / "a"])) == {"spend"}
    with pytest.raises(UseCaseError, match="table 'raw_orders' is declared differently by use cases 'spend' and 'spend2'"):
        discover_usecases([tmp_path / "a", tmp_path / "b"])
    shutil.rmtree(tmp_path / "b")
    write_spend_usecase(tmp_path / "b")
    with pytest.raises(UseCaseError, match="use case 'spend' is declared twice"):
        discover_usecases([tmp_path / "a", tmp_path / "b"])


def test_the_cli_checks_and_lists_declarations(tmp_path):
    folder = write_spend_usecase(tmp_path)
    ok = subprocess.run([str(MLOPS), "usecase", "check", str(folder)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "spend: Customer spend forecast (regression, entity customer by customer_id)" in ok.stdout
    listed = subprocess.run([str(MLOPS), "usecase", "list"], capture_output=True, text=True, timeout=120,
                            env={"MLOPS_USECASE_PATHS": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert listed.returncode == 0, listed.stderr
    assert "spend      regression  customer" in listed.stdout
    edited(folder, lambda d: d["label"].update(horizon_days=-1))
    bad = subprocess.run([str(MLOPS), "usecase", "check", str(folder)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "label.horizon_days: Input should be greater than or equal to 0" in bad.stderr


def test_churn_declares_its_raw_tables_in_its_folder_and_the_schemas_are_read_from_there():
    """Churn's raw tables are a use case's ``tables`` (``usecases/churn/tables.yaml``): the warehouse's
    DDL, the inbox's validation and the domain's category levels all come from that file."""
    import pandas as pd
    import pandera.errors

    from mlops.core import vocabulary
    from resources.schemas import ACCOUNTS_FILE, ATTRIBUTE_NAMES, RAW_TABLES

    assert Path(__file__).resolve().parents[1] / "usecases/churn/tables.yaml" == vocabulary.CHURN_TABLES_FILE
    assert set(RAW_TABLES) == {"raw_accounts", "raw_account_attributes", "raw_usage_events", "raw_billing_events",
                               "raw_support_tickets", "raw_churn_events"}
    assert ATTRIBUTE_NAMES == ("plan", "seats", "mrr") and vocabulary.PLANS == ("starter", "pro", "enterprise")
    # An accounts file: the static attributes, the current plan/seats/MRR, and valid_from if it has one.
    row = {"account_id": "a1", "signup_date": "2026-01-05", "region": "eu", "segment": "smb", "company_size": 40,
           "plan": "pro", "seats": 12, "mrr": 480.0}
    schema = ACCOUNTS_FILE.pandera_schema()
    assert "valid_from" not in schema.validate(pd.DataFrame([row]))
    assert "valid_from" in schema.validate(pd.DataFrame([{**row, "valid_from": "2026-02-01"}]))
    # A single declared bound names itself in a rejection; a level outside the vocabulary is refused.
    with pytest.raises(pandera.errors.SchemaErrors, match=r"greater_than_or_equal_to\(0"):
        RAW_TABLES["raw_usage_events"].pandera_schema().validate(pd.DataFrame([{
            "account_id": "a1", "event_date": "2026-01-05", "active_users": -1, "sessions": 3, "feature_events": 2}]),
            lazy=True)
    with pytest.raises(pandera.errors.SchemaErrors, match="isin"):
        schema.validate(pd.DataFrame([{**row, "plan": "platinum"}]), lazy=True)


@pytest.mark.parametrize(("text", "message"), [
    ("tables: [{name: raw_x, key: [id], columns: [{name: other, type: VARCHAR}]}]",
     "key or time column 'id' is not one of its columns"),
    ("tables: [{name: raw_x, key: [id], columns: [{name: id, type: TEXT}]}]", "tables.0.columns.0.type"),
    ("tables: [{name: raw_x, key: [id], columns: [{name: id, type: VARCHAR}]}, "
     "{name: raw_x, key: [id], columns: [{name: id, type: VARCHAR}]}]", "a table is declared twice"),
    ("tables: [{name: raw_x", "not valid YAML"),
])
def test_a_malformed_tables_file_is_refused_naming_the_file_and_the_field(tmp_path, text, message):
    from mlops.core.usecase import load_tables

    path = tmp_path / "tables.yaml"
    path.write_text(text)
    with pytest.raises(UseCaseError, match="tables.yaml") as caught:
        load_tables(path)
    assert message in str(caught.value)
