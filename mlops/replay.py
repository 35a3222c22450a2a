"""Offline replay of a simulated tenant for monitoring: what the service would have logged, day by
day, without the service. Tests and benchmarks use it to judge detection quality (does an alert
fire within a week of a drift, and never without one) on exactly the data path monitoring sees in
production: features as of each day from the same feature view, scores of the model trained at the
start, labels once their window has closed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import duckdb
import pandas as pd

from mlops.core import modeling
from mlops.core.monitoring import TIMESTAMP, TenantMonitor, decay_evidence
from resources.feature_store import (
    LABEL_HORIZON_DAYS,
    build_feature_table,
    build_training_set,
    compute_features,
)
from resources.monitoring import MonitoringPolicy
from resources.schemas import RAW_TABLES
from resources.tenants import TenantSpec
from usecases.churn.simulator import SIMULATION_START, simulate_tenant


def load_world(spec: TenantSpec) -> duckdb.DuckDBPyConnection:
    """An in-memory warehouse with the tenant's raw tables up to its clock."""
    con = duckdb.connect()
    for name, frame in simulate_tenant(spec).items():
        table = RAW_TABLES[name]
        con.execute(table.ddl())
        staged = frame[table.column_names].assign(source="simulator")
        con.register("staged", staged)
        con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM staged")  # noqa: S608 - known table
        con.unregister("staged")
    return con


@dataclasses.dataclass
class ReplayedTenant:
    spec: TenantSpec
    start_day: int
    reference: pd.DataFrame  # the model's holdout: features, score, label, timestamp
    predictions: pd.DataFrame  # one row per account and day: features, score, timestamp
    churn: pd.DataFrame  # account_id, churned_at (the whole horizon)

    def analysis_as_of(self, today: int) -> pd.DataFrame:
        """Predictions made before ``today``, labelled where the label window has closed by then."""
        now = pd.Timestamp(SIMULATION_START) + pd.Timedelta(days=today)
        rows = self.predictions[self.predictions[TIMESTAMP] < now].copy()
        churned_at = rows["account_id"].map(self.churn.set_index("account_id")["churned_at"])
        horizon = pd.Timedelta(days=LABEL_HORIZON_DAYS)
        mature = rows[TIMESTAMP] + horizon <= now
        label = (churned_at.notna() & (churned_at < rows[TIMESTAMP] + horizon)).astype(float)
        rows["churned"] = label.where(mature)
        return rows


def replay_tenant(spec: TenantSpec, start_day: int, end_day: int) -> ReplayedTenant:
    """Train at ``start_day`` (as the platform does), then score every active account each day
    until ``end_day`` with that model."""
    built = load_world(dataclasses.replace(spec, today=start_day))
    build_feature_table(built)
    training = build_training_set(built)
    split = modeling.time_split(training, embargo_days=LABEL_HORIZON_DAYS)
    booster = modeling.train_booster(split.train)
    reference = split.holdout.assign(score=modeling.score(booster, split.holdout)).rename(
        columns={"prediction_time": TIMESTAMP})

    world = load_world(dataclasses.replace(spec, today=end_day))
    days = []
    for day in range(start_day, end_day):
        origin = SIMULATION_START + dt.timedelta(days=day)
        features = compute_features(world, origin, -1, -1)
        # In account order: the query's row order varies from run to run.
        features = features[features["active_days_7d"] > 0].sort_values("account_id", ignore_index=True)
        days.append(features.assign(score=modeling.score(booster, features), **{TIMESTAMP: pd.Timestamp(origin)}))
    churn = world.execute("SELECT account_id, min(churned_at) AS churned_at FROM raw_churn_events GROUP BY 1").df()
    return ReplayedTenant(spec, start_day, reference, pd.concat(days, ignore_index=True), churn)


def first_decay_day(replayed: ReplayedTenant, policy: MonitoringPolicy, until_day: int) -> tuple[int, dict] | None:
    """The first simulated day on which the daily monitoring run would raise a decay alert, from
    one monitoring run over everything logged until ``until_day``.

    One run suffices: a chunk's estimated ROC AUC does not change as days pass, and its realized
    ROC AUC is final from the day its label window closes. The alert rule (the newest
    ``consecutive_chunks`` valued chunks all under the threshold) is then met on the day the last
    chunk of an alerting run of chunks got its value; with ``policy.decay_confidence`` a realized
    alert also needs the platform's evidence (``decay_evidence``) over those chunks, judged on the
    labels known that day."""
    monitor = TenantMonitor(policy, replayed.reference)
    report = monitor.run(replayed.analysis_as_of(until_day))
    found = []
    for metric, delay in (("estimated_roc_auc", 1), ("realized_roc_auc", LABEL_HORIZON_DAYS)):
        rows = report.results[(report.results["metric"] == metric) & report.results["value"].notna()]
        rows = rows.sort_values("chunk_start").reset_index(drop=True)
        alerts = rows["alert"].rolling(policy.consecutive_chunks).sum() == policy.consecutive_chunks
        for index in rows.index[alerts]:
            row = rows.loc[index]
            day = (pd.Timestamp(row["chunk_start"]) - pd.Timestamp(SIMULATION_START)).days + delay
            alert = {"metric": metric, "chunk": row["chunk_key"], "value": float(row["value"]),
                     "threshold": float(row["lower_threshold"]), "consecutive_chunks": policy.consecutive_chunks}
            if policy.decay_confidence and not decay_evidence(
                    monitor, replayed.analysis_as_of(day), rows.loc[:index], alert, alert["threshold"],
                    policy.decay_confidence)[0]:
                continue
            found.append((day, {k: alert[k] for k in ("metric", "chunk", "value", "threshold")}))
            break
    return min(found, key=lambda f: f[0]) if found else None
