"""A failed validation gate keeps the model version away from the aliases, says why, and audits."""

import pytest

from resources.gates import GatePolicy
from tests.conftest import TEST_TENANT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def failed_gate_run(platform_home):
    """The pipeline re-run with an ROC AUC floor no model can reach."""
    from definitions import build_definitions

    defs = build_definitions(str(platform_home["home"]), gates=GatePolicy(min_roc_auc=0.999))
    registry = defs.resources["registry"]
    before = {a: str(registry.alias_version(TEST_TENANT.name, a).version) for a in ("champion", "challenger")}
    with platform_home["instance"]() as instance:
        result = defs.resolve_job_def("churn_pipeline").execute_in_process(
            instance=instance, partition_key=TEST_TENANT.name, raise_on_error=False)
        evaluations = {
            r.dagster_event.event_specific_data.check_name: r.dagster_event.event_specific_data
            for r in instance.all_logs(result.run_id)
            if r.dagster_event and r.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
        }
    return defs, result, evaluations, before


def test_impossible_auc_floor_blocks_the_alias_and_is_audited(failed_gate_run):
    defs, result, evaluations, before = failed_gate_run
    registry, warehouse = defs.resources["registry"], defs.resources["warehouse"]
    champion_before, challenger_before = before["champion"], before["challenger"]
    assert not result.success
    gate = evaluations["roc_auc_gate"]
    assert gate.passed is False
    assert "below the floor 0.9990" in gate.description
    # The aliases step never ran, so both aliases still point at the earlier versions.
    aliases_step = [e for e in result.all_events if e.step_key == "churn_model_aliases" and e.is_step_success]
    assert aliases_step == []
    assert str(registry.alias_version(TEST_TENANT.name, "champion").version) == champion_before
    assert str(registry.alias_version(TEST_TENANT.name, "challenger").version) == challenger_before

    entries = warehouse.audit_entries(TEST_TENANT.name)
    failed = entries[(entries["action"] == "gate:roc_auc_gate") & (entries["outcome"] == "failed")]
    assert len(failed) == 1
    assert "below the floor" in failed.iloc[0]["details"]
    new_version = failed.iloc[0]["subject"].split("/")[-1]
    assert int(new_version) > int(champion_before)


def test_aliases_asset_refuses_a_version_that_failed_a_gate(platform_home, failed_gate_run, defs_for):
    # Materializing the aliases asset alone must not bypass the gates.
    defs = defs_for()
    with platform_home["instance"]() as instance:
        result = defs.resolve_job_def("churn_pipeline").execute_in_process(
            instance=instance, partition_key=TEST_TENANT.name, raise_on_error=False,
            asset_selection=[__import__("dagster").AssetKey("churn_model_aliases")])
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "kept away from the aliases" in str(failure.step_failure_data.error.message)
    assert "roc_auc_gate" in str(failure.step_failure_data.error.message)
