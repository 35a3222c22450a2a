"""A real ``bentoml serve`` process for tests: started on a free port against a home, ready when it
answers /readyz, stopped (SIGTERM, then whatever is left killed) when the block ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from mlops.core.environment import PROJECT_ROOT, TELEMETRY_OFF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def bentoml_service(home: Path, log: Path, env: dict[str, str] | None = None,
                    ready_timeout_s: float = 120) -> Iterator[dict]:
    """Serve ``bentos.service:ChurnService`` over ``home``; yields ``{"url", "proc", "log"}``."""
    port = free_port()
    environment = {**os.environ, **TELEMETRY_OFF, "MLOPS_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT),
                   **(env or {})}
    environment.pop("MLOPS_SERVING_DIR", None)
    # Set here, so that tests know how many workers must report what they serve.
    environment.setdefault("CHURN_SERVICE_WORKERS", "2")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "bentos.service:ChurnService",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=PROJECT_ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited early:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"service not ready in {ready_timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    tree = list(psutil.Process(proc.pid).children(recursive=True))
    try:
        yield {"url": url, "proc": proc, "log": log, "home": home,
               "workers": int(environment["CHURN_SERVICE_WORKERS"])}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        _, alive = psutil.wait_procs(tree, timeout=10)
        for leftover in alive:
            leftover.kill()


def served_by_workers(service: dict, use_case: str = "churn") -> dict[int, dict] | None:
    """What each live worker of ``service`` (a ``bentoml_service``) says it serves, per tenant
    (champion, challenger, snapshot version: the status file each worker rewrites on every manifest
    swap), by worker pid; None until every worker has written one. Files of workers of other, earlier
    services in the same home are not theirs (their pids are not in this service's process tree)."""
    from mlops.core.monitoring import worker_statuses

    try:
        pids = {p.pid for p in psutil.Process(service["proc"].pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return None
    found = {s["pid"]: s.get("serving", {}).get(use_case, {}) for s in worker_statuses(service["home"])
             if s.get("pid") in pids}
    return found if len(found) == service["workers"] else None


def wait_until(predicate, what: str, timeout_s: float = 30.0, interval_s: float = 0.05):
    """Poll ``predicate`` until it returns something other than None or False (returned), or fail
    naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


class Load:
    """``threads`` clients posting ``body(i)`` to ``url`` until stopped; every answer is recorded as
    (monotonic time, HTTP status, model_version), and an exception as status None: a failed request
    (its text in ``errors``). A client thread that dies (an exception its loop does not catch) or
    stops before the block ends fails the block: leaving it raises AssertionError naming it, so a
    load that silently shrank to fewer clients cannot pass for a load that was answered."""

    def __init__(self, url: str, headers: dict, body, threads: int = 3):
        self.url, self.headers, self.body = url, headers, body
        self.results: list[tuple[float, int | None, str | None]] = []
        self.errors: list[str] = []
        self.crashed: list[str] = []
        self.ids: list[str] = []  # the prediction_id of every 200 answer
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, name=f"load-{n}", daemon=True) for n in range(threads)]

    def _client(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # recorded: the block fails on it
            self.crashed.append(f"{threading.current_thread().name}: {exc!r}")

    def _run(self) -> None:
        session, i = requests.Session(), 0
        while not self._stop.is_set():
            try:
                response = session.post(self.url, json=self.body(i), headers=self.headers, timeout=30)
            except Exception as exc:  # counted as a failed request, never lost
                self.results.append((time.monotonic(), None, None))
                self.errors.append(repr(exc))
            else:
                try:
                    body = response.json() if response.status_code == 200 else {}
                except ValueError as exc:  # a 200 that is not the JSON of the contract: a failed request
                    self.results.append((time.monotonic(), None, None))
                    self.errors.append(f"200 with a body that is not JSON: {exc!r}")
                else:
                    if "prediction_id" in body:
                        self.ids.append(body["prediction_id"])
                    self.results.append((time.monotonic(), response.status_code, body.get("model_version")))
            i += 1

    def answered_after(self, moment: float) -> list[tuple[float, int | None, str | None]]:
        return [r for r in self.results if r[0] > moment]

    def assert_every_request_answered(self) -> None:
        """Every request got a 200: none failed (status None) and none got another status."""
        assert self.results, "the load sent no request"
        failed = sum(status is None for _, status, _ in self.results)
        assert failed == 0, f"{failed} of {len(self.results)} requests failed: {sorted(set(self.errors))[:5]}"
        statuses = {status for _, status, _ in self.results}
        assert statuses == {200}, f"statuses other than 200: {statuses}"

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        stopped_early = [t.name for t in self._threads if not t.is_alive()]
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        hung = [t.name for t in self._threads if t.is_alive()]
        if exc_type is None:
            assert not self.crashed, f"load client threads died: {self.crashed}"
            assert not stopped_early, f"load client threads stopped before the load ended: {stopped_early}"
            assert not hung, f"load client threads did not stop within 60 s: {hung}"
