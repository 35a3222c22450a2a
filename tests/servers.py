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
        yield {"url": url, "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        _, alive = psutil.wait_procs(tree, timeout=10)
        for leftover in alive:
            leftover.kill()


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
    (monotonic time, HTTP status, model_version), and an exception as status None: a failed request."""

    def __init__(self, url: str, headers: dict, body, threads: int = 3):
        self.url, self.headers, self.body = url, headers, body
        self.results: list[tuple[float, int | None, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        session, i = requests.Session(), 0
        while not self._stop.is_set():
            try:
                response = session.post(self.url, json=self.body(i), headers=self.headers, timeout=30)
                self.results.append((time.monotonic(), response.status_code, response.json().get("model_version")))
            except Exception:  # counted as a failed request, never lost
                self.results.append((time.monotonic(), None, None))
            i += 1

    def answered_after(self, moment: float) -> list[tuple[float, int | None, str | None]]:
        return [r for r in self.results if r[0] > moment]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
