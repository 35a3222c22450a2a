"""The closed loop's rules (mlops.core.loop) on a real DuckDB file: one episode per decay, a bounded
number of retrains spaced by matured labels, then one escalation to a person; a floor that does not
fall with a promotion; restoration judged on realized chunks; time-to-restore figures."""

from __future__ import annotations

import json
from types import SimpleNamespace

import duckdb
import pandas as pd
import pytest

from mlops.core import loop
from mlops.core.monitoring import CHURN_SPEC, TenantMonitor, onset_estimate

RULES = loop.LoopRules(max_retrains=2, first_retrain_after_days=0, retrain_min_new_label_days=7, restore_chunks=3)
ALERT = {"metric": "realized_roc_auc", "chunk": "2026-09-20", "value": 0.70, "threshold": 0.76}
DAY0 = pd.Timestamp("2026-10-01")


@pytest.fixture()
def con(tmp_path):
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as connection:
        yield connection


def decide(con, day: int, *, shadow: bool = False, value: float = 0.70, rules: loop.LoopRules = RULES):
    now = DAY0 + pd.Timedelta(days=day)
    return loop.on_decay_alert(con, "churn", {**ALERT, "value": value}, now=now, champion_version="1",
                               floor=(0.76, "v1 reference"), challenger_in_shadow=shadow,
                               labels_through=now - pd.Timedelta(days=30), rules=rules)


def test_an_episode_retrains_at_most_twice_on_new_labels_then_calls_a_person_once(con):
    first = decide(con, 0)
    assert (first.action, first.episode.episode, first.episode.retrains) == ("retrain", 1, 1)
    held = decide(con, 1, shadow=True)  # the shadow decides first
    assert held.action == "hold" and "a challenger is in shadow; 1 day(s)" in held.reason
    held = decide(con, 3)  # the challenger was retired; only 3 days of new labels since the retrain
    assert held.action == "hold" and "3 day(s) of new labels" in held.reason
    second = decide(con, 7)
    assert (second.action, second.episode.retrains) == ("retrain", 2)
    assert "supersedes" not in second.reason
    last = decide(con, 15, shadow=True)  # the last allowed challenger is in shadow: no escalation yet
    assert last.action == "hold" and "last allowed challenger" in last.reason
    escalated = decide(con, 20)
    assert escalated.action == "escalate" and "2 retrain(s)" in escalated.reason
    assert escalated.episode.status == loop.ESCALATED
    assert json.loads(escalated.episode.evidence)["escalation"]["retrains"] == 2
    after = decide(con, 30)
    assert after.action == "none" and "escalated to a person" in after.reason
    frame = loop.episodes(con, "churn")
    assert frame[["episode", "status", "retrains"]].values.tolist() == [[1, "escalated", 2]]

    # A person closes it; the next decay opens a new episode with its own retrain budget.
    assert loop.close_episode(con, "churn", now=DAY0 + pd.Timedelta(days=31), note="accepted").status == loop.CLOSED
    fresh = decide(con, 40)
    assert (fresh.action, fresh.episode.episode, fresh.episode.retrains) == ("retrain", 2, 1)


def test_the_first_retrain_waits_for_labels_after_the_change_and_a_newer_one_supersedes_the_shadow(con):
    rules = loop.LoopRules(max_retrains=2, first_retrain_after_days=7, retrain_min_new_label_days=7)
    opened = decide(con, 0, rules=rules)
    assert opened.action == "hold" and "0 of 7 day(s) before the first retrain" in opened.reason
    assert decide(con, 6, rules=rules).action == "hold"
    assert decide(con, 7, rules=rules).action == "retrain"
    # A week later the first challenger is still waiting for evidence: a new one replaces it.
    again = decide(con, 14, shadow=True, rules=rules)
    assert again.action == "retrain" and "supersedes the challenger in shadow" in again.reason


def test_a_challenger_is_not_superseded_before_its_evidence_could_be_labelled(con):
    """Fraud's shadow evidence is early labels 14 days old: a second retrain a week after the first
    would replace a challenger none of whose predictions could be judged yet."""
    rules = loop.LoopRules(max_retrains=2, first_retrain_after_days=0, retrain_min_new_label_days=7)

    def alert(day: int, shadow: bool) -> loop.Decision:
        now = DAY0 + pd.Timedelta(days=day)
        return loop.on_decay_alert(con, "fraud", ALERT, now=now, champion_version="1", floor=(0.76, "v1 reference"),
                                   challenger_in_shadow=shadow, labels_through=now, rules=rules, evidence_days=14)

    assert alert(0, shadow=False).action == "retrain"
    held = alert(7, shadow=True)
    assert held.action == "hold" and "has had 7 of the 14 day(s) its labelled evidence needs" in held.reason
    again = alert(14, shadow=True)
    assert again.action == "retrain" and "supersedes the challenger in shadow" in again.reason


def test_the_first_retrain_is_due_on_its_day_though_no_new_alert_comes(con):
    """Fraud's daily chunks are noisy: the run of alerting chunks that opened the episode can break
    during the week of waiting. The episode's alert stands; its first retrain is launched on time."""
    rules = loop.LoopRules(max_retrains=2, first_retrain_after_days=7, retrain_min_new_label_days=7)

    def run(day: int, alerts: list[dict]) -> dict:
        now = DAY0 + pd.Timedelta(days=day)
        return loop.after_monitoring(con, "churn", _results([0.70]), alerts, now=now, champion_version="1",
                                     floor=(0.76, "v1 reference"), challenger_in_shadow=False,
                                     labels_through=now - pd.Timedelta(days=30), rules=rules,
                                     realized_metric="realized_roc_auc")

    assert run(0, [ALERT])["action"] == "hold"
    assert run(3, [])["action"] == "none"  # nothing new, and the week is not over
    due = run(7, [])
    assert (due["action"], due["episode"], due["run_key"]) == ("retrain", 1, "e1.r1")
    assert due["reason"].startswith("no new alert; episode 1's alert stands: retrain 1 of at most 2")
    assert run(8, [])["action"] == "none"  # only the first retrain stands; later ones need new alerts
    assert run(14, [])["action"] == "none"


def test_the_floor_does_not_fall_with_a_worse_model(con):
    # v2 (own floor 0.70) replaces v1 (floor 0.76): it inherits 0.76.
    assert loop.inherit_floor(con, "churn", "2", "1", "realized_roc_auc", 0.70, 0.76) == (0.76, "inherited from v1")
    assert loop.decay_floor(con, "churn", "2", own=0.70) == (0.76, "inherited from v1")
    # v3 is better than the floor it would inherit: its own counts.
    assert loop.inherit_floor(con, "churn", "3", "2", "realized_roc_auc", 0.80, 0.76) == (0.80, "v3 reference")
    assert loop.decay_floor(con, "churn", "3", own=0.80) == (0.80, "v3 reference")
    # A version never promoted has its own floor; an SLO raises every own floor.
    assert loop.decay_floor(con, "churn", "9", own=0.71) == (0.71, "v9 reference")
    assert loop.own_floor(0.84, 0.08, loop.LoopRules(performance_slo=0.80)) == 0.80


def _results(values: list[float | None], start: str = "2026-10-02") -> pd.DataFrame:
    days = pd.date_range(start, periods=len(values), freq="D")
    return pd.DataFrame({"metric": "realized_roc_auc", "chunk_key": days.strftime("%Y-%m-%d"), "chunk_start": days,
                         "value": values, "alert": [v is not None and v < 0.76 for v in values]})


def test_an_episode_is_restored_by_realized_chunks_after_it_opened(con):
    decide(con, 0)
    assert loop.on_promotion(con, "churn", now=DAY0 + pd.Timedelta(days=10), new_version="2").promotions == 1
    now = DAY0 + pd.Timedelta(days=60)
    # Two good chunks are not yet three; a bad one among them is no restoration either.
    assert loop.check_restored(con, "churn", _results([0.80, 0.81]), "realized_roc_auc", now=now, rules=RULES) is None
    assert loop.check_restored(con, "churn", _results([0.80, 0.70, 0.81]), "realized_roc_auc", now=now,
                               rules=RULES) is None
    # Chunks from before the episode opened do not count.
    assert loop.check_restored(con, "churn", _results([0.8, 0.8, 0.8], start="2026-09-01"), "realized_roc_auc",
                               now=now, rules=RULES) is None
    restored = loop.check_restored(con, "churn", _results([0.70, 0.79, 0.80, 0.81, None]), "realized_roc_auc",
                                   now=now, rules=RULES)
    assert restored is not None and restored.status == loop.RESTORED
    (kpi,) = loop.episode_kpis(loop.episodes(con, "churn"))
    assert kpi | {"opened_at": None} == {
        "use_case": "churn", "episode": 1, "status": "restored", "opened_at": None, "onset_to_alert_days": None,
        "alert_to_promotion_days": 10, "alert_to_restored_days": 60, "retrains": 1, "promotions": 1,
        "escalated": False}
    assert loop.active_episode(con, "churn") is None


def test_after_monitoring_decides_once_per_run_and_names_the_run_key(con):
    results = _results([0.80, 0.70, 0.69])
    out = loop.after_monitoring(con, "churn", results, [ALERT], now=DAY0, champion_version="1",
                                floor=(0.76, "v1 reference"), challenger_in_shadow=False,
                                labels_through=DAY0 - pd.Timedelta(days=30), rules=RULES,
                                realized_metric="realized_roc_auc")
    assert (out["action"], out["episode"], out["run_key"]) == ("retrain", 1, "e1.r1")
    episode = loop.active_episode(con, "churn")
    assert episode.onset_estimate == pd.Timestamp("2026-10-03")  # the first chunk of the alerting run
    quiet = loop.after_monitoring(con, "churn", results, [], now=DAY0, champion_version="1",
                                  floor=(0.76, "v1 reference"), challenger_in_shadow=False,
                                  labels_through=DAY0, rules=RULES, realized_metric="realized_roc_auc")
    assert quiet["action"] == "none" and loop.active_episode(con, "churn").retrains == 1


def test_onset_estimate_is_the_start_of_the_newest_run_of_alerts():
    frame = _results([0.70, 0.80, 0.70, None, 0.71, 0.72])
    assert onset_estimate(frame, "realized_roc_auc") == pd.Timestamp("2026-10-04")
    assert onset_estimate(_results([0.70, 0.80]), "realized_roc_auc") is None


def test_a_challenger_without_evidence_is_retired_after_its_shadow_deadline():
    policy = SimpleNamespace(promotion_max_shadow_days=21)
    logged = pd.DataFrame({"prediction_id": ["a", "b"], "timestamp": pd.to_datetime(["2026-10-01", "2026-10-05"])})
    pairs = pd.DataFrame({"prediction_id": ["a", "b"]})
    assert loop.shadow_deadline("wait", "no evidence yet", logged, pairs, "2026-10-20", policy) == (
        "wait", "no evidence yet")
    decision, reason = loop.shadow_deadline("wait", "interval contains 0", logged, pairs, "2026-10-25", policy)
    assert decision == "retire" and "24 days in shadow (limit 21)" in reason
    assert loop.shadow_deadline("promote", "ok", logged, pairs, "2026-12-25", policy) == ("promote", "ok")


def test_an_inherited_floor_judges_the_realized_metric_only():
    results = pd.concat([_results([0.74, 0.78]), _results([0.74, 0.78]).assign(metric="univariate_drift"),
                         _results([0.74, 0.78]).assign(metric="estimated_roc_auc", alert=False)])
    results["lower_threshold"] = 0.70
    monitor = SimpleNamespace(own_bound=0.70, higher_is_better=True, spec=CHURN_SPEC,
                              realized_metric="realized_roc_auc")
    judged = TenantMonitor.apply_bound(monitor, results, 0.76)
    decay = judged[judged["metric"] == "realized_roc_auc"]
    assert decay["alert"].tolist() == [True, False] and set(decay["lower_threshold"]) == {0.76}
    for metric in ("univariate_drift", "estimated_roc_auc"):  # the estimate keeps the version's own bound
        other, before = judged[judged["metric"] == metric], results[results["metric"] == metric]
        assert other["lower_threshold"].tolist() == [0.70, 0.70]
        assert other["alert"].tolist() == before["alert"].tolist()
    assert TenantMonitor.apply_bound(monitor, results, 0.70) is results


def test_the_replay_dates_realized_performance_by_the_last_day_it_covers():
    """A 7-day window of served predictions is known on its last day: a model promoted on day 15 that
    serves perfectly is restored on day 21, not on a day before it served (the window's first day)."""
    import numpy as np

    from mlops.core.names import CHAMPION
    from mlops.loop_replay import ReplayOutcomes

    rng = np.random.default_rng(0)
    origin = pd.Timestamp("2026-06-01")

    class Replay(ReplayOutcomes):
        spec = SimpleNamespace(seed=1, scenario="concept_drift", drift_day=10)
        events: list = []
        served = {d: ("1" if d < 15 else "2") for d in range(30)}

        def eventual_labels(self, rows):
            return rows["y_true"]

        def labels_closed_before(self):
            return origin + pd.Timedelta(days=30)

    replay = Replay()
    replay.origin, replay.log = origin, []
    for d in range(30):
        y = rng.integers(0, 2, 200)
        score = (y if d >= 15 else 1 - y) + rng.normal(0, 0.1, 200)  # v1 is wrong, v2 right
        replay.log.append(pd.DataFrame({"role": CHAMPION, "model_version": replay.served[d], "y_true": y,
                                        "score": score, "prediction_id": [f"{d}-{i}" for i in range(200)],
                                        "timestamp": origin + pd.Timedelta(days=d, hours=12)}))
    realized = replay.realized_by_day()
    assert list(realized["day"]) == list(range(6, 30)) and (realized["day"] - realized["first_day"] == 6).all()
    summary = replay.summary(oracle=1.0, tolerance=0.03)
    assert summary["restored_day"] == 21 and summary["days_to_restore"] == 11
    assert summary["before"] < 0.1 and summary["final"] > 0.97
