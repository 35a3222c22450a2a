"""Alerts that reach people: two sensors that turn the platform's events into webhook messages.

- ``platform_alerts_sensor`` reads Dagster's event log, never a tenant's warehouse (DuckDB admits one
  writing process and no reader from another while it writes). Its cursor is the storage id of the
  last run-finished event it handled (``RUN_SUCCESS`` / ``RUN_FAILURE``, kept in the instance's
  index shard). For each run that finished since, it reads the run's own events:

  - a failed run (job, partition, the first error; whether Dagster retries it) -> ``run_failed``;
  - a run that succeeded as an automatic retry (``dagster/retry_number``) -> ``run_retried``;
  - a failed asset check of severity ERROR (the validation gates, the promotion gate retiring a
    challenger, data checks) -> ``check_failed``;
  - a materialization of a monitoring asset (``model_monitoring``, ``<use case>/model_monitoring``)
    with ``decay_alert`` -> ``decay_alert`` (with the loop's decision), and with features drifting
    in the latest chunk (``features_drifting_latest_chunk`` > 0) -> ``drift_alert``;
  - a materialization of a promotion asset (``champion_promotion``, ``<use case>/champion_promotion``)
    with ``promoted`` -> ``promotion``. Rollbacks are manual (``mlops rollback``): the CLI sends them.

  Alerts of a run go out when the run has finished (its events are all written by then).
- ``service_alert_sensor`` probes the service's ``/readyz`` (``MonitoringPolicy.service_url``) and
  alerts once when it stops answering (``readyz_failures_before_alert`` failed probes in a row) and
  once when it answers again.

Both are RUNNING by default and do nothing but move their cursor while no webhook is configured
(``MLOPS_ALERT_WEBHOOK_URL``), so configuring one later does not replay old events. A sensor with
no cursor yet starts from now. Every event has a stable id, and the notifier's ledger sends each id
once, whatever the cursor does (a tick that sent and then crashed, a restarted daemon, a reset cursor).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator

import dagster as dg
from dagster import DagsterEventType

from mlops.core.alerts import AlertEvent, asset_url, deployment_event, probe_readyz, run_url, service_event
from resources.alerts import AlertWebhook
from resources.monitoring import MonitoringPolicy

MONITORING_ASSET_NAME = "model_monitoring"
PROMOTION_ASSET_NAME = "champion_promotion"
RETRY_NUMBER_TAG, PARENT_RUN_ID_TAG, WILL_RETRY_TAG = "dagster/retry_number", "dagster/parent_run_id", "dagster/will_retry"
PARTITION_TAG = "dagster/partition"
_FINISHED = (DagsterEventType.RUN_FAILURE, DagsterEventType.RUN_SUCCESS)
_PAGE = 200
MAX_RUNS_PER_TICK = 100


def _value(metadata, key, default=None):
    return metadata[key].value if key in metadata else default


def newest_finished_storage_id(instance: dg.DagsterInstance) -> int:
    newest = 0
    for event_type in _FINISHED:
        result = instance.fetch_run_status_changes(event_type, limit=1, ascending=False)
        newest = max([newest, *(r.storage_id for r in result.records)])
    return newest


def finished_runs_after(instance: dg.DagsterInstance, after: int) -> list[dg.EventLogRecord]:
    """Every run-finished event (success or failure) with a storage id after ``after``, oldest first."""
    records: list[dg.EventLogRecord] = []
    for event_type in _FINISHED:
        page = None
        while True:
            result = instance.fetch_run_status_changes(
                dg.RunStatusChangeRecordsFilter(event_type=event_type, after_storage_id=after),
                limit=_PAGE, cursor=page, ascending=True)
            records.extend(result.records)
            if not result.has_more:
                break
            page = result.cursor
    return sorted(records, key=lambda r: r.storage_id)


def run_events(instance: dg.DagsterInstance, finished: dg.EventLogRecord, ui: str) -> Iterator[AlertEvent]:
    """The alerts of one finished run (see the module docstring)."""
    entry = finished.event_log_entry
    run = instance.get_run_by_id(entry.run_id)
    if run is None:
        return
    tags, run_id = run.tags, run.run_id
    tenant = tags.get(PARTITION_TAG)
    where = f"{run.job_name}" + (f" for {tenant}" if tenant else "")
    run_link = ("run", run_url(ui, run_id))
    retry = int(tags.get(RETRY_NUMBER_TAG, "0") or 0)
    retry_note = f" (automatic retry {retry} of run {tags.get(PARENT_RUN_ID_TAG, '?')[:8]})" if retry else ""
    if entry.dagster_event_type == DagsterEventType.RUN_FAILURE:
        will_retry = tags.get(WILL_RETRY_TAG) == "true"
        yield AlertEvent(
            id=f"run_failed:{run_id}", kind="run_failed", tenant=tenant, severity="error",
            title=f"run failed: {where}{retry_note}",
            detail=_failure_message(entry) + ("\nDagster retries it automatically." if will_retry else ""),
            links=(run_link,))
    elif retry:
        yield AlertEvent(
            id=f"run_retried:{run_id}", kind="run_retried", tenant=tenant, severity="info",
            title=f"run succeeded on retry: {where}{retry_note}", links=(run_link,))
    connection = instance.get_records_for_run(
        run_id, of_type={DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_CHECK_EVALUATION})
    for record in connection.records:
        event = record.event_log_entry.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
            yield from _check_events(event.asset_check_evaluation_data, run_id, tenant, ui, run_link)
        else:
            yield from _materialization_events(event.step_materialization_data.materialization, record.storage_id,
                                               run_id, ui, run_link)


def _failure_message(entry) -> str:
    data = entry.dagster_event.event_specific_data
    step = getattr(data, "first_step_failure_event", None)
    error = getattr(getattr(step, "event_specific_data", None), "error", None) or getattr(data, "error", None)
    message = error.message.strip() if error is not None else (entry.message or "")
    # "dagster._core.definitions.events.Failure: why" -> "why": the class path says nothing to a person.
    return re.sub(r"^[\w.]+(Error|Failure|Exception): ", "", message)[:1500]


def _check_events(evaluation, run_id: str, tenant: str | None, ui: str, run_link) -> Iterator[AlertEvent]:
    if evaluation.passed or evaluation.severity != dg.AssetCheckSeverity.ERROR:
        return
    key = evaluation.asset_key
    partition = evaluation.partition or tenant
    model_version = _value(evaluation.metadata, "model_version") or _value(evaluation.metadata, "challenger_version")
    subject = "/".join(key.path) + (f" v{model_version}" if model_version else "")
    yield AlertEvent(
        id=f"check_failed:{run_id}:{key.to_user_string()}:{evaluation.check_name}:{partition or ''}",
        kind="check_failed", tenant=partition, severity="error",
        title=f"gate failed: {evaluation.check_name} on {subject}" + (f" for {partition}" if partition else ""),
        detail=evaluation.description or "", links=(("asset", asset_url(ui, key.path, partition)), run_link))


def _materialization_events(materialization, storage_id: int, run_id: str, ui: str, run_link) -> Iterator[AlertEvent]:
    key, metadata, tenant = materialization.asset_key, materialization.metadata, materialization.partition
    name = key.path[-1]
    use_case = key.path[0] if len(key.path) > 1 else "churn"
    asset_link = ("asset", asset_url(ui, key.path, tenant))
    version = _value(metadata, "model_version")
    if name == MONITORING_ASSET_NAME and _value(metadata, "decay_alert"):
        alerts = _value(metadata, "decay_alerts") or []
        found = "; ".join(f"{a.get('metric')} {_number(a.get('value'))} below {_number(a.get('threshold'))} "
                          f"(chunk {a.get('chunk')})" for a in alerts if isinstance(a, dict))
        action = _value(metadata, "loop_action", "none")
        yield AlertEvent(
            id=f"decay_alert:{run_id}:{storage_id}", kind="decay_alert", tenant=tenant, severity="error",
            title=f"{use_case} / {tenant}: decay alert on champion v{version}",
            detail=f"{found or 'performance below its floor'}\nclosed loop: {action}: "
                   f"{_value(metadata, 'loop_reason', 'no loop decision recorded')}",
            links=(asset_link, run_link))
    if name == MONITORING_ASSET_NAME and (_value(metadata, "features_drifting_latest_chunk") or 0) > 0:
        drifting = int(_value(metadata, "features_drifting_latest_chunk"))
        detail = f"{drifting} feature(s) drifting in the latest chunk ({_value(metadata, 'latest_chunk', '?')})"
        multivariate = _value(metadata, "multivariate_drift")
        if multivariate is not None:
            detail += f"; multivariate reconstruction error {_number(multivariate)}"
        yield AlertEvent(
            id=f"drift_alert:{run_id}:{storage_id}", kind="drift_alert", tenant=tenant, severity="warning",
            title=f"{use_case} / {tenant}: data drift on champion v{version}",
            detail=detail + " (drift without decay does not retrain)", links=(asset_link, run_link))
    if name == PROMOTION_ASSET_NAME and _value(metadata, "promoted"):
        yield deployment_event(
            "promotion", tenant, f"{use_case}-{tenant}", _value(metadata, "from_version"),
            str(_value(metadata, "to_version")), str(_value(metadata, "reason", "")), "the promotion gate",
            event_id=f"promotion:{run_id}:{storage_id}", ui_base_url=ui, asset_key=key.path, run_id=run_id)


def _number(value) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


@dg.sensor(minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING)
def platform_alerts_sensor(context: dg.SensorEvaluationContext, alerts: AlertWebhook):
    """Sends decay and drift alerts, failed gates, failed or retried runs and promotions to the
    alert webhook, once each, with links to the Dagster UI (module docstring)."""
    state = json.loads(context.cursor) if context.cursor else None
    instance = context.instance
    if state is None or not alerts.enabled:
        newest = newest_finished_storage_id(instance)
        why = "alerts start from now" if alerts.enabled else "no alert webhook configured (MLOPS_ALERT_WEBHOOK_URL)"
        return dg.SensorResult(cursor=json.dumps({"after": newest}), skip_reason=why)
    # A long backlog (the sensor was stopped for days) is worked off over several ticks, oldest first.
    finished = finished_runs_after(instance, int(state["after"]))[:MAX_RUNS_PER_TICK]
    events = [e for record in finished for e in run_events(instance, record, alerts.ui_base_url)]
    delivery = alerts.notifier().notify(events)  # also retries what an earlier tick could not deliver
    if delivery.pending or delivery.abandoned:
        context.log.error(f"alert webhook: {delivery.summary()}")
    after = max([int(state["after"]), *(r.storage_id for r in finished)])
    return dg.SensorResult(cursor=json.dumps({"after": after}),
                           skip_reason=f"{len(finished)} finished run(s): {delivery.summary()}")


@dg.sensor(minimum_interval_seconds=10, default_status=dg.DefaultSensorStatus.RUNNING)
def service_alert_sensor(context: dg.SensorEvaluationContext, alerts: AlertWebhook,
                         monitoring_policy: MonitoringPolicy):
    """Alerts once when the prediction service stops answering ``/readyz`` and once when it is back."""
    if not alerts.enabled:
        return dg.SkipReason("no alert webhook configured (MLOPS_ALERT_WEBHOOK_URL)")
    # epoch: a new one whenever the cursor starts over, so a reset cursor never reuses an event id.
    state = json.loads(context.cursor) if context.cursor else {"epoch": uuid.uuid4().hex[:12], "transitions": 0,
                                                               "state": "unknown", "failures": 0}
    url = monitoring_policy.service_url.rstrip("/") + "/readyz"
    ok, detail = probe_readyz(url)
    events = []
    if ok:
        if state["state"] == "down":
            state["transitions"] += 1
            events.append(service_event(url, True, detail, event_id=f"service:{state['epoch']}:{state['transitions']}:up"))
        state |= {"state": "up", "failures": 0}
    else:
        state["failures"] += 1
        if state["state"] != "down" and state["failures"] >= alerts.readyz_failures_before_alert:
            state["transitions"] += 1
            events.append(service_event(url, False, f"{state['failures']} failed probe(s) in a row; last: {detail}",
                                        event_id=f"service:{state['epoch']}:{state['transitions']}:down"))
            state["state"] = "down"
    delivery = alerts.notifier().notify(events)
    if delivery.pending or delivery.abandoned:
        context.log.error(f"alert webhook: {delivery.summary()}")
    return dg.SensorResult(cursor=json.dumps(state), skip_reason=f"{url}: {detail}; {delivery.summary()}")
