"""Browser test: the real Dagster webserver, on loopback, shows the platform's asset graph.

Starts ``dagster-webserver -w workspace.yaml`` against a temporary MLOPS_HOME and drives the
global asset lineage page in headless Debian chromium (``apt-get install chromium``) through
Playwright. Nothing is materialized: the graph of definitions alone must render.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from mlops.core.environment import TELEMETRY_OFF
from resources.settings import PlatformSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these chromium reaches out to Google hosts that a test machine cannot (and must not)
    # reach.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GROUPS = ["ingestion", "features", "training", "deployment"]
# Asset names short enough that the graph renders them untruncated.
ASSETS = ["raw_accounts", "raw_churn_events", "churn_training_set", "churn_model"]
SERVER_READY_TIMEOUT_S = 120
UI_TIMEOUT_MS = 30_000

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no server log>"


def _require_chromium() -> None:
    # A missing browser is a broken setup, not a reason to skip: CI installs it.
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: install Debian chromium (`apt-get install -y chromium`) "
            "to run the browser tests; CI installs it.",
            pytrace=False,
        )


def _stop(proc: subprocess.Popen) -> None:
    """Stop the webserver and its code-server child: they share the process group we started."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    # The code server may outlive the webserver; take the whole group down regardless.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def dagster_webserver(tmp_path_factory):
    """A running ``dagster-webserver`` over workspace.yaml and a fresh MLOPS_HOME; yields its URL."""
    home = tmp_path_factory.mktemp("ui_mlops_home")
    PlatformSettings(home=str(home)).ensure_home()
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        "MLOPS_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
    }
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = home / "webserver.log"
    executable = Path(sys.executable).with_name("dagster-webserver")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(executable), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"dagster-webserver exited with code {proc.returncode} before it was ready:\n"
                    f"{_tail(log_path)}"
                )
            try:
                with urllib.request.urlopen(f"{base_url}/server_info", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"dagster-webserver not ready on {base_url} after {SERVER_READY_TIMEOUT_S}s:\n"
                    f"{_tail(log_path)}"
                )
            time.sleep(0.5)
        yield {"url": base_url, "log": log_path}
    finally:
        _stop(proc)


@pytest.fixture()
def browser_page(dagster_webserver):
    """A headless Debian-chromium page that can reach only the webserver."""
    _require_chromium()
    from playwright.sync_api import sync_playwright

    base_url = dagster_webserver["url"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            # The UI shows a "Join the Dagster community" dialog on localhost; mark it dismissed so
            # it does not cover the graph.
            context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'));")

            def only_loopback(route):
                if route.request.url.startswith(base_url):
                    route.continue_()
                else:
                    route.abort()

            context.route("**/*", only_loopback)
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def test_asset_graph_shows_groups(request, tmp_path):
    # Checked in the test body, not only in the fixtures, so a missing browser reports as a test
    # failure rather than a setup error.
    _require_chromium()
    dagster_webserver = request.getfixturevalue("dagster_webserver")
    page = request.getfixturevalue("browser_page")
    # Global asset lineage with every group expanded (the same URL the UI builds for "Expand all
    # groups"); group ids are ``global@global:<group>`` on this page.
    expanded = ",".join(f"global@global:{group}" for group in GROUPS)
    page.goto(f"{dagster_webserver['url']}/asset-groups?expanded={quote(expanded)}")

    # The graph is an <svg> whose nodes (group boxes and asset cards) are <foreignObject>s; the
    # sidebar tree repeats the group names outside it, so scope the checks to the graph.
    graph = page.locator("svg foreignObject")
    try:
        for name in GROUPS + ASSETS:
            graph.get_by_text(name, exact=True).first.wait_for(state="visible")
    except Exception as exc:
        page.screenshot(path=str(tmp_path / "asset_graph_failure.png"))
        raise AssertionError(
            f"asset graph did not show {name!r}; page text:\n{page.inner_text('body')[:3000]}\n"
            f"server log:\n{_tail(dagster_webserver['log'])}"
        ) from exc

    assert page.get_by_text("Global asset lineage").first.is_visible()
    for name in GROUPS + ASSETS:
        assert graph.get_by_text(name, exact=True).count() >= 1, name

    shot = tmp_path / "asset_graph.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0
