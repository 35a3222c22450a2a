"""The closed loop's memory and rules: decay episodes, a floor that does not fall, when to retrain,
when to stop and call a person, and the time-to-restore figures.

An **episode** opens with the first decay alert of a tenant's use case and stays open until the
serving champion's realized performance is back at or above the episode's floor in
``restore_chunks`` consecutive chunks (``restored``), or a person closes it. Within an episode:

- **the floor is fixed**: the floor of the champion that was serving when the episode opened (its
  reference performance minus the allowed drop, or the policy's SLO where that is higher). A version
  promoted during the episode inherits it (``inherit_floor``): a bad promotion cannot lower the bar,
  and a permanently degraded feature keeps alerting;
- **the first retrain** waits ``first_retrain_after_days`` after the alert: the labels that saw the
  change (early ones included: a churn that already happened is known) are what it learns from. It
  is due on that day whether or not a new alert comes that day: the episode's alert stands until
  the floor is restored (a rare positive class's daily chunks are noisy, and one chunk back over
  the floor by chance must not cancel a retrain that the evidence already called for);
- **another retrain** follows once ``retrain_min_new_label_days`` more days of labels have come in,
  if the episode is still alerting; its challenger supersedes one still waiting in shadow for
  evidence (a retrain that cannot beat the champion yet is tried again on more evidence, never
  promoted), but not before that one has shadowed for ``evidence_days`` (the age its labelled
  evidence needs: the use case's early labels, 14 days for fraud): a challenger replaced before
  any of its predictions could be labelled was never judged;
- **after ``max_retrains`` retrains** that did not restore the floor (and once the last challenger
  left the shadow), the next alert *escalates* once: the episode stops retraining and an alert for a
  person carries the evidence.

Times are the platform's data clock (the day after the newest event, ``feature_origin``): in
production that is today; in a replay it is the simulated day, so the same rules give the same days.
Everything here is plain Python on a DuckDB connection (the caller's transaction); Dagster assets
and the simulated-clock replay (``mlops.loop_replay``) call the same functions.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping

import pandas as pd

EPISODES_TABLE = "loop_episodes"
EPISODES_DDL = f"""
CREATE TABLE IF NOT EXISTS {EPISODES_TABLE} (
    use_case VARCHAR NOT NULL, episode INTEGER NOT NULL, status VARCHAR NOT NULL,
    metric VARCHAR NOT NULL, floor DOUBLE NOT NULL, floor_source VARCHAR NOT NULL,
    opened_at TIMESTAMP NOT NULL, opened_version VARCHAR NOT NULL, onset_estimate TIMESTAMP,
    alert_chunk VARCHAR, retrains INTEGER NOT NULL, promotions INTEGER NOT NULL,
    last_retrain_at TIMESTAMP, last_retrain_labels_through TIMESTAMP, first_promotion_at TIMESTAMP,
    promoted_versions VARCHAR NOT NULL, escalated_at TIMESTAMP, closed_at TIMESTAMP,
    evidence VARCHAR NOT NULL, PRIMARY KEY (use_case, episode)
)
"""
FLOORS_TABLE = "loop_floors"
FLOORS_DDL = f"""
CREATE TABLE IF NOT EXISTS {FLOORS_TABLE} (
    use_case VARCHAR NOT NULL, model_version VARCHAR NOT NULL, metric VARCHAR NOT NULL,
    floor DOUBLE NOT NULL, source VARCHAR NOT NULL, PRIMARY KEY (use_case, model_version)
)
"""
OPEN, ESCALATED, RESTORED, CLOSED = "open", "escalated", "restored", "closed"
ACTIVE = (OPEN, ESCALATED)


@dataclasses.dataclass(frozen=True)
class LoopRules:
    """The loop's numbers (``MonitoringPolicy`` carries them; ``LoopRules.of(policy)``)."""

    max_retrains: int = 2
    first_retrain_after_days: int = 7
    retrain_min_new_label_days: int = 7
    restore_chunks: int = 3
    performance_slo: float | None = None  # an absolute floor on the decay metric (higher is better)

    @classmethod
    def of(cls, policy) -> LoopRules:
        names = [f.name for f in dataclasses.fields(cls)]
        values = {n: getattr(policy, f"loop_{n}") for n in names if getattr(policy, f"loop_{n}", None) is not None}
        return cls(**values)


@dataclasses.dataclass
class Episode:
    use_case: str
    episode: int
    status: str
    metric: str
    floor: float
    floor_source: str
    opened_at: pd.Timestamp
    opened_version: str
    onset_estimate: pd.Timestamp | None = None
    alert_chunk: str | None = None
    retrains: int = 0
    promotions: int = 0
    last_retrain_at: pd.Timestamp | None = None
    last_retrain_labels_through: pd.Timestamp | None = None
    first_promotion_at: pd.Timestamp | None = None
    promoted_versions: str = ""
    escalated_at: pd.Timestamp | None = None
    closed_at: pd.Timestamp | None = None
    evidence: str = "{}"

    def record(self, key: str, value) -> None:
        """Add ``value`` to the episode's evidence under ``key``."""
        evidence = json.loads(self.evidence)
        evidence[key] = value
        self.evidence = json.dumps(evidence, default=str)

    def end(self, con, status: str, now, key: str, value) -> Episode:
        """End the episode (``restored`` or ``closed``) with the evidence of why, and save it."""
        self.status, self.closed_at = status, pd.Timestamp(now)
        self.record(key, value)
        self.save(con)
        return self

    def save(self, con) -> None:
        con.execute(EPISODES_DDL)
        row = {k: (None if _missing(v) else v) for k, v in dataclasses.asdict(self).items()}
        columns = ", ".join(row)
        con.execute(f"INSERT OR REPLACE INTO {EPISODES_TABLE} ({columns}) VALUES "  # noqa: S608 - constant names
                    f"({', '.join('?' for _ in row)})", list(row.values()))


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the loop does about a decay alert: ``retrain``, ``hold`` (wait for the shadow or for new
    labels), ``escalate`` (stop and call a person) or ``none`` (already escalated)."""

    action: str
    reason: str
    episode: Episode


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value is pd.NaT


def _stamp(value) -> pd.Timestamp | None:
    return None if _missing(value) else pd.Timestamp(value)


# --- the floor ----------------------------------------------------------------------------------
def own_floor(reference_value: float, max_drop: float, rules: LoopRules) -> float:
    """A version's floor from its own reference (higher is better): reference minus the allowed drop,
    raised to the SLO where one is set."""
    floor = reference_value - max_drop
    return max(floor, rules.performance_slo) if rules.performance_slo is not None else floor


def floor_of(con, use_case: str, version: str) -> tuple[float, str] | None:
    """The floor recorded for a version (one promoted after a decay inherits its predecessor's), or None."""
    con.execute(FLOORS_DDL)
    row = con.execute(f"SELECT floor, source FROM {FLOORS_TABLE} WHERE use_case = ? AND model_version = ?",  # noqa: S608
                      [use_case, str(version)]).fetchone()
    return (float(row[0]), str(row[1])) if row else None


def decay_floor(con, use_case: str, version: str, own: float) -> tuple[float, str]:
    """The floor monitoring judges a version against: the recorded (inherited) one, never below its own."""
    recorded = floor_of(con, use_case, version)
    if recorded is None or recorded[0] <= own:
        return own, f"v{version} reference"
    return recorded


def inherit_floor(con, use_case: str, new_version: str, old_version: str, metric: str, new_own: float,
                  old_floor: float) -> tuple[float, str]:
    """At promotion: the new champion's floor is the higher of its own and the one it replaces."""
    con.execute(FLOORS_DDL)
    floor, source = (new_own, f"v{new_version} reference") if new_own >= old_floor else (
        old_floor, f"inherited from v{old_version}")
    con.execute(f"INSERT OR REPLACE INTO {FLOORS_TABLE} VALUES (?, ?, ?, ?, ?)",  # noqa: S608 - constant name
                [use_case, str(new_version), metric, float(floor), source])
    return floor, source


# --- episodes -----------------------------------------------------------------------------------
def episodes(con, use_case: str | None = None) -> pd.DataFrame:
    con.execute(EPISODES_DDL)
    where, params = ("WHERE use_case = ?", [use_case]) if use_case else ("", [])
    return con.execute(f"SELECT * FROM {EPISODES_TABLE} {where} ORDER BY use_case, episode", params).df()  # noqa: S608


def active_episode(con, use_case: str) -> Episode | None:
    con.execute(EPISODES_DDL)
    frame = con.execute(f"SELECT * FROM {EPISODES_TABLE} WHERE use_case = ? AND status IN ('open', 'escalated') "  # noqa: S608
                        "ORDER BY episode DESC LIMIT 1", [use_case]).df()
    if frame.empty:
        return None
    row = frame.iloc[0].to_dict()
    for key in ("opened_at", "onset_estimate", "last_retrain_at", "last_retrain_labels_through",
                "first_promotion_at", "escalated_at", "closed_at"):
        row[key] = _stamp(row[key])
    for key in ("episode", "retrains", "promotions"):
        row[key] = int(row[key])
    return Episode(**row)


def on_decay_alert(con, use_case: str, alert: Mapping, *, now, champion_version: str, floor: tuple[float, str],
                   challenger_in_shadow: bool, labels_through, rules: LoopRules,
                   onset_estimate=None, evidence_days: int = 0) -> Decision:
    """The loop's answer to a decay alert (``alert``: metric, chunk, value, threshold), saved: opens an
    episode if none is active, then decides whether to retrain, hold or escalate (module docstring)."""
    now, labels_through = pd.Timestamp(now), pd.Timestamp(labels_through)
    episode = active_episode(con, use_case)
    if episode is None:
        number = int(con.execute(f"SELECT coalesce(max(episode), 0) FROM {EPISODES_TABLE} WHERE use_case = ?",  # noqa: S608
                                 [use_case]).fetchone()[0]) + 1
        episode = Episode(use_case=use_case, episode=number, status=OPEN, metric=str(alert["metric"]),
                          floor=float(floor[0]), floor_source=floor[1], opened_at=now,
                          opened_version=str(champion_version), onset_estimate=_stamp(onset_estimate),
                          alert_chunk=str(alert.get("chunk")), evidence=json.dumps({"first_alert": dict(alert)},
                                                                                   default=str))
    since_open = (now - episode.opened_at).days
    since_retrain = None if episode.last_retrain_at is None else (now - episode.last_retrain_at).days
    if episode.status == ESCALATED:
        decision = Decision("none", f"episode {episode.episode} was escalated to a person on "
                                    f"{episode.escalated_at.date()}; no more retrains until it is closed", episode)
    elif episode.retrains == 0 and since_open < rules.first_retrain_after_days:
        decision = Decision("hold", f"collecting labels after the change: {since_open} of "
                                    f"{rules.first_retrain_after_days} day(s) before the first retrain", episode)
    elif episode.retrains >= rules.max_retrains and challenger_in_shadow:
        decision = Decision("hold", "the last allowed challenger is in shadow: the promotion gate decides", episode)
    elif episode.retrains >= rules.max_retrains:
        episode.status, episode.escalated_at = ESCALATED, now
        episode.record("escalation", {"alert": dict(alert), "retrains": episode.retrains,
                                      "promotions": episode.promotions, "floor": episode.floor})
        decision = Decision("escalate", f"{episode.retrains} retrain(s) in episode {episode.episode} did not bring "
                                        f"{alert['metric']} back above the floor {episode.floor:.4f} (now "
                                        f"{float(alert['value']):.4f}): a person must look", episode)
    elif challenger_in_shadow and since_retrain is not None and since_retrain < evidence_days:
        decision = Decision("hold", f"the challenger in shadow has had {since_retrain} of the {evidence_days} day(s) "
                                    f"its labelled evidence needs", episode)
    elif since_retrain is not None and since_retrain < rules.retrain_min_new_label_days:
        waiting = "a challenger is in shadow; " if challenger_in_shadow else ""
        decision = Decision("hold", f"{waiting}{since_retrain} day(s) of new labels since the last retrain; "
                                    f"{rules.retrain_min_new_label_days} are needed for another", episode)
    else:
        # A challenger still in shadow without the evidence to be promoted is superseded by one
        # trained on the labels that matured since.
        episode.retrains += 1
        episode.last_retrain_at, episode.last_retrain_labels_through = now, labels_through
        supersedes = "; supersedes the challenger in shadow" if challenger_in_shadow else ""
        decision = Decision("retrain", f"retrain {episode.retrains} of at most {rules.max_retrains} in episode "
                                       f"{episode.episode} (floor {episode.floor:.4f}){supersedes}", episode)
    episode.save(con)
    return decision


def on_promotion(con, use_case: str, *, now, new_version: str) -> Episode | None:
    """Count a promotion in the active episode (the new champion inherits its floor: ``inherit_floor``)."""
    episode = active_episode(con, use_case)
    if episode is None:
        return None
    episode.promotions += 1
    episode.first_promotion_at = episode.first_promotion_at or pd.Timestamp(now)
    episode.promoted_versions = ",".join(v for v in (episode.promoted_versions, str(new_version)) if v)
    episode.save(con)
    return episode


def check_restored(con, use_case: str, results: pd.DataFrame, realized_metric: str, *, now,
                   rules: LoopRules, higher_is_better: bool = True) -> Episode | None:
    """Close the active episode as ``restored`` when the champion's ``restore_chunks`` newest realized
    chunks that started on or after the episode opened are all at or above its floor (``results``:
    the champion's monitoring results). Returns the episode if it was closed now."""
    episode = active_episode(con, use_case)
    if episode is None:
        return None
    rows = results[(results["metric"] == realized_metric) & results["value"].notna()
                   & (pd.to_datetime(results["chunk_start"]) >= episode.opened_at)].sort_values("chunk_start")
    newest = rows.tail(rules.restore_chunks)
    if len(newest) < rules.restore_chunks:
        return None
    ok = (newest["value"] >= episode.floor) if higher_is_better else (newest["value"] <= episode.floor)
    if not ok.all():
        return None
    return episode.end(con, RESTORED, now, "restored", {"chunks": newest["chunk_key"].astype(str).tolist(),
                                                        "values": [round(float(v), 4) for v in newest["value"]]})


def close_episode(con, use_case: str, *, now, note: str) -> Episode | None:
    """A person closes the active episode (after looking at an escalation, say)."""
    episode = active_episode(con, use_case)
    return None if episode is None else episode.end(con, CLOSED, now, "closed_by_person", note)


# --- time to restore ----------------------------------------------------------------------------
def episode_kpis(frame: pd.DataFrame) -> list[dict]:
    """Per episode: days from the estimated onset and from the alert to the first promotion and to
    restoration, retrains and promotions (``frame``: ``episodes(con)``)."""
    out = []
    for row in frame.to_dict("records"):
        opened, onset = pd.Timestamp(row["opened_at"]), _stamp(row.get("onset_estimate"))

        def days(later, since):
            later = _stamp(later)
            return None if later is None or since is None else (later - since).days

        out.append({
            "use_case": row["use_case"], "episode": int(row["episode"]), "status": row["status"],
            "opened_at": str(opened.date()), "onset_to_alert_days": days(opened, onset),
            "alert_to_promotion_days": days(row.get("first_promotion_at"), opened),
            "alert_to_restored_days": days(row.get("closed_at"), opened) if row["status"] == RESTORED else None,
            "retrains": int(row["retrains"]), "promotions": int(row["promotions"]),
            "escalated": not _missing(row.get("escalated_at")),
        })
    return out


def data_clock(origin) -> pd.Timestamp:
    """The loop's clock from a feature origin (a date): midnight of that day."""
    return pd.Timestamp(origin if not isinstance(origin, dt.datetime) else origin.date())


def after_monitoring(con, use_case: str, results: pd.DataFrame, new_alerts: list[dict], *, now,
                     champion_version: str, floor: tuple[float, str], challenger_in_shadow: bool,
                     labels_through, rules: LoopRules, realized_metric: str, higher_is_better: bool = True,
                     evidence_days: int = 0) -> dict:
    """What a monitoring run means for the loop (caller's transaction): first whether the active
    episode is restored, then the decision on this run's new decay alerts (the first of them; one
    decision per run). Returns ``{action, reason, episode, run_key}`` for the run's metadata;
    ``action`` is ``none`` when nothing alerted."""
    restored = check_restored(con, use_case, results, realized_metric, now=now, rules=rules,
                              higher_is_better=higher_is_better)
    out = {"action": "none", "reason": "no new decay alert", "episode": None, "run_key": None,
           "restored": restored.episode if restored is not None else None}
    alert = new_alerts[0] if new_alerts else _due_first_retrain(con, use_case, now, rules)
    if alert is not None:
        from mlops.core.monitoring import onset_estimate

        decision = on_decay_alert(con, use_case, alert, now=now, champion_version=champion_version, floor=floor,
                                  challenger_in_shadow=challenger_in_shadow, labels_through=labels_through,
                                  rules=rules, onset_estimate=alert.get("onset") or onset_estimate(results, alert["metric"]),
                                  evidence_days=evidence_days)
        episode = decision.episode
        standing = f"no new alert; episode {episode.episode}'s alert stands: " if alert.get("standing") else ""
        out |= {"action": decision.action, "reason": standing + decision.reason, "episode": episode.episode,
                "run_key": f"e{episode.episode}.r{episode.retrains}"}
    return out


def _due_first_retrain(con, use_case: str, now, rules: LoopRules) -> dict | None:
    """The standing alert of an open episode whose first retrain is due (``first_retrain_after_days``
    have passed since it opened) when no new alert came: the alert that opened it."""
    episode = active_episode(con, use_case)
    if (episode is None or episode.status != OPEN or episode.retrains
            or (pd.Timestamp(now) - episode.opened_at).days < rules.first_retrain_after_days):
        return None
    return {**json.loads(episode.evidence)["first_alert"], "standing": True}


def loop_metadata(loop: dict) -> dict[str, str]:
    """The loop's decision as a monitoring run's metadata (the decay sensor reads ``loop_action`` and
    ``loop_run_key``)."""
    return {"loop_action": loop["action"], "loop_reason": loop["reason"],
            "loop_episode": "" if loop["episode"] is None else str(loop["episode"]),
            "loop_run_key": loop["run_key"] or "",
            "loop_restored_episode": "" if loop["restored"] is None else str(loop["restored"])}


def audit_loop(warehouse, tenant: str, subject: str, decay: list[dict], loop: dict, log) -> None:
    """Audit a monitoring run's decay alerts and the loop's decision; an escalation is an error in
    the run's log and an audit entry a person acts on (``needs_attention``)."""
    for alert in decay:
        warehouse.audit(tenant, actor="monitoring", action="decay_alert", subject=subject, outcome="alert",
                        details=alert)
    if loop["action"] in ("retrain", "escalate"):
        warehouse.audit(tenant, actor="closed_loop", action=f"loop_{loop['action']}", subject=subject,
                        outcome="needs_attention" if loop["action"] == "escalate" else "launched",
                        details={"episode": loop["episode"], "reason": loop["reason"]})
    if loop["action"] == "escalate":
        log.error(f"{tenant}: {loop['reason']}")
    if loop["restored"] is not None:
        warehouse.audit(tenant, actor="closed_loop", action="loop_restored", subject=subject, outcome="restored",
                        details={"episode": loop["restored"]})


def first_shadowed(logged: pd.DataFrame, pairs: pd.DataFrame) -> pd.Timestamp | None:
    """The feature time (data clock) of the challenger's first shadowed prediction among the champion's
    logged rows, or None before there is one."""
    from mlops.core.monitoring import TIMESTAMP

    if logged.empty:
        return None
    shadowed = logged.loc[logged["prediction_id"].isin(pairs["prediction_id"]), TIMESTAMP]
    return None if shadowed.empty else pd.Timestamp(shadowed.min())


def shadow_deadline(decision: str, reason: str, logged: pd.DataFrame, pairs: pd.DataFrame, origin,
                    policy) -> tuple[str, str]:
    """A challenger still waiting for evidence after ``promotion_max_shadow_days`` of shadow traffic
    (data time: the feature day of its first shadowed prediction) is retired, so that the loop can
    retrain on the labels that matured meanwhile."""
    first = first_shadowed(logged, pairs)
    if decision != "wait" or first is None:
        return decision, reason
    days = (data_clock(origin) - first).days
    limit = policy.promotion_max_shadow_days
    if days <= limit:
        return decision, reason
    return "retire", f"no evidence of an improvement after {days} days in shadow (limit {limit}): {reason}"


def shadowed_period(logged: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The champion's logged rows from the challenger's first shadowed prediction on: the evidence
    that neither model was trained on (older rows may be in the challenger's training data)."""
    from mlops.core.monitoring import TIMESTAMP

    first = first_shadowed(logged, pairs)
    return logged if first is None else logged[logged[TIMESTAMP] >= first].reset_index(drop=True)


def decide_promotion(pairs: pd.DataFrame, logged: pd.DataFrame, references: dict, boosters: dict, policy, *,
                     require_improvement: bool, origin, **compare) -> tuple[dict, str, str]:
    """The promotion gate on enough shadow pairs: compare both models on the shadowed period
    (``shadowed_period``), decide with the evidence the episode requires (``promotion_decision``), and
    retire a challenger past its shadow deadline. ``compare``: ``compare_shadow``'s keywords (spec,
    metric, score). Returns (comparison, decision, reason)."""
    from mlops.core.shadow import ROC_AUC, compare_shadow, promotion_decision

    logged = shadowed_period(logged, pairs)
    comparison = compare_shadow(pairs, logged, references, boosters,
                                confidence=getattr(policy, "promotion_confidence", 0.95), **compare)
    decision, reason = promotion_decision(comparison, policy, compare.get("metric", ROC_AUC),
                                          require_improvement=require_improvement)
    decision, reason = shadow_deadline(decision, reason, logged, pairs, origin, policy)
    return comparison, decision, reason
