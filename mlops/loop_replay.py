"""The closed loop for churn on a simulated clock, through the platform's own functions.

Each simulated day runs what the daily cycle and the decay sensor run in production, in the same
order: the shadow comparison and promotion (``decide_promotion``, ``inherit_floor``,
``on_promotion``), monitoring of the champion's logged predictions (``monitoring_step``: incremental
NannyML, the floor, the decay rule), the loop's decision (``after_monitoring``: episodes, retrain or
hold or escalate, restoration), a retrain when the loop decided one (``fit_churn_for_episode`` on the training
set the feature store builds as of that day), then the day's traffic: every active account scored
by the champion and, in shadow, the challenger, from features as of that day. Only Dagster, MLflow,
the service and the wall clock are left out, so a replay takes a minute instead of the demo's
several, and ``benchmarks/loop.py`` can run many seeds. The full daily cycle (``make demo``) must
agree with it on the same seed.

What the replay adds is the ground truth the platform never has: every prediction's eventual label
(the whole simulated horizon), to measure realized performance day by day and the time to restore.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import duckdb
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from assets.training import fit_churn_for_episode
from mlops.core import loop, modeling
from mlops.core.monitoring import SCORE, TIMESTAMP, TenantMonitor, describe_alert, monitoring_step
from mlops.core.names import CHALLENGER, CHAMPION, CHURN
from mlops.replay import load_world
from resources.feature_store import (
    LABEL_HORIZON_DAYS,
    MIN_OBSERVED_DAYS,
    build_feature_table,
    build_provisional_set,
    build_training_set,
    compute_features,
)
from resources.gates import GatePolicy
from resources.monitoring import MonitoringPolicy
from resources.tenants import TenantSpec
from usecases.churn.simulator import SIMULATION_START

START = pd.Timestamp(SIMULATION_START)


def live_accounts(snapshot: pd.DataFrame, churn: pd.DataFrame, day: int) -> list[str]:
    """The accounts of a feature snapshot that are still customers on ``day`` (none of their churn
    events is before it), sorted: the population the product scores, and the one training labels
    describe (accounts live at the prediction time)."""
    now = START + pd.Timedelta(days=day)
    gone = set(churn.loc[pd.to_datetime(churn["churned_at"]) < now, "account_id"])
    return sorted(a for a in snapshot["account_id"] if a not in gone)


@dataclasses.dataclass
class Model:
    version: str
    booster: object
    reference: pd.DataFrame  # holdout: features, score, label, timestamp
    monitor: TenantMonitor
    trained_on: int  # the simulated day


@dataclasses.dataclass
class Event:
    day: int
    kind: str
    detail: str


class ReplayOutcomes:
    """What a simulated-clock replay measures with the ground truth the platform never has (every
    prediction's eventual label): realized performance of what was served, day by day, the summary of
    an episode, and promotions of a worse model. Shared by churn's replay and a declared use case's
    (``mlops.usecase_replay``); a replay provides ``log`` (frames of logged predictions with ``role``,
    ``model_version``, ``prediction_id``, ``score`` and ``timestamp``), ``events``, ``served`` (day ->
    champion version), ``spec``, ``origin`` (day 0), ``logged(role, version)``, ``eventual_labels(rows)``
    and ``labels_closed_before()`` (predictions before it have closed label windows)."""

    metric_name = "roc_auc"  # the column of realized_by_day
    realized_window_days = 7

    def metric(self, y, scores) -> float:
        return float(roc_auc_score(y, scores))

    def eventual_labels(self, rows: pd.DataFrame) -> pd.Series:
        raise NotImplementedError

    def labels_closed_before(self) -> pd.Timestamp:
        raise NotImplementedError

    # --- one day, as the daily cycle and the decay sensor run it (shared by every replay) ----------
    # A replay provides ``loop_name`` (the use case whose loop tables it keeps), ``horizon`` (the label
    # window), ``early_after_days`` (early labels in an episode's shadow evidence), ``con``, ``policy``,
    # ``rules``, ``champion``/``challenger`` (``Model``), ``stored``, ``raised``, ``analysis(...)``,
    # ``train(day, episode)`` and ``traffic(day, now)``; ``promotion_kwargs()`` adds
    # ``decide_promotion``'s keywords (spec, metric, score) where they are not churn's.
    early_after_days: int | None = None

    def promotion_kwargs(self) -> dict:
        return {}

    def monitoring_analysis(self, version: str, day: int, window_days: int) -> pd.DataFrame:
        """What the daily monitoring run reads (``analysis`` unless a replay labels it otherwise)."""
        return self.analysis(version, day, window_days)

    def begin(self) -> None:
        """The replay's state on ``start_day``: the loop's own tables (episodes, floors, in an in-memory
        DuckDB as in the warehouse), an empty log and the first champion."""
        self.con = duckdb.connect()
        self.events: list[Event] = []
        self.log: list[pd.DataFrame] = []
        self.versions = 0
        self.stored: dict[str, pd.DataFrame] = {}
        self.raised: dict[str, set] = {}
        self.served: dict[int, str] = {}
        self.champion = self.train(self.start_day, episode=None)
        self.challenger: Model | None = None
        self.emit(self.start_day, "built", f"champion v{self.champion.version}")

    def emit(self, day: int, kind: str, detail: str) -> None:
        self.events.append(Event(day, kind, detail))

    def logged(self, role: str, version: str) -> pd.DataFrame:
        rows = [f for f in self.log if f["role"].iat[0] == role and f["model_version"].iat[0] == version]
        return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()

    def run(self):
        for d in range(self.start_day, self.end_day):
            self.day(d)
        return self

    def day(self, d: int) -> None:
        now = self.origin + pd.Timedelta(days=d)
        name = self.loop_name
        self.shadow(d, now)  # the shadow comparison and promotion come first in the daily cycle
        champion = self.champion
        v = champion.version
        analysis = self.monitoring_analysis(v, d, self.policy.analysis_window_days)
        action = "none"
        if not analysis.empty:
            floor = loop.decay_floor(self.con, name, v, champion.monitor.own_bound)
            _, everything, decay = monitoring_step(champion.monitor, analysis, self.stored.get(v, pd.DataFrame()),
                                                   self.raised.setdefault(v, set()), floor[0], self.policy)
            self.stored[v] = everything
            self.raised[v] |= {(a["metric"], a["chunk"]) for a in decay}
            outcome = loop.after_monitoring(
                self.con, name, everything, decay, now=now, champion_version=v, floor=floor,
                challenger_in_shadow=self.challenger is not None, labels_through=now - self.horizon,
                rules=self.rules, realized_metric=champion.monitor.realized_metric,
                higher_is_better=champion.monitor.higher_is_better, evidence_days=self.early_after_days or 0)
            for alert in decay:
                self.emit(d, "decay alert", describe_alert(alert, v))
            if outcome["restored"] is not None:
                self.emit(d, "restored", f"episode {outcome['restored']}")
            action = outcome["action"]
            if action in ("retrain", "escalate"):
                self.emit(d, f"loop: {action}", outcome["reason"])
        if action == "retrain":
            model = self.train(d, loop.active_episode(self.con, name))
            if model is not None:
                self.challenger = model
                self.emit(d, "challenger", f"v{model.version} in shadow")
        self.traffic(d, now)

    def shadow(self, d: int, now: pd.Timestamp) -> None:
        if self.challenger is None:
            return
        name = self.loop_name
        champ, chall = self.champion, self.challenger
        a, b = self.logged(CHAMPION, champ.version), self.logged(CHALLENGER, chall.version)
        if a.empty or b.empty:
            return
        pairs = a[["prediction_id", "account_id", SCORE, "snapshot_version"]].merge(
            b[["prediction_id", SCORE]], on="prediction_id", suffixes=("_champion", "_challenger")).rename(
            columns={"score_champion": "champion_score", "score_challenger": "challenger_score"}).assign(
            champion_latency_ms=1.0, challenger_latency_ms=1.0)
        if len(pairs) < self.policy.shadow_min_predictions:
            return
        episode = loop.active_episode(self.con, name)
        logged = self.analysis(champ.version, d, self.policy.analysis_window_days + self.horizon.days,
                               early_after_days=self.early_after_days if episode is not None else None)
        _, decision, reason = loop.decide_promotion(
            pairs, logged, {champ.version: champ.reference, chall.version: chall.reference},
            {champ.version: champ.booster, chall.version: chall.booster}, self.policy,
            require_improvement=episode is not None, origin=now, **self.promotion_kwargs())
        if decision == "promote":
            old_floor = loop.decay_floor(self.con, name, champ.version, champ.monitor.own_bound)[0]
            loop.inherit_floor(self.con, name, chall.version, champ.version, chall.monitor.realized_metric,
                               chall.monitor.own_bound, old_floor)
            loop.on_promotion(self.con, name, now=now, new_version=chall.version)
            self.champion, self.challenger = chall, None
            self.emit(d, "promoted", f"v{champ.version} -> v{chall.version}: {reason}")
        elif decision == "retire":
            self.challenger = None
            self.emit(d, "retired", f"v{chall.version}: {reason}")

    def realized_by_day(self, window: int | None = None) -> pd.DataFrame:
        """Realized performance (``metric_name``) of what was served, from every prediction's eventual
        label, pooled over the trailing ``window`` days: the row of ``day`` covers the predictions of
        days ``first_day`` .. ``day`` (= ``day - window + 1`` .. ``day``), so a day's figure is known on
        that day and never credits a model with predictions served after it. Windows with a day
        missing or whose labels the horizon has not closed are left out."""
        window = window or self.realized_window_days
        served = pd.concat([f for f in self.log if f["role"].iat[0] == CHAMPION], ignore_index=True)
        served["y"] = self.eventual_labels(served).to_numpy()
        served = served[served[TIMESTAMP] < self.labels_closed_before()]
        served["day"] = (served[TIMESTAMP] - self.origin).dt.days
        out = []
        for last in sorted(served["day"].unique()):
            first = last - window + 1
            rows = served[(served["day"] >= first) & (served["day"] <= last)]
            if rows["day"].nunique() == window and rows["y"].nunique() == 2:
                out.append({"day": int(last), "first_day": int(first),
                            self.metric_name: self.metric(rows["y"], rows["score"]),
                            "version": self.served[int(last)]})
        return pd.DataFrame(out)

    def summary(self, oracle: float | None = None, tolerance: float = 0.03) -> dict:
        """Detection day, retrains, promotions (and of worse models), realized performance before and
        after, and days from the drift to realized performance within ``tolerance`` of ``oracle``."""
        drift = self.spec.drift_day if self.spec.scenario != "none" else None
        kinds = [e.kind for e in self.events]
        realized = self.realized_by_day()
        alert = next((e.day for e in self.events if e.kind == "decay alert"), None)
        out = {"seed": self.spec.seed, "scenario": self.spec.scenario, "drift_day": drift, "alert_day": alert,
               "retrains": kinds.count("challenger") + kinds.count("gates failed"),
               "promotions": kinds.count("promoted"), "escalations": kinds.count("loop: escalate"),
               "promotion_days": [e.day for e in self.events if e.kind == "promoted"]}
        if drift is not None and len(realized):
            value = realized[self.metric_name]
            # "before": windows that end before the drift; "after": windows that start on or after it
            after_drift = realized[realized["first_day"] >= drift]
            out["before"] = float(value[realized["day"] < drift].tail(7).mean())
            out["after_drift"] = float(after_drift[self.metric_name].head(7).mean()) if len(after_drift) else None
            out["final"] = float(value.tail(7).mean())
            if oracle is not None:
                ok = after_drift[after_drift[self.metric_name] >= oracle - tolerance]
                out["restored_day"] = int(ok["day"].iloc[0]) if len(ok) else None
                out["days_to_restore"] = None if out["restored_day"] is None else out["restored_day"] - drift
        out["worse_promotions"] = self._worse_promotions(realized)
        return out

    def _worse_promotions(self, realized: pd.DataFrame) -> int:
        """Promotions after which the served realized performance was lower than what the replaced
        model scored on the same days (both models scored the shadowed days; ground-truth labels)."""
        worse = 0
        for e in self.events:
            if e.kind != "promoted":
                continue
            old, new = e.detail.split(":")[0].replace("v", "").split(" -> ")
            a, b = self.logged(CHAMPION, old), self.logged(CHALLENGER, new)
            pairs = a.merge(b[["prediction_id", "score"]], on="prediction_id", suffixes=("", "_new"))
            y = self.eventual_labels(pairs)
            if y.nunique() == 2 and self.metric(y, pairs["score_new"]) < self.metric(y, pairs["score"]):
                worse += 1
        return worse


class LoopReplay(ReplayOutcomes):
    """One tenant's closed loop, day by day, from ``start_day`` (the first champion) to ``end_day``."""

    origin = START
    loop_name = CHURN
    horizon = pd.Timedelta(days=LABEL_HORIZON_DAYS)
    early_after_days = MIN_OBSERVED_DAYS

    def __init__(self, spec: TenantSpec, start_day: int, end_day: int, policy: MonitoringPolicy | None = None,
                 gates: GatePolicy | None = None):
        self.spec, self.start_day, self.end_day = spec, start_day, end_day
        self.policy, self.gates = policy or MonitoringPolicy(), gates or GatePolicy()
        self.rules = loop.LoopRules.of(self.policy)
        horizon_end = min(spec.days, end_day + LABEL_HORIZON_DAYS)
        self.world = load_world(dataclasses.replace(spec, today=horizon_end))
        self.churned_at = self.world.execute(
            "SELECT account_id, min(churned_at) AS churned_at FROM raw_churn_events GROUP BY 1").df().set_index(
            "account_id")["churned_at"]
        self.begin()

    # --- training, as the retraining job does it -------------------------------------------------
    def train(self, day: int, episode: loop.Episode | None) -> Model | None:
        built = load_world(dataclasses.replace(self.spec, today=day))
        build_feature_table(built)
        training = build_training_set(built)
        if episode is None:
            split = modeling.time_split(training, embargo_days=LABEL_HORIZON_DAYS)
            booster = modeling.train_booster(split.train)
            scores = modeling.score(booster, split.holdout)
        else:
            early = build_provisional_set(built)
            retrained = fit_churn_for_episode(training, early, episode.onset_estimate, who=self.spec.name,
                                              max_ece=self.gates.max_expected_calibration_error)
            split, booster, scores = retrained.split, retrained.booster, retrained.holdout_scores
            self.emit(day, "training", f"{retrained.candidate.name}; {retrained.comparison}")
        built.close()
        reference = split.holdout.assign(score=scores).rename(columns={"prediction_time": TIMESTAMP})
        if episode is not None and not self._gates_pass(day, reference):
            return None
        self.versions += 1
        return Model(str(self.versions), booster, reference, TenantMonitor(self.policy, reference), day)

    def _gates_pass(self, day: int, reference: pd.DataFrame) -> bool:
        """The holdout gates the retrain's challenger must pass, decided by the functions churn's
        blocking asset checks call (``roc_auc_outcome``, ``calibration_outcome``,
        ``fairness_outcome``) with the platform's ``GatePolicy``. (Latency and size depend on the
        machine and the model file, not on the drift: the replay does not measure them.)"""
        y, score, gates = reference["churned"].to_numpy(), reference["score"].to_numpy(), self.gates
        outcomes = [
            modeling.roc_auc_outcome(y, score, floor=gates.min_roc_auc, tolerance=gates.champion_auc_tolerance,
                                     champion_score=modeling.score(self.champion.booster, reference),
                                     champion_version=self.champion.version),
            modeling.calibration_outcome(y, score, max_ece=gates.max_expected_calibration_error),
            modeling.fairness_outcome(y, score, reference[modeling.FAIRNESS_ATTRIBUTE], max_gap=gates.max_fairness_gap,
                                      min_group_size=gates.fairness_min_group_size,
                                      min_class_rows=gates.fairness_min_class_rows)[0],
        ]
        failed = [outcome.reason for outcome in outcomes if not outcome.passed]
        if failed:
            self.emit(day, "gates failed", "; ".join(failed))
        return not failed

    # --- the log and what monitoring reads --------------------------------------------------------
    def analysis(self, version: str, day: int, window_days: int, early_after_days: int | None = None) -> pd.DataFrame:
        """``analysis_frame``'s rows: the version's logged champion predictions of the window, labelled
        once mature (early labels too with ``early_after_days``), as of ``day``."""
        rows = self.logged(CHAMPION, version)
        if rows.empty:
            return rows
        now = START + pd.Timedelta(days=day)
        rows = rows[(rows[TIMESTAMP] < now) & (rows[TIMESTAMP] >= now - pd.Timedelta(days=window_days))].copy()
        churned_at = rows["account_id"].map(self.churned_at)
        churned_at = churned_at.where(churned_at >= rows[TIMESTAMP])
        horizon = pd.Timedelta(days=LABEL_HORIZON_DAYS)
        mature = rows[TIMESTAMP] + horizon <= now
        label = pd.Series(np.nan, index=rows.index)
        label[mature] = (churned_at[mature].notna() & (churned_at[mature] < rows[TIMESTAMP][mature] + horizon)).astype(float)
        if early_after_days is not None:
            early = ~mature & (rows[TIMESTAMP] + pd.Timedelta(days=early_after_days) <= now)
            label[early] = (churned_at[early].notna() & (churned_at[early] < now)).astype(float)
        rows["churned"] = label
        return rows.drop(columns=["role", "model_version"]).reset_index(drop=True)

    def traffic(self, d: int, now: pd.Timestamp) -> None:
        features = compute_features(self.world, (SIMULATION_START + dt.timedelta(days=d)), -1, -1)
        churn = self.churned_at.rename("churned_at").reset_index()
        live = set(live_accounts(features, churn, d))
        features = features[features["account_id"].isin(live)].sort_values("account_id", ignore_index=True)
        features = features.assign(**{TIMESTAMP: now, "snapshot_version": d,
                                      "prediction_id": [f"{d}-{a}" for a in features["account_id"]]})
        self.served[d] = self.champion.version
        for role, model in ((CHAMPION, self.champion), (CHALLENGER, self.challenger)):
            if model is not None:
                self.log.append(features.assign(score=modeling.score(model.booster, features), role=role,
                                                model_version=model.version))

    # --- the ground truth (``ReplayOutcomes``): churn's eventual labels ------------------------------
    def eventual_labels(self, rows: pd.DataFrame) -> pd.Series:
        """Whether each logged prediction's account churned within the horizon (the whole simulated
        horizon's churn events)."""
        churned_at = rows["account_id"].map(self.churned_at)
        return (churned_at.notna() & (churned_at >= rows[TIMESTAMP])
                & (churned_at < rows[TIMESTAMP] + pd.Timedelta(days=LABEL_HORIZON_DAYS))).astype(int)

    def labels_closed_before(self) -> pd.Timestamp:
        return START + pd.Timedelta(days=min(self.spec.days, self.end_day + LABEL_HORIZON_DAYS) - LABEL_HORIZON_DAYS)
