"""A real ``bentoml serve`` process for tests: started on a free port against a home, ready when it
answers /readyz, stopped (SIGTERM, then whatever is left killed) when the block ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
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
