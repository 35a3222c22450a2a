"""Alerts that reach people: a Slack-compatible webhook, sent once per event.

The platform's sensors (``assets.alerts``) and the CLI turn what happened (a decay or drift alert, a
failed gate, a failed or retried run, a promotion or rollback, a service that stopped answering
``/readyz``) into ``AlertEvent``s with a **stable id** (``<kind>:<run id or storage id>``) and hand
them to ``Notifier.notify``. The notifier keeps a small ledger (``<home>/alerts/ledger.jsonl``,
JSON lines, appended under an exclusive file lock and fsynced) of every event it has delivered, so
a sensor that ticks again, a daemon that restarts or a cursor that is replayed never sends an event
twice. An event the webhook did not accept (after ``attempts`` tries with a short timeout) stays
*pending* in the ledger and is retried by the next ``notify`` (each sensor tick) for up to
``max_pending_s`` (a day), then given up (``abandoned``) with its last error. The lock is held while
an event is posted (one short timeout, a few attempts), so two processes never send the same event.

The payload is what a Slack incoming webhook accepts (``text`` plus ``blocks``); other chat tools
(Mattermost, Rocket.Chat, Teams' Slack-compatible connectors) read ``text``. Links point at the
Dagster UI: ``<ui>/runs/<run id>`` and ``<ui>/assets/<asset key path>``.

Plain Python (no Dagster): the CLI (``mlops rollback``) sends through the same notifier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from mlops.core.environment import file_lock, write_atomic

DEFAULT_UI_BASE_URL = "http://127.0.0.1:3000"
WEBHOOK_URL_ENV = "MLOPS_ALERT_WEBHOOK_URL"
UI_BASE_URL_ENV = "MLOPS_DAGSTER_UI_URL"
SENT, PENDING, ABANDONED = "sent", "pending", "abandoned"
# The ledger is rewritten to one line per event (its latest state) once it has this many lines.
COMPACT_AFTER_LINES = 5000
SEVERITY_ICON = {"error": ":red_circle:", "warning": ":warning:", "info": ":information_source:"}


def ledger_path(home: str | os.PathLike) -> Path:
    """Where a home keeps the record of delivered alerts."""
    return Path(home) / "alerts" / "ledger.jsonl"


def asset_url(ui_base_url: str, asset_key: Sequence[str], partition: str | None = None) -> str:
    """``<ui>/assets/<key path>``, with ``?partition=`` for a tenant's partition."""
    path = "/".join(urllib.parse.quote(part, safe="") for part in asset_key)
    url = f"{ui_base_url.rstrip('/')}/assets/{path}"
    return f"{url}?{urllib.parse.urlencode({'partition': partition})}" if partition else url


def run_url(ui_base_url: str, run_id: str) -> str:
    return f"{ui_base_url.rstrip('/')}/runs/{urllib.parse.quote(run_id, safe='')}"


@dataclasses.dataclass(frozen=True)
class AlertEvent:
    """One thing a person should hear about. ``id`` is stable: the same event always has the same id."""

    id: str
    kind: str  # decay_alert, drift_alert, check_failed, run_failed, run_retried, promotion, rollback, service_down, service_up
    title: str
    detail: str = ""
    severity: str = "warning"  # error, warning, info
    links: tuple[tuple[str, str], ...] = ()  # (label, url)
    tenant: str | None = None

    def payload(self) -> dict:
        """The Slack-compatible message: ``text`` (read by every client and notification) and ``blocks``."""
        icon = SEVERITY_ICON.get(self.severity, "")
        links = " | ".join(f"<{url}|{_escape(label)}>" for label, url in self.links)
        text = f"{icon} *{_escape(self.title)}*".strip()
        if self.detail:
            text += f"\n{_escape(self.detail)}"
        if links:
            text += f"\n{links}"
        blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}},
                  {"type": "context", "elements": [{"type": "mrkdwn", "text": _escape(
                      f"{self.kind} | {self.tenant or 'platform'} | event {self.id}")[:3000]}]}]
        return {"text": text, "blocks": blocks}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> AlertEvent:
        data = dict(data)
        data["links"] = tuple(tuple(link) for link in data.get("links", ()))
        return cls(**data)


def _escape(text: str) -> str:
    # Slack's three control characters; links are built separately as <url|label>.
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class WebhookError(RuntimeError):
    """The webhook did not accept a message (the error says why: status and body, or the network error)."""


def post_webhook(url: str, payload: dict, *, timeout_s: float = 5.0, attempts: int = 3,
                 backoff_s: float = 0.5) -> None:
    """POST ``payload`` as JSON; a 2xx answer is success. Retries network errors, 429 and 5xx with a
    growing pause; a 4xx other than 429 is not retried (the message itself is wrong)."""
    body = json.dumps(payload).encode()
    last = "no attempt made"
    for attempt in range(1, max(1, attempts) + 1):
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                if 200 <= response.status < 300:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:200].decode(errors='replace')}"
            if 400 <= exc.code < 500 and exc.code != 429:
                raise WebhookError(f"webhook {_redact(url)} refused the alert: {last}") from None
        except OSError as exc:
            last = f"unreachable: {exc}"
        if attempt < attempts:
            time.sleep(backoff_s * attempt)
    raise WebhookError(f"webhook {_redact(url)} did not accept the alert after {attempts} attempt(s): {last}")


def _redact(url: str) -> str:
    """A webhook URL's path is its secret (Slack's token): show scheme and host only."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..."


class Ledger:
    """Append-only JSON lines, one line per state change of an event (``sent``, ``pending``,
    ``abandoned``); the last line of an id is its state. Every read-decide-write happens under an
    exclusive ``flock`` on ``<ledger>.lock``, across processes (daemon, sensors, CLI)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, dict]]:
        """Hold the lock; yields the current state of every event (id -> latest line)."""
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            yield self._read()

    def _read(self) -> dict[str, dict]:
        state: dict[str, dict] = {}
        if not self.path.exists():
            return state
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash mid-write: at worst that event is sent again
                state[entry["id"]] = entry
        return state

    def append(self, state: dict[str, dict], entry: dict) -> None:
        """Record ``entry`` (call inside ``locked``); compacts the file when it has grown long."""
        state[entry["id"]] = entry
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._lines() > COMPACT_AFTER_LINES:
            write_atomic(self.path, "".join(json.dumps(e, default=str) + "\n" for e in state.values()).encode())

    def _lines(self) -> int:
        with open(self.path, "rb") as fh:
            return sum(1 for _ in fh)

    def status(self, event_id: str) -> str | None:
        with self.locked() as state:
            return state.get(event_id, {}).get("status")


@dataclasses.dataclass
class Delivery:
    """What one ``notify`` did: ids sent now, ids already sent before (skipped), ids still pending
    (with their errors) and ids given up."""

    sent: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    pending: dict[str, str] = dataclasses.field(default_factory=dict)
    abandoned: dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        out = f"{len(self.sent)} alert(s) sent, {len(self.skipped)} already sent"
        if self.pending:
            out += f", {len(self.pending)} pending ({next(iter(self.pending.values()))})"
        if self.abandoned:
            out += f", {len(self.abandoned)} given up ({next(iter(self.abandoned.values()))})"
        return out


@dataclasses.dataclass
class Notifier:
    """Sends ``AlertEvent``s to ``url`` once each (``url`` None: alerts are off, nothing is sent or
    recorded)."""

    url: str | None
    ledger: Ledger
    timeout_s: float = 5.0
    attempts: int = 3
    max_pending_s: float = 24 * 3600  # an event not delivered this long after its first try is given up

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def notify(self, events: Iterable[AlertEvent] = ()) -> Delivery:
        """Send each new event (and every one still pending from before) once; never raises for a
        webhook that is down: what was not delivered stays pending for the next call."""
        done = Delivery()
        if not self.enabled:
            return done
        events = list(events)
        with self.ledger.locked() as state:
            queue = [AlertEvent.from_json(e["event"]) for e in state.values()
                     if e["status"] == PENDING and e["id"] not in {ev.id for ev in events}]
            failed = None  # once the webhook fails, the rest wait for the next call (a tick stays short)
            for event in [*queue, *events]:
                previous = state.get(event.id, {})
                if previous.get("status") in (SENT, ABANDONED):
                    done.skipped.append(event.id)
                    continue
                now = time.time()
                tries = int(previous.get("deliveries", 0)) + (failed is None)
                entry = {"id": event.id, "kind": event.kind, "at": now, "first_at": previous.get("first_at", now),
                         "deliveries": tries, "event": event.to_json()}
                if failed is not None:
                    if previous.get("status") != PENDING:
                        self.ledger.append(state, entry | {"status": PENDING, "error": failed})
                    done.pending[event.id] = failed
                    continue
                try:
                    post_webhook(self.url, event.payload(), timeout_s=self.timeout_s, attempts=self.attempts)
                except WebhookError as exc:
                    failed = str(exc)
                    status = ABANDONED if now - entry["first_at"] >= self.max_pending_s else PENDING
                    self.ledger.append(state, entry | {"status": status, "error": str(exc)})
                    (done.abandoned if status == ABANDONED else done.pending)[event.id] = str(exc)
                    continue
                self.ledger.append(state, entry | {"status": SENT})
                done.sent.append(event.id)
        return done


def notifier_for(home: str | os.PathLike, url: str | None, **options) -> Notifier:
    return Notifier(url=url or None, ledger=Ledger(ledger_path(home)), **options)


# --- events from facts --------------------------------------------------------------------------
def deployment_event(action: str, tenant: str, model_name: str, from_version: str | None, to_version: str,
                     reason: str, actor: str, *, event_id: str, ui_base_url: str = DEFAULT_UI_BASE_URL,
                     asset_key: Sequence[str] = ("serving_manifest",), run_id: str | None = None) -> AlertEvent:
    """A promotion or rollback (``action``: ``promotion`` or ``rollback``) of ``model_name``."""
    verb = "promoted" if action == "promotion" else "rolled back"
    links = [("asset", asset_url(ui_base_url, asset_key, tenant))]
    if run_id:
        links.append(("run", run_url(ui_base_url, run_id)))
    return AlertEvent(
        id=event_id, kind=action, tenant=tenant, severity="info" if action == "promotion" else "warning",
        title=f"{model_name}: champion {verb} from v{from_version or '?'} to v{to_version}",
        detail=f"by {actor}: {reason}", links=tuple(links))


def probe_readyz(url: str, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(answered 200, what happened) for one GET of a service's ``/readyz``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except OSError as exc:
        return False, f"unreachable: {exc}"


def service_event(url: str, up: bool, detail: str, *, event_id: str) -> AlertEvent:
    if up:
        return AlertEvent(id=event_id, kind="service_up", severity="info",
                          title=f"prediction service is answering again: {url}", detail=detail,
                          links=(("readyz", url),))
    return AlertEvent(id=event_id, kind="service_down", severity="error",
                      title=f"prediction service stopped answering /readyz: {url}", detail=detail,
                      links=(("readyz", url),))
