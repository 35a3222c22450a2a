"""Adding a use case is adding a folder: the `spend` regression use case, declared in a temporary
folder from files this test writes, runs ingest -> features -> train -> gates -> register -> publish
through the platform's generated assets, with no edit to platform code."""

from __future__ import annotations

import json

import pytest

from tests.conftest import open_instance
from tests.usecase_fixtures import write_spend_usecase

pytestmark = pytest.mark.slow

TENANT = "shopco"


@pytest.fixture(scope="module")
def spend(tmp_path_factory):
    from definitions import build_definitions
    from resources.tenants import TenantSpec

    roots = tmp_path_factory.mktemp("usecases")
    write_spend_usecase(roots)
    home = tmp_path_factory.mktemp("spend_home")
    defs = build_definitions(str(home), usecase_paths=[str(roots)])
    r = defs.resources
    r["settings"].ensure_home()
    r["registry"].ensure_experiment()
    r["catalog"].add(TenantSpec(name=TENANT, region="us", n_accounts=400, seed=5, days=150))
    # The tenant's own files for the use case: one good delivery, one with a negative amount.
    inbox = home / "inbox" / TENANT / "spend"
    inbox.mkdir(parents=True)
    (inbox / "orders_extra.csv").write_text(
        "order_id,customer_id,ordered_at,amount,channel\n"
        "x-1,shopco-c00001,2026-07-01 10:00:00,12.5,web\nx-2,shopco-c00002,2026-07-02 11:30:00,80,store\n")
    (inbox / "orders_bad.csv").write_text(
        "order_id,customer_id,ordered_at,amount,channel\nx-3,shopco-c00003,2026-07-03 09:00:00,-5,web\n")
    with open_instance(home) as instance:
        instance.add_dynamic_partitions("tenant", [TENANT])
        result = defs.resolve_job_def("spend_pipeline").execute_in_process(
            instance=instance, partition_key=TENANT, raise_on_error=False)
    return {"home": home, "defs": defs, "result": result, "roots": roots}


def test_the_pipeline_of_a_declared_use_case_succeeds(spend):
    result = spend["result"]
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    materialized = {e.asset_key.to_user_string() for e in result.all_events if e.is_step_materialization}
    assert materialized == {"spend/raw_customers", "spend/raw_orders", "spend/features", "spend/training_set",
                            "spend/online_snapshot", "spend/model", "spend/model_aliases", "spend/serving_manifest"}


def test_every_check_and_gate_ran_and_passed(spend):
    checks = {}
    for event in spend["result"].all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            data = event.event_specific_data
            checks[data.check_name] = data.passed
    assert checks == {"inbox_files_accepted": False, "training_data_integrity": True, "no_training_serving_skew": True,
                      "r2_gate": True, "fairness_gate": True, "latency_gate": True, "model_size_gate": True}


def test_inbox_files_of_the_use_case_are_validated_against_its_declared_tables(spend):
    inbox = spend["home"] / "inbox" / TENANT / "spend"
    assert [p.name.split("-", 1)[1] for p in (inbox / "processed").iterdir()] == ["orders_extra.csv"]
    errors = list((inbox / "rejected").glob("*.error.txt"))
    assert len(errors) == 1 and "orders_bad.csv: column 'amount'" in errors[0].read_text()
    with spend["defs"].resources["warehouse"].connect(TENANT, read_only=True) as con:
        delivered = con.execute("SELECT order_id, amount FROM raw_orders WHERE source = 'inbox:orders_extra.csv' "
                                "ORDER BY order_id").fetchall()
        bad = con.execute("SELECT count(*) FROM raw_orders WHERE order_id = 'x-3'").fetchone()[0]
    assert delivered == [("x-1", 12.5), ("x-2", 80.0)] and bad == 0


def test_the_registry_holds_the_use_case_model_with_aliases_and_lineage(spend):
    from resources.registry import LINEAGE_TAGS

    registry = spend["defs"].resources["registry"]
    champion = registry.alias_version(TENANT, "champion", use_case="spend")
    assert champion is not None and champion.name == "spend-shopco"
    assert registry.alias_version(TENANT, "challenger", use_case="spend").version == champion.version
    assert set(LINEAGE_TAGS) <= set(champion.tags)
    assert champion.tags["use_case"] == "spend"
    # churn's model of the tenant was never trained by this job
    assert registry.alias_version(TENANT, "champion") is None


def test_the_serving_bundle_names_the_use_case_champion_and_snapshot(spend):
    manifest = json.loads((spend["home"] / "serving" / "manifest.json").read_text())
    entry = manifest["use_cases"]["spend"]["tenants"][TENANT]
    assert entry["champion"]["version"] == "1"
    assert (spend["home"] / "serving" / entry["champion"]["model_file"]).exists()
    assert (spend["home"] / "serving" / entry["snapshot"]["file"]).exists()
    assert manifest["tenants"] == {}  # churn's section is untouched


def test_the_audit_log_tells_the_use_case_lifecycle(spend):
    from mlops.core import audit

    warehouse = spend["defs"].resources["warehouse"]
    log = warehouse.audit_entries(TENANT)
    actions = log["action"].tolist()
    assert actions.index("model_trained") < actions.index("gate:r2_gate") < actions.index("alias_assigned") \
        < actions.index("manifest_published")
    assert set(log.loc[log["action"] == "model_trained", "subject"]) == {"spend-shopco/1"}
    with warehouse.connect(TENANT, read_only=True) as con:
        assert audit.verify_chain(con).ok


@pytest.fixture(scope="module")
def served(spend, tmp_path_factory):
    """The platform's own service over the spend home: a key for the tenant, then predictions."""
    from mlops.core.serving import ApiKeyStore, serving_dir
    from tests.servers import bentoml_service

    key = ApiKeyStore(serving_dir(spend["home"])).create(TENANT)
    log = tmp_path_factory.mktemp("spend_service") / "serve.log"
    with bentoml_service(spend["home"], log) as service:
        yield {**service, "key": key}


def test_the_service_answers_the_use_case_with_the_champion_score(spend, served):
    import lightgbm as lgb
    import pandas as pd
    import requests

    from mlops.core.model_inputs import ModelInputs
    from mlops.core.usecase import load_usecase

    manifest = json.loads((spend["home"] / "serving" / "manifest.json").read_text())
    entry = manifest["use_cases"]["spend"]["tenants"][TENANT]
    snapshot = pd.read_parquet(spend["home"] / "serving" / entry["snapshot"]["file"])
    uc = load_usecase(spend["roots"] / "spend")
    booster = lgb.Booster(model_file=str(spend["home"] / "serving" / entry["champion"]["model_file"]))
    headers = {"Authorization": f"Bearer {served['key']}"}
    for customer in snapshot["customer_id"].head(20):
        response = requests.post(f"{served['url']}/v1/spend/predict", headers=headers, timeout=30,
                                 json={"tenant": TENANT, "customer_id": customer})
        assert response.status_code == 200, response.text
        body = response.json()
        row = snapshot[snapshot["customer_id"] == customer]
        expected = booster.predict(ModelInputs.of(uc).to_model_matrix(row))[0]
        assert body["model_version"] == "1" and body["customer_id"] == customer
        assert abs(body["score"] - expected) < 1e-9
    batch = requests.post(f"{served['url']}/v1/spend/predict_batch", headers=headers, timeout=30,
                          json={"tenant": TENANT, "instances": [{"customer_id": c} for c in snapshot["customer_id"]]})
    assert batch.status_code == 200, batch.text
    assert len(batch.json()["predictions"]) == len(snapshot)


def test_the_prediction_log_is_ingested_and_monitored(spend, served):
    import os
    import signal

    from mlops.core.monitoring import read_monitoring_results
    from mlops.core.prediction_log import prediction_log_table

    # Stop the service: it writes its open prediction-log segment on the way out.
    os.killpg(served["proc"].pid, signal.SIGTERM)
    served["proc"].wait(timeout=60)
    defs = spend["defs"]
    with open_instance(spend["home"]) as instance:
        result = defs.resolve_job_def("spend_daily_cycle").execute_in_process(
            instance=instance, partition_key=TENANT, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    warehouse = defs.resources["warehouse"]
    with warehouse.connect(TENANT, read_only=True) as con:
        logged = con.execute(f"SELECT count(*) FROM {prediction_log_table('spend')}").fetchone()[0]  # noqa: S608
        results = read_monitoring_results(con, "1", use_case="spend")
    assert logged >= 20 + 400 - 1  # 20 single predictions and a batch over the snapshot
    assert {"univariate_drift", "multivariate_drift", "estimated_rmse"} <= set(results["metric"])
    monitored = [e for e in result.all_events if e.is_step_materialization
                 and e.asset_key.to_user_string() == "spend/model_monitoring"]
    assert monitored and monitored[0].step_materialization_data.materialization.metadata["analysis_rows"].value > 0


def test_a_retrained_challenger_is_compared_in_shadow_and_promoted(spend, served):
    """The factory's shadow_comparison and champion_promotion on a regression: retrain (the same data:
    the same model), give the challenger the champion's logged requests as shadow rows, and the
    promotion gate compares DLE-estimated RMSE (no label has matured), passes, moves the alias and
    republishes the use case; every step audited."""
    from definitions import build_definitions
    from mlops.core.prediction_log import prediction_log_table
    from mlops.core.shadow import shadow_table
    from resources.monitoring import MonitoringPolicy

    defs = build_definitions(str(spend["home"]), usecase_paths=[str(spend["roots"])],
                             monitoring_policy=MonitoringPolicy(shadow_min_predictions=100))
    registry, warehouse = defs.resources["registry"], defs.resources["warehouse"]
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    with open_instance(spend["home"]) as instance:
        assert defs.resolve_job_def("spend_retrain").execute_in_process(
            instance=instance, partition_key=TENANT, run_config=quiet).success
        challenger = str(registry.alias_version(TENANT, "challenger", use_case="spend").version)
        assert challenger == "2"
        table = prediction_log_table("spend")
        with warehouse.transaction(TENANT) as con:  # the challenger shadows what the champion answered
            con.execute(f"INSERT INTO {table} SELECT * REPLACE ('challenger' AS role, '2' AS model_version, "  # noqa: S608
                        f"latency_ms * 1.1 AS latency_ms) FROM {table} WHERE role = 'champion' AND model_version = '1'")
        result = defs.resolve_job_def("spend_daily_cycle").execute_in_process(
            instance=instance, partition_key=TENANT, run_config=quiet, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    checks = [e.asset_check_evaluation_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    gate = [c for c in checks if c.check_name == "promotion_gate"]
    assert len(gate) == 1 and gate[0].passed, gate
    assert "estimated RMSE" in gate[0].description
    assert str(registry.alias_version(TENANT, "champion", use_case="spend").version) == "2"
    manifest = json.loads((spend["home"] / "serving" / "manifest.json").read_text())
    assert manifest["use_cases"]["spend"]["tenants"][TENANT]["champion"]["version"] == "2"
    with warehouse.connect(TENANT, read_only=True) as con:
        decision = con.execute(f"SELECT decision FROM {shadow_table('spend')}").fetchall()  # noqa: S608
        actions = [a for a, in con.execute("SELECT action FROM audit_log ORDER BY seq").fetchall()]
    assert decision[-1] == ("promote",)
    assert actions.index("promotion_gate") < actions.index("promotion")
