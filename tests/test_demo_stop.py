"""Stopping the demo: Ctrl-C (SIGINT to the terminal's whole foreground process group) stops the
driver and every process it started (tenant workers, the BentoML service and its workers, the
Dagster daemon and its code server, the runs it launched) within 15 s, says so on the terminal,
and leaves a home whose audit chains verify and whose serving manifest agrees with the registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from mlops.core.environment import PROJECT_ROOT, TELEMETRY_OFF
from tests.servers import free_port, wait_until

pytestmark = pytest.mark.timeout(300)
STOP_BUDGET_S = 15.0


class Demo:
    """``mlops demo --headless --small`` in a process group of its own, as a terminal starts it."""

    def __init__(self, home, use_cases: str | None = None):
        self.home = home
        env = {**os.environ, **TELEMETRY_OFF, "PYTHONPATH": str(PROJECT_ROOT)}
        env.pop("MLOPS_HOME", None)
        env.pop("DAGSTER_HOME", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlops.cli", "--home", str(home), "demo", "--headless", "--small",
             "--service-port", str(free_port()), *(["--use-cases", use_cases] if use_cases else [])],
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.home.parent / "demo.out", "w") as copy:  # kept beside the home, for a failure
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                copy.write(f"{time.monotonic():.1f} {line}")
                copy.flush()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def replay_started(self) -> bool:
        """True once a tenant's daily cycle of the replay is running (a run tagged by the driver)."""
        if self.proc.poll() is not None:
            pytest.fail(f"the demo exited early ({self.proc.returncode}):\n{self.output[-4000:]}")
        if not any("service ready" in line for line in self.lines):
            return False
        from dagster import DagsterInstance, RunsFilter

        with DagsterInstance.from_config(str(self.home / "dagster")) as instance:
            return bool(instance.get_run_records(RunsFilter(job_name="daily_cycle",
                                                            tags={"trigger": "demo_replay"}), limit=1))

    def tree(self) -> list[psutil.Process]:
        """The driver and every process below it, including the sessions the demo started."""
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def kill(self) -> None:
        for p in self.tree() if self.proc.poll() is None else []:
            p.kill()


def _assert_stopped_cleanly(demo: Demo, tree: list[psutil.Process], sent_at: float, signal_name: str) -> None:
    try:
        demo.proc.wait(timeout=max(0.1, sent_at + STOP_BUDGET_S - time.monotonic()))
        print(f"{signal_name} sent at {sent_at:.1f}, the driver exited by {time.monotonic():.1f}")
    except subprocess.TimeoutExpired:
        demo.kill()
        pytest.fail(f"the driver still ran {STOP_BUDGET_S:.0f} s after {signal_name}:\n{demo.output[-3000:]}")
    survivors = _survivors(tree, timeout=max(0.1, sent_at + STOP_BUDGET_S - time.monotonic()))
    assert not survivors, f"still running {STOP_BUDGET_S:.0f} s after {signal_name}: {survivors}"
    print(f"{signal_name}: everything stopped within {time.monotonic() - sent_at:.1f} s")
    demo._reader.join(timeout=5)
    output = demo.output
    assert f"stopping ({signal_name})" in output, output[-3000:]
    assert "stopped the tenant workers and" in output, output[-3000:]
    assert "mlops demo --reset" in output
    assert demo.proc.returncode == 130, output[-3000:]
    print("\n".join(line for line in demo.lines[-12:] if not line.startswith(" ")))
    timeline = json.loads((demo.home / "demo_timeline.json").read_text())
    assert timeline[-1]["kind"] == "stopped" and timeline[-1]["detail"] == f"by {signal_name}"


def _assert_home_consistent(home) -> None:
    """Every tenant's audit chain verifies (the CLI) and the manifest serves what the registry names."""
    from click.testing import CliRunner

    from definitions import build_definitions
    from mlops.cli import main
    from mlops.core.serving import read_manifest, serving_dir
    from mlops.demo import demo_tenants

    registry = build_definitions(str(home)).resources["registry"]
    manifest = read_manifest(serving_dir(home))["tenants"]
    for spec in demo_tenants(small=True):
        verified = CliRunner().invoke(main, ["--home", str(home), "verify-audit", spec.name])
        assert verified.exit_code == 0 and "chain intact" in verified.output, verified.output
        entry = manifest[spec.name]
        assert entry["champion"]["version"] == str(registry.alias_version(spec.name, "champion").version)
        challenger = registry.alias_version(spec.name, "challenger")
        served = (entry["challenger"] or entry["champion"])["version"]
        assert challenger is None or str(challenger.version) == served, (spec.name, entry, challenger.version)


def _survivors(tree: list[psutil.Process], timeout: float) -> list[str]:
    """The processes of ``tree`` still running (not zombies) after ``timeout``, named; killed afterwards."""
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    survivors = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in alive if p.is_running()
                 and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    return survivors


def test_ctrl_c_stops_the_demo_and_everything_it_started(tmp_path):
    """Churn alone: fraud adds runs to the same processes (the service, the daemon, the tenant
    workers), not processes of its own, and a build of both use cases doubles the test's time."""
    demo = Demo(tmp_path / "home", use_cases="churn")
    try:
        wait_until(demo.replay_started, "the replay's first daily cycle", timeout_s=240, interval_s=0.2)
        tree = demo.tree()
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "bentoml serve" in names and "dagster-daemon" in names and "multiprocessing" in names, names
        sent_at = time.monotonic()
        os.killpg(demo.proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        _assert_stopped_cleanly(demo, tree, sent_at, "SIGINT")
        assert "stopped the tenant workers and service, daemon in" in demo.output
    finally:
        demo.kill()
    _assert_home_consistent(demo.home)


def test_sigterm_to_the_driver_alone_stops_the_build_and_marks_its_runs_failed(tmp_path):
    """SIGTERM (a CI timeout, ``kill``) to the driver only, while the tenant workers build: the
    workers' runs are interrupted and marked failed in Dagster (never left 'started'), and no worker
    outlives the driver."""
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    demo = Demo(tmp_path / "home")

    def building():
        if demo.proc.poll() is not None:
            pytest.fail(f"the demo exited early ({demo.proc.returncode}):\n{demo.output[-4000:]}")
        if not (demo.home / "dagster" / "dagster.yaml").exists():
            return False
        with DagsterInstance.from_config(str(demo.home / "dagster")) as instance:
            return len(instance.get_run_records(RunsFilter(job_name="churn_pipeline"))) == 2

    try:
        wait_until(building, "both tenants' builds to start", timeout_s=120, interval_s=0.2)
        tree = demo.tree()
        sent_at = time.monotonic()
        os.kill(demo.proc.pid, signal.SIGTERM)
        _assert_stopped_cleanly(demo, tree, sent_at, "SIGTERM")
    finally:
        demo.kill()
    with DagsterInstance.from_config(str(demo.home / "dagster")) as instance:
        runs = instance.get_run_records(RunsFilter(job_name="churn_pipeline"))
        statuses = {r.dagster_run.tags["dagster/partition"]: r.dagster_run.status for r in runs}
    assert set(statuses) == {"acme", "globex"}
    assert all(s in (DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS) for s in statuses.values()), statuses


def test_no_process_outlives_a_killed_driver(tmp_path):
    """kill -9 of the driver (nothing of it runs to stop the others): the kernel signals its
    children (PR_SET_PDEATHSIG): each child's guard (``mlops.process_guard``) ends its process tree,
    and every process the demo started ends within 15 s."""
    demo = Demo(tmp_path / "home", use_cases="churn")
    try:
        wait_until(demo.replay_started, "the replay's first daily cycle", timeout_s=240, interval_s=0.2)
        tree = demo.tree()
        sent_at = time.monotonic()
        os.kill(demo.proc.pid, signal.SIGKILL)
        demo.proc.wait(timeout=10)
        survivors = _survivors(tree[1:], timeout=STOP_BUDGET_S)
        assert not survivors, f"still running {STOP_BUDGET_S:.0f} s after the driver was killed: {survivors}"
        print(f"SIGKILL: every child ended within {time.monotonic() - sent_at:.1f} s")
    finally:
        demo.kill()
