"""The closed-loop demo: a simulated SaaS world replayed day by day against the running platform.

From an empty MLOPS_HOME it builds every tenant (data, features, a validated champion), starts the
Dagster daemon (sensors, run queue), the Dagster webserver (unless headless) and the BentoML
service, then replays one simulated day at a time:

1. the world moves: each tenant's clock advances one day (``TenantCatalog.set_today``);
2. the tenant's ``daily_cycle`` runs (its schedule in production; here the driver launches it,
   in process, against the same Dagster instance): new data, features, online snapshot, prediction
   log ingestion, NannyML monitoring, shadow comparison, promotion;
3. traffic: every active account of every tenant is scored through the service's HTTP API.

Nothing else is scripted: the decay sensor, the retraining run, the gates, the shadow scoring and
the promotion are the platform acting on its own. The driver only watches and prints a timeline.
A tenant's daily cycle waits while a run of that tenant is in flight (its warehouse admits one
writer), as the run queue's per-tenant limit does for queued runs.

Stopping (Ctrl-C, which a terminal sends to the whole foreground process group, or SIGTERM to the
driver): the driver alone decides. The tenant workers run in sessions of their own, so the
terminal's SIGINT never reaches them; the driver gives the day in flight ``STOP_GRACE_S`` to
complete, then interrupts it (Dagster marks that run failed; every step writes atomically, in one
DuckDB transaction or a temporary file renamed, so nothing is half-written), stops the service, the
daemon and the webserver (SIGTERM to their process groups, then SIGKILL to whatever of their
process trees is left) and says on the terminal what it stopped. Every process the driver starts
also dies with it (``PR_SET_PDEATHSIG``), should the driver itself be killed. The replay always
starts from an empty home: run it again with ``--reset``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from mlops.core.environment import PROJECT_ROOT, HomeLayout, configure_environment, write_atomic
from mlops.core.names import CHALLENGER, CHAMPION
from resources.tenants import TenantSpec

DEMO_START_DAY = 150  # the clock when the platform is first built: 150 days of history
DRIFT_AFTER = 32  # concept drift starts this many simulated days after the build
REPLAY_DAYS = 100  # give up if the loop has not restored performance after this many days
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
SERVICE_WORKERS = 2
# The budget of a stop, 15 s in all: a tenant's daily cycle in flight may complete within
# STOP_GRACE_S; then an interrupted one has STOP_INTERRUPT_S to mark its run failed; the service,
# daemon and webserver, signalled first, have STOP_CHILDREN_S from the signal to exit.
STOP_GRACE_S = 4.0
STOP_INTERRUPT_S = 3.0
STOP_CHILDREN_S = 9.0


def demo_tenants(small: bool = False) -> list[TenantSpec]:
    """The default tenants, with concept drift injected for ``acme`` (or a small pair for tests)."""
    horizon = DEMO_START_DAY + REPLAY_DAYS + 35  # labels of the last day mature within the world
    drift = DEMO_START_DAY + DRIFT_AFTER
    if small:
        return [
            TenantSpec(name="acme", region="eu", n_accounts=900, seed=101, days=horizon,
                       scenario="concept_drift", drift_day=drift, today=DEMO_START_DAY),
            TenantSpec(name="globex", region="us", n_accounts=600, seed=202, days=horizon, today=DEMO_START_DAY),
        ]
    return [
        TenantSpec(name="acme", region="eu", n_accounts=6000, seed=101, days=horizon,
                   scenario="concept_drift", drift_day=drift, today=DEMO_START_DAY),
        TenantSpec(name="globex", region="us", n_accounts=3000, seed=202, days=horizon, today=DEMO_START_DAY),
        TenantSpec(name="initech", region="us", n_accounts=1500, seed=303, days=horizon, today=DEMO_START_DAY),
    ]


def prepare_home(home: str | None, reset: bool) -> Path:
    """The demo replays a world from its first day, so it needs an empty MLOPS_HOME: refuse a used
    one, or (``reset``) delete it when it is recognisably a platform home."""
    import shutil

    root = configure_environment(home)
    if root.exists() and any(root.iterdir()):
        looks_like_home = any((root / name).exists() for name in ("dagster", "regions", "mlflow", "serving"))
        if not reset:
            raise SystemExit(f"error: the demo starts from an empty MLOPS_HOME and {root} is not empty; "
                             "pass --reset to delete it first (make demo does), or use --home <new dir>")
        if not looks_like_home:
            raise SystemExit(f"error: {root} does not look like an MLOPS_HOME; refusing to delete it")
        print(f"deleting {root} (--reset)", flush=True)
        shutil.rmtree(root)
    return root


@dataclasses.dataclass
class Event:
    day: int
    wall_s: float
    tenant: str
    kind: str
    detail: str

    def line(self, start: dt.date) -> str:
        date = start + dt.timedelta(days=self.day)
        return f"day {self.day:3d} {date}  +{self.wall_s:7.1f}s  {self.tenant:8s} {self.kind:22s} {self.detail}"


# --- tenant workers: one process per tenant, so tenants' days run in parallel -------------------
_WORKER: dict = {}


def _worker_init(home: str) -> None:
    import logging
    import warnings

    # A session of its own: the terminal's Ctrl-C (SIGINT to the foreground group) reaches the
    # driver only, which decides how the day in flight ends (SIGINT from the driver interrupts a
    # Dagster run cleanly: the run is marked failed). Should the driver die without stopping it
    # (kill -9), the kernel sends SIGUSR1: the worker interrupts its run the same way and exits
    # within STOP_INTERRUPT_S (it would otherwise wait on its task queue forever). Not SIGTERM:
    # Dagster's in-process execution maps SIGTERM to its SIGINT handler.
    os.setsid()
    signal.signal(signal.SIGUSR1, _worker_orphaned)
    _die_with_parent(signal.SIGUSR1)

    from dagster import BetaWarning, DagsterInstance, PreviewWarning

    warnings.filterwarnings("ignore", category=BetaWarning)
    warnings.filterwarnings("ignore", category=PreviewWarning)
    warnings.filterwarnings("ignore", module="nannyml")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    from definitions import build_definitions

    defs = build_definitions(home)
    _WORKER.update(defs=defs, instance=DagsterInstance.from_config(str(defs.resources["settings"].dagster_home)))


def _worker_orphaned(signum, frame) -> None:
    import threading

    threading.Timer(STOP_INTERRUPT_S, os._exit, args=(1,)).start()
    os.kill(os.getpid(), signal.SIGINT)


def _worker_build(tenant: str) -> dict:
    defs, instance = _WORKER["defs"], _WORKER["instance"]
    result = defs.resolve_job_def("churn_pipeline").execute_in_process(
        instance=instance, partition_key=tenant, raise_on_error=False, run_config=_quiet(),
        tags={"trigger": "demo_build"})
    if not result.success:
        raise RuntimeError(f"the initial build of {tenant} failed (run {result.run_id})")
    version = defs.resources["registry"].alias_version(tenant, CHAMPION).version
    return {"events": [("built", f"champion v{version} trained, gated and published")]}


def _worker_day(tenant: str, day: int) -> dict:
    """One tenant's daily cycle for one simulated day; returns what the timeline should show."""
    defs, instance = _WORKER["defs"], _WORKER["instance"]
    defs.resources["catalog"].set_today(tenant, day)
    deadline = time.monotonic() + 600
    # The tenant's warehouse admits one writer: wait for its runs in flight (a retrain, say).
    while _in_flight(instance, tenant):
        if time.monotonic() > deadline:
            raise RuntimeError(f"runs of {tenant} still in flight after 600 s")
        time.sleep(0.5)
    result = defs.resolve_job_def("daily_cycle").execute_in_process(
        instance=instance, partition_key=tenant, raise_on_error=False, run_config=_quiet(),
        tags={"trigger": "demo_replay", "simulated_day": str(day)})
    failed = [e.step_key for e in result.all_events if e.is_step_failure]
    # A challenger failing the blocking promotion gate fails that step by design: it is retired.
    if not result.success and failed != ["shadow_comparison"]:
        raise RuntimeError(f"daily_cycle of {tenant} failed on day {day} in steps {failed} (run {result.run_id})")
    events, promoted, alerted, restored = [], False, False, False
    for event in result.all_events:
        if not event.is_step_materialization:
            continue
        mat = event.step_materialization_data.materialization
        meta = {k: v.value for k, v in mat.metadata.items()}
        key = mat.asset_key.to_user_string()
        if key == "model_monitoring" and meta.get("decay_alert"):
            alerted = True
            action, episode = meta.get("loop_action"), meta.get("loop_episode")
            # The timeline shows an episode's first alert (the others come daily) and what the loop did.
            for alert in meta.get("decay_alerts", [])[:1]:
                events.append(("decay alert", f"{alert['metric']} {alert['value']:.3f} < {alert['threshold']:.3f} "
                                              f"(chunk {alert['chunk']}, v{meta['model_version']}); episode {episode}",
                               f"alert:{episode}"))
            if action in ("retrain", "escalate"):
                events.append((f"loop: {action}", meta.get("loop_reason", "")))
            elif action == "hold" and "first retrain" in meta.get("loop_reason", ""):
                events.append(("loop: hold", meta.get("loop_reason", "").split(":")[0], f"hold:{episode}"))
        if key == "model_monitoring" and meta.get("loop_restored_episode"):
            events.append(("restored", f"episode {meta['loop_restored_episode']}: realized "
                                       f"{meta.get('realized_roc_auc', float('nan')):.3f} >= floor "
                                       f"{meta.get('decay_floor', float('nan')):.3f} (v{meta['model_version']})"))
            restored = True
        elif key == "shadow_comparison" and meta.get("decision") in ("promote", "retire"):
            events.append((f"shadow: {meta['decision']}", str(meta.get("reason"))))
        elif key == "champion_promotion" and meta.get("promoted"):
            events.append(("promoted", f"champion v{meta['from_version']} -> v{meta['to_version']}"))
            promoted = True
    outcome = {"events": events, "promoted": promoted, "restored": restored}
    if alerted:  # the storage id the decay sensor's cursor must pass before the day goes on
        from dagster import AssetKey, AssetRecordsFilter

        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("model_monitoring"), asset_partitions=[tenant]),
            limit=1, ascending=False).records
        outcome["alert_storage_id"] = records[0].storage_id
    return outcome


def _in_flight(instance, tenant: str) -> bool:
    from dagster import DagsterRunStatus, RunsFilter

    statuses = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
                DagsterRunStatus.STARTED]
    return bool(instance.get_run_records(RunsFilter(tags={"dagster/partition": tenant}, statuses=statuses), limit=1))


class ClosedLoopDemo:
    def __init__(self, home: str | None, *, headless: bool, small: bool, service_port: int = 3001,
                 ui_port: int = 3000, max_days: int = REPLAY_DAYS, stop_after_promotion_days: int = 1,
                 until_restored: bool = True):
        self.root = configure_environment(home)
        self.headless, self.small = headless, small
        self.service_url = f"http://127.0.0.1:{service_port}"
        self.service_port, self.ui_port = service_port, ui_port
        self.max_days = max_days
        self.stop_after_promotion_days = stop_after_promotion_days
        # Run until the episode is restored (realized performance back above the floor), or stop
        # ``stop_after_promotion_days`` after the first promotion.
        self.until_restored = until_restored
        self.events: list[Event] = []
        self.processes: list[subprocess.Popen] = []
        self.process_names: dict[int, str] = {}
        self.in_flight: dict = {}
        self.t0 = time.monotonic()
        self.day = DEMO_START_DAY
        self.keys: dict[str, str] = {}
        self.seen_runs: set[str] = set()
        self.shown: set[tuple[str, str]] = set()

    # --- timeline -------------------------------------------------------------------------------
    def emit(self, tenant: str, kind: str, detail: str) -> None:
        from usecases.churn.simulator import SIMULATION_START

        event = Event(self.day, time.monotonic() - self.t0, tenant, kind, detail)
        self.events.append(event)
        print(event.line(SIMULATION_START), flush=True)

    def timeline_json(self) -> list[dict]:
        return [dataclasses.asdict(e) for e in self.events]

    # --- set-up ---------------------------------------------------------------------------------
    def build(self) -> None:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        from dagster import DagsterInstance

        from definitions import build_definitions
        from mlops.core.serving import ApiKeyStore, serving_dir

        self.defs = build_definitions(str(self.root))
        settings, catalog, registry = (self.defs.resources[k] for k in ("settings", "catalog", "registry"))
        self.settings, self.catalog, self.registry = settings, catalog, registry
        settings.ensure_home()
        registry.ensure_experiment()
        for spec in demo_tenants(self.small):
            catalog.add(spec)
        self.tenants = [s.name for s in demo_tenants(self.small)]
        self.instance = DagsterInstance.from_config(str(settings.dagster_home))
        existing = set(self.instance.get_dynamic_partitions("tenant"))
        self.instance.add_dynamic_partitions("tenant", [t for t in self.tenants if t not in existing])
        # One worker per tenant (spawned: no forked Dagster or MLflow state); at most one per core.
        workers = max(1, min(len(self.tenants), os.cpu_count() or 1))
        self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                        initargs=(str(self.root),))
        self.for_each_tenant(_worker_build)
        store = ApiKeyStore(serving_dir(settings.root))
        store.path.parent.mkdir(parents=True, exist_ok=True)
        self.keys = {t: store.create(t) for t in self.tenants}

    def for_each_tenant(self, fn, *args) -> None:
        """Run ``fn(tenant, *args)`` for every tenant in the workers and put its events on the timeline."""
        futures = {t: self.pool.submit(fn, t, *args) for t in self.tenants}
        self.in_flight = futures
        for tenant, future in futures.items():
            outcome = future.result()
            for kind, detail, *once in outcome["events"]:
                if once and (tenant, once[0]) in self.shown:
                    continue  # shown once per episode (an alert comes every day the decay lasts)
                self.shown.update((tenant, key) for key in once)
                self.emit(tenant, kind, detail)
                if kind == "decay alert":
                    self.first_alert.setdefault(tenant, time.monotonic())
            if outcome.get("promoted"):
                self.promoted_on = self.promoted_on or self.day
                self.promoted_tenants.append(tenant)
            if outcome.get("restored"):
                self.restored_on = self.restored_on or self.day
            if "alert_storage_id" in outcome:
                self.pending_alerts[tenant] = outcome["alert_storage_id"]

    # --- waiting on observable state: what the platform sees must not depend on timing ----------
    def settle_automation(self, timeout: float = 600.0) -> None:
        """Until the decay sensor has handled today's alerts (its cursor is past their monitoring
        materializations) and the runs it launched for those tenants have finished: a retrain then
        always trains on the day it was triggered, and its challenger shadows that day's traffic."""
        if not self.pending_alerts:
            return
        newest = max(self.pending_alerts.values())
        deadline = time.monotonic() + timeout
        while _sensor_cursor(self.instance, "decay_retrain_sensor") < newest:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the decay sensor did not handle alert {newest} within {timeout:.0f} s")
            time.sleep(0.25)
        self.watch_runs()
        for tenant in self.pending_alerts:
            while _in_flight(self.instance, tenant):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"runs of {tenant} still in flight after {timeout:.0f} s")
                time.sleep(0.5)
        self.pending_alerts.clear()

    def wait_until_served(self, timeout: float = 60.0) -> None:
        """Until every service worker serves what the manifest says for every tenant (today's
        snapshot, its champion and challenger), read from the workers' status files: today's
        traffic is then scored from today's features on every run alike."""
        from mlops.core.monitoring import worker_statuses
        from mlops.core.serving import read_manifest, serving_dir

        entries = read_manifest(serving_dir(self.root))["tenants"]
        want = {t: _served_entry(entries[t]) for t in self.tenants}
        deadline = time.monotonic() + timeout
        while True:
            workers = worker_statuses(self.root, fresh_within_s=10.0)
            served = [w.get("serving", {}).get("churn", {}) for w in workers]
            if len(workers) >= SERVICE_WORKERS and all(s.get(t) == v for s in served for t, v in want.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service workers did not load the manifest within {timeout:.0f} s: "
                                   f"want {want}, workers serve {served}")
            time.sleep(0.1)

    def wait_for_log(self, sent: dict[str, int], timeout: float = 60.0) -> None:
        """Until the service has written every prediction of today's traffic, and its shadow score,
        to closed log segments: tomorrow's ingestion then sees the whole day, on every run alike."""
        import pyarrow.parquet as pq

        from mlops.core.serving import prediction_log_dir, read_manifest, serving_dir

        entries = read_manifest(serving_dir(self.root))["tenants"]
        deadline = time.monotonic() + timeout
        for tenant, n in sent.items():
            expected = {CHAMPION: n}
            if _served_entry(entries[tenant])["challenger"] is not None:
                expected[CHALLENGER] = n
            folder = prediction_log_dir(self.root, tenant) / "closed"
            counted: dict[str, dict[str, int]] = {}
            while True:
                for path in sorted(folder.glob("segment-*.parquet")):
                    if path.name not in counted:
                        roles = pq.read_table(path, columns=["role"]).column("role").to_pylist()
                        counted[path.name] = {r: roles.count(r) for r in set(roles)}
                totals = {role: sum(c.get(role, 0) for c in counted.values()) for role in expected}
                if all(totals[role] >= want for role, want in expected.items()):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{tenant}: the service logged {totals} of today's {expected} predictions "
                                       f"within {timeout:.0f} s")
                time.sleep(0.1)

    def start_processes(self) -> None:
        env = {**os.environ, "MLOPS_HOME": str(self.root), "DAGSTER_HOME": str(self.settings.dagster_home),
               # The demo's traffic is one batch per tenant and day: shadow every batch, not a sample.
               "CHURN_SHADOW_BATCH_SAMPLE": "1", "CHURN_SERVICE_WORKERS": str(SERVICE_WORKERS)}
        logs = HomeLayout(self.root).logs_dir
        logs.mkdir(exist_ok=True)
        bin_dir = Path(sys.executable).parent

        def spawn(name: str, argv: list[str]) -> None:
            out = (logs / f"{name}.log").open("ab")
            # A process group of its own (the driver stops it as a whole), and SIGTERM to it should
            # the driver die without stopping it (SIGKILL, say).
            self.processes.append(subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True,
                                                   preexec_fn=_child_dies_with(os.getpid())))
            self.process_names[self.processes[-1].pid] = name

        spawn("service", [sys.executable, "-m", "bentoml", "serve", "bentos.service:ChurnService",
                          "--host", "127.0.0.1", "--port", str(self.service_port)])
        spawn("daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", "workspace.yaml"])
        if not self.headless:
            spawn("webserver", [str(bin_dir / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
                                "-p", str(self.ui_port)])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.service_url}/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            for proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[1:3]} exited early; see {logs}")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the service did not become ready; see {logs / 'service.log'}")
        self.emit("-", "service ready", self.service_url + ("" if self.headless else
                                                             f"; Dagster UI http://127.0.0.1:{self.ui_port}"))

    def signal_processes(self) -> None:
        """SIGTERM to each child's process group; remembers their process trees (a BentoML worker,
        say, lives in a session of its own) for ``stop_processes``."""
        self.process_trees = {proc.pid: _descendants(proc.pid) for proc in self.processes}
        for proc in self.processes:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)

    def stop_processes(self, deadline: float) -> list[str]:
        """Wait for the signalled children until ``deadline``, then SIGKILL their groups and
        whatever is left of their process trees; returns the names of what was stopped."""
        if not hasattr(self, "process_trees"):
            self.signal_processes()
        stopped = []
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            stopped.append(self.process_names.get(proc.pid, str(proc.args[1:3])))
        _kill_leftovers([pid for tree in self.process_trees.values() for pid in tree], deadline)
        self.processes.clear()
        return stopped

    def stop_workers(self) -> str | None:
        """Stop the tenant workers: the day in flight gets ``STOP_GRACE_S`` to complete, then it is
        interrupted (SIGINT: Dagster marks its run failed), then the workers are killed. Returns
        what happened to the day in flight, for the terminal."""
        pool = getattr(self, "pool", None)
        if pool is None:
            return None
        workers = list(getattr(pool, "_processes", {}).values())
        pending = {t: f for t, f in getattr(self, "in_flight", {}).items() if not f.done()}
        for future in pending.values():
            future.cancel()  # not started yet: never starts
        running = {t: f for t, f in pending.items() if not f.cancelled()}
        deadline = time.monotonic() + STOP_GRACE_S
        while running and not all(f.done() for f in running.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        completed = [t for t, f in running.items() if f.done() and f.exception() is None]
        interrupted = [t for t, f in running.items() if t not in completed]
        if interrupted:
            for worker in workers:
                _signal(worker.pid, signal.SIGINT)
            deadline = time.monotonic() + STOP_INTERRUPT_S
            while not all(f.done() for t, f in running.items() if t in interrupted) and time.monotonic() < deadline:
                time.sleep(0.1)
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:  # their sessions too: Dagster's log capture processes
            _signal_group(worker.pid, signal.SIGKILL)
            _signal(worker.pid, signal.SIGKILL)
        for worker in workers:
            worker.join(timeout=5)
        self.pool = None
        self.fail_orphaned_runs()
        if not running:
            return None
        parts = []
        if completed:
            parts.append(f"{', '.join(completed)} completed the day")
        if interrupted:
            parts.append(f"{', '.join(interrupted)} interrupted (its run is marked failed in Dagster; every step "
                         "writes atomically, so nothing is half-written)")
        return f"day {self.day}: " + "; ".join(parts)

    def fail_orphaned_runs(self) -> None:
        """A worker killed in the middle of a step (one that did not reach a point where Dagster
        takes the interrupt) leaves its run 'started': mark it failed, as Dagster would have."""
        from dagster import DagsterRunStatus, RunsFilter

        instance = getattr(self, "instance", None)
        if instance is None:
            return
        unfinished = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
        for trigger in ("demo_build", "demo_replay"):
            for record in instance.get_run_records(RunsFilter(tags={"trigger": trigger}, statuses=unfinished)):
                instance.report_run_failed(record.dagster_run, "the demo was stopped and killed this run's tenant "
                                                               "worker mid-step; every step writes atomically")

    def stop(self, signal_name: str | None) -> None:
        """Stop everything this demo started, saying so on the terminal when a signal asked."""
        start = time.monotonic()
        if signal_name:
            print(f"\nstopping ({signal_name}): the day in flight gets {STOP_GRACE_S:.0f} s to complete, then "
                  "everything this demo started is stopped", flush=True)
        self.signal_processes()  # they stop while the day in flight ends
        day = self.stop_workers()
        stopped = self.stop_processes(deadline=start + STOP_CHILDREN_S)
        if signal_name:
            if day:
                print(day, flush=True)
            what = ", ".join(stopped) if stopped else "no server had started"
            print(f"stopped the tenant workers and {what} in {time.monotonic() - start:.1f} s. {self.root} is "
                  f"consistent (mlops verify-audit <tenant>); the replay starts from an empty home: "
                  f"mlops demo --reset", flush=True)

    # --- one simulated day ----------------------------------------------------------------------
    def active_accounts(self, tenant: str) -> list[str]:
        """The tenant's live customers (signed up, not churned by today) in the snapshot the service
        serves: the accounts its product would score today (``mlops.loop_replay.live_accounts``)."""
        import pandas as pd

        from mlops.core.serving import read_manifest, serving_dir
        from mlops.loop_replay import live_accounts
        from usecases.churn.simulator import simulate_tenant

        entry = read_manifest(serving_dir(self.root))["tenants"][tenant]
        snapshot = pd.read_parquet(serving_dir(self.root) / entry["snapshot"]["file"], columns=["account_id"])
        spec = next(s for s in demo_tenants(self.small) if s.name == tenant)
        churn = simulate_tenant(dataclasses.replace(spec, today=self.day))["raw_churn_events"]
        return live_accounts(snapshot, churn, self.day)

    def traffic(self, tenant: str) -> int:
        """Score every active account of the tenant, in batches of 1,000."""
        accounts = self.active_accounts(tenant)
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        for i in range(0, len(accounts), 1000):
            payload = {"tenant": tenant, "account_ids": accounts[i:i + 1000]}
            response = requests.post(f"{self.service_url}/v1/predict_batch", headers=headers, timeout=60,
                                     json=payload)
            response.raise_for_status()
        return len(accounts)

    def confirm_promotions(self) -> None:
        """After a promotion, wait until the service answers with the new champion."""
        while self.promoted_tenants:
            tenant = self.promoted_tenants.pop()
            expected = str(self.registry.alias_version(tenant, CHAMPION).version)
            account = self.active_accounts(tenant)[0]
            deadline = time.monotonic() + 30
            while (version := self.serving_version(tenant, account)) != expected and time.monotonic() < deadline:
                time.sleep(0.1)
            since = time.monotonic() - self.first_alert.get(tenant, time.monotonic())
            self.emit(tenant, "new champion serving", f"v{version} answers; {since:.1f}s after the first decay alert")
            self.alert_to_serving_s = since

    def serving_version(self, tenant: str, account: str) -> str:
        """The model version the running service answers with for one account."""
        response = requests.post(f"{self.service_url}/v1/predict", timeout=10,
                                 headers={"Authorization": f"Bearer {self.keys[tenant]}"},
                                 json={"tenant": tenant, "account_id": account})
        response.raise_for_status()
        return str(response.json()["model_version"])

    def watch_runs(self) -> None:
        """Report runs the platform launched on its own (the decay sensor's retraining)."""
        from dagster import RunsFilter

        for record in self.instance.get_run_records(RunsFilter(job_name="churn_retrain"), limit=50):
            run = record.dagster_run
            tenant = run.tags.get("dagster/partition", "?")
            trigger = run.tags.get("trigger", "manual")
            if run.run_id not in self.seen_runs:
                self.seen_runs.add(run.run_id)
                self.emit(tenant, "retrain launched", f"by {trigger} (run {run.run_id[:8]})")
            if run.status.value not in FINISHED or f"{run.run_id}:done" in self.seen_runs:
                continue
            self.seen_runs.add(f"{run.run_id}:done")
            if run.status.value == "SUCCESS":
                challenger = self.registry.alias_version(tenant, CHALLENGER)
                self.emit(tenant, "retrain succeeded", f"gates passed; challenger v{challenger.version} "
                                                       "published to shadow" if challenger else "no challenger")
                self.retrained[tenant] = self.retrained.get(tenant, 0) + 1
            else:
                self.emit(tenant, f"retrain {run.status.value.lower()}", f"run {run.run_id[:8]}")

    # --- the replay -----------------------------------------------------------------------------
    def run(self) -> int:
        from usecases.churn.simulator import SIMULATION_START

        self.promoted_on: int | None = None
        self.restored_on: int | None = None
        self.retrained: dict[str, int] = {}
        self.first_alert: dict[str, float] = {}
        self.promoted_tenants: list[str] = []
        self.pending_alerts: dict[str, int] = {}
        drifted = [s for s in demo_tenants(self.small) if s.scenario != "none"]
        print(f"MLOPS_HOME {self.root}; concept drift for "
              f"{', '.join(f'{s.name} from day {s.drift_day} ({SIMULATION_START + dt.timedelta(days=s.drift_day)})' for s in drifted)}",
              flush=True)
        # Ctrl-C, SIGTERM (a CI timeout, kill) and a closed terminal all stop every process this demo
        # started; a second signal while stopping does not cut the stop short.
        stopper = _Stopper()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, stopper)
        try:
            self.build()
            self.start_processes()
            for day in range(DEMO_START_DAY, DEMO_START_DAY + self.max_days):
                self.day = day
                self.for_each_tenant(_worker_day, day)
                self.settle_automation()
                self.watch_runs()
                self.confirm_promotions()
                self.wait_until_served()
                scored = {t: self.traffic(t) for t in self.tenants}
                if self.day % 7 == 0:
                    self.emit("-", "traffic", ", ".join(f"{t}: {n} accounts scored" for t, n in scored.items()))
                self.wait_for_log(scored)
                if self.restored_on is not None or (self.promoted_on is not None and not self.until_restored
                                                    and self.day >= self.promoted_on + self.stop_after_promotion_days - 1):
                    break
            for tenant in self.tenants:
                self.emit(tenant, "serving", f"model v{self.serving_version(tenant, self.active_accounts(tenant)[0])}")
            closed = self.restored_on is not None or (self.promoted_on is not None and not self.until_restored)
            outcome = ("performance restored" if self.restored_on is not None else "promoted") if closed else "NOT closed"
            self.emit("-", f"loop {'closed' if closed else 'NOT closed'}",
                      f"{outcome}; {sum(self.retrained.values())} retrain(s); wall {time.monotonic() - self.t0:.0f}s")
            (self.root / "demo_timeline.json").write_text(json.dumps(self.timeline_json(), indent=2))
            if not self.headless and closed:
                print(f"\nThe Dagster UI stays up at http://127.0.0.1:{self.ui_port} and the service at "
                      f"{self.service_url}. Ctrl-C stops everything.", flush=True)
                while True:
                    time.sleep(3600)
            return 0 if closed else 1
        except KeyboardInterrupt:
            return 0 if self.restored_on is not None or self.promoted_on is not None else 130
        finally:
            stopper.stopping = True
            self.stop(stopper.received)
            if stopper.received:
                self.emit("-", "stopped", f"by {stopper.received}")
                write_atomic(self.root / "demo_timeline.json", json.dumps(self.timeline_json(), indent=2).encode())


def _served_entry(entry: dict) -> dict:
    """What a worker's status reports for a tenant it serves from this manifest entry."""
    champion = str(entry[CHAMPION]["version"])
    challenger = str(entry[CHALLENGER]["version"]) if entry.get(CHALLENGER) else None
    return {"champion": champion, "challenger": None if challenger == champion else challenger,
            "snapshot_version": int(entry["snapshot"]["version"])}


def _sensor_cursor(instance, name: str) -> int:
    """The storage id an asset sensor's cursor has reached (-1 before its first tick)."""
    for state in instance.all_instigator_state():
        if state.name == name and state.instigator_data is not None:
            cursor = getattr(state.instigator_data, "cursor", None)
            return int(cursor) if cursor and str(cursor).isdigit() else -1
    return -1


class _Stopper:
    """The driver's handler of SIGINT, SIGTERM and SIGHUP: the first raises ``KeyboardInterrupt``
    (the replay unwinds to its ``finally``, which stops everything); later ones are noted only."""

    def __init__(self):
        self.received: str | None = None
        self.stopping = False

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received or self.stopping:
            print(f"({name}: already stopping)", flush=True)
            return
        self.received = name
        raise KeyboardInterrupt


def _prctl():
    """libc's ``prctl`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


_PR_SET_PDEATHSIG = 1


def _die_with_parent(signum: int) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux)."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def _child_dies_with(parent: int):
    """A ``preexec_fn``: SIGTERM to the child when ``parent`` (the driver) dies, even by SIGKILL.
    libc is looked up here, before the fork: the child only calls it."""
    prctl = _prctl()

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the driver died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _kill_leftovers(pids: list[int], deadline: float) -> None:
    """SIGKILL the processes of ``pids`` still alive at ``deadline`` (ids checked against their
    start, so a reused id is never hit)."""
    starts = {pid: _start_time(pid) for pid in pids}
    alive = [pid for pid, started in starts.items() if started is not None]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _start_time(pid) == starts[pid]]
    for pid in alive:
        if _start_time(pid) == starts[pid]:
            _signal(pid, signal.SIGKILL)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (None when gone or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _quiet() -> dict:
    return {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
