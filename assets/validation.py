"""Validation gates: blocking asset checks between a trained model and the ``challenger`` alias.

Each gate evaluates the newest model candidate of the tenant (``mlops.core.candidates``), records
its result in the warehouse table ``gate_results`` and in the audit log, and explains itself in the UI. A failed
gate blocks ``churn_model_aliases`` in the same run, and that asset also refuses any version
without a full set of passed gates.
"""


import dagster as dg
import pandas as pd

from assets.training import churn_model
from mlops.core import modeling
from mlops.core.candidates import GateOutcome, holdout_scores, latest_candidate, record_gate_result
from mlops.core.names import CHAMPION, registered_model_name
from resources.gates import GatePolicy
from resources.registry import ModelRegistry
from resources.warehouse import DuckDBWarehouse


def tenant_of(context: dg.AssetCheckExecutionContext) -> str:
    tenant = context.run.tags.get("dagster/partition")
    if not tenant:
        raise dg.Failure("validation gates run per tenant: launch them with a tenant partition")
    return tenant


def record_gate(context, warehouse: DuckDBWarehouse, version: str, outcome: GateOutcome) -> dg.AssetCheckResult:
    """Persist a gate outcome and its audit entry, and turn it into the check result the UI shows."""
    tenant = tenant_of(context)
    with warehouse.transaction(tenant) as con:
        record_gate_result(con, version, outcome, context.run.run_id)
    warehouse.audit(
        tenant, actor="validation", action=f"gate:{outcome.gate}", subject=f"{registered_model_name(tenant)}/{version}",
        outcome="passed" if outcome.passed else "failed",
        details={"value": outcome.value, "threshold": outcome.threshold, "reason": outcome.reason},
    )
    return dg.AssetCheckResult(
        passed=outcome.passed,
        description=outcome.reason,
        metadata={
            "model_version": version,
            "value": dg.MetadataValue.float(float(outcome.value)),
            "threshold": dg.MetadataValue.float(float(outcome.threshold)),
            "reason": outcome.reason,
        },
    )


def _candidate_and_holdout(warehouse: DuckDBWarehouse, tenant: str) -> tuple[pd.Series, pd.DataFrame]:
    with warehouse.connect(tenant) as con:
        candidate = latest_candidate(con)
        holdout = holdout_scores(con, candidate["model_version"])
    return candidate, holdout


def _gate(**kwargs):
    # Checks of a partitioned asset run in the asset's partitioned run; the tenant comes from its tags.
    return dg.asset_check(asset=churn_model, blocking=True, **kwargs)


@_gate(description="Holdout ROC AUC is above the floor and not worse than the champion's beyond a tolerance.")
def roc_auc_gate(context: dg.AssetCheckExecutionContext, warehouse: DuckDBWarehouse,
                 registry: ModelRegistry, gates: GatePolicy) -> dg.AssetCheckResult:
    tenant = tenant_of(context)
    candidate, holdout = _candidate_and_holdout(warehouse, tenant)
    version = candidate["model_version"]
    champion = registry.alias_version(tenant, CHAMPION)
    champion_scores = None
    if champion is not None and str(champion.version) != version:
        champion_scores = modeling.score(registry.load_booster(tenant, champion.version), holdout)
    return record_gate(context, warehouse, version, modeling.roc_auc_outcome(
        holdout["churned"].to_numpy(), holdout["score"].to_numpy(), floor=gates.min_roc_auc,
        tolerance=gates.champion_auc_tolerance, champion_score=champion_scores,
        champion_version=champion.version if champion_scores is not None else None))


@_gate(description="Expected calibration error on the holdout is under the limit.")
def calibration_gate(context: dg.AssetCheckExecutionContext, warehouse: DuckDBWarehouse,
                     gates: GatePolicy) -> dg.AssetCheckResult:
    candidate, holdout = _candidate_and_holdout(warehouse, tenant_of(context))
    return record_gate(context, warehouse, candidate["model_version"], modeling.calibration_outcome(
        holdout["churned"].to_numpy(), holdout["score"].to_numpy(), max_ece=gates.max_expected_calibration_error))


@_gate(description="ROC AUC gap between customer segments (fairlearn MetricFrame) is under the limit.")
def fairness_gate(context: dg.AssetCheckExecutionContext, warehouse: DuckDBWarehouse,
                  gates: GatePolicy) -> dg.AssetCheckResult:
    candidate, holdout = _candidate_and_holdout(warehouse, tenant_of(context))
    outcome, table = modeling.fairness_outcome(
        holdout["churned"].to_numpy(), holdout["score"].to_numpy(), holdout[modeling.FAIRNESS_ATTRIBUTE],
        max_gap=gates.max_fairness_gap, min_group_size=gates.fairness_min_group_size,
        min_class_rows=gates.fairness_min_class_rows)
    result = record_gate(context, warehouse, candidate["model_version"], outcome)
    return dg.AssetCheckResult(
        passed=result.passed, description=result.description,
        metadata={**result.metadata, "by_group": dg.MetadataValue.md(table.to_markdown(index=False, floatfmt=".3f"))},
    )


@_gate(description="Single-row in-process scoring p99 (encoding + predict) is under the latency budget.")
def latency_gate(context: dg.AssetCheckExecutionContext, warehouse: DuckDBWarehouse,
                 registry: ModelRegistry, gates: GatePolicy) -> dg.AssetCheckResult:
    tenant = tenant_of(context)
    candidate, holdout = _candidate_and_holdout(warehouse, tenant)
    booster = registry.load_booster(tenant, candidate["model_version"])
    latency = modeling.single_row_latency_ms(booster, holdout)
    passed = latency["p99_ms"] <= gates.max_single_row_p99_ms
    return record_gate(context, warehouse, candidate["model_version"], GateOutcome(
        "latency_gate", passed, latency["p99_ms"], gates.max_single_row_p99_ms,
        f"single-row p99 {latency['p99_ms']:.2f} ms (p50 {latency['p50_ms']:.2f} ms; the best of "
        f"{latency['rounds']} rounds), budget "
        f"{gates.max_single_row_p99_ms} ms"))


@_gate(description="The serialized model is under the size limit.")
def model_size_gate(context: dg.AssetCheckExecutionContext, warehouse: DuckDBWarehouse,
                    gates: GatePolicy) -> dg.AssetCheckResult:
    candidate, _ = _candidate_and_holdout(warehouse, tenant_of(context))
    size = int(candidate["model_bytes"])
    passed = size <= gates.max_model_bytes
    return record_gate(context, warehouse, candidate["model_version"], GateOutcome(
        "model_size_gate", passed, size, gates.max_model_bytes,
        f"model file is {size:,} bytes, limit {gates.max_model_bytes:,}"))
