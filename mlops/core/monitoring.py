"""Model monitoring with NannyML: drift, label-free performance (CBPE), realized performance and
data quality, fitted once per model version on its reference period and run on prediction-log chunks.

The reference of a model version is its training holdout (features, score, label), stored with
the version in ``model_holdout_scores``. The analysis data is the champion's prediction log joined
to the online feature snapshot each prediction was scored from; a prediction's label is known once
its LABEL_HORIZON_DAYS window has closed. Everything here is plain Python on data frames: the
Dagster assets assemble the frames, call ``TenantMonitor`` and store what it returns. The policy
(``resources.monitoring.MonitoringPolicy``, a configurable resource) is passed in.

Decay alerts use NannyML's own alert flags, with a constant lower threshold on ROC AUC (the
reference ROC AUC minus ``max_auc_drop``) so that a tenant with few reference chunks does not get
a threshold from a noisy standard deviation. Univariate and multivariate drift use NannyML's
default thresholds and are reported, not acted on: drift without decay does not retrain.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from mlops.core.candidates import holdout_scores
from mlops.core.environment import HomeLayout, write_atomic
from mlops.core.model_inputs import CATEGORICAL_FEATURES, FEATURE_COLUMNS, NUMERIC_FEATURES
from mlops.core.names import CHAMPION
from mlops.core.online import SNAPSHOT_VERSION_REGEX, snapshot_file_name
from mlops.core.prediction_log import PREDICTION_LOG_DDL

TIMESTAMP = "timestamp"
SCORE = "score"
PREDICTED = "predicted_label"
TARGET = "churned"
PERFORMANCE_METRICS = ("estimated_roc_auc", "realized_roc_auc")
# The score at or above which a prediction counts as positive: NannyML's y_pred, the shadow
# comparison's agreement and the reports' confusion matrices.
DECISION_THRESHOLD = 0.5

RESULTS_DDL = """
CREATE TABLE IF NOT EXISTS monitoring_results (
    model_version VARCHAR NOT NULL, metric VARCHAR NOT NULL, feature VARCHAR, method VARCHAR,
    chunk_key VARCHAR NOT NULL, chunk_start TIMESTAMP NOT NULL, chunk_end TIMESTAMP NOT NULL,
    period VARCHAR NOT NULL, chunk_rows BIGINT, value DOUBLE, lower_threshold DOUBLE,
    upper_threshold DOUBLE, alert BOOLEAN NOT NULL, dagster_run_id VARCHAR NOT NULL
)
"""
ALERTS_DDL = """
CREATE TABLE IF NOT EXISTS monitoring_alerts (
    model_version VARCHAR NOT NULL, metric VARCHAR NOT NULL, feature VARCHAR, chunk_key VARCHAR NOT NULL,
    value DOUBLE, lower_threshold DOUBLE, upper_threshold DOUBLE, decay BOOLEAN NOT NULL,
    dagster_run_id VARCHAR NOT NULL, raised_at TIMESTAMP NOT NULL
)
"""


class MonitoringPolicy(Protocol):
    """What monitoring reads of its policy (``resources.monitoring.MonitoringPolicy`` provides it)."""

    chunk_period: str
    chunk_size: int
    max_auc_drop: float
    consecutive_chunks: int
    continuous_drift_methods: list[str]
    categorical_drift_methods: list[str]
    jensen_shannon_threshold: float
    multivariate_drift_margin: float

    def chunking(self) -> dict: ...

    def fingerprint(self) -> str: ...


@dataclass
class MonitoringReport:
    """Tidy results of one monitoring run: one row per metric (and feature) and chunk."""

    results: pd.DataFrame
    reference_roc_auc: float
    decay: list[dict] = field(default_factory=list)

    @property
    def alerts(self) -> pd.DataFrame:
        return self.results[self.results["alert"] & (self.results["period"] == "analysis")]

    def latest(self, metric: str, feature: str | None = None) -> float | None:
        rows = self.results[(self.results["metric"] == metric) & (self.results["period"] == "analysis")
                            & self.results["value"].notna()]
        if feature is not None:
            rows = rows[rows["feature"] == feature]
        return None if rows.empty else float(rows.sort_values("chunk_start")["value"].iloc[-1])


def prepare(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns NannyML reads: features, timestamp, score, a 0/1 prediction and the label."""
    out = frame.loc[:, [*FEATURE_COLUMNS, TIMESTAMP, SCORE]].copy()
    for col in NUMERIC_FEATURES:
        out[col] = pd.to_numeric(out[col], errors="coerce").astype("float64")
    for col in CATEGORICAL_FEATURES:
        out[col] = out[col].astype("object")
    out[TIMESTAMP] = pd.to_datetime(out[TIMESTAMP])
    out[SCORE] = out[SCORE].astype("float64")
    out[PREDICTED] = (out[SCORE] >= DECISION_THRESHOLD).astype("int64")
    out[TARGET] = frame[TARGET].astype("float64") if TARGET in frame else np.nan
    return out.sort_values(TIMESTAMP, kind="stable").reset_index(drop=True)


class TenantMonitor:
    """NannyML calculators fitted on one model version's reference data."""

    def __init__(self, policy: MonitoringPolicy, reference: pd.DataFrame):
        import nannyml as nml
        from nannyml.thresholds import ConstantThreshold

        reference = prepare(reference)
        if reference[TARGET].isna().any():
            raise ValueError("reference data must have a label on every row")
        if reference[TARGET].nunique() < 2:
            raise ValueError("reference data has a single class; ROC AUC is undefined")
        from sklearn.metrics import roc_auc_score

        self.reference_roc_auc = float(roc_auc_score(reference[TARGET], reference[SCORE]))
        self.auc_floor = self.reference_roc_auc - policy.max_auc_drop
        self.consecutive = policy.consecutive_chunks
        chunking = {"timestamp_column_name": TIMESTAMP, **policy.chunking()}
        auc_threshold = {"roc_auc": ConstantThreshold(lower=self.auc_floor)}
        classification = {"y_pred_proba": SCORE, "y_pred": PREDICTED, "y_true": TARGET,
                          "problem_type": "classification_binary", "metrics": ["roc_auc"]}
        self.univariate = nml.UnivariateDriftCalculator(
            column_names=list(FEATURE_COLUMNS), treat_as_categorical=list(CATEGORICAL_FEATURES),
            continuous_methods=list(policy.continuous_drift_methods),
            categorical_methods=list(policy.categorical_drift_methods), **chunking,
            thresholds={"jensen_shannon": ConstantThreshold(upper=policy.jensen_shannon_threshold)},
        ).fit(reference)
        # A model's reference (its holdout) spans a few weekly dates only: a threshold from the
        # spread of so few reference chunks is near zero and alerts on every chunk. The threshold
        # is the reference's own reconstruction error plus a margin instead.
        probe = nml.DataReconstructionDriftCalculator(column_names=list(FEATURE_COLUMNS), **chunking).fit(reference)
        reference_error = float(probe.calculate(reference).to_df()[("reconstruction_error", "value")].mean())
        self.multivariate_threshold = reference_error * (1 + policy.multivariate_drift_margin)
        self.multivariate = nml.DataReconstructionDriftCalculator(
            column_names=list(FEATURE_COLUMNS), threshold=ConstantThreshold(upper=self.multivariate_threshold),
            **chunking).fit(reference)
        self.cbpe = nml.CBPE(**classification, thresholds=auc_threshold, **chunking).fit(reference)
        self.realized_calculator = nml.PerformanceCalculator(**classification, thresholds=auc_threshold, **chunking).fit(reference)
        self.missing = nml.MissingValuesCalculator(column_names=list(FEATURE_COLUMNS), **chunking).fit(reference)
        self.unseen = nml.UnseenValuesCalculator(column_names=list(CATEGORICAL_FEATURES), **chunking).fit(reference)

    # --- the monitoring run ------------------------------------------------------------------
    def realized(self, analysis: pd.DataFrame) -> pd.DataFrame:
        """Realized ROC AUC alone (chunks computed before whose labels have matured since)."""
        analysis = prepare(analysis)
        return _tidy_simple(self.realized_calculator.calculate(analysis).filter(period="analysis").to_df(),
                            "roc_auc", "realized_roc_auc", None, "realized")

    def run(self, analysis: pd.DataFrame) -> MonitoringReport:
        analysis = prepare(analysis)
        if analysis.empty:
            raise ValueError("no analysis data: the tenant's champion has no logged predictions yet")
        parts = [
            _tidy_univariate(self.univariate.calculate(analysis).filter(period="analysis").to_df()),
            _tidy_simple(self.multivariate.calculate(analysis).filter(period="analysis").to_df(),
                         "reconstruction_error", "multivariate_drift", None, "pca_reconstruction"),
            _tidy_simple(self.cbpe.estimate(analysis).filter(period="analysis").to_df(),
                         "roc_auc", "estimated_roc_auc", None, "cbpe"),
        ]
        labelled = analysis[TARGET].notna()
        if labelled.any():
            parts.append(_tidy_simple(self.realized_calculator.calculate(analysis).filter(period="analysis").to_df(),
                                      "roc_auc", "realized_roc_auc", None, "realized"))
        parts.append(_tidy_per_column(self.missing.calculate(analysis).filter(period="analysis").to_df(),
                                      "missing_values_rate"))
        parts.append(_tidy_per_column(self.unseen.calculate(analysis).filter(period="analysis").to_df(),
                                      "unseen_values_rate"))
        results = pd.concat(parts, ignore_index=True)
        return MonitoringReport(results, self.reference_roc_auc, decay_alerts(results, self.consecutive))


def decay_alerts(results: pd.DataFrame, consecutive: int) -> list[dict]:
    """A decay alert per performance metric whose newest ``consecutive`` chunks with a value all
    alert: the metric, the chunk, the threshold and the value."""
    found = []
    for metric in PERFORMANCE_METRICS:
        rows = results[(results["metric"] == metric) & results["value"].notna()].sort_values("chunk_start")
        newest = rows.tail(consecutive)
        if len(newest) == consecutive and newest["alert"].all():
            last = newest.iloc[-1]
            found.append({"metric": metric, "chunk": str(last["chunk_key"]), "value": float(last["value"]),
                          "threshold": float(last["lower_threshold"]), "consecutive_chunks": consecutive})
    return found


def _chunk_columns(frame: pd.DataFrame, prefix: tuple) -> pd.DataFrame:
    chunk = frame[prefix]
    return pd.DataFrame({
        "chunk_key": chunk["key"].astype(str).to_numpy(),
        "chunk_start": pd.to_datetime(chunk["start_date"]).to_numpy(),
        "chunk_end": pd.to_datetime(chunk["end_date"]).to_numpy(),
        "period": chunk["period"].astype(str).to_numpy(),
        "chunk_rows": (chunk["end_index"] - chunk["start_index"] + 1).astype("int64").to_numpy(),
    })


def _block(base: pd.DataFrame, values: pd.DataFrame, metric: str, feature, method: str) -> pd.DataFrame:
    def col(name):
        return pd.to_numeric(values[name], errors="coerce").to_numpy() if name in values else np.nan

    return base.assign(
        metric=metric, feature=feature, method=method, value=col("value"),
        lower_threshold=col("lower_threshold"), upper_threshold=col("upper_threshold"),
        alert=values["alert"].fillna(False).astype(bool).to_numpy() if "alert" in values else False,
    )


def _tidy_simple(frame: pd.DataFrame, source: str, metric: str, feature, method: str) -> pd.DataFrame:
    frame = frame.sort_index(axis=1)
    return _block(_chunk_columns(frame, ("chunk",)), frame[source], metric, feature, method)


def _tidy_univariate(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.sort_index(axis=1)  # lexsorted columns: fast, warning-free selection
    base = _chunk_columns(frame["chunk"], ("chunk",))
    blocks = []
    for column, method in dict.fromkeys((c[0], c[1]) for c in frame.columns if c[0] != "chunk"):
        blocks.append(_block(base, frame[(column, method)], "univariate_drift", column, method))
    return pd.concat(blocks, ignore_index=True)


def _tidy_per_column(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    frame = frame.sort_index(axis=1)
    base = _chunk_columns(frame, ("chunk",))
    blocks = [_block(base, frame[column], metric, column, "nannyml")
              for column in dict.fromkeys(c[0] for c in frame.columns if c[0] != "chunk")]
    return pd.concat(blocks, ignore_index=True)


def store_report(con, report: MonitoringReport, version: str, run_id: str) -> pd.DataFrame:
    """Write a monitoring run's results and decay alerts to the warehouse (caller's transaction).
    Chunks of the run replace earlier results of the same chunks (labels mature over time); older
    chunks keep theirs. Returns the stored rows."""
    import datetime as dt

    results = report.results.assign(model_version=version, dagster_run_id=run_id)
    con.execute(RESULTS_DDL)
    con.execute(ALERTS_DDL)
    con.register("new_results", results)
    con.execute("DELETE FROM monitoring_results r WHERE model_version = ? AND EXISTS (SELECT 1 FROM new_results n "
                "WHERE n.chunk_key = r.chunk_key AND n.metric = r.metric)", [version])
    con.execute("INSERT INTO monitoring_results BY NAME SELECT * FROM new_results")
    con.unregister("new_results")
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    for alert in report.decay:
        con.execute("INSERT INTO monitoring_alerts VALUES (?, ?, NULL, ?, ?, ?, NULL, TRUE, ?, ?)",
                    [version, alert["metric"], alert["chunk"], alert["value"], alert["threshold"], run_id, now])
    return results


def chunk_keys(frame: pd.DataFrame, policy: MonitoringPolicy) -> pd.Series:
    """The NannyML chunk key of each row under period chunking (e.g. '2026-09-02' for days)."""
    return pd.to_datetime(frame[TIMESTAMP]).dt.to_period(policy.chunk_period).astype(str)


def run_incremental(monitor: TenantMonitor, analysis: pd.DataFrame, stored: pd.DataFrame,
                    policy: MonitoringPolicy) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Only what changed since the last run: every metric for chunks never computed, and realized
    ROC AUC for chunks whose labels have matured since. NannyML computes each chunk against the
    fitted reference alone, so this equals a full recomputation. Returns (new results, all results).
    Size-based chunks are not stable across runs: they are recomputed over the whole window."""
    if policy.chunk_size > 0 or stored.empty:
        fresh = monitor.run(analysis).results
        return fresh, fresh
    keys = chunk_keys(analysis, policy)
    computed = set(stored.loc[stored["metric"] == "estimated_roc_auc", "chunk_key"])
    realized = set(stored.loc[(stored["metric"] == "realized_roc_auc") & stored["value"].notna(), "chunk_key"])
    parts = []
    new_rows = analysis[~keys.isin(computed)]
    if len(new_rows):
        parts.append(monitor.run(new_rows).results)
    matured = analysis[keys.isin(computed) & ~keys.isin(realized) & analysis[TARGET].notna()]
    if len(matured):
        parts.append(monitor.realized(matured))
    fresh = pd.concat(parts, ignore_index=True) if parts else stored.iloc[0:0][list(stored.columns)]
    fresh = fresh.drop(columns=["model_version", "dagster_run_id"], errors="ignore")
    kept = stored.drop(columns=["model_version", "dagster_run_id"], errors="ignore")
    if len(fresh):
        replaced = kept.set_index(["chunk_key", "metric"]).index.isin(fresh.set_index(["chunk_key", "metric"]).index)
        kept = kept[~replaced]
    return fresh, pd.concat([kept, fresh], ignore_index=True)


# --- the data monitoring reads ------------------------------------------------------------------
ANALYSIS_SQL = """
WITH snapshots AS (
    SELECT * EXCLUDE (filename),
           CAST(regexp_extract(filename, '(VERSION_REGEX)', 1) AS BIGINT) AS snapshot_version
    FROM read_parquet($files, filename = true)
),
predictions AS (
    SELECT p.prediction_id, p.account_id, p.score, p.snapshot_version, p.requested_at
    FROM prediction_log p
    WHERE p.role = $role AND p.model_version = $version
)
SELECT p.prediction_id, p.score, s.*  EXCLUDE (snapshot_version), s.available_at AS timestamp,
       CASE WHEN s.available_at + INTERVAL (HORIZON) DAY <= CAST($origin AS TIMESTAMP)
            THEN CAST(c.churned_at IS NOT NULL AND c.churned_at < s.available_at + INTERVAL (HORIZON) DAY AS INTEGER)
       END AS churned
FROM predictions p
JOIN snapshots s ON s.account_id = p.account_id AND s.snapshot_version = p.snapshot_version
LEFT JOIN raw_churn_events c ON c.account_id = p.account_id AND c.churned_at >= s.available_at
WHERE s.available_at >= CAST($origin AS TIMESTAMP) - INTERVAL (WINDOW) DAY
QUALIFY row_number() OVER (PARTITION BY p.prediction_id ORDER BY c.churned_at) = 1
"""


def analysis_frame(con, online_dir: Path, version: str, window_days: int, origin, horizon_days: int,
                   role: str = CHAMPION) -> pd.DataFrame:
    """Logged predictions of one model version with the features they were scored from and, once
    mature (``horizon_days`` after the features, by ``origin``: the day after the newest event),
    their label: the analysis data of monitoring."""
    con.execute(PREDICTION_LOG_DDL)
    versions = [r[0] for r in con.execute(
        "SELECT DISTINCT snapshot_version FROM prediction_log WHERE role = ? AND model_version = ?",
        [role, version]).fetchall()]
    files = [str(online_dir / snapshot_file_name(v)) for v in versions]
    files = [f for f in files if Path(f).exists()]
    if not files:
        return pd.DataFrame()
    sql = (ANALYSIS_SQL.replace("(HORIZON)", str(int(horizon_days))).replace("(WINDOW)", str(int(window_days)))
           .replace("(VERSION_REGEX)", SNAPSHOT_VERSION_REGEX))
    return con.execute(sql, {"files": files, "role": role, "version": version, "origin": origin}).df()


def reference_frame(con, version: str) -> pd.DataFrame:
    """The reference of a model version: its training holdout, with scores and labels."""
    return holdout_scores(con, version).rename(columns={"prediction_time": TIMESTAMP})


# --- fitted monitors: once per model version ------------------------------------------------
def monitor_path(root: Path, tenant: str, version: str, policy: MonitoringPolicy) -> Path:
    return HomeLayout(Path(root)).monitoring_dir(tenant) / f"v{version}-{policy.fingerprint()}.pkl"


def load_or_fit(root: Path, tenant: str, version: str, policy: MonitoringPolicy,
                reference_loader) -> tuple[TenantMonitor, bool]:
    """The fitted monitor of a model version; fitted (and stored) on first use only."""
    path = monitor_path(root, tenant, version, policy)
    if path.exists():
        with path.open("rb") as fh:
            return pickle.load(fh), False
    monitor = TenantMonitor(policy, reference_loader())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, pickle.dumps(monitor))
    return monitor, True


# --- plots ------------------------------------------------------------------------------------
def performance_plot(results: pd.DataFrame, title: str) -> bytes:
    """Estimated (CBPE) and realized ROC AUC per chunk, with the alert threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for metric, style in (("estimated_roc_auc", "-o"), ("realized_roc_auc", "-s")):
        rows = results[(results["metric"] == metric) & results["value"].notna()].sort_values("chunk_start")
        if rows.empty:
            continue
        ax.plot(rows["chunk_start"], rows["value"], style, ms=3, label=metric.replace("_", " "))
        alerts = rows[rows["alert"]]
        ax.scatter(alerts["chunk_start"], alerts["value"], color="red", zorder=3, s=18)
        ax.axhline(rows["lower_threshold"].iloc[-1], color="grey", ls="--", lw=1)
    ax.set_title(title)
    ax.set_ylabel("ROC AUC")
    ax.legend(loc="lower left", fontsize=8)
    fig.autofmt_xdate()
    from mlops.core.modeling import figure_png

    return figure_png(fig)


def drift_plot(results: pd.DataFrame, title: str) -> bytes:
    """Multivariate reconstruction error per chunk and how many features drift in each chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True)
    multi = results[results["metric"] == "multivariate_drift"].sort_values("chunk_start")
    top.plot(multi["chunk_start"], multi["value"], "-o", ms=3)
    if len(multi) and multi["upper_threshold"].notna().any():
        top.axhline(multi["upper_threshold"].iloc[-1], color="grey", ls="--", lw=1)
    top.scatter(multi.loc[multi["alert"], "chunk_start"], multi.loc[multi["alert"], "value"], color="red", s=18, zorder=3)
    top.set_ylabel("reconstruction error")
    top.set_title(title)
    uni = results[results["metric"] == "univariate_drift"]
    counts = uni.groupby("chunk_start")["alert"].sum()
    bottom.bar(counts.index, counts.values, width=0.8)
    bottom.set_ylabel("features drifting")
    fig.autofmt_xdate()
    from mlops.core.modeling import figure_png

    return figure_png(fig)


# --- operational monitoring -------------------------------------------------------------------
OPERATIONAL_SUMMARY_SQL = """
SELECT model_version, role, predictions, q[1] AS p50_ms, q[2] AS p95_ms, q[3] AS p99_ms, errors, last_24h
FROM (
    SELECT model_version, role, count(*) AS predictions,
           quantile_cont(latency_ms, [0.5, 0.95, 0.99]) AS q,
           count(*) FILTER (WHERE NOT isfinite(score) OR score < 0 OR score > 1) AS errors,
           count(*) FILTER (WHERE requested_at >= now() - INTERVAL 1 DAY) AS last_24h
    FROM prediction_log
    GROUP BY model_version, role
)
ORDER BY model_version, role
"""


def operational_summary(con) -> pd.DataFrame:
    """Latency percentiles (linear interpolation), volume (all time and the last 24 hours) and errors
    per model version and role, in one DuckDB pass over ``prediction_log``: the log never comes into memory.
    An error is a logged score that is not a probability (NaN, infinite or outside [0, 1])."""
    return con.execute(OPERATIONAL_SUMMARY_SQL).df()


def service_status_dir(root: Path) -> Path:
    return HomeLayout(Path(root)).service_status_dir


def service_cpu_usage(root: Path) -> dict | None:
    """CPU seconds and predictions of the service's workers, summed over their status files
    (each worker rewrites its own file every few seconds)."""
    files = sorted(service_status_dir(root).glob("worker-*.json"))
    if not files:
        return None
    totals = {"cpu_seconds": 0.0, "predictions": 0, "workers": 0}
    for path in files:
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        totals["cpu_seconds"] += float(status.get("cpu_seconds", 0.0))
        totals["predictions"] += int(status.get("predictions", 0))
        totals["workers"] += 1
    return totals


def health_checks_path(root: Path) -> Path:
    return HomeLayout(Path(root)).health_checks_file


def record_health_check(root: Path, ok: bool, detail: str, at: float) -> None:
    """Append one probe of the service's readiness (the health sensor writes these)."""
    path = health_checks_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({"at": at, "ok": ok, "detail": detail}) + "\n")


def read_health_checks(root: Path) -> pd.DataFrame:
    path = health_checks_path(root)
    if not path.exists():
        return pd.DataFrame(columns=["at", "ok", "detail"])
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows, columns=["at", "ok", "detail"])


def compute_kpis(audit_log: pd.DataFrame, run_statuses: list[str], health: pd.DataFrame) -> dict:
    """Delivery KPIs of one tenant from its audit log, its Dagster runs and the service's health checks."""
    audit_log = audit_log.sort_values("seq")
    alerts = audit_log[audit_log["action"] == "decay_alert"]
    promotions = audit_log[audit_log["action"] == "promotion"]
    first_champions = audit_log[(audit_log["action"] == "alias_assigned")
                                & audit_log["details"].str.contains(f'"{CHAMPION}"', regex=False)]
    deployments = pd.concat([promotions, first_champions])
    lead_times = []
    for _, promotion in promotions.iterrows():
        before = alerts[alerts["seq"] < promotion["seq"]]
        if len(before):
            # The incident starts at its first alert after the previous promotion.
            earlier = promotions[promotions["seq"] < promotion["seq"]]
            since = earlier["seq"].max() if len(earlier) else -1
            incident = before[before["seq"] > since]
            if len(incident):
                lead_times.append((promotion["recorded_at"] - incident["recorded_at"].min()).total_seconds())
    span_days = 0.0
    if len(audit_log):
        span_days = max((audit_log["recorded_at"].max() - audit_log["recorded_at"].min()).total_seconds() / 86400, 1.0)
    started = health[health["ok"]]["at"].min() if len(health) and health["ok"].any() else None
    probes = health[health["at"] >= started] if started is not None else health.iloc[0:0]
    return {
        "decay_alerts": len(alerts),
        "promotions": len(promotions),
        "deployments": len(deployments),
        "deployments_per_week": len(deployments) / span_days * 7 if span_days else None,
        "mean_alert_to_promotion_s": float(np.mean(lead_times)) if lead_times else None,
        "last_alert_to_promotion_s": float(lead_times[-1]) if lead_times else None,
        "rollbacks": int((audit_log["action"] == "rollback").sum()),
        "gate_failures": int(((audit_log["action"].str.startswith("gate:") | (audit_log["action"] == "promotion_gate"))
                              & (audit_log["outcome"] == "failed")).sum()),
        "challengers_retired": int((audit_log["action"] == "challenger_retired").sum()),
        "runs": len(run_statuses),
        "failed_runs": sum(s == "FAILURE" for s in run_statuses),
        "health_checks": len(probes),
        "uptime_ratio": float(probes["ok"].mean()) if len(probes) else None,
    }


# --- reading stored results (the drift report) ------------------------------------------------
def read_monitoring_results(con, version: str | None = None) -> pd.DataFrame:
    """Stored monitoring results (``store_report``) of one model version, or of every version if
    ``version`` is None, in chunk order. Works on a read-only connection; empty, with the table's
    columns, where monitoring has stored nothing yet."""
    return _read_stored(con, "monitoring_results", RESULTS_DDL, version,
                        "model_version, chunk_start, metric, feature NULLS FIRST, method")


def read_monitoring_alerts(con, version: str | None = None) -> pd.DataFrame:
    """Stored decay alerts (the retraining triggers) of one model version, or of every version."""
    return _read_stored(con, "monitoring_alerts", ALERTS_DDL, version, "raised_at, model_version, metric, chunk_key")


def _read_stored(con, table: str, ddl: str, version: str | None, order: str) -> pd.DataFrame:
    exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]).fetchone()[0]
    if not exists:
        import duckdb

        with duckdb.connect() as scratch:  # the table's columns and types, without writing to the warehouse
            scratch.execute(ddl)
            return scratch.execute(f"SELECT * FROM {table}").df()  # noqa: S608 - constant table
    where, params = ("WHERE model_version = ?", [str(version)]) if version is not None else ("", [])
    return con.execute(f"SELECT * FROM {table} {where} ORDER BY {order}", params).df()  # noqa: S608 - constants
