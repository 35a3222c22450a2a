"""Model candidates: every trained version of a tenant's model, its holdout scores (the reference of
its gates and of its monitoring) and the results of its validation gates, in the tenant's warehouse.

The functions take an open DuckDB connection and leave the transaction to the caller. A use case
other than churn keeps its own tables, named with its prefix (``spend_model_candidates``); churn's
tables keep their unprefixed names.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import pandas as pd

CANDIDATES_DDL = """
CREATE TABLE IF NOT EXISTS {prefix}model_candidates (
    model_version VARCHAR PRIMARY KEY,
    trained_at TIMESTAMP NOT NULL,
    mlflow_run_id VARCHAR NOT NULL,
    dagster_run_id VARCHAR NOT NULL,
    dataset_version VARCHAR NOT NULL,
    feature_view_version VARCHAR NOT NULL,
    holdout_cutoff TIMESTAMP NOT NULL,
    model_bytes BIGINT NOT NULL,
    metrics VARCHAR NOT NULL
)
"""
HOLDOUT_TABLE = "model_holdout_scores"
GATE_RESULTS_DDL = """
CREATE TABLE IF NOT EXISTS {prefix}gate_results (
    model_version VARCHAR NOT NULL,
    gate VARCHAR NOT NULL,
    passed BOOLEAN NOT NULL,
    value DOUBLE,
    threshold DOUBLE,
    reason VARCHAR NOT NULL,
    dagster_run_id VARCHAR NOT NULL,
    evaluated_at TIMESTAMP NOT NULL
)
"""
# Every gate a version must pass before it may carry the challenger alias.
GATES = ("roc_auc_gate", "calibration_gate", "fairness_gate", "latency_gate", "model_size_gate")


class NoCandidateError(LookupError):
    pass


@dataclass(frozen=True)
class GateOutcome:
    gate: str
    passed: bool
    value: float
    threshold: float
    reason: str


def table_prefix(use_case: str) -> str:
    """The prefix of a use case's candidate tables: none for churn (its tables predate use cases)."""
    return "" if use_case == "churn" else f"{use_case}_"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def record_candidate(con, *, version: str, mlflow_run_id: str, dagster_run_id: str, dataset_version: str,
                     feature_view_version: str, holdout_cutoff: pd.Timestamp, model_bytes: int, metrics: dict,
                     holdout: pd.DataFrame, use_case: str = "churn") -> None:
    """Store a trained version and its holdout rows (features, label, ``score``)."""
    prefix = table_prefix(use_case)
    con.execute(CANDIDATES_DDL.format(prefix=prefix))
    con.execute(
        f"INSERT OR REPLACE INTO {prefix}model_candidates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - prefix of a declared name
        [version, _now(), mlflow_run_id, dagster_run_id, dataset_version, feature_view_version,
         holdout_cutoff.to_pydatetime(), model_bytes, json.dumps(metrics)],
    )
    holdout_table = prefix + HOLDOUT_TABLE
    con.register("holdout_frame", holdout.assign(model_version=version))
    con.execute(f"CREATE TABLE IF NOT EXISTS {holdout_table} AS SELECT * FROM holdout_frame LIMIT 0")  # noqa: S608 - constant table name
    con.execute(f"DELETE FROM {holdout_table} WHERE model_version = ?", [version])  # noqa: S608
    con.execute(f"INSERT INTO {holdout_table} BY NAME SELECT * FROM holdout_frame")  # noqa: S608
    con.unregister("holdout_frame")


def latest_candidate(con, use_case: str = "churn") -> pd.Series:
    """The most recently trained model version of this tenant, with its metrics."""
    prefix = table_prefix(use_case)
    con.execute(CANDIDATES_DDL.format(prefix=prefix))
    frame = con.execute(f"SELECT * FROM {prefix}model_candidates ORDER BY trained_at DESC LIMIT 1").df()  # noqa: S608
    if frame.empty:
        raise NoCandidateError(f"no trained {use_case} model candidate yet: train a model first")
    return frame.iloc[0]


def holdout_scores(con, version: str, use_case: str = "churn") -> pd.DataFrame:
    """The holdout of a model version: features, label and the version's own score per row."""
    holdout_table = table_prefix(use_case) + HOLDOUT_TABLE
    exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                         [holdout_table]).fetchone()[0]
    frame = con.execute(
        f"SELECT * FROM {holdout_table} WHERE model_version = ?", [str(version)]  # noqa: S608 - constant table
    ).df() if exists else pd.DataFrame()
    if frame.empty:
        raise NoCandidateError(f"model version {version} has no holdout scores")
    return frame


def record_gate_result(con, version: str, outcome: GateOutcome, run_id: str, use_case: str = "churn") -> None:
    prefix = table_prefix(use_case)
    con.execute(GATE_RESULTS_DDL.format(prefix=prefix))
    con.execute(
        f"INSERT INTO {prefix}gate_results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - prefix of a declared name
        [version, outcome.gate, outcome.passed, outcome.value, outcome.threshold, outcome.reason, run_id, _now()],
    )


def failed_or_missing_gates(con, version: str, gates: tuple[str, ...] = GATES,
                            use_case: str = "churn") -> dict[str, str]:
    """Gates (of ``gates``) that the version has not passed in its latest evaluation, with the reason."""
    prefix = table_prefix(use_case)
    con.execute(GATE_RESULTS_DDL.format(prefix=prefix))
    rows = con.execute(
        f"SELECT gate, passed, reason FROM {prefix}gate_results WHERE model_version = ? "  # noqa: S608
        "QUALIFY row_number() OVER (PARTITION BY gate ORDER BY evaluated_at DESC) = 1",
        [version],
    ).fetchall()
    latest = {gate: (passed, reason) for gate, passed, reason in rows}
    problems = {g: "not evaluated" for g in gates if g not in latest}
    problems.update({g: reason for g, (passed, reason) in latest.items() if not passed})
    return problems
