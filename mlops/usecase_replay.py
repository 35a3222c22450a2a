"""The closed loop of a declared use case (``mlops.core.usecase``) on a simulated clock, through the
platform's own functions: ``mlops.loop_replay`` for any binary use case with a simulator (fraud).

Each simulated day runs what the use case's daily cycle and decay sensor run in production
(``assets.usecases``), in the same order: the shadow comparison and promotion (``decide_promotion``
with the use case's ``promotion_metric``, ``inherit_floor``, ``on_promotion``), monitoring of the
champion's logged predictions (``monitoring_step`` with ``MonitorSpec.of(uc)``: incremental NannyML,
the floor, the decay rule), the loop's decision (``after_monitoring``), a retrain when the loop
decided one (``usecase_store``'s training set as of that day and, in an episode,
``usecase_model.fit_for_episode`` on its early labels too), then the day's traffic.

The traffic of day ``d``: every settled request of the day (a payment: its request fields) with
the feature row the online snapshot of that day serves (the account's aggregates as of the
midnight that starts the day), scored by the champion and, in shadow, the challenger. Those rows are
the point-in-time join of the whole simulated horizon's labels (``build_training_set``: the newest
feature row at or before the request, which is the snapshot's; the ``no_training_serving_skew``
check holds the two equal). Only settled requests are replayed: they are the ones the labels SQL
knows, so the only ones monitoring and the shadow comparison analyse in production (declined
payments are never charged back).

What the replay adds is the ground truth: every request's eventual label (its chargeback, from the
whole simulated horizon), to measure realized performance day by day and the time to restore
(``ReplayOutcomes``, shared with churn's replay).
"""

from __future__ import annotations

import dataclasses

import duckdb
import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from mlops.core import loop, usecase_model, usecase_store
from mlops.core.monitoring import SCORE, TIMESTAMP, MonitorSpec, TenantMonitor, censor_reference
from mlops.core.names import CHALLENGER, CHAMPION
from mlops.core.shadow import PR_AUC, promotion_metric
from mlops.core.usecase import UseCase
from mlops.loop_replay import Model, ReplayOutcomes
from resources.monitoring import MonitoringPolicy
from resources.tenants import TenantSpec

SIMULATOR_SOURCE = "simulator"
# Gates that depend on the machine and the model file, not on the drift: the replay does not judge them.
UNJUDGED_GATES = ("latency_gate", "model_size_gate")


def load_tables(uc: UseCase, spec: TenantSpec) -> duckdb.DuckDBPyConnection:
    """An in-memory warehouse with the use case's raw tables as its simulator gives them at the
    tenant's clock (``spec.today``), validated and loaded by ``usecase_store.replace_rows``."""
    con = duckdb.connect()
    usecase_store.replace_rows(con, uc, usecase_store.load_simulator(uc)(spec), SIMULATOR_SOURCE)
    return con


class UseCaseReplay(ReplayOutcomes):
    """One tenant's closed loop of a binary use case, day by day, from ``start_day`` (the first
    champion) to ``end_day``. ``origin``: the simulator's day 0 (``simulator.START``)."""

    def __init__(self, uc: UseCase, spec: TenantSpec, start_day: int, end_day: int, origin,
                 policy: MonitoringPolicy | None = None):
        if uc.problem_type != "binary":
            raise ValueError(f"use case {uc.name!r}: the replay is for a binary use case")
        horizon = uc.label.horizon_days
        if end_day + horizon > spec.days:
            raise ValueError(f"the simulated horizon ({spec.days} days) must reach the labels of the last "
                             f"replayed day ({end_day} + {horizon})")
        self.uc, self.spec, self.start_day, self.end_day = uc, spec, start_day, end_day
        self.loop_name, self.early_after_days = uc.name, uc.label.early_after_days
        self.origin = pd.Timestamp(origin)
        self.policy = policy or MonitoringPolicy()
        self.rules = loop.LoopRules.of(self.policy)
        self.monitor_spec = MonitorSpec.of(uc)
        self.metric_spec = promotion_metric(uc)
        self.label = uc.label.column
        self.horizon = pd.Timedelta(days=horizon)
        if self.metric_spec is PR_AUC:
            self.metric_name = "pr_auc"
        # The whole horizon: its point-in-time rows are the traffic, its chargebacks the ground truth.
        world = load_tables(uc, dataclasses.replace(spec, today=None))
        usecase_store.build_feature_table(world, uc)
        rows = usecase_store.build_training_set(world, uc)
        self.known_from = self._known_from(world, rows, start_day, end_day + horizon)
        world.close()
        rows = rows.rename(columns={"available_at": TIMESTAMP})
        rows["prediction_id"] = rows[uc.entity.key].astype(str)
        self.truth = rows.set_index("prediction_id")[self.label].astype(int)
        day = ((rows["prediction_time"] - self.origin) // pd.Timedelta(days=1)).astype(int)
        self.traffic_rows = {int(d): part.drop(columns=[self.label]).reset_index(drop=True)
                             for d, part in rows[(day >= start_day) & (day < end_day)].groupby(day)}
        self.begin()

    def _known_from(self, world, rows: pd.DataFrame, first: int, last: int) -> pd.Series:
        """The clock (a midnight) from which each eventual positive is known: the labels SQL run as of
        each day (``usecase_store.labels_as_of``), the first day it returns the positive. Clocks are
        midnights, so this is exact for every clock the replay asks about."""
        key, label = self.uc.entity.key, self.label
        pending = set(rows.loc[rows[label] == 1, key].astype(str))
        known = {}
        for d in range(first, last + 1):
            if not pending:
                break
            at = self.origin + pd.Timedelta(days=d)
            now = usecase_store.labels_as_of(world, self.uc, at)
            for k in set(now.loc[now[label] == 1, key].astype(str)) & pending:
                known[k] = at
            pending -= set(known)
        # a positive the labels SQL already returns on day ``first`` is known at every clock replayed
        return pd.Series(known, dtype="datetime64[ns]")

    def promotion_kwargs(self) -> dict:
        return {"spec": self.monitor_spec, "metric": self.metric_spec,
                "score": lambda booster, rows: usecase_model.predict(self.uc, booster, rows)}

    def metric(self, y, scores) -> float:
        if self.metric_name == "pr_auc":
            return float(average_precision_score(y, scores))
        return super().metric(y, scores)

    # --- training, as the use case's retrain job does it ----------------------------------------
    def train(self, day: int, episode: loop.Episode | None) -> Model | None:
        uc = self.uc
        built = load_tables(uc, dataclasses.replace(self.spec, today=day))
        usecase_store.build_feature_table(built, uc)
        training = usecase_store.build_training_set(built, uc)
        if episode is None or uc.label.early_after_days is None:
            split = usecase_model.time_split(uc, training)
            booster = usecase_model.train(uc, split.train)
            scores = usecase_model.predict(uc, booster, split.holdout)
        else:
            early = usecase_store.build_provisional_set(built, uc)
            retrained = usecase_model.fit_for_episode(uc, training, early, episode.onset_estimate,
                                                      who=self.spec.name)
            split, booster, scores = retrained.split, retrained.booster, retrained.holdout_scores
            self.emit(day, "training", f"{retrained.candidate.name}; {retrained.early_rows} early label rows "
                                       f"({int(early[self.label].sum())} positive); {retrained.comparison}")
        # labelled as monitoring will label what the version scores (as usecase_reference_frame)
        reference = censor_reference(built, uc, split.holdout.assign(**{SCORE: scores})
                                     .rename(columns={"prediction_time": TIMESTAMP}))
        built.close()
        if episode is not None and not self._gates_pass(day, split.holdout, scores, booster):
            return None
        self.versions += 1
        return Model(str(self.versions), booster, reference, TenantMonitor(self.policy, reference, self.monitor_spec),
                     day)

    def _gates_pass(self, day: int, holdout: pd.DataFrame, scores: np.ndarray, booster) -> bool:
        """The use case's gates on the retrain's holdout (``usecase_model.evaluate_gates``, the blocking
        checks of its ``model`` asset), the champion scored on the same rows; latency and size depend on
        the machine, not on the drift, and are not judged here."""
        outcomes = usecase_model.evaluate_gates(
            self.uc, holdout, scores, booster, usecase_model.model_bytes(booster),
            champion_scores=usecase_model.predict(self.uc, self.champion.booster, holdout))
        failed = [o.reason for o in outcomes if not o.passed and o.gate not in UNJUDGED_GATES]
        if failed:
            self.emit(day, "gates failed", "; ".join(failed))
        return not failed

    # --- the log and what monitoring reads --------------------------------------------------------
    def analysis(self, version: str, day: int, window_days: int, early_after_days: int | None = None) -> pd.DataFrame:
        """``usecase_analysis_frame``'s rows: the version's logged champion predictions of the window,
        labelled once mature (``prediction_time + horizon``), early labels too with
        ``early_after_days`` (a chargeback reported before the clock), as of ``day``."""
        rows = self.logged(CHAMPION, version)
        if rows.empty:
            return rows
        now = self.origin + pd.Timedelta(days=day)
        rows = rows[(rows[TIMESTAMP] < now) & (rows[TIMESTAMP] >= now - pd.Timedelta(days=window_days))].copy()
        reported = rows["prediction_id"].map(self.known_from)
        mature = rows["prediction_time"] + self.horizon <= now
        label = pd.Series(np.nan, index=rows.index)
        label[mature] = (reported[mature].notna() & (reported[mature] <= now)).astype(float)
        if early_after_days is not None:
            early = ~mature & (rows[TIMESTAMP] + pd.Timedelta(days=early_after_days) <= now)
            label[early] = (reported[early].notna() & (reported[early] <= now)).astype(float)
        rows[self.label] = label
        return rows.drop(columns=["role", "model_version"]).reset_index(drop=True)

    def monitoring_analysis(self, version: str, day: int, window_days: int) -> pd.DataFrame:
        """With ``monitoring.realized_after_days`` (E), as ``usecase_analysis_frame`` gives monitoring:
        every row's label as known E days after the midnight that starts its day, once that clock has
        come (a positive is known from ``known_from``, the first midnight the labels SQL returns it)."""
        rows = self.analysis(version, day, window_days)
        after = self.monitor_spec.realized_after_days
        if not after or rows.empty:
            return rows
        clock = rows["prediction_time"].dt.floor("D") + pd.Timedelta(days=after)
        reported = rows["prediction_id"].map(self.known_from)
        known = clock <= self.origin + pd.Timedelta(days=day)
        rows[self.label] = np.where(known, (reported.notna() & (reported <= clock)).astype(float), np.nan)
        return rows

    def traffic(self, d: int, now: pd.Timestamp) -> None:
        rows = self.traffic_rows.get(d)
        self.served[d] = self.champion.version
        if rows is None or rows.empty:
            return
        rows = rows.assign(snapshot_version=d)
        for role, model in ((CHAMPION, self.champion), (CHALLENGER, self.challenger)):
            if model is not None:
                self.log.append(rows.assign(**{SCORE: usecase_model.predict(self.uc, model.booster, rows)}, role=role,
                                            model_version=model.version))

    # --- the ground truth (``ReplayOutcomes``) ------------------------------------------------------
    def eventual_labels(self, rows: pd.DataFrame) -> pd.Series:
        """Each logged request's label once its window closed (every chargeback of the horizon)."""
        return rows["prediction_id"].map(self.truth).astype(int)

    def labels_closed_before(self) -> pd.Timestamp:
        return self.origin + pd.Timedelta(days=self.spec.days) - self.horizon
