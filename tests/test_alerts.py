"""Alerts reach people: the alert sensors against a real Dagster instance (SQLite, run-sharded, as the
platform configures it) and a real HTTP receiver standing in for a Slack webhook.

The events come from real runs in a temporary home: stand-in assets with the platform's asset keys
and metadata names (``model_monitoring``'s decay alert and loop decision from ``mlops.core.loop``,
``champion_promotion``), a blocking gate that fails, an asset that fails. Each sensor is evaluated
twice and from a stale cursor (a tick that sent and then crashed): every event arrives once.
"""

from __future__ import annotations

import http.server
import json
import threading

import dagster as dg
import pytest

from assets.alerts import platform_alerts_sensor, service_alert_sensor
from mlops.core.alerts import ledger_path
from mlops.core.loop import loop_metadata
from resources.alerts import AlertWebhook
from resources.monitoring import MonitoringPolicy
from resources.settings import PlatformSettings
from tests.conftest import open_instance
from tests.servers import free_port

UI = "http://dagster.example:3000"
TENANTS = dg.StaticPartitionsDefinition(["acme"])


class Receiver:
    """A webhook on a real socket: records every JSON body; answers ``status`` (200 unless a test changes it)."""

    def __init__(self):
        self.messages: list[dict] = []
        self.status = 200
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.status == 200:
                    receiver.messages.append(body)
                self.send_response(receiver.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def do_GET(self):  # a /readyz for the service alert test
                self.send_response(200 if self.path == "/readyz" else 404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def texts(self) -> list[str]:
        return [m["text"] for m in self.messages]


@pytest.fixture()
def receiver():
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture()
def home(tmp_path):
    PlatformSettings(home=str(tmp_path)).ensure_home()  # the platform's dagster.yaml
    return tmp_path


def _webhook(home, url, **kwargs) -> AlertWebhook:
    return AlertWebhook(settings=PlatformSettings(home=str(home)), url=url, ui_base_url=UI, **kwargs)


def _tick(sensor, instance, cursor, resources):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return sensor(context).cursor


# --- stand-ins with the platform's keys and metadata names ----------------------------------------
DECAY = [{"metric": "estimated_roc_auc", "chunk": "2026-03-02", "value": 0.612, "threshold": 0.7}]


@dg.asset(name="model_monitoring", partitions_def=TENANTS)
def monitoring_with_decay():
    loop = {"action": "retrain", "reason": "retrain 1 of at most 2 in episode 1", "episode": 1, "run_key": "e1.r1",
            "restored": None}
    return dg.MaterializeResult(metadata={
        "model_version": "3", "decay_alert": True, "decay_alerts": dg.MetadataValue.json(DECAY),
        "features_drifting_latest_chunk": dg.MetadataValue.int(2), "latest_chunk": "2026-03-02",
        "multivariate_drift": dg.MetadataValue.float(1.37), **loop_metadata(loop)})


@dg.asset(key=["fraud", "model_monitoring"], partitions_def=TENANTS)
def quiet_monitoring():
    return dg.MaterializeResult(metadata={"model_version": "1", "decay_alert": False,
                                          "features_drifting_latest_chunk": dg.MetadataValue.int(0)})


@dg.asset(name="champion_promotion", partitions_def=TENANTS)
def promotion():
    return dg.MaterializeResult(metadata={"promoted": True, "from_version": "2", "to_version": "3",
                                          "reason": "promotion gate passed: +0.04 ROC AUC"})


@dg.asset(name="churn_model", partitions_def=TENANTS)
def churn_model():
    return dg.MaterializeResult(metadata={"model_version": "4"})


@dg.asset_check(asset=churn_model, blocking=True)
def roc_auc_gate():
    return dg.AssetCheckResult(passed=False, description="ROC AUC 0.5120 is below the floor 0.7000",
                               metadata={"model_version": "4"})


@dg.asset(name="churn_training_set", partitions_def=TENANTS)
def broken_asset():
    raise dg.Failure("warehouse file is locked by another writer")


def test_every_kind_of_event_arrives_once_with_its_link(home, receiver):
    resources = {"alerts": _webhook(home, receiver.url + "/hook")}
    with open_instance(home) as instance:
        old = dg.materialize([monitoring_with_decay], instance=instance, partition_key="acme")
        start = _tick(platform_alerts_sensor, instance, None, resources)  # starts from now: history is not sent
        decay_run = dg.materialize([monitoring_with_decay, quiet_monitoring, promotion], instance=instance,
                                   partition_key="acme")
        gate_run = dg.materialize([churn_model, roc_auc_gate], instance=instance, partition_key="acme",
                                  raise_on_error=False)
        broken_run = dg.materialize([broken_asset], instance=instance, partition_key="acme", raise_on_error=False)
        assert decay_run.success and not gate_run.success and not broken_run.success
        assert receiver.messages == []

        after = _tick(platform_alerts_sensor, instance, start, resources)
        texts = receiver.texts()
        by_kind = {m["blocks"][1]["elements"][0]["text"].split(" | ")[0]: m["text"] for m in receiver.messages}
        assert sorted(by_kind) == ["check_failed", "decay_alert", "drift_alert", "promotion", "run_failed"], texts
        assert len(texts) == 6, texts  # both failed runs; nothing for the quiet use case or the earlier run
        assert not any(old.run_id in t for t in texts)

        decay = by_kind["decay_alert"]
        assert "churn / acme: decay alert on champion v3" in decay
        assert "estimated_roc_auc 0.6120 below 0.7000" in decay and "closed loop: retrain" in decay
        assert f"<{UI}/assets/model_monitoring?partition=acme|asset>" in decay
        assert f"<{UI}/runs/{decay_run.run_id}|run>" in decay
        assert "2 feature(s) drifting" in by_kind["drift_alert"]
        assert "champion promoted from v2 to v3" in by_kind["promotion"]
        assert f"{UI}/assets/champion_promotion?partition=acme" in by_kind["promotion"]
        assert "gate failed: roc_auc_gate on churn_model v4 for acme" in by_kind["check_failed"]
        assert "ROC AUC 0.5120 is below the floor 0.7000" in by_kind["check_failed"]
        failed = [t for t in texts if "run failed" in t]
        assert any(f"{UI}/runs/{gate_run.run_id}" in t for t in failed)
        broken = next(t for t in failed if broken_run.run_id in t)
        assert "\nwarehouse file is locked by another writer" in broken and "for acme" in broken
        assert all(m["blocks"][0]["text"]["text"] == m["text"] for m in receiver.messages)

        # Once per event: the next tick, a tick from the stale cursor (one that sent, then crashed before
        # Dagster stored its cursor) and a restarted daemon (new instance and resource objects).
        assert _tick(platform_alerts_sensor, instance, after, resources) == after
        _tick(platform_alerts_sensor, instance, start, resources)
    with open_instance(home) as restarted:
        _tick(platform_alerts_sensor, restarted, start, {"alerts": _webhook(home, receiver.url + "/hook")})
    assert len(receiver.messages) == 6


def test_an_alert_the_webhook_refused_is_delivered_later_once(home, receiver):
    resources = {"alerts": _webhook(home, receiver.url + "/hook", attempts=1)}
    with open_instance(home) as instance:
        start = _tick(platform_alerts_sensor, instance, None, resources)
        failed = dg.materialize([broken_asset], instance=instance, partition_key="acme", raise_on_error=False)
        receiver.status = 503
        after = _tick(platform_alerts_sensor, instance, start, resources)
        assert receiver.messages == []
        pending = [json.loads(line) for line in ledger_path(home).read_text().splitlines()]
        assert [(e["status"], e["id"]) for e in pending] == [("pending", f"run_failed:{failed.run_id}")]
        assert "HTTP 503" in pending[0]["error"] and "/hook" not in pending[0]["error"]  # the URL's secret path
        receiver.status = 200
        _tick(platform_alerts_sensor, instance, after, resources)  # no new run: the pending alert goes now
        _tick(platform_alerts_sensor, instance, after, resources)
    assert len(receiver.messages) == 1 and failed.run_id in receiver.messages[0]["text"]


def test_no_webhook_sends_nothing_and_does_not_replay_history(home, receiver):
    with open_instance(home) as instance:
        off = {"alerts": _webhook(home, None)}
        cursor = _tick(platform_alerts_sensor, instance, None, off)
        dg.materialize([broken_asset], instance=instance, partition_key="acme", raise_on_error=False)
        cursor = _tick(platform_alerts_sensor, instance, cursor, off)  # moves on while alerts are off
        assert _tick(platform_alerts_sensor, instance, cursor, {"alerts": _webhook(home, receiver.url)}) == cursor
    assert receiver.messages == [] and not ledger_path(home).exists()


def test_service_down_and_back_is_one_alert_each(home, receiver):
    dead = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    alerts = _webhook(home, receiver.url + "/hook")
    with open_instance(home) as instance:
        def tick(cursor, service_url):
            return _tick(service_alert_sensor, instance, cursor,
                         {"alerts": alerts, "monitoring_policy": MonitoringPolicy(service_url=service_url)})

        cursor = tick(None, dead)
        assert receiver.messages == []  # one failed probe is not an outage (readyz_failures_before_alert=2)
        down = tick(cursor, dead)
        assert len(receiver.messages) == 1
        assert f"prediction service stopped answering /readyz: {dead}/readyz" in receiver.texts()[0]
        tick(cursor, dead)  # the same transition again (a tick that crashed after sending): not re-sent
        cursor = tick(tick(down, dead), dead)
        assert len(receiver.messages) == 1
        up = tick(cursor, receiver.url)  # a live /readyz
        assert len(receiver.messages) == 2
        assert f"prediction service is answering again: {receiver.url}/readyz" in receiver.texts()[1]
        tick(tick(up, receiver.url), receiver.url)
        tick(cursor, receiver.url)
    assert len(receiver.messages) == 2


def test_failed_and_retried_runs_say_which_retry(home, receiver):
    resources = {"alerts": _webhook(home, receiver.url)}
    with open_instance(home) as instance:
        start = _tick(platform_alerts_sensor, instance, None, resources)
        # Dagster itself decides whether a failed run is retried (``dagster/will_retry``).
        first = dg.materialize([broken_asset], instance=instance, partition_key="acme", raise_on_error=False,
                               tags={"dagster/max_retries": "1", "dagster/retry_on_asset_or_op_failure": "true"})
        retried = dg.materialize([quiet_monitoring], instance=instance, partition_key="acme",
                                 tags={"dagster/retry_number": "1", "dagster/parent_run_id": first.run_id})
        _tick(platform_alerts_sensor, instance, start, resources)
        retries_on = instance.run_retries_enabled
    failed, succeeded = receiver.texts()
    assert "run failed: __ephemeral_asset_job__ for acme*" in failed
    assert ("Dagster retries it automatically." in failed) == retries_on
    assert (f"run succeeded on retry: __ephemeral_asset_job__ for acme (automatic retry 1 of run "
            f"{first.run_id[:8]})") in succeeded
    assert f"<{UI}/runs/{retried.run_id}|run>" in succeeded


def test_a_manual_rollback_alerts_through_the_cli_helper(home, receiver):
    from mlops.cli import _alert_deployment

    _alert_deployment({"alerts": _webhook(home, receiver.url)}, "rollback", "acme", "5", "4", "bad canary", "alice")
    _alert_deployment({"alerts": _webhook(home, None)}, "rollback", "acme", "4", "3", "off", "alice")  # no webhook
    (text,) = receiver.texts()
    assert "churn-acme: champion rolled back from v5 to v4" in text and "by alice: bad canary" in text
    assert f"<{UI}/assets/serving_manifest?partition=acme|asset>" in text


def test_the_platform_definitions_take_the_webhook_from_the_environment(home, receiver, monkeypatch):
    import os

    from definitions import build_definitions

    for key in ("MLOPS_HOME", "DAGSTER_HOME", "BENTOML_HOME", "MLFLOW_TRACKING_URI"):  # build_definitions sets them
        monkeypatch.setenv(key, os.environ[key]) if key in os.environ else monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLOPS_ALERT_WEBHOOK_URL", receiver.url + "/secret-token")
    monkeypatch.setenv("MLOPS_DAGSTER_UI_URL", UI)
    defs = build_definitions(str(home), monitoring_policy=MonitoringPolicy(service_url=f"http://127.0.0.1:{free_port()}"))
    configured = defs.resources["alerts"]
    assert configured.url.env_var_name == "MLOPS_ALERT_WEBHOOK_URL"  # the UI shows the variable, never the secret URL
    sensor = defs.resolve_sensor_def("service_alert_sensor")
    resources = {key: defs.resources[key] for key in ("alerts", "monitoring_policy")}
    with open_instance(home) as instance:
        cursor = None
        for _ in range(3):  # Dagster resolves the variable when it builds the resources
            with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
                cursor = sensor(context).cursor
    (text,) = receiver.texts()
    assert "prediction service stopped answering /readyz" in text


def _notify_once(home: str, url: str, barrier, results) -> None:
    from mlops.core.alerts import AlertEvent, notifier_for

    barrier.wait()
    results.put(notifier_for(home, url).notify([AlertEvent(id="rollback:acme:race", kind="rollback",
                                                           title="race")]).sent)


def test_processes_racing_on_one_event_send_it_once(home, receiver):
    import multiprocessing

    context = multiprocessing.get_context("fork")  # four daemons/CLIs at once, without re-importing Dagster
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_notify_once, args=(str(home), receiver.url, barrier, results))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    sent = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert sorted(map(len, sent)) == [0, 0, 0, 1] and len(receiver.messages) == 1


def test_an_alert_undelivered_past_its_deadline_is_given_up_with_its_error(home, receiver):
    from mlops.core.alerts import AlertEvent, notifier_for

    receiver.status = 500
    event = AlertEvent(id="promotion:acme:x", kind="promotion", title="v2 -> v3")
    done = notifier_for(home, receiver.url, attempts=1, max_pending_s=0).notify([event])
    assert list(done.abandoned) == [event.id] and "HTTP 500" in done.abandoned[event.id]
    receiver.status = 200
    assert notifier_for(home, receiver.url).notify([event]).skipped == [event.id]
    assert receiver.messages == []
