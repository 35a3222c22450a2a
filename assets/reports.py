"""Reports: the parametrised notebooks under ``notebooks/``, executed per tenant with papermill.

Each materialization writes ``MLOPS_HOME/reports/<tenant>/<name>-<timestamp>.ipynb`` and the HTML
next to it, and records both paths and the report's headline numbers as metadata. A cell that
raises fails the materialization with that cell's error.
"""

import dagster as dg
from pydantic import Field

from mlops.core.names import CHALLENGER, CHAMPION, registered_model_name
from resources.notebooks import NotebookRun, NotebookRunner
from resources.registry import ModelRegistry
from resources.tenants import TENANT_PARTITIONS


class ModelReportConfig(dg.Config):
    model_version: str = Field(
        default="",
        description="Registered version to report. Empty: the challenger (the newest version that passed "
        "every gate), or the champion when the tenant has no challenger.",
    )
    threshold: float = Field(default=0.3, gt=0.0, lt=1.0,
                             description="Churn probability at or above which an account is flagged.")


@dg.asset(
    deps=["churn_training_set"],
    partitions_def=TENANT_PARTITIONS,
    group_name="reports",
    kinds={"jupyter"},
)
def eda_report(context: dg.AssetExecutionContext, notebooks: NotebookRunner) -> dg.MaterializeResult:
    """Exploratory analysis of the tenant's training set (notebooks/eda.ipynb): feature distributions
    per segment and outcome, churn rate over time, missing values."""
    run = notebooks.run("eda", context.partition_key)
    context.log.info(f"eda report of {context.partition_key}: {run.html} ({run.seconds:.1f} s)")
    return dg.MaterializeResult(metadata=_metadata(run))


@dg.asset(
    deps=["churn_model_aliases"],
    partitions_def=TENANT_PARTITIONS,
    group_name="reports",
    kinds={"jupyter", "mlflow"},
)
def model_report(
    context: dg.AssetExecutionContext,
    config: ModelReportConfig,
    notebooks: NotebookRunner,
    registry: ModelRegistry,
) -> dg.MaterializeResult:
    """Report of a registered churn model version (notebooks/model_report.ipynb): ROC and PR curves,
    calibration, confusion matrix at the threshold, feature importance, SHAP explanations, fairness
    by segment, and the comparison with the champion on the same holdout."""
    tenant = context.partition_key
    version = config.model_version.strip()
    if not version:
        aliased = registry.alias_version(tenant, CHALLENGER) or registry.alias_version(tenant, CHAMPION)
        if aliased is None:
            raise dg.Failure(f"{registered_model_name(tenant)} has neither a challenger nor a champion to report")
        version = str(aliased.version)
    run = notebooks.run("model_report", tenant, {"model_version": version, "threshold": config.threshold})
    context.log.info(f"model report of {registered_model_name(tenant)} v{version}: {run.html} ({run.seconds:.1f} s)")
    return dg.MaterializeResult(metadata={"model_name": registered_model_name(tenant), **_metadata(run)})


class DriftReportConfig(dg.Config):
    model_version: str = Field(
        default="",
        description="Registered version whose monitoring results are reported. Empty: the current champion "
        "(the version model_monitoring monitors).",
    )
    last_chunks: int = Field(default=0, ge=0, description="Report only the newest chunks; 0: every stored chunk.")


@dg.asset(
    deps=["model_monitoring"],
    partitions_def=TENANT_PARTITIONS,
    group_name="reports",
    kinds={"jupyter", "nannyml"},
)
def drift_report(
    context: dg.AssetExecutionContext,
    config: DriftReportConfig,
    notebooks: NotebookRunner,
    registry: ModelRegistry,
) -> dg.MaterializeResult:
    """Drift report of a registered churn model version from its stored monitoring results
    (notebooks/drift_report.ipynb): per-feature drift over time with alerts, multivariate drift,
    CBPE estimate against realized ROC AUC with the threshold, the alerts, and data quality."""
    tenant = context.partition_key
    version = config.model_version.strip()
    if not version:
        champion = registry.alias_version(tenant, CHAMPION)
        if champion is None:
            raise dg.Failure(f"{registered_model_name(tenant)} has no champion whose monitoring to report")
        version = str(champion.version)
    run = notebooks.run("drift_report", tenant, {"model_version": version, "last_chunks": config.last_chunks})
    context.log.info(f"drift report of {registered_model_name(tenant)} v{version}: {run.html} ({run.seconds:.1f} s)")
    return dg.MaterializeResult(metadata={"model_name": registered_model_name(tenant), **_metadata(run)})


def _metadata(run: NotebookRun) -> dict:
    metadata = {
        "notebook": dg.MetadataValue.path(str(run.notebook)),
        "html": dg.MetadataValue.path(str(run.html)),
        "execution_seconds": dg.MetadataValue.float(round(run.seconds, 2)),
        "figures": dg.MetadataValue.int(run.figures),
        "tables": dg.MetadataValue.int(run.tables),
    }
    for key, value in run.summary.items():
        if key == "tenant":
            continue
        if isinstance(value, bool):
            metadata[key] = dg.MetadataValue.bool(value)
        elif isinstance(value, int):
            metadata[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            metadata[key] = dg.MetadataValue.float(value)
        else:
            metadata[key] = dg.MetadataValue.text("none" if value is None else str(value))
    return metadata
