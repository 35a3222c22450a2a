"""Benchmark: predictions answered vs logged when the service is killed -9 under load.

Run from the repository root::

    .venv/bin/python -m benchmarks.reliability                        # a small generated bundle (~1 minute)
    .venv/bin/python -m benchmarks.reliability --home /tmp/benchhome  # the serving bundle of a built home
    # the same against a patched copy of the service (module copy.py in /tmp/x), e.g. one without the journal:
    .venv/bin/python -m benchmarks.reliability --service copy:ChurnService --pythonpath /tmp/x

Each scenario runs on a fresh temporary home holding a copy of the serving bundle (``--home``'s, or a
small generated one: two LightGBM models over churn's inputs, 400 accounts), so no home's logs are
touched. ``--clients`` Python client threads post single predictions for ``--duration`` seconds and
keep the ``prediction_id`` of every 200 answer; half-way:

- ``worker``: one service worker (a child of ``bentoml serve`` with ``--worker-id``) gets SIGKILL; the
  load goes on; at the end the service is stopped with SIGTERM (the live workers flush as usual);
- ``server``: the whole process group gets SIGKILL (no shutdown hook runs anywhere).

Then the service is started again over the same home (its workers recover dead workers' journals at
start-up), stopped, and ``recover_journals`` runs once more (as the ingestion asset does). It prints,
per scenario, the predictions answered 200, the distinct ones found in the closed segments as
champion rows, the missing and the duplicated, and PASS when both are 0. All traffic is to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_bundle(home: Path, tenant: str = "testco") -> None:
    """A served home without the pipeline: champion and challenger (so the shadow logs too) over
    churn's inputs, and an online snapshot of 400 accounts ``acc-0000``..``acc-0399``."""
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from mlops.core.model_inputs import CATEGORICAL_FEATURES, NUMERIC_FEATURES, to_model_matrix
    from mlops.core.serving import publish_tenant, serving_dir

    rng = np.random.default_rng(3)
    n = 400
    frame = pd.DataFrame({c: rng.normal(size=n) for c in NUMERIC_FEATURES})
    for col, levels in CATEGORICAL_FEATURES.items():
        frame[col] = rng.choice(list(levels), size=n)
    frame.insert(0, "account_id", [f"acc-{i:04d}" for i in range(n)])
    x = to_model_matrix(frame)
    y = (x[:, 0] + rng.normal(size=n) > 0).astype(int)
    work = home / "work"
    work.mkdir(parents=True, exist_ok=True)
    models = []
    for version, rounds in (("1", 10), ("2", 12)):
        booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 8, "num_threads": 1},
                            lgb.Dataset(x, y), num_boost_round=rounds)
        booster.save_model(str(work / f"m{version}.txt"))
        models.append((version, work / f"m{version}.txt"))
    frame.to_parquet(work / "features-v00001.parquet")
    publish_tenant(serving_dir(home), tenant, champion=models[0], challenger=models[1],
                   snapshot=(1, work / "features-v00001.parquet"))


def prepare_home(source: Path | None, target: Path) -> tuple[str, list[str], str]:
    """A fresh home with a serving bundle; returns (tenant, its account ids, an API key)."""
    import pandas as pd

    from mlops.core.serving import ApiKeyStore, read_manifest, serving_dir

    if source is None:
        tiny_bundle(target)
    else:
        shutil.copytree(serving_dir(source), serving_dir(target))
    folder = serving_dir(target)
    tenants = read_manifest(folder)["tenants"]
    if not tenants:
        raise SystemExit(f"no churn tenant is published in {folder}")
    tenant = next((t for t, e in tenants.items() if e.get("challenger")), next(iter(tenants)))
    accounts = pd.read_parquet(folder / tenants[tenant]["snapshot"]["file"], columns=["account_id"])
    return tenant, accounts["account_id"].astype(str).tolist()[:500], ApiKeyStore(folder).create(tenant)


class Clients:
    """``n`` threads posting single predictions; keeps every 200 answer's prediction_id."""

    def __init__(self, port: int, tenant: str, accounts: list[str], key: str, n: int):
        self.port, self.tenant, self.accounts, self.key = port, tenant, accounts, key
        self.ids: list[str] = []
        self.statuses: dict[str, int] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, offset: int) -> None:
        conn, i = None, offset
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"}
        while not self._stop.is_set():
            body = json.dumps({"tenant": self.tenant, "account_id": self.accounts[i % len(self.accounts)]})
            i += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("POST", "/v1/predict", body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status = str(resp.status)
                if resp.status == 200:
                    self.ids.append(json.loads(data)["prediction_id"])
            except (OSError, http.client.HTTPException, ValueError):
                status = "connection error"
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                time.sleep(0.01)
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


def start(home: Path, service: str, pythonpath: str, log: Path) -> tuple[subprocess.Popen, int]:
    from mlops.core.environment import TELEMETRY_OFF

    port = free_port()
    env = {**os.environ, **TELEMETRY_OFF, "MLOPS_HOME": str(home),
           "PYTHONPATH": os.pathsep.join(p for p in [pythonpath, str(REPO), os.environ.get("PYTHONPATH", "")] if p)}
    env.pop("MLOPS_SERVING_DIR", None)
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", service, "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited early; see {log}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc, port
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"the service was not ready in 180 s; see {log}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def workers(proc: subprocess.Popen) -> list:
    import psutil

    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "--worker-id" in p.cmdline():
                found.append(p)
    return found


def logged_champion_ids(home: Path, tenant: str):
    import pandas as pd

    from mlops.core.serving import prediction_log_dir

    folder = prediction_log_dir(home, tenant)
    frames = [pd.read_parquet(p, columns=["prediction_id", "role"])
              for sub in ("closed", "ingested") for p in sorted((folder / sub).glob("segment-*.parquet"))]
    if not frames:
        return pd.Series(dtype="int64")
    rows = pd.concat(frames, ignore_index=True)
    return rows[rows["role"] == "champion"]["prediction_id"].value_counts()


def scenario(name: str, args, source: Path | None, workdir: Path) -> dict:
    import psutil

    from mlops.core.serving import recover_journals

    home = workdir / name
    tenant, accounts, key = prepare_home(source, home)
    log = workdir / f"{name}.log"
    proc, port = start(home, args.service, args.pythonpath, log)
    killed = ""
    with Clients(port, tenant, accounts, key, args.clients) as clients:
        time.sleep(args.duration / 2)
        if name == "worker":
            victim = workers(proc)[0]
            killed = f"worker pid {victim.pid}"
            victim.kill()
        else:
            # the workers sit in sessions of their own: every process of the tree gets SIGKILL
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            killed = f"all {len(tree)} processes of the service"
            for p in tree:
                p.send_signal(signal.SIGKILL)
            psutil.wait_procs(tree, timeout=10)
        time.sleep(args.duration / 2)
    stop(proc, signal.SIGTERM if name == "worker" else signal.SIGKILL)
    # Recovery: a restarted service converts dead workers' journals at start-up; ingestion does it too.
    proc, _ = start(home, args.service, args.pythonpath, log)
    stop(proc)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        recover_journals(home)
    answered = set(clients.ids)
    counts = logged_champion_ids(home, tenant)
    missing = len(answered - set(counts.index))
    duplicated = int((counts > 1).sum())
    return {"scenario": name, "killed": killed, "answered": len(clients.ids), "distinct": len(answered),
            "logged": int(counts.reindex(list(answered)).notna().sum()) if len(counts) else 0,
            "missing": missing, "duplicated": duplicated, "statuses": clients.statuses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", help="copy the serving bundle of this home (default: a small generated one)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load; the kill is half-way")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--scenario", choices=["worker", "server"], action="append",
                        help="repeatable; default both")
    parser.add_argument("--service", default="bentos.service:ChurnService")
    parser.add_argument("--pythonpath", default="", help="prepended to PYTHONPATH of the BentoML service")
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes (their path is printed)")
    args = parser.parse_args(argv)
    from mlops.core.environment import disable_telemetry

    disable_telemetry()
    workdir = Path(tempfile.mkdtemp(prefix="reliability-"))
    results = []
    try:
        for name in args.scenario or ["worker", "server"]:
            results.append(scenario(name, args, Path(args.home) if args.home else None, workdir))
    finally:
        if args.keep:
            print(f"homes and service logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nkill -9 under load: {args.clients} client threads, {args.duration:.0f} s, the kill half-way; "
          f"service {args.service}")
    print(f"{'scenario':<9} {'answered 200':>12} {'logged':>8} {'missing':>8} {'duplicated':>10}  killed / statuses")
    ok = True
    for r in results:
        good = r["missing"] == 0 and r["duplicated"] == 0
        ok &= good
        print(f"{r['scenario']:<9} {r['answered']:>12} {r['logged']:>8} {r['missing']:>8} {r['duplicated']:>10}  "
              f"{r['killed']}; {r['statuses']}  {'PASS' if good else 'FAIL'}")
    print("PASS: every answered prediction logged exactly once" if ok else "FAIL: predictions lost or duplicated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
