"""Features: the offline weekly feature table, point-in-time training sets and the online snapshot,
all built from the feature views declared once in ``resources.feature_store``."""


import dagster as dg
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from mlops.core.hashing import content_hash
from resources.feature_store import (
    CATEGORICAL_FEATURES,
    FEATURE_COLUMNS,
    FEATURE_VIEW_VERSION,
    NUMERIC_FEATURES,
    FeatureStore,
    build_provisional_set,
    compare_feature_rows,
    feature_origin,
    offline_rows_at,
)
from resources.gates import GatePolicy
from resources.schemas import RAW_TABLES
from resources.tenants import TENANT_PARTITIONS
from resources.warehouse import DuckDBWarehouse

# The raw tables the feature views read: all but the labels.
RAW_DEPS = [name for name in RAW_TABLES if name != "raw_churn_events"]
SKEW_SAMPLE_SIZE = 200


@dg.asset(
    deps=RAW_DEPS,
    partitions_def=TENANT_PARTITIONS,
    group_name="features",
    kinds={"duckdb"},
)
def account_features(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, feature_store: FeatureStore):
    """Offline feature table: one row per account and week, from the declared feature views."""
    with warehouse.transaction(context.partition_key) as con:
        rows = feature_store.build_features(con)
        origin, weeks = feature_origin(con)
    return dg.MaterializeResult(
        metadata={
            "rows": dg.MetadataValue.int(rows),
            "weeks": dg.MetadataValue.int(weeks),
            "available_until": str(origin),
            "feature_view_version": FEATURE_VIEW_VERSION,
            "features": dg.MetadataValue.md("\n".join(f"- `{c}`" for c in FEATURE_COLUMNS)),
        }
    )


def training_set_schema(max_staleness_days: int, last_event: pd.Timestamp) -> pa.DataFrameSchema:
    """Data contract of a training set: types, no nulls, plausible ranges, fresh labels."""
    numeric = {c: pa.Column(float, pa.Check.ge(0), nullable=False) for c in NUMERIC_FEATURES}
    numeric["seat_utilisation_7d"] = pa.Column(float, pa.Check.in_range(0, 50), nullable=False)
    numeric["max_ticket_severity_28d"] = pa.Column(float, pa.Check.in_range(0, 4), nullable=False)
    return pa.DataFrameSchema(
        {
            "account_id": pa.Column(str, nullable=False),
            "prediction_time": pa.Column(
                "datetime64[ns]",
                pa.Check(lambda s: (last_event - s.max()).days <= max_staleness_days,
                         element_wise=False, error=f"newest label older than {max_staleness_days} days"),
            ),
            "churned": pa.Column(int, pa.Check.isin([0, 1]), nullable=False, coerce=True),
            **numeric,
            **{c: pa.Column(str, pa.Check.isin(list(levels)), nullable=False)
               for c, levels in CATEGORICAL_FEATURES.items()},
        },
        unique=["account_id", "prediction_time"],
        checks=pa.Check(lambda df: df["available_at"].le(df["prediction_time"]).all(),
                        element_wise=False, error="a feature row is newer than its label (leak)"),
        name="churn_training_set",
    )


@dg.asset(
    deps=[account_features, "raw_churn_events"],
    partitions_def=TENANT_PARTITIONS,
    group_name="features",
    kinds={"duckdb"},
    check_specs=[
        dg.AssetCheckSpec(
            "training_data_integrity",
            asset="churn_training_set",
            blocking=True,
            description="Schema, nulls, ranges, point-in-time order and label freshness of the training set.",
        )
    ],
)
def churn_training_set(
    context: dg.AssetExecutionContext,
    warehouse: DuckDBWarehouse,
    feature_store: FeatureStore,
    gates: GatePolicy,
):
    """Mature churn labels joined point-in-time (DuckDB ASOF) to the offline features; alongside,
    the early (censoring-aware) labels of the weeks whose window is still open
    (``churn_provisional_set``), which a retrain in a decay episode learns from."""
    with warehouse.transaction(context.partition_key) as con:
        training = feature_store.build_training_set(con)
        early = build_provisional_set(con)
        origin, _ = feature_origin(con)
    version = content_hash(training)
    yield dg.MaterializeResult(
        metadata={
            "rows": dg.MetadataValue.int(len(training)),
            "accounts": dg.MetadataValue.int(training["account_id"].nunique()),
            "prediction_dates": dg.MetadataValue.int(training["prediction_time"].nunique()),
            "churn_rate": dg.MetadataValue.float(float(training["churned"].mean()) if len(training) else 0.0),
            "early_label_rows": dg.MetadataValue.int(len(early)),
            "early_churns_so_far": dg.MetadataValue.int(int(early["churned"].sum()) if len(early) else 0),
            "dataset_version": version,
            "feature_view_version": FEATURE_VIEW_VERSION,
        }
    )
    try:
        training_set_schema(gates.max_label_staleness_days, pd.Timestamp(origin)).validate(training, lazy=True)
        failures = None
    except SchemaErrors as exc:
        failures = exc.failure_cases
    if len(training) == 0:
        failures = pd.DataFrame({"column": ["*"], "check": ["non_empty"], "failure_case": ["no rows"]})
    yield dg.AssetCheckResult(
        check_name="training_data_integrity",
        passed=failures is None,
        metadata={
            "rows_checked": dg.MetadataValue.int(len(training)),
            "failures": dg.MetadataValue.md(
                "none" if failures is None
                else failures[["column", "check", "failure_case"]].head(20).to_markdown(index=False)),
        },
        description=None if failures is None else f"{len(failures)} contract violations",
    )


@dg.asset(
    deps=[account_features],
    partitions_def=TENANT_PARTITIONS,
    group_name="features",
    kinds={"duckdb", "parquet"},
    check_specs=[
        dg.AssetCheckSpec(
            "no_training_serving_skew",
            asset="online_feature_snapshot",
            blocking=True,
            description="Online features equal the offline features at the same as-of time for a sample of accounts.",
        )
    ],
)
def online_feature_snapshot(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, feature_store: FeatureStore):
    """Latest feature row per account, published as an immutable versioned Parquet file for serving."""
    tenant = context.partition_key
    with warehouse.connect(tenant) as con:
        pointer = feature_store.write_online_snapshot(tenant, con)
        online = feature_store.read_online_snapshot(tenant)
        sample = online.sample(n=min(SKEW_SAMPLE_SIZE, len(online)), random_state=0)
        as_of = pd.Timestamp(online["available_at"].max())
        offline = offline_rows_at(con, sample["account_id"].tolist(), as_of)
    problems = compare_feature_rows(sample, offline)
    yield dg.MaterializeResult(
        metadata={
            "rows": dg.MetadataValue.int(pointer["rows"]),
            "snapshot_version": dg.MetadataValue.int(pointer["version"]),
            "path": dg.MetadataValue.path(str(feature_store.online_dir(tenant) / pointer["path"])),
            "feature_date": pointer["feature_date"],
            "content_hash": pointer["content_hash"],
        }
    )
    yield dg.AssetCheckResult(
        check_name="no_training_serving_skew",
        passed=not problems,
        metadata={
            "accounts_compared": dg.MetadataValue.int(len(sample)),
            "mismatches": dg.MetadataValue.int(len(problems)),
            "examples": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems[:20]) or "none"),
        },
    )
