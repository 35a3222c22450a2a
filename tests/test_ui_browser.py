"""Browser test: the real Dagster webserver, on loopback, shows the platform's asset graph.

Starts ``dagster-webserver -w workspace.yaml`` against a temporary MLOPS_HOME with one tenant
partition and drives the UI in headless Debian chromium (``apt-get install chromium``) through
Playwright. Nothing is materialized: the graph of definitions alone must render. What the pages must
show is derived from the platform's ``Definitions`` (every asset group and every asset node of the
global lineage, every sensor and schedule, a sensor's target, monitored asset and running status,
the tenant partition), not written down here.
"""

from __future__ import annotations

import contextlib
import os
import re
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
UI_TENANT = "uitenant"
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
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home / "dagster")) as instance:
        instance.add_dynamic_partitions("tenant", [UI_TENANT])
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
        # what the pages must show, read while the server starts
        expected = _expected(home)
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
        yield {"url": base_url, "log": log_path, "home": home, "expected": expected}
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


def _expected(home: Path) -> dict:
    """What the UI must show, from the platform's Definitions over the server's home: asset keys by
    group, sensors (target job, monitored asset, default status) and schedules."""
    saved = dict(os.environ)  # build_definitions points this process's variables at its home
    try:
        from definitions import build_definitions

        defs = build_definitions(str(home))
        graph = defs.resolve_asset_graph()
        groups: dict[str, list[list[str]]] = {}
        for key in graph.get_all_asset_keys():
            groups.setdefault(graph.get(key).group_name, []).append(list(key.path))
        sensors = {s.name: {"job": s.job_name if s.has_jobs else None, "running": s.default_status.value == "RUNNING",
                            "asset": getattr(s, "asset_key", None) and s.asset_key.to_user_string()}
                   for s in defs.sensors}
        return {"groups": groups, "sensors": sensors, "schedules": sorted(s.name for s in defs.schedules)}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _shows(displayed: str, name: str) -> bool:
    """The graph shows an asset by the last part of its key, middle-truncated with an ellipsis when
    the node is too narrow for it (``raw_ac…_attributes``)."""
    if displayed == name:
        return True
    head, sep, tail = displayed.partition("…")
    return bool(sep) and len(head) + len(tail) < len(name) and name.startswith(head) and name.endswith(tail)


def _unmatched(displayed: list[str], names: list[str]) -> tuple[list[str], list[str]]:
    """Pair each expected name with a node showing it (exact ones first); what is left on each side."""
    left = list(displayed)
    missing = []
    for name in sorted(names, key=lambda n: n not in left):
        match = next((d for d in left if d == name), None) or next((d for d in left if _shows(d, name)), None)
        if match is None:
            missing.append(name)
        else:
            left.remove(match)
    return missing, left


def _field(text: str, label: str) -> str | None:
    """The value a detail page shows next to ``label`` (an asset key as the UI writes it, ``a / b``,
    in the key's own ``a/b`` form)."""
    found = re.search(rf"^{re.escape(label)}\t\s*(\S.*)$", text, re.M)
    return found.group(1).strip().replace(" / ", "/") if found else None


def _fail_with_page(page, server, tmp_path, what: str, exc: Exception | None = None):
    page.screenshot(path=str(tmp_path / "ui_failure.png"))
    raise AssertionError(f"{what}; page text:\n{page.inner_text('body')[:3000]}\n"
                         f"server log:\n{_tail(server['log'])}") from exc


def test_ui_shows_every_group_asset_sensor_and_the_tenant_partition(request, tmp_path):
    # Checked in the test body, not only in the fixtures, so a missing browser reports as a test
    # failure rather than a setup error.
    _require_chromium()
    server = request.getfixturevalue("dagster_webserver")
    page = request.getfixturevalue("browser_page")
    expected = server["expected"]
    groups = expected["groups"]
    assert {"ingestion", "features", "training", "deployment", "monitoring", "reports"} <= set(groups)

    # Global asset lineage with every group expanded (the same URL the UI builds for "Expand all
    # groups"); group ids are ``global@global:<group>`` on this page.
    expanded = ",".join(f"global@global:{group}" for group in sorted(groups))
    page.goto(f"{server['url']}/asset-groups?expanded={quote(expanded)}")
    # The graph is an <svg> whose nodes (group boxes and asset cards) are <foreignObject>s; the
    # sidebar tree repeats the group names outside it, so scope the checks to the graph.
    graph = page.locator("svg foreignObject")
    names = [path[-1] for keys in groups.values() for path in keys]
    nodes = graph.locator('[class*="AssetNode_assetName"]')
    try:
        for group in groups:
            graph.get_by_text(group, exact=True).first.wait_for(state="visible")
        page.wait_for_function("n => document.querySelectorAll('svg foreignObject [class*=\"AssetNode_assetName\"]')"
                               ".length >= n", arg=len(names))
    except Exception as exc:
        _fail_with_page(page, server, tmp_path, "the asset graph did not show every group and asset", exc)
    assert page.get_by_text("Global asset lineage").first.is_visible()
    # every asset of every group is a node of the graph, and the graph has no node the platform lacks
    missing, extra = _unmatched([t.strip() for t in nodes.all_text_contents()], names)
    assert (missing, extra) == ([], []), f"graph nodes: missing {missing}, not in the definitions {extra}"

    # Every sensor and schedule is listed; the decay sensor's page shows its target, the asset it
    # watches and that it is running (its default status), as the definitions say.
    page.goto(f"{server['url']}/automation")
    try:
        for name in [*expected["sensors"], *expected["schedules"]]:
            page.get_by_text(name, exact=True).first.wait_for(state="visible")
    except Exception as exc:
        _fail_with_page(page, server, tmp_path, "the automation page did not list every sensor and schedule", exc)
    for name, sensor in expected["sensors"].items():
        if sensor["asset"] is None:
            continue
        page.goto(f"{server['url']}/locations/definitions/sensors/{name}")
        try:
            page.get_by_text("Monitored assets").first.wait_for(state="visible")
        except Exception as exc:
            _fail_with_page(page, server, tmp_path, f"the page of sensor {name} did not render", exc)
        text = page.inner_text("body")
        fields = text[text.index("Latest tick"):text.index("Cursor")]
        shown = {"target": _field(fields, "Target"), "asset": _field(fields, "Monitored assets")}
        assert shown == {"target": sensor["job"], "asset": sensor["asset"]}, fields
        assert ("\nRunning\n" in fields) == sensor["running"], fields

    # The tenant is a partition of the per-tenant assets.
    page.goto(f"{server['url']}/assets/raw_accounts?view=partitions")
    try:
        page.get_by_text(UI_TENANT, exact=True).first.wait_for(state="visible")
    except Exception as exc:
        _fail_with_page(page, server, tmp_path, f"the partitions of raw_accounts did not show {UI_TENANT}", exc)
