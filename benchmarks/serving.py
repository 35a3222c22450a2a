"""Benchmark: the BentoML churn service against a bare ASGI server scoring the same model.

Run from the repository root, against a platform home that has a published serving bundle
(``mlops --home /tmp/benchhome build``)::

    .venv/bin/python -m benchmarks.serving --home /tmp/benchhome                # ~1 minute
    .venv/bin/python -m benchmarks.serving --home /tmp/benchhome --soak 300     # + 5 min soak
    # servers with a bytecode cache, as in the bento image (its Dockerfile sets UV_COMPILE_BYTECODE=1):
    .venv/bin/python -m benchmarks.serving --home /tmp/benchhome --pycache /tmp/benchhome-pycache
    # the service's settings travel in the environment (see bentos/service.py), e.g.
    CHURN_SHADOW_BATCH_SAMPLE=1 .venv/bin/python -m benchmarks.serving --home /tmp/benchhome
    # the same against a patched copy of the service (module copy.py in /tmp/x):
    .venv/bin/python -m benchmarks.serving --home /tmp/benchhome --service copy:ChurnService --pythonpath /tmp/x
    # a declared use case beside churn (/v1/fraud/predict and /v1/fraud/predict_batch), in that order:
    .venv/bin/python -m benchmarks.serving --home /tmp/benchhome --use-case churn --use-case fraud
    .venv/bin/python -m benchmarks.serving --home /tmp/benchhome --use-case all --skip-bare

In one run, side by side, it

1. starts ``bentoml serve bentos.service:ChurnService`` (its own process group, killed at the
   end) and measures the cold start: seconds from process start to ``/readyz`` 200, then checks
   that every tenant of the manifest answers a prediction;
2. starts a bare uvicorn + Starlette server (``benchmarks.serving_support.bare_app``, one
   worker) that loads the same champion model file and online snapshot and calls
   ``Booster.predict`` on one numpy row -- the baseline;
3. drives both, one after the other, with the same ``wrk`` load (8 connections, 2 threads, same
   duration, ``benchmarks/serving_support/post.lua``: single-account POSTs cycling over a few
   account ids, with the auth header) and prints req/s, p50/p90/p99 and the ratio. Shadow
   scoring is on whenever the manifest names a challenger for the tenant (the table says so);
4. measures ``/v1/predict_batch`` with 1,000 accounts per request (accounts/s);
5. optionally (``--soak SECONDS``) keeps single-predict load on the service and samples the RSS
   of its processes every 10 s (first/last/max and growth; growth after the first minute too);
6. with ``--use-case NAME`` (repeatable, in the order given; ``all``: churn and every use case of the
   manifest; default churn), loads each declared use case's ``/v1/<name>/predict`` and
   ``/v1/<name>/predict_batch`` (``instances``) with the same wrk settings: the bodies are built from
   the declaration the manifest carries (the snapshot's lookup key values, e.g. ``account_id`` for
   fraud, a generated entity key, and a valid value for every request field from its declared
   levels or range). With churn in the same run it prints each use case's server CPU per request
   against churn's (the ratio; fraud's target: within 1.2x);
7. prints PASS/FAIL against the targets. The exit status is 0 whether or not they are met (1 only
   when the benchmark itself cannot run, e.g. ``wrk`` is missing or the service does not start).

Each load run also reports the CPU time (user + system) the server's processes used per request:
on a small machine shared with other work, req/s and latency swing with the neighbours' load, the
CPU cost per request much less. Without ``--pycache`` the servers start as this environment has
them: where PYTHONDONTWRITEBYTECODE is set and a package has no ``.pyc`` files, every start
compiles it from source (seconds for BentoML); the report says which packages have them.

Short-lived API keys are created for the run (one per tenant) and revoked at the end. The
service writes its prediction logs into the home, as in production. All traffic is to 127.0.0.1.
Note that wrk shares the machine's CPUs with the server under test.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "serving_support"
LUA = SUPPORT / "post.lua"

TARGET_COLD_START_S = 5.0
TARGET_P99_MS = 5.0
TARGET_THROUGHPUT_RATIO = 0.5
TARGET_BATCH_ACCOUNTS_S = 100_000
TARGET_SOAK_GROWTH_PCT = 5.0
SOAK_SAMPLE_S = 10.0
SOAK_WARMUP_S = 60.0  # reported separately: RSS growth after the first minute of soak
CHURN = "churn"  # served at /v1/predict from manifest["tenants"]; the other use cases at /v1/<name>/...
# server CPU per single prediction of a use case over churn's, measured in the same run (issue 12: fraud's
# request-time features and online join within 1.2x of churn's lookup)
TARGET_USECASE_CPU_RATIO = {"fraud": 1.2}
BODIES = 64  # distinct single-request bodies cycled by wrk


# --- processes -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path
    started: float  # perf_counter just before Popen
    ready_s: float | None = None

    def stop(self) -> None:
        """SIGTERM to the process group, then SIGKILL to whatever of the process tree is left."""
        import psutil

        tree = tree_processes(self.proc.pid)  # before the parent goes: workers may sit in their own sessions
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_server(name: str, cmd: list[str], port: int, env: dict, logdir: Path) -> Server:
    log = logdir / f"{name}.log"
    handle = log.open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # own process group: killpg takes the workers too
    )
    handle.close()
    return Server(name, proc, port, log, started)


def wait_ready(server: Server, path: str = "/readyz", timeout_s: float = 120.0) -> float:
    """Seconds from process start to the first 200 on ``path``; raises if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            status, _ = request(server.port, "GET", path, timeout=1.0)
            if status == 200:
                server.ready_s = time.perf_counter() - server.started
                return server.ready_s
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{server.name} not ready on {path} after {timeout_s:.0f} s:\n{server.log_tail()}")


def request(port: int, method: str, path: str, body: dict | None = None, token: str | None = None,
            timeout: float = 30.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- load ----------------------------------------------------------------------------------
@dataclass
class WrkResult:
    label: str
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: dict = field(default_factory=dict)
    server_cpu_s: float | None = None  # CPU seconds (user + system) the server's processes used during the run
    wrk_cpu_s: float | None = None
    connections: list[int] | None = None  # wrk's connections per server process, sampled mid-run

    @property
    def server_cpu_ms_per_request(self) -> float | None:
        return self.server_cpu_s / self.requests * 1000 if self.server_cpu_s is not None and self.requests else None

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def wrk_command(port: int, path: str, bodies: Path, token: str, duration_s: float, connections: int,
                threads: int) -> tuple[list[str], dict]:
    cmd = [
        "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration_s))}s",
        "--timeout", "10s", "--latency", "-s", str(LUA), f"http://127.0.0.1:{port}",
    ]
    env = {**os.environ, "WRK_PATH": path, "WRK_BODIES": str(bodies), "WRK_TOKEN": token}
    return cmd, env


def parse_wrk(label: str, output: str) -> WrkResult:
    for line in output.splitlines():
        if line.startswith("WRK_JSON "):
            d = json.loads(line[len("WRK_JSON "):])
            ms = lambda us: us / 1000.0  # noqa: E731
            return WrkResult(
                label, d["requests"], d["duration_us"] / 1e6, ms(d["p50_us"]), ms(d["p90_us"]),
                ms(d["p99_us"]), ms(d["p999_us"]), ms(d["max_us"]), d["errors"],
            )
    raise RuntimeError(f"no WRK_JSON line in wrk's output (did the lua done() run?):\n{output}")


def run_wrk(label: str, port: int, path: str, bodies: Path, token: str, duration_s: float,
            connections: int, threads: int, server_pid: int | None = None) -> WrkResult:
    """One wrk run; with ``server_pid``, also the CPU time the server's process tree and wrk used
    (a figure that depends much less than throughput on what else the shared machine runs)."""
    import resource

    cmd, env = wrk_command(port, path, bodies, token, duration_s, connections, threads)
    cpu0 = tree_cpu_s(server_pid) if server_pid else None
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    spread = None
    if server_pid:
        time.sleep(min(1.0, duration_s / 2))
        spread = connections_per_process(server_pid, port)
    try:
        stdout, stderr = wrk.communicate(timeout=duration_s + 60)
    finally:
        if wrk.poll() is None:
            wrk.kill()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed ({wrk.returncode}): {stderr}\n{stdout}")
    result = parse_wrk(label, stdout)
    if server_pid:
        result.server_cpu_s = tree_cpu_s(server_pid) - cpu0
        result.wrk_cpu_s = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        result.connections = spread
    return result


def write_bodies(path: Path, bodies: list[dict]) -> Path:
    path.write_text("".join(json.dumps(b, separators=(",", ":")) + "\n" for b in bodies))
    return path


# --- declared use cases ------------------------------------------------------------------------
def request_field_value(spec: dict, rng: random.Random):
    """A valid value of a declared request field (``mlops.core.serving.serving_declaration``): one of its
    levels, or a number in its declared range, of its type (the service validates strictly)."""
    if spec.get("isin") is not None:
        return rng.choice(spec["isin"])
    if spec["type"] == "BOOLEAN":
        return rng.random() < 0.5
    lo = spec.get("min") if spec.get("min") is not None else 0
    hi = spec.get("max") if spec.get("max") is not None else lo + 1000
    if spec["type"] in ("BIGINT", "INTEGER"):
        return rng.randint(int(lo), int(hi))
    # a long-tailed draw over the range (amounts are mostly small), as a float
    return float(round(lo + (hi - lo) * rng.random() ** 4, 2))


def usecase_instances(declaration: dict, lookup_values: list[str], n: int, rng: random.Random,
                      start: int = 0) -> list[dict]:
    """``n`` request instances of a use case: the lookup key from the published snapshot's values, the
    entity key generated where it is another field (fraud: a new ``payment_id`` per payment), the request
    fields drawn from their declaration."""
    key = declaration["entity"]["key"]
    lookup_key = declaration.get("lookup_key") or key
    out = []
    for i in range(start, start + n):
        item: dict = {}
        if declaration["lookup"] or lookup_key == key:
            item[lookup_key] = rng.choice(lookup_values)
        if key != lookup_key or not declaration["lookup"]:
            item[key] = f"bench-{i:07d}"
        for spec in declaration["request_fields"]:
            item[spec["name"]] = request_field_value(spec, rng)
        out.append(item)
    return out


@dataclass
class Target:
    """One use case under load: its routes, tenant, request bodies and results."""

    name: str
    tenant: str
    entry: dict  # the tenant's manifest entry (champion, challenger, snapshot)
    path: str  # single-prediction route
    batch_path: str
    single: list[dict]
    batch: list[dict]
    matrix: object = None  # encoded snapshot rows for the in-process model timings (None: churn's)
    shadow: bool = False
    results: dict = field(default_factory=dict)  # "single", "batch", "bare_single", "bare_batch"


# --- memory --------------------------------------------------------------------------------
def tree_processes(pid: int) -> list:
    """The process and all its descendants (circus starts BentoML's workers in sessions of their own,
    so the process group of ``bentoml serve`` alone does not hold them)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by the process and its live descendants."""
    import psutil

    total = 0.0
    for p in tree_processes(pid):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def connections_per_process(pid: int, port: int) -> list[int]:
    """Established connections to ``port`` held by each process of the tree that holds any: how the
    load generator's connections spread over the server's workers (the workers share one listening
    socket, and whichever accepts first keeps the connection for the whole run)."""
    import psutil

    counts = []
    for p in tree_processes(pid):
        with contextlib.suppress(psutil.Error):
            n = sum(1 for c in p.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
            if n:
                counts.append(n)
    return sorted(counts, reverse=True)


def rss_sample(pid: int) -> tuple[int, int]:
    """(RSS of the largest BentoML worker process, RSS of ``bentoml serve`` and all its children), bytes."""
    import psutil

    total, worker = 0, 0
    for p in tree_processes(pid):
        try:
            rss = p.memory_info().rss
            cmdline = " ".join(p.cmdline())
        except psutil.Error:
            continue
        total += rss
        if "_bentoml_impl.worker" in cmdline:
            worker = max(worker, rss)
    return worker, total


def _time_scorer(predict, one, many) -> tuple[float, float]:
    """(microseconds per single row, milliseconds per batch) of ``predict``, one thread."""
    for _ in range(20):
        predict(one)
    t = time.perf_counter()
    for _ in range(500):
        predict(one)
    single_us = (time.perf_counter() - t) / 500 * 1e6
    predict(many)
    t = time.perf_counter()
    for _ in range(5):
        predict(many)
    return single_us, (time.perf_counter() - t) / 5 * 1e3


def model_ceiling(folder: Path, entry: dict, batch_size: int, matrix=None) -> dict:
    """In-process timings of the champion (and challenger), one thread: LightGBM's Booster.predict
    (what the bare server calls) and the scorer the service loads for it (``bentos.service.load_scorer``:
    the compiled trees when the bundle has them), with the largest score difference between the two."""
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from bentos.service import CompiledBooster, load_scorer
    from mlops.core.model_inputs import to_model_matrix

    if matrix is None:  # churn's snapshot
        matrix = to_model_matrix(pd.read_parquet(folder / entry["snapshot"]["file"]))
    rows = np.resize(np.arange(len(matrix)), batch_size)
    out = {}
    for role in ("champion", "challenger"):
        spec = entry.get(role)
        if not spec:
            continue
        booster = lgb.Booster(model_file=str(folder / spec["model_file"]))
        one, many = matrix[:1], matrix[rows]
        single_us, batch_ms = _time_scorer(lambda m, b=booster: b.predict(m, num_threads=1), one, many)
        scorer = load_scorer(folder, spec, matrix[:1000])
        service_single_us, service_batch_ms = _time_scorer(scorer.predict, one, many)
        gap = float(np.max(np.abs(scorer.predict(matrix) - booster.predict(matrix, num_threads=1))))
        out[role] = {"trees": booster.num_trees(), "single_us": single_us, "batch_ms": batch_ms,
                     "service_scorer": "compiled (lleaves)" if isinstance(scorer, CompiledBooster) else "LightGBM",
                     "service_single_us": service_single_us, "service_batch_ms": service_batch_ms, "max_gap": gap}
    return out


# --- report --------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def cpu_ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def spread(r: WrkResult) -> str:
    return "/".join(map(str, r.connections)) if r.connections else ""


def row(r: WrkResult, extra: str = "") -> str:
    return (f"| {r.label} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | {r.max_ms:.1f} "
            f"| {r.requests:,} | {r.error_count}{extra} | {cpu_ms(r.server_cpu_ms_per_request)} | {spread(r)} |")


def pick_tenant(entries: dict, wanted: str | None) -> str:
    """``wanted`` where it is deployed, else a tenant with a challenger (shadow scoring on), else the first."""
    if wanted in entries:
        return wanted
    return next((t for t, e in entries.items() if e.get("challenger")), next(iter(entries)))


def has_shadow(entry: dict) -> bool:
    return bool(entry.get("challenger")) and str(entry["challenger"]["version"]) != str(entry["champion"]["version"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True, help="MLOPS_HOME with a published serving bundle")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of measured load per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load before each run")
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of soak load with RSS sampling (0: skip)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="accounts (instances) per /v1/predict_batch (/v1/<use case>/predict_batch) request")
    parser.add_argument("--batch-connections", type=int, default=4)
    parser.add_argument("--tenant", help="tenant to load (default: one with a challenger, else the first)")
    parser.add_argument("--use-case", action="append", dest="use_cases", metavar="NAME",
                        help="churn (/v1/predict) or a use case of the manifest (/v1/NAME/predict); repeatable, "
                             "measured in the order given; `all`: churn and every published use case "
                             "(default: churn)")
    parser.add_argument("--service", default="bentos.service:ChurnService",
                        help="what `bentoml serve` serves (e.g. a patched copy on --pythonpath)")
    parser.add_argument("--pythonpath", default="", help="prepended to PYTHONPATH of the BentoML service")
    parser.add_argument("--skip-bare", action="store_true", help="measure the BentoML service alone")
    parser.add_argument("--pycache", metavar="DIR",
                        help="run the servers with a bytecode cache in DIR (PYTHONPYCACHEPREFIX, bytecode writing "
                             "on), as in an image whose packages are compiled; default: this environment as it is")
    args = parser.parse_args(argv)
    # `timeout` and friends send SIGTERM: turn it into SystemExit so that the servers are stopped
    # (otherwise circus keeps an orphaned `bentoml serve` and its workers alive).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_start = os.getloadavg()[0]

    if shutil.which("wrk") is None:
        print("error: the load generator `wrk` is not installed (Debian: `apt-get install -y wrk`)", file=sys.stderr)
        return 1
    try:
        import psutil  # noqa: F401
    except ImportError:
        print("error: psutil is not importable in this environment", file=sys.stderr)
        return 1

    from mlops.core.serving import ApiKeyStore, read_manifest, serving_dir

    home = Path(args.home).resolve()
    os.environ["MLOPS_HOME"] = str(home)
    folder = serving_dir(home)
    manifest = read_manifest(folder)
    tenants = manifest.get("tenants", {})
    declared = manifest.get("use_cases", {})
    names: list[str] = []
    for name in args.use_cases or [CHURN]:
        for n in ([CHURN, *declared] if name == "all" else [name]):
            if n not in names:
                names.append(n)
    unknown = [n for n in names if n != CHURN and not declared.get(n, {}).get("tenants")]
    if unknown:
        print(f"error: use case(s) {', '.join(unknown)} not published in {folder / 'manifest.json'} (published: "
              f"{', '.join(u for u, e in declared.items() if e.get('tenants')) or 'none'}); run "
              f"`mlops --home {home} build`", file=sys.stderr)
        return 1
    if CHURN in names and not tenants:
        print(f"error: no tenants in {folder / 'manifest.json'}; run `mlops --home {home} build`",
              file=sys.stderr)
        return 1

    import pandas as pd

    targets: list[Target] = []
    accounts: dict[str, list[str]] = {}
    single_ids: list[str] = []
    if CHURN in names:
        accounts = {t: pd.read_parquet(folder / e["snapshot"]["file"], columns=["account_id"])["account_id"].tolist()
                    for t, e in tenants.items()}
    churn_target = None
    for name in names:
        if name == CHURN:
            tenant = pick_tenant(tenants, args.tenant)
            entry = tenants[tenant]
            rng = random.Random(20260401)  # the bodies this benchmark has always sent
            single_ids = rng.sample(accounts[tenant], min(BODIES, len(accounts[tenant])))
            batch = [{"tenant": tenant, "account_ids": rng.choices(accounts[tenant], k=args.batch_size)}
                     for _ in range(8)]
            target = churn_target = Target(
                CHURN, tenant, entry, "/v1/predict", "/v1/predict_batch",
                [{"tenant": tenant, "account_id": a} for a in single_ids], batch, shadow=has_shadow(entry))
        else:
            from bentos.usecase_serving import UseCaseDeclaration

            declaration = declared[name]["declaration"]
            entries = declared[name]["tenants"]
            tenant = pick_tenant(entries, args.tenant or (churn_target.tenant if churn_target else None))
            entry = entries[tenant]
            served = UseCaseDeclaration(declaration)
            _, features = served.read_snapshot(folder / entry["snapshot"]["file"])
            lookup_values = (pd.read_parquet(folder / entry["snapshot"]["file"], columns=[served.lookup_key])
                             [served.lookup_key].astype(str).tolist() if served.lookup else [])
            rng = random.Random(20261128)
            single = [{"tenant": tenant, **i} for i in usecase_instances(declaration, lookup_values, BODIES, rng)]
            batch = [{"tenant": tenant,
                      "instances": usecase_instances(declaration, lookup_values, args.batch_size, rng,
                                                     start=BODIES + b * args.batch_size)}
                     for b in range(8)]
            target = Target(name, tenant, entry, f"/v1/{name}/predict", f"/v1/{name}/predict_batch", single, batch,
                            # the model timed on snapshot rows with the request fields drawn (as the service checks)
                            matrix=served.verify_sample(features, len(features)), shadow=has_shadow(entry))
        targets.append(target)

    ceilings = {t.name: model_ceiling(folder, t.entry, args.batch_size, t.matrix) for t in targets}

    store = ApiKeyStore(folder)
    all_tenants = sorted({*(tenants if CHURN in names else {}),
                          *(t for n in names if n != CHURN for t in declared[n]["tenants"])})
    keys = {t: store.create(t) for t in all_tenants}
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    files: dict[tuple[str, str], Path] = {}
    for t in targets:
        files[t.name, "single"] = write_bodies(tmp / f"{t.name}-single.jsonl", t.single)
        files[t.name, "batch"] = write_bodies(tmp / f"{t.name}-batch.jsonl", t.batch)
    bare_single_file = bare_batch_file = None
    if churn_target is not None:
        bare_single_file = write_bodies(tmp / "bare-single.jsonl", [{"account_id": a} for a in single_ids])
        bare_batch_file = write_bodies(tmp / "bare-batch.jsonl",
                                       [{"account_ids": b["account_ids"]} for b in churn_target.batch])

    env = {**os.environ, "MLOPS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    if args.pycache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(Path(args.pycache).resolve())
    if env.get("PYTHONPYCACHEPREFIX"):
        bytecode = f"cached in {env['PYTHONPYCACHEPREFIX']}"
    else:
        packages = ("bentoml", "_bentoml_sdk", "pandas", "pyarrow", "uvicorn", "starlette", "pydantic")
        has_pyc = {name: (Path(importlib.util.find_spec(name).origin).parent / "__pycache__").exists()
                   for name in packages}
        bytecode = (f".pyc files present for: {', '.join(n for n, ok in has_pyc.items() if ok) or 'none'}; "
                    f"missing for: {', '.join(n for n, ok in has_pyc.items() if not ok) or 'none'}"
                    + (" (PYTHONDONTWRITEBYTECODE is set: those compile from source at every start)"
                       if env.get("PYTHONDONTWRITEBYTECODE") else ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [args.pythonpath, str(REPO), env.get("PYTHONPATH", "")] if p)
    bin_dir = Path(sys.executable).parent
    bentoml_cmd = [str(bin_dir / "bentoml")] if (bin_dir / "bentoml").exists() else [sys.executable, "-m", "bentoml"]

    servers: list[Server] = []
    notes: list[str] = []
    soak = None
    answered: dict[str, list[str]] = {}
    try:
        # 1. cold start
        print(f"starting {' '.join(['bentoml', 'serve', args.service])} ...", flush=True)
        port = free_port()
        bento = start_server(
            "bentoml", [*bentoml_cmd, "serve", args.service, "--host", "127.0.0.1", "--port", str(port)],
            port, env, tmp,
        )
        servers.append(bento)
        cold = wait_ready(bento)
        # every tenant of every measured use case answers its first request (a body built as the load's)
        for t in targets:
            deployed = tenants if t.name == CHURN else declared[t.name]["tenants"]
            answered[t.name] = []
            for tn in deployed:
                body = {**t.single[0], "tenant": tn}
                if t.name == CHURN:
                    body["account_id"] = accounts[tn][0]
                elif tn != t.tenant and declared[t.name]["declaration"]["lookup"]:
                    lk = declared[t.name]["declaration"].get("lookup_key") or declared[t.name]["declaration"]["entity"]["key"]
                    body[lk] = str(pd.read_parquet(folder / deployed[tn]["snapshot"]["file"], columns=[lk])[lk].iloc[0])
                status, answer = request(bento.port, "POST", t.path, body, keys[tn])
                if status == 200:
                    answered[t.name].append(tn)
                else:
                    notes.append(f"{t.name}, tenant {tn}: first prediction answered {status}: {answer[:300]!r}")
        all_tenants_s = time.perf_counter() - bento.started
        print(f"  /readyz 200 after {cold:.2f} s; "
              + "; ".join(f"{t.name}: {len(answered[t.name])}/"
                          f"{len(tenants if t.name == CHURN else declared[t.name]['tenants'])} tenants"
                          for t in targets)
              + f" answered a prediction after {all_tenants_s:.2f} s", flush=True)

        # 2. the bare baseline (churn's; started after the cold start, so as not to share the CPUs with it)
        bare = None
        if churn_target is not None and not args.skip_bare:
            entry = churn_target.entry
            bare_env = {**env, "BARE_MODEL_FILE": str(folder / entry["champion"]["model_file"]),
                        "BARE_SNAPSHOT": str(folder / entry["snapshot"]["file"])}
            port = free_port()
            bare = start_server(
                "bare", [sys.executable, "-m", "uvicorn", "benchmarks.serving_support.bare_app:app", "--host",
                         "127.0.0.1", "--port", str(port), "--workers", "1", "--no-access-log", "--log-level",
                         "warning"],
                port, bare_env, tmp,
            )
            servers.append(bare)
            wait_ready(bare)
            # same model, same row: the two servers must agree
            token = keys[churn_target.tenant]
            _, b1 = request(bento.port, "POST", "/v1/predict",
                            {"tenant": churn_target.tenant, "account_id": single_ids[0]}, token)
            _, b2 = request(bare.port, "POST", "/v1/predict", {"account_id": single_ids[0]})
            s1, s2 = json.loads(b1)["score"], json.loads(b2)["score"]
            if abs(s1 - s2) > 1e-9:
                notes.append(f"scores differ for {single_ids[0]}: BentoML {s1} vs bare {s2}")

        def load(target: Target, key: str, server: Server, path: str, bodies: Path, conns: int) -> None:
            token = keys[target.tenant]
            if args.warmup > 0:
                run_wrk(key, server.port, path, bodies, token, args.warmup, conns, args.threads)
            target.results[key] = run_wrk(key, server.port, path, bodies, token, args.duration, conns, args.threads,
                                          server_pid=server.proc.pid)

        # 3. single predictions, the same wrk run against each route (churn: then the bare server)
        for t in targets:
            print(f"wrk {t.name} single ({t.path}): {args.connections} connections, {args.threads} threads, "
                  f"{args.warmup:.0f} s warm-up + {args.duration:.0f} s", flush=True)
            load(t, "single", bento, t.path, files[t.name, "single"], args.connections)
            if t is churn_target and bare:
                print("wrk bare single", flush=True)
                load(t, "bare_single", bare, "/v1/predict", bare_single_file, args.connections)

        # 4. batch
        conns = max(args.batch_connections, args.threads)
        for t in targets:
            print(f"wrk {t.name} batch ({t.batch_path}): {args.batch_size:,} per request, {conns} connections, "
                  f"{args.threads} threads, {args.warmup:.0f} s warm-up + {args.duration:.0f} s", flush=True)
            load(t, "batch", bento, t.batch_path, files[t.name, "batch"], conns)
            if t is churn_target and bare:
                print("wrk bare batch", flush=True)
                load(t, "bare_batch", bare, "/v1/predict_batch", bare_batch_file, conns)

        # 5. soak (the first use case measured)
        if args.soak > 0:
            if bare:
                bare.stop()  # the soak is about the service alone
            first = targets[0]
            print(f"soak: {args.soak:.0f} s of {first.path} load, RSS sampled every {SOAK_SAMPLE_S:.0f} s",
                  flush=True)
            cmd, wenv = wrk_command(bento.port, first.path, files[first.name, "single"], keys[first.tenant],
                                    args.soak, args.connections, args.threads)
            samples: list[tuple[float, int, int]] = []
            t0 = time.monotonic()
            wrk = subprocess.Popen(cmd, env=wenv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out_box: dict = {}
            reader = threading.Thread(
                target=lambda: out_box.update(zip(("out", "err"), wrk.communicate(), strict=True))
            )
            reader.start()
            next_at = t0 + 1.0  # first sample once the load is on
            while wrk.poll() is None:
                now = time.monotonic()
                if now >= next_at:
                    w, tot = rss_sample(bento.proc.pid)
                    samples.append((now - t0, w, tot))
                    print(f"  t={now - t0:5.0f} s  worker RSS {w / 2**20:7.1f} MiB  group RSS {tot / 2**20:7.1f} MiB",
                          flush=True)
                    next_at += SOAK_SAMPLE_S
                time.sleep(0.2)
            reader.join()
            w, tot = rss_sample(bento.proc.pid)
            samples.append((time.monotonic() - t0, w, tot))
            soak = (samples, parse_wrk("bento_soak", out_box.get("out", "")))
    except Exception as exc:  # the benchmark itself failed: say why, with the servers' logs
        print(f"error: {exc}", file=sys.stderr)
        for s in servers:
            print(f"--- {s.name} log ({s.log}) ---\n{s.log_tail()}", file=sys.stderr)
        return 1
    finally:
        for s in servers:
            s.stop()
        for key_text in keys.values():
            with contextlib.suppress(Exception):  # best effort
                store.revoke(key_text.split("_", 2)[1])

    # --- report ------------------------------------------------------------------------------
    import bentoml
    import lightgbm

    print()
    print(
        f"Serving: BentoML {bentoml.__version__} ({args.service}), LightGBM {lightgbm.__version__}; wrk "
        f"{args.connections} connections / {args.threads} threads, {args.duration:.0f} s per run after "
        f"{args.warmup:.0f} s warm-up; {os.cpu_count()} CPU cores shared by wrk and the server; 1-min load average "
        f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; measured in this order: "
        f"{', '.join(t.name for t in targets)}"
    )
    for t in targets:
        e = t.entry
        print(f"  {t.name}: tenant {t.tenant!r} (champion v{e['champion']['version']}, challenger "
              f"{'v' + str(e['challenger']['version']) + ' -> shadow scoring ON' if t.shadow else 'none -> shadow scoring off'}), "
              f"{len(t.single)} single bodies cycled ({', '.join(sorted(t.single[0]))})")
    print()
    print("model alone, in process, 1 thread (measured before the servers start):")
    for t in targets:
        for role, c in ceilings[t.name].items():
            print(f"  {t.name} {role} ({c['trees']} trees): LightGBM Booster.predict {c['single_us']:.0f} us per "
                  f"single row, {c['batch_ms']:.1f} ms per {args.batch_size:,} rows = "
                  f"{args.batch_size / c['batch_ms'] * 1000:,.0f} rows/s per core; the service's scorer, "
                  f"{c['service_scorer']}: {c['service_single_us']:.0f} us, {c['service_batch_ms']:.1f} ms = "
                  f"{args.batch_size / c['service_batch_ms'] * 1000:,.0f} rows/s per core "
                  f"({c['batch_ms'] / c['service_batch_ms']:.1f}x); largest score difference {c['max_gap']:.1e}")
    print()
    all_answered = all(len(answered[t.name]) == len(tenants if t.name == CHURN else declared[t.name]["tenants"])
                       for t in targets)
    print(f"cold start (process start -> /readyz 200): {cold:.2f} s; every tenant of "
          + ", ".join(f"{t.name} ({', '.join(answered[t.name]) or 'none'})" for t in targets)
          + f" answered a prediction: {'yes' if all_answered else 'NO'} ({all_tenants_s:.2f} s); "
          f"Python bytecode {bytecode}")
    print()
    print("server CPU = CPU time (user + system) of the server's processes during the run, per request: what the "
          "server costs, much less sensitive than req/s to what else runs on the machine; connections = wrk's "
          "connections per server process (BentoML's workers share one listening socket: the spread is chance)")
    print()
    print("| server | req/s | p50 ms | p90 ms | p99 ms | max ms | requests | errors | server CPU ms/request "
          "| connections |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
    ratio = None
    for t in targets:
        r = t.results["single"]
        r.label = f"BentoML {t.path} (shadow {'on' if t.shadow else 'off'})"
        print(row(r))
        if "bare_single" in t.results:
            bare_r = t.results["bare_single"]
            bare_r.label = "bare uvicorn+Starlette /v1/predict"
            print(row(bare_r))
            ratio = r.rps / bare_r.rps if bare_r.rps else 0.0
            print(f"| ratio BentoML / bare | {ratio:.2f}x | {r.p50_ms / bare_r.p50_ms:.2f}x | "
                  f"{r.p90_ms / bare_r.p90_ms:.2f}x | {r.p99_ms / bare_r.p99_ms:.2f}x | | | | | |")
    print()
    print(f"| batch ({args.batch_size:,} per request) | requests/s | predictions/s | p50 ms | p99 ms | errors "
          f"| server CPU ms/request | connections |")
    print("|:---|---:|---:|---:|---:|---:|---:|:---|")
    for t in targets:
        bb = t.results["batch"]
        print(f"| BentoML {t.batch_path} | {bb.rps:,.1f} | {bb.rps * args.batch_size:,.0f} | {bb.p50_ms:.1f} "
              f"| {bb.p99_ms:.1f} | {bb.error_count} | {cpu_ms(bb.server_cpu_ms_per_request)} | {spread(bb)} |")
        if "bare_batch" in t.results:
            r = t.results["bare_batch"]
            print(f"| bare /v1/predict_batch (scores only) | {r.rps:,.1f} | {r.rps * args.batch_size:,.0f} "
                  f"| {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.error_count} | {cpu_ms(r.server_cpu_ms_per_request)} "
                  f"| {spread(r)} |")

    # each use case's server CPU against churn's, measured in this run
    cpu_ratios: dict[str, tuple[float, float | None]] = {}
    if churn_target is not None and len(targets) > 1:
        print()
        print("| server CPU per request, use case / churn (same run) | single | batch |")
        print("|:---|---:|---:|")
        cs, cb = (churn_target.results[k].server_cpu_ms_per_request for k in ("single", "batch"))
        for t in targets:
            if t is churn_target:
                continue
            us, ub = (t.results[k].server_cpu_ms_per_request for k in ("single", "batch"))
            single_ratio = us / cs if us and cs else float("nan")
            batch_ratio = ub / cb if ub and cb else None
            cpu_ratios[t.name] = (single_ratio, batch_ratio)
            print(f"| {t.name} / churn | {single_ratio:.2f}x ({us:.3f} / {cs:.3f} ms) | "
                  + (f"{batch_ratio:.2f}x ({ub:.1f} / {cb:.1f} ms)" if batch_ratio is not None else "") + " |")

    growth = None
    if soak:
        samples, sr = soak
        first, last = samples[0], samples[-1]
        max_w = max(s[1] for s in samples)
        max_t = max(s[2] for s in samples)
        growth = (last[1] - first[1]) / first[1] * 100 if first[1] else float("nan")
        growth_t = (last[2] - first[2]) / first[2] * 100 if first[2] else float("nan")
        mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
        print()
        print(f"soak ({targets[0].path}): {sr.duration_s:.0f} s, {sr.requests:,} requests ({sr.rps:,.0f} req/s, "
              f"p50 {sr.p50_ms:.2f} ms, p99 {sr.p99_ms:.2f} ms, {sr.error_count} errors), {len(samples)} RSS samples")
        print()
        print("| RSS MiB | first | last | max | growth (last vs first) |")
        print("|:---|---:|---:|---:|---:|")
        print(f"| BentoML worker | {mib(first[1])} | {mib(last[1])} | {mib(max_w)} | {growth:+.1f}% |")
        print(f"| process group (all) | {mib(first[2])} | {mib(last[2])} | {mib(max_t)} | {growth_t:+.1f}% |")
        steady = [s for s in samples if s[0] >= SOAK_WARMUP_S]
        if len(steady) >= 2 and steady[0][1]:
            print(f"\nworker RSS from t={steady[0][0]:.0f} s (after the first {SOAK_WARMUP_S:.0f} s of soak) to the end: "
                  f"{mib(steady[0][1])} -> {mib(steady[-1][1])} MiB, {(steady[-1][1] - steady[0][1]) / steady[0][1] * 100:+.1f}% "
                  "(warm-up growth vs steady-state growth)")

    errors = {f"{t.name}/{k}": r.error_count for t in targets for k, r in t.results.items() if r.error_count}
    if errors:
        notes.append(f"wrk counted errors (non-2xx, timeouts, socket errors): {errors}")

    print()
    print("| target | measured | verdict |")
    print("|:---|---:|:---|")
    print(f"| cold start <= {TARGET_COLD_START_S:.0f} s ({len(all_tenants)} tenants ready) | {cold:.2f} s "
          f"| {verdict(cold <= TARGET_COLD_START_S and all_answered)} |")
    if churn_target is not None:
        bs, bb = churn_target.results["single"], churn_target.results["batch"]
        print(f"| BentoML single p99 <= {TARGET_P99_MS:.0f} ms | {bs.p99_ms:.2f} ms "
              f"| {verdict(bs.p99_ms <= TARGET_P99_MS)} |")
        if ratio is not None:
            print(f"| BentoML throughput >= {TARGET_THROUGHPUT_RATIO}x bare | {ratio:.2f}x "
                  f"| {verdict(ratio >= TARGET_THROUGHPUT_RATIO)} |")
        print(f"| batch >= {TARGET_BATCH_ACCOUNTS_S:,} accounts/s | {bb.rps * args.batch_size:,.0f} "
              f"| {verdict(bb.rps * args.batch_size >= TARGET_BATCH_ACCOUNTS_S and not bb.error_count)} |")
    for name, limit in TARGET_USECASE_CPU_RATIO.items():
        if name in cpu_ratios:
            single_ratio = cpu_ratios[name][0]
            t = next(t for t in targets if t.name == name)
            print(f"| {name} single server CPU/request <= {limit}x churn's (same run) | {single_ratio:.2f}x "
                  f"| {verdict(single_ratio <= limit and not t.results['single'].error_count)} |")
        elif name in names:
            print(f"| {name} single server CPU/request <= {limit}x churn's | not run (add --use-case churn) | n/a |")
    if growth is not None:
        # A leak shows as growth: the verdict is on the highest RSS of the soak against its first
        # sample. RSS falling (memory the batch runs before the soak used, handed back) is shown, not failed.
        peak_growth = (max_w - first[1]) / first[1] * 100 if first[1] else float("nan")
        print(f"| soak worker RSS growth within {TARGET_SOAK_GROWTH_PCT:.0f}% | peak {peak_growth:+.1f}%, last "
              f"{growth:+.1f}% vs the first sample | {verdict(peak_growth <= TARGET_SOAK_GROWTH_PCT)} |")
    else:
        print(f"| soak worker RSS growth within {TARGET_SOAK_GROWTH_PCT:.0f}% | not run (--soak 300) | n/a |")
    for note in notes:
        print(f"note: {note}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
