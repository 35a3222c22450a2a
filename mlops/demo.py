"""The closed-loop demo: a simulated SaaS world replayed day by day against the running platform.

From an empty MLOPS_HOME it builds every tenant (data, features, a validated champion), starts the
Dagster daemon (sensors, run queue), the Dagster webserver (unless headless) and the BentoML
service, then replays one simulated day at a time:

1. the world moves: each tenant's clock advances one day (``TenantCatalog.set_today``);
2. each use case's daily cycle runs for every tenant (churn's ``daily_cycle``, then
   ``fraud_daily_cycle`` with ``--use-cases churn,fraud``; their schedules in production, here
   the driver launches them, in process, against the same Dagster instance): new data, features,
   online snapshot, prediction log ingestion, NannyML monitoring, shadow comparison, promotion;
3. traffic through the service's HTTP API: every live customer of every tenant is scored for churn
   (``/v1/predict_batch``) and every payment the tenant's customers settle that day for fraud
   (``/v1/fraud/predict_batch``: the payment's fields, joined to its account's online aggregates).

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
from mlops.core.names import CHALLENGER, CHAMPION, CHURN
from mlops.process_guard import child_dies_with, descendants, die_with_parent, kill_leftovers
from resources.tenants import TenantSpec

DEMO_START_DAY = 150  # the clock when the platform is first built: 150 days of history
DRIFT_AFTER = 32  # concept drift starts this many simulated days after the build
REPLAY_DAYS = 120  # give up if the loop has not restored performance after this many days
# The simulated world's horizon (its days shape every random draw, so it is fixed, not derived from
# --max-days): the labels of the last replayed day mature within it (fraud's 14-day realized labels
# for a replay of REPLAY_DAYS; churn's 30-day ones up to day 255).
WORLD_DAYS = DEMO_START_DAY + 135
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
SERVICE_WORKERS = 2
# The budget of a stop, 15 s in all: a tenant's daily cycle in flight may complete within
# STOP_GRACE_S; then an interrupted one has STOP_INTERRUPT_S to mark its run failed; the service,
# daemon and webserver, signalled first, have STOP_CHILDREN_S from the signal to exit.
STOP_GRACE_S = 4.0
STOP_INTERRUPT_S = 3.0
STOP_CHILDREN_S = 9.0
# A child's guard kills what is left of it this long after a stop request (before the driver's
# STOP_CHILDREN_S, and the only bound when the driver was killed outright).
GUARD_GRACE_S = 7.0
# The use cases the demo can build and replay (it simulates their traffic), and those it does by
# default (``--use-cases``): every one is scored, monitored and retrained by the platform, and the
# drifted tenant's drift hits each of them.
DEMO_USE_CASES = ("churn", "fraud")
DEFAULT_USE_CASES = ("churn", "fraud")


DRIFTED_SEED = 101  # the seed of the drifted tenant's world (``acme``); ``--seed`` replays another


def demo_tenants(small: bool = False, seed: int | None = None) -> list[TenantSpec]:
    """The default tenants, with concept drift injected for ``acme`` (or a small pair for tests);
    ``seed``: acme's world (default ``DRIFTED_SEED``), to check the loop on another draw of it."""
    horizon = WORLD_DAYS
    drift = DEMO_START_DAY + DRIFT_AFTER
    seed = DRIFTED_SEED if seed is None else seed
    if small:
        # acme's payments come from 3,000 accounts: fraud is rare (about 4 a day then), and with
        # churn's 900 the first champion's holdout holds too few frauds to carry a decay floor.
        return [
            TenantSpec(name="acme", region="eu", n_accounts=900, seed=seed, days=horizon,
                       scenario="concept_drift", drift_day=drift, today=DEMO_START_DAY,
                       use_case_accounts={"fraud": 3000}),
            TenantSpec(name="globex", region="us", n_accounts=600, seed=202, days=horizon, today=DEMO_START_DAY),
        ]
    return [
        TenantSpec(name="acme", region="eu", n_accounts=6000, seed=seed, days=horizon,
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
    use_case: str = "-"

    def line(self, start: dt.date) -> str:
        date = start + dt.timedelta(days=self.day)
        return (f"day {self.day:3d} {date}  +{self.wall_s:7.1f}s  {self.tenant:8s} {self.use_case:6s} "
                f"{self.kind:22s} {self.detail}")


@dataclasses.dataclass(frozen=True)
class DemoUseCase:
    """The names one use case's lifecycle has in the definitions: churn's own jobs, sensor and asset
    keys (``assets/``), or those ``assets.usecases`` generates for a declared use case."""

    name: str

    @property
    def is_churn(self) -> bool:
        return self.name == CHURN

    @property
    def pipeline_job(self) -> str:
        return "churn_pipeline" if self.is_churn else f"{self.name}_pipeline"

    @property
    def daily_job(self) -> str:
        return "daily_cycle" if self.is_churn else f"{self.name}_daily_cycle"

    @property
    def retrain_job(self) -> str:
        return "churn_retrain" if self.is_churn else f"{self.name}_retrain"

    @property
    def sensor(self) -> str:
        return "decay_retrain_sensor" if self.is_churn else f"{self.name}_decay_sensor"

    def asset(self, name: str) -> list[str]:
        """An asset's key path (``model_monitoring`` or ``fraud/model_monitoring``)."""
        return [name] if self.is_churn else [self.name, name]

    def local(self, key: str) -> str | None:
        """The asset name of a key string of this use case's assets, None for another's."""
        if self.is_churn:
            return key if "/" not in key else None
        prefix = f"{self.name}/"
        return key[len(prefix):] if key.startswith(prefix) else None

    def route(self, endpoint: str) -> str:
        return f"/v1/{endpoint}" if self.is_churn else f"/v1/{self.name}/{endpoint}"


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
    die_with_parent(signal.SIGUSR1)

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


def _worker_build(tenant: str, use_cases: tuple[str, ...]) -> dict:
    defs, instance = _WORKER["defs"], _WORKER["instance"]
    events = []
    for uc in map(DemoUseCase, use_cases):
        result = defs.resolve_job_def(uc.pipeline_job).execute_in_process(
            instance=instance, partition_key=tenant, raise_on_error=False, run_config=_quiet(),
            tags={"trigger": "demo_build"})
        if not result.success:
            raise RuntimeError(f"the initial build of {uc.name} for {tenant} failed (run {result.run_id})")
        version = defs.resources["registry"].alias_version(tenant, CHAMPION, use_case=uc.name).version
        events.append((uc.name, "built", f"champion v{version} trained, gated and published"))
    return {"events": events}


def _worker_day(tenant: str, day: int, use_cases: tuple[str, ...]) -> dict:
    """One tenant's daily cycles (one per use case) for one simulated day; returns what the timeline
    should show, which use cases promoted or were restored, and the monitoring materializations
    whose retrain decision the decay sensor must handle before the day goes on."""
    defs, instance = _WORKER["defs"], _WORKER["instance"]
    defs.resources["catalog"].set_today(tenant, day)
    outcome: dict = {"events": [], "promoted": [], "restored": [], "alert_storage_ids": {}}
    for uc in map(DemoUseCase, use_cases):
        deadline = time.monotonic() + 600
        # The tenant's warehouse admits one writer: wait for its runs in flight (a retrain, say).
        while _in_flight(instance, tenant):
            if time.monotonic() > deadline:
                raise RuntimeError(f"runs of {tenant} still in flight after 600 s")
            time.sleep(0.5)
        result = defs.resolve_job_def(uc.daily_job).execute_in_process(
            instance=instance, partition_key=tenant, raise_on_error=False, run_config=_quiet(),
            tags={"trigger": "demo_replay", "simulated_day": str(day)})
        failed = [e.step_key for e in result.all_events if e.is_step_failure]
        # A challenger failing the blocking promotion gate fails that step by design: it is retired.
        if not result.success and [uc.local(k.replace("__", "/")) for k in failed] != ["shadow_comparison"]:
            raise RuntimeError(f"{uc.daily_job} of {tenant} failed on day {day} in steps {failed} "
                               f"(run {result.run_id})")
        _day_events(uc, result, outcome)
        if uc.name in outcome["alert_storage_ids"]:  # the storage id the decay sensor's cursor must pass
            from dagster import AssetKey, AssetRecordsFilter

            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey(uc.asset("model_monitoring")), asset_partitions=[tenant]),
                limit=1, ascending=False).records
            outcome["alert_storage_ids"][uc.name] = records[0].storage_id
    return outcome


def _day_events(uc: DemoUseCase, result, outcome: dict) -> None:
    """The timeline's events of one daily-cycle run of ``uc`` (into ``outcome``)."""
    from mlops.core.monitoring import describe_alert

    events = outcome["events"]
    for event in result.all_events:
        if not event.is_step_materialization:
            continue
        mat = event.step_materialization_data.materialization
        meta = {k: v.value for k, v in mat.metadata.items()}
        key = uc.local(mat.asset_key.to_user_string())
        if key == "model_monitoring" and (meta.get("decay_alert") or meta.get("loop_action") == "retrain"):
            action, episode = meta.get("loop_action"), meta.get("loop_episode")
            if action == "retrain":  # the one decision the decay sensor acts on: the day waits for it
                outcome["alert_storage_ids"][uc.name] = None
            # The timeline shows an episode's first alert (the others come daily) and what the loop did.
            for alert in meta.get("decay_alerts", [])[:1]:
                events.append((uc.name, "decay alert", f"{describe_alert(alert, meta['model_version'])}; episode {episode}",
                               f"alert:{episode}"))
            if action in ("retrain", "escalate"):
                events.append((uc.name, f"loop: {action}", meta.get("loop_reason", "")))
            elif action == "hold" and "first retrain" in meta.get("loop_reason", ""):
                events.append((uc.name, "loop: hold", meta.get("loop_reason", "").split(":")[0], f"hold:{episode}"))
        if key == "model_monitoring" and meta.get("loop_restored_episode"):
            metric = next((k for k in meta if k.startswith("realized_") and isinstance(meta[k], float)), None)
            value = f"realized {meta[metric]:.3f}" if metric else "realized"
            events.append((uc.name, "restored", f"episode {meta['loop_restored_episode']}: {value} >= floor "
                                                f"{meta.get('decay_floor', float('nan')):.3f} (v{meta['model_version']})"))
            outcome["restored"].append(uc.name)
        elif key == "shadow_comparison" and meta.get("decision") in ("promote", "retire"):
            events.append((uc.name, f"shadow: {meta['decision']}", str(meta.get("reason"))))
        elif key == "champion_promotion" and meta.get("promoted"):
            events.append((uc.name, "promoted", f"champion v{meta['from_version']} -> v{meta['to_version']}"))
            outcome["promoted"].append(uc.name)


def _in_flight(instance, tenant: str) -> bool:
    from dagster import DagsterRunStatus, RunsFilter

    statuses = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
                DagsterRunStatus.STARTED]
    return bool(instance.get_run_records(RunsFilter(tags={"dagster/partition": tenant}, statuses=statuses), limit=1))


class ClosedLoopDemo:
    def __init__(self, home: str | None, *, headless: bool, small: bool, service_port: int = 3001,
                 ui_port: int = 3000, max_days: int = REPLAY_DAYS, stop_after_promotion_days: int = 1,
                 until_restored: bool = True, use_cases: tuple[str, ...] = DEFAULT_USE_CASES,
                 seed: int | None = None):
        self.root = configure_environment(home)
        self.headless, self.small = headless, small
        self.specs = demo_tenants(small, seed)
        self.service_url = f"http://127.0.0.1:{service_port}"
        self.service_port, self.ui_port = service_port, ui_port
        self.max_days = max_days
        self.stop_after_promotion_days = stop_after_promotion_days
        # Run until every drifted (tenant, use case) is restored (realized performance back above
        # the floor), or stop ``stop_after_promotion_days`` after the last of them was promoted.
        self.until_restored = until_restored
        self.use_cases = tuple(DemoUseCase(name) for name in use_cases)
        self.events: list[Event] = []
        self.processes: list[subprocess.Popen] = []
        self.process_names: dict[int, str] = {}
        self.in_flight: dict = {}
        self.t0 = time.monotonic()
        self.day = DEMO_START_DAY
        self.keys: dict[str, str] = {}
        self.seen_runs: set[str] = set()
        self.shown: set[tuple[str, str, str]] = set()
        self.payments: dict[str, object] = {}  # tenant -> its payments (fraud traffic), simulated once

    # --- timeline -------------------------------------------------------------------------------
    def emit(self, tenant: str, kind: str, detail: str, use_case: str = "-") -> None:
        from usecases.churn.simulator import SIMULATION_START

        event = Event(self.day, time.monotonic() - self.t0, tenant, kind, detail, use_case)
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
        for spec in self.specs:
            catalog.add(spec)
        self.tenants = [s.name for s in self.specs]
        self.instance = DagsterInstance.from_config(str(settings.dagster_home))
        existing = set(self.instance.get_dynamic_partitions("tenant"))
        self.instance.add_dynamic_partitions("tenant", [t for t in self.tenants if t not in existing])
        # One worker per tenant (spawned: no forked Dagster or MLflow state); at most one per core.
        workers = max(1, min(len(self.tenants), os.cpu_count() or 1))
        self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                        initargs=(str(self.root),))
        self.for_each_tenant(_worker_build, self.use_case_names)
        store = ApiKeyStore(serving_dir(settings.root))
        store.path.parent.mkdir(parents=True, exist_ok=True)
        self.keys = {t: store.create(t) for t in self.tenants}

    @property
    def use_case_names(self) -> tuple[str, ...]:
        return tuple(uc.name for uc in self.use_cases)

    def for_each_tenant(self, fn, *args) -> None:
        """Run ``fn(tenant, *args)`` for every tenant in the workers and put its events on the timeline."""
        futures = {t: self.pool.submit(fn, t, *args) for t in self.tenants}
        self.in_flight = futures
        for tenant, future in futures.items():
            outcome = future.result()
            for use_case, kind, detail, *once in outcome["events"]:
                if once and (tenant, use_case, once[0]) in self.shown:
                    continue  # shown once per episode (an alert comes every day the decay lasts)
                self.shown.update((tenant, use_case, key) for key in once)
                self.emit(tenant, kind, detail, use_case)
                if kind == "decay alert":
                    self.first_alert.setdefault((tenant, use_case), time.monotonic())
            for use_case in outcome.get("promoted", []):
                self.promoted_on.setdefault((tenant, use_case), self.day)
                self.promoted_pending.append((tenant, use_case))
            for use_case in outcome.get("restored", []):
                self.restored_on.setdefault((tenant, use_case), self.day)
            for use_case, storage_id in outcome.get("alert_storage_ids", {}).items():
                self.pending_alerts[(tenant, use_case)] = storage_id

    # --- waiting on observable state: what the platform sees must not depend on timing ----------
    def settle_automation(self, timeout: float = 600.0) -> None:
        """Until each use case's decay sensor has handled today's alerts (its cursor is past their
        monitoring materializations) and the runs it launched for those tenants have finished: a
        retrain then always trains on the day it was triggered, and its challenger shadows that
        day's traffic."""
        if not self.pending_alerts:
            return
        deadline = time.monotonic() + timeout
        for uc in self.use_cases:
            ids = [i for (_, name), i in self.pending_alerts.items() if name == uc.name]
            if not ids:
                continue
            while _sensor_cursor(self.instance, uc.sensor) < max(ids):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{uc.sensor} did not handle alert {max(ids)} within {timeout:.0f} s")
                time.sleep(0.25)
        self.watch_runs()
        for tenant in {t for t, _ in self.pending_alerts}:
            while _in_flight(self.instance, tenant):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"runs of {tenant} still in flight after {timeout:.0f} s")
                time.sleep(0.5)
        self.pending_alerts.clear()

    def manifest_entries(self, uc: DemoUseCase, manifest: dict | None = None) -> dict:
        """The serving manifest's entries of a use case, by tenant (``manifest``: one already read)."""
        from mlops.core.serving import read_manifest, serving_dir

        manifest = manifest or read_manifest(serving_dir(self.root))
        return manifest["tenants"] if uc.is_churn else manifest["use_cases"].get(uc.name, {}).get("tenants", {})

    def wait_until_served(self, timeout: float = 60.0) -> None:
        """Until every service worker serves what the manifest says for every use case and tenant
        (today's snapshot, its champion and challenger), read from the workers' status files: today's
        traffic is then scored from today's features on every run alike."""
        from mlops.core.monitoring import worker_statuses
        from mlops.core.serving import read_manifest, serving_dir

        manifest = read_manifest(serving_dir(self.root))
        want = {(uc.name, t): _served_entry(self.manifest_entries(uc, manifest)[t])
                for uc in self.use_cases for t in self.tenants}
        deadline = time.monotonic() + timeout
        while True:
            workers = worker_statuses(self.root, fresh_within_s=10.0)
            served = [w.get("serving", {}) for w in workers]
            if len(workers) >= SERVICE_WORKERS and all(s.get(uc, {}).get(t) == v for s in served
                                                       for (uc, t), v in want.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service workers did not load the manifest within {timeout:.0f} s: "
                                   f"want {want}, workers serve {served}")
            time.sleep(0.1)

    def wait_for_log(self, sent: dict[tuple[str, str], int], timeout: float = 60.0) -> None:
        """Until the service has written every prediction of today's traffic, and its shadow score,
        to closed log segments: tomorrow's ingestion then sees the whole day, on every run alike."""
        import pyarrow.parquet as pq

        from mlops.core.serving import prediction_log_dir, read_manifest, serving_dir

        deadline = time.monotonic() + timeout
        manifest = read_manifest(serving_dir(self.root))
        for (tenant, name), n in sent.items():
            uc = DemoUseCase(name)
            expected = {CHAMPION: n}
            if _served_entry(self.manifest_entries(uc, manifest)[tenant])["challenger"] is not None:
                expected[CHALLENGER] = n
            folder = prediction_log_dir(self.root, tenant, None if uc.is_churn else uc.name) / "closed"
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
                    raise RuntimeError(f"{tenant}/{name}: the service logged {totals} of today's {expected} "
                                       f"predictions within {timeout:.0f} s")
                time.sleep(0.1)

    def start_processes(self) -> None:
        env = {**os.environ, "MLOPS_HOME": str(self.root), "DAGSTER_HOME": str(self.settings.dagster_home),
               # The demo's traffic is one batch per tenant and day: shadow every batch, not a sample.
               "CHURN_SHADOW_BATCH_SAMPLE": "1", "CHURN_SERVICE_WORKERS": str(SERVICE_WORKERS),
               # Each simulated day waits for its traffic's log segments to close: close them soon.
               "MLOPS_LOG_SEGMENT_SECONDS": os.environ.get("MLOPS_LOG_SEGMENT_SECONDS", "0.2")}
        logs = HomeLayout(self.root).logs_dir
        logs.mkdir(exist_ok=True)
        bin_dir = Path(sys.executable).parent

        def spawn(name: str, argv: list[str]) -> None:
            out = (logs / f"{name}.log").open("ab")
            # Under a guard (mlops.process_guard), in a process group of its own: a stop request to
            # the guard ends the command and everything below it within GUARD_GRACE_S. The guard
            # gets SIGTERM should the driver die without stopping it (SIGKILL, say).
            guarded = [sys.executable, "-m", "mlops.process_guard", "--grace", str(GUARD_GRACE_S), "--", *argv]
            self.processes.append(subprocess.Popen(guarded, cwd=PROJECT_ROOT, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True,
                                                   preexec_fn=child_dies_with(os.getpid())))
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
                    raise RuntimeError(f"the {self.process_names[proc.pid]} exited early; see {logs}")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the service did not become ready; see {logs / 'service.log'}")
        self.emit("-", "service ready", self.service_url + ("" if self.headless else
                                                             f"; Dagster UI http://127.0.0.1:{self.ui_port}"))

    def signal_processes(self) -> None:
        """SIGTERM to each child's guard (which passes it on to its process group); remembers their
        process trees (a BentoML worker, say, lives in a session of its own) for ``stop_processes``."""
        self.process_trees = {proc.pid: descendants(proc.pid) for proc in self.processes}
        for proc in self.processes:
            if proc.poll() is None:
                _signal(proc.pid, signal.SIGTERM)

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
            stopped.append(self.process_names[proc.pid])
        kill_leftovers({pid: start for tree in self.process_trees.values() for pid, start in tree.items()}, deadline)
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

        from mlops.core.serving import serving_dir
        from mlops.loop_replay import live_accounts
        from usecases.churn.simulator import simulate_tenant

        entry = self.manifest_entries(DemoUseCase(CHURN))[tenant]
        snapshot = pd.read_parquet(serving_dir(self.root) / entry["snapshot"]["file"], columns=["account_id"])
        spec = next(s for s in self.specs if s.name == tenant)
        churn = simulate_tenant(dataclasses.replace(spec, today=self.day))["raw_churn_events"]
        return live_accounts(snapshot, churn, self.day)

    def todays_payments(self, tenant: str) -> list[dict]:
        """The payments the tenant's customers settle today, as the checkout sends them to be scored:
        the payment's own fields and its account (whose online aggregates the service joins). The
        world is simulated once (a payment does not depend on the clock, only its visibility); an
        account that signed up today has no aggregates yet and is left out."""
        import pandas as pd

        from mlops.core.serving import serving_dir
        from mlops.core.usecase import load_usecase
        from mlops.core.usecase_store import load_simulator
        from usecases.churn.simulator import SIMULATION_START

        if tenant not in self.payments:
            uc = load_usecase(PROJECT_ROOT / "usecases" / "fraud")
            spec = next(s for s in self.specs if s.name == tenant)
            self.payments[tenant] = load_simulator(uc)(dataclasses.replace(spec.for_use_case(uc.name), today=None))[
                "raw_payments"]
        payments = self.payments[tenant]
        start = pd.Timestamp(SIMULATION_START) + pd.Timedelta(days=self.day)
        today = payments[(payments["paid_at"] >= start) & (payments["paid_at"] < start + pd.Timedelta(days=1))]
        entry = self.manifest_entries(DemoUseCase("fraud"))[tenant]
        known = set(pd.read_parquet(serving_dir(self.root) / entry["snapshot"]["file"], columns=["account_id"])
                    ["account_id"])
        # Settled payments only, as the simulated-clock replay scores them (``mlops.usecase_replay``):
        # a declined payment is never charged back, so no label ever tells how its score did.
        today = today[today["account_id"].isin(known) & (today["status"] == "succeeded")]
        today = today.sort_values(["paid_at", "payment_id"])
        return [{"payment_id": r.payment_id, "account_id": r.account_id, "amount": float(r.amount),
                 "currency": r.currency, "country": r.country, "payment_method": r.payment_method,
                 "card_age_days": float(r.card_age_days), "hour_of_day": float(r.paid_at.hour)}
                for r in today.itertuples(index=False)]

    def traffic(self, tenant: str, uc: DemoUseCase) -> int:
        """Today's requests of one use case for one tenant, in batches of 1,000: churn scores every
        live customer; fraud scores the day's payments."""
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        if uc.is_churn:
            items, field = self.active_accounts(tenant), "account_ids"
        elif uc.name == "fraud":
            items, field = self.todays_payments(tenant), "instances"
        else:
            raise ValueError(f"the demo has no traffic for use case {uc.name!r}")
        for i in range(0, len(items), 1000):
            response = requests.post(f"{self.service_url}{uc.route('predict_batch')}", headers=headers, timeout=60,
                                     json={"tenant": tenant, field: items[i:i + 1000]})
            response.raise_for_status()
        self.last_request[(tenant, uc.name)] = items[0] if items else None
        return len(items)

    def confirm_promotions(self) -> None:
        """After a promotion, wait until the service answers with the new champion."""
        while self.promoted_pending:
            tenant, name = self.promoted_pending.pop()
            expected = str(self.registry.alias_version(tenant, CHAMPION, use_case=name).version)
            deadline = time.monotonic() + 30
            while (version := self.serving_version(tenant, name)) != expected and time.monotonic() < deadline:
                time.sleep(0.1)
            since = time.monotonic() - self.first_alert.get((tenant, name), time.monotonic())
            self.emit(tenant, "new champion serving", f"v{version} answers; {since:.1f}s after the first decay alert",
                      name)
            self.alert_to_serving_s[(tenant, name)] = since

    def serving_version(self, tenant: str, name: str) -> str:
        """The model version the running service answers with, for a request of yesterday's traffic
        (a live account; one of the day's payments)."""
        uc = DemoUseCase(name)
        request = self.last_request.get((tenant, name))
        if request is None:
            request = self.active_accounts(tenant)[0] if uc.is_churn else self.todays_payments(tenant)[0]
        body = {"tenant": tenant, "account_id": request} if uc.is_churn else {"tenant": tenant, **request}
        response = requests.post(f"{self.service_url}{uc.route('predict')}", timeout=10, json=body,
                                 headers={"Authorization": f"Bearer {self.keys[tenant]}"})
        response.raise_for_status()
        return str(response.json()["model_version"])

    def watch_runs(self) -> None:
        """Report runs the platform launched on its own (the decay sensors' retraining)."""
        from dagster import RunsFilter

        for uc in self.use_cases:
            for record in self.instance.get_run_records(RunsFilter(job_name=uc.retrain_job), limit=50):
                run = record.dagster_run
                tenant = run.tags.get("dagster/partition", "?")
                trigger = run.tags.get("trigger", "manual")
                if run.run_id not in self.seen_runs:
                    self.seen_runs.add(run.run_id)
                    self.emit(tenant, "retrain launched", f"by {trigger} (run {run.run_id[:8]})", uc.name)
                if run.status.value not in FINISHED or f"{run.run_id}:done" in self.seen_runs:
                    continue
                self.seen_runs.add(f"{run.run_id}:done")
                if run.status.value == "SUCCESS":
                    challenger = self.registry.alias_version(tenant, CHALLENGER, use_case=uc.name)
                    self.emit(tenant, "retrain succeeded", f"gates passed; challenger v{challenger.version} "
                                                           "published to shadow" if challenger else "no challenger",
                              uc.name)
                    self.retrained[(tenant, uc.name)] = self.retrained.get((tenant, uc.name), 0) + 1
                else:
                    self.emit(tenant, f"retrain {run.status.value.lower()}", f"run {run.run_id[:8]}", uc.name)

    # --- the replay -----------------------------------------------------------------------------
    def closed(self) -> bool:
        """Every drifted (tenant, use case) restored, or (``--until promoted``) promoted at least
        ``stop_after_promotion_days`` ago."""
        if self.until_restored:
            return all(pair in self.restored_on for pair in self.drifted)
        if not all(pair in self.promoted_on for pair in self.drifted):
            return False
        return self.day >= max(self.promoted_on[p] for p in self.drifted) + self.stop_after_promotion_days - 1

    def run(self) -> int:
        from usecases.churn.simulator import SIMULATION_START

        self.promoted_on: dict[tuple[str, str], int] = {}
        self.restored_on: dict[tuple[str, str], int] = {}
        self.retrained: dict[tuple[str, str], int] = {}
        self.first_alert: dict[tuple[str, str], float] = {}
        self.alert_to_serving_s: dict[tuple[str, str], float] = {}
        self.promoted_pending: list[tuple[str, str]] = []
        self.pending_alerts: dict[tuple[str, str], int] = {}
        self.last_request: dict[tuple[str, str], object] = {}
        drifted = [s for s in self.specs if s.scenario != "none"]
        self.drifted = [(s.name, uc.name) for s in drifted for uc in self.use_cases]
        print(f"MLOPS_HOME {self.root}; use cases {', '.join(self.use_case_names)}; concept drift for "
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
                # One use case at a time, its sensor's retrains settled before the next one's daily
                # cycle: a tenant's warehouse admits one writer, and what each run sees must not
                # depend on which of two processes got there first.
                for uc in self.use_cases:
                    self.for_each_tenant(_worker_day, day, (uc.name,))
                    self.settle_automation()
                self.watch_runs()
                self.confirm_promotions()
                self.wait_until_served()
                scored = {(t, uc.name): self.traffic(t, uc) for uc in self.use_cases for t in self.tenants}
                if self.day % 7 == 0:
                    self.emit("-", "traffic", ", ".join(f"{t}/{uc}: {n}" for (t, uc), n in scored.items()))
                self.wait_for_log(scored)
                if self.closed():
                    break
            for uc in self.use_cases:
                for tenant in self.tenants:
                    self.emit(tenant, "serving", f"model v{self.serving_version(tenant, uc.name)}", uc.name)
            closed = self.closed()
            restored = ", ".join(f"{t}/{uc} on day {d}" for (t, uc), d in sorted(self.restored_on.items()))
            promoted = ", ".join(f"{t}/{uc} on day {d}" for (t, uc), d in sorted(self.promoted_on.items()))
            outcome = (f"performance restored: {restored}" if self.until_restored else f"promoted: {promoted}") \
                if closed else f"NOT closed (promoted: {promoted or 'none'}; restored: {restored or 'none'})"
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
            return 0 if self.restored_on or self.promoted_on else 130
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


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _quiet() -> dict:
    return {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
