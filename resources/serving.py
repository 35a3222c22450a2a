"""What the serving layer reads and writes, shared by Dagster, the CLI and the BentoML service.

The service never opens a warehouse or the registry. It reads a *serving bundle*:

    <serving dir>/manifest.json                      tenant -> champion, challenger, snapshot, history
    <serving dir>/models/<tenant>/v<N>.txt           LightGBM model files exported from the registry
    <serving dir>/models/<tenant>/v<N>-<hash>.o      the same trees compiled to native code (lleaves)
    <serving dir>/online/<tenant>/features-vNNNNN.parquet   online feature snapshots
    <serving dir>/api_keys.json                      hashed API keys

and appends prediction logs as closed Parquet segments under ``MLOPS_HOME/prediction_logs``.
Every file others read is written to a temporary name and renamed.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import json
import os
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from pathlib import Path

from resources.environment import write_atomic

MANIFEST = "manifest.json"
SERVING_DIR_ENV = "MLOPS_SERVING_DIR"
PREDICTION_LOG_COLUMNS = {
    "prediction_id": "string",
    "tenant": "string",
    "account_id": "string",
    "role": "string",
    "model_version": "string",
    "score": "float64",
    "latency_ms": "float64",
    "snapshot_version": "int64",
    "endpoint": "string",
    "requested_at": "datetime64[us]",
}


def serving_dir(home: Path) -> Path:
    """The bundle the service reads: ``$MLOPS_SERVING_DIR`` (inside a bento) or ``<home>/serving``."""
    configured = os.environ.get(SERVING_DIR_ENV)
    if configured:
        # Relative to the project root (inside a bento: its src/ folder), not the working directory.
        from resources.environment import PROJECT_ROOT

        return (PROJECT_ROOT / configured).resolve()
    return Path(home) / "serving"


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        return {"tenants": {}, "written_at": None}
    return json.loads(path.read_text())


def _write_manifest(folder: Path, manifest: dict) -> None:
    manifest["written_at"] = dt.datetime.now(dt.UTC).isoformat()
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


_manifest_lock = threading.Lock()


# --- compiled models ---------------------------------------------------------------------------
# Every published model file is also compiled to native code by lleaves (LLVM): each tree becomes
# straight-line machine code, scored 3-5x faster than by LightGBM's own predictor, with the same
# float64 comparisons and the same scores (the service checks this on load). Compiling costs
# seconds once per model version, at publication, never at service start: the service loads the
# object file in milliseconds. The object is built for the baseline x86-64 CPU, so it runs on any
# x86-64 host the bento is deployed to; the service falls back to LightGBM where it cannot use it.
# Inlining (lleaves' default) scores another ~1.6x faster but compiles ~2.5x slower (~11 s for
# 250 trees here): publication latency is part of the closed loop, so it is off.
COMPILE_OPTIONS = {"finline": False, "fcodemodel": "large", "target_cpu": "x86-64", "target_cpu_features": ""}
# The options the service loads the object with: those of the compilation (the object's name,
# which the service checks, says it was compiled with COMPILE_OPTIONS).
LOAD_OPTIONS = {k: COMPILE_OPTIONS[k] for k in ("fcodemodel", "target_cpu", "target_cpu_features")}


def compiled_model_name(model_file: Path) -> str:
    """``v<N>-<hash>.o``: the hash covers the model text, the compile options and the compiler versions,
    so a stale object is never picked up (lleaves does not check its cache)."""
    from importlib.metadata import version

    digest = hashlib.sha256(model_file.read_bytes())
    digest.update(json.dumps([COMPILE_OPTIONS, version("lleaves"), version("llvmlite")]).encode())
    return f"{model_file.stem}-{digest.hexdigest()[:16]}.o"


def compile_model(model_file: Path) -> dict:
    """Compile a published model file next to itself (once); returns the manifest's ``compiled`` entry."""
    import lleaves
    import llvmlite.binding as llvm

    target = model_file.with_name(compiled_model_name(model_file))
    if not target.exists():
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.unlink(missing_ok=True)
        lleaves.Model(model_file=str(model_file)).compile(cache=str(tmp), **COMPILE_OPTIONS)
        os.replace(tmp, target)
    return {"file": target.name, "triple": llvm.get_process_triple()}


def _model_entry(folder: Path, tenant: str, version: str) -> dict:
    """The manifest entry of a published model version: its file, and its compiled object when one exists."""
    model_file = folder / "models" / tenant / f"v{version}.txt"
    entry = {"version": version, "model_file": f"models/{tenant}/v{version}.txt"}
    try:
        compiled = compile_model(model_file)
    except Exception as exc:  # the service scores with LightGBM instead: slower, same scores
        print(f"serving: could not compile {model_file.name} for tenant {tenant!r}, LightGBM will score it: {exc!r}")
    else:
        entry["compiled"] = {**compiled, "file": f"models/{tenant}/{compiled['file']}"}
    return entry


def publish_tenant(
    folder: Path,
    tenant: str,
    *,
    champion: tuple[str, Path],
    challenger: tuple[str, Path] | None,
    snapshot: tuple[int, Path],
) -> dict:
    """Copy model files and the online snapshot into the bundle, then switch the manifest atomically.

    ``champion``/``challenger`` are (version, model file); ``snapshot`` is (version, parquet file).
    Files are copied before the manifest names them, so a reader never sees a missing file.
    """
    models = folder / "models" / tenant
    online = folder / "online" / tenant
    models.mkdir(parents=True, exist_ok=True)
    online.mkdir(parents=True, exist_ok=True)
    entries = {}
    for version, source in [champion] + ([challenger] if challenger else []):
        _copy_atomic(source, models / f"v{version}.txt")
        entries[version] = _model_entry(folder, tenant, version)  # compiled before the manifest names it
    snap_version, snap_source = snapshot
    _copy_atomic(snap_source, online / snap_source.name)
    with _manifest_lock:
        manifest = read_manifest(folder)
        previous = manifest["tenants"].get(tenant, {})
        history = list(previous.get("champion_history", []))
        if not history or history[-1] != champion[0]:
            history.append(champion[0])
        manifest["tenants"][tenant] = {
            "champion": entries[champion[0]],
            "challenger": entries[challenger[0]] if challenger else None,
            "snapshot": {"version": snap_version, "file": f"online/{tenant}/{snap_source.name}"},
            "champion_history": history,
        }
        _write_manifest(folder, manifest)
    return manifest["tenants"][tenant]


def rollback_tenant(folder: Path, tenant: str) -> tuple[str, str]:
    """Point the tenant's champion back at its previous champion; returns (from, to) versions."""
    with _manifest_lock:
        manifest = read_manifest(folder)
        entry = manifest["tenants"].get(tenant)
        if entry is None:
            raise KeyError(f"tenant {tenant!r} is not deployed")
        history = entry["champion_history"]
        if len(history) < 2:
            raise ValueError(f"tenant {tenant!r} has no previous champion to roll back to")
        current, previous = history[-1], history[-2]
        entry["champion"] = _model_entry(folder, tenant, previous)
        entry["champion_history"] = history[:-1]
        entry["challenger"] = None  # the rolled-back model must not keep shadowing
        _write_manifest(folder, manifest)
    return current, previous


def _copy_atomic(source: Path, target: Path) -> None:
    if target.exists():
        return  # model files and snapshots are immutable once published
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


# --- API keys ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str


class ApiKeyStore:
    """Tenant API keys, stored as salted hashes; the plaintext is shown once, at creation."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "api_keys.json"

    def _load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def create(self, tenant: str) -> str:
        keys = self._load()
        key_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(24)
        salt = secrets.token_hex(8)
        keys[key_id] = {
            "tenant": tenant,
            "salt": salt,
            "hash": _hash(salt, secret),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "revoked": False,
        }
        write_atomic(self.path, json.dumps(keys, indent=2).encode())
        return f"mlk_{key_id}_{secret}"

    def revoke(self, key_id: str) -> None:
        keys = self._load()
        if key_id not in keys:
            raise KeyError(f"no API key with id {key_id!r}")
        keys[key_id]["revoked"] = True
        write_atomic(self.path, json.dumps(keys, indent=2).encode())

    def snapshot(self) -> dict:
        return self._load()


def verify_key(keys: dict, presented: str | None) -> ApiKey | None:
    """The key's identity if ``presented`` is a valid, unrevoked key; None otherwise."""
    if not presented or not presented.startswith("mlk_") or presented.count("_") < 2:
        return None
    _, key_id, secret = presented.split("_", 2)
    entry = keys.get(key_id)
    if entry is None or entry.get("revoked"):
        return None
    if not hmac.compare_digest(entry["hash"], _hash(entry["salt"], secret)):
        return None
    return ApiKey(key_id, entry["tenant"])


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


# --- prediction log ------------------------------------------------------------------------
def prediction_log_dir(home: Path, tenant: str) -> Path:
    return Path(home) / "prediction_logs" / tenant


@dataclass(frozen=True)
class LogChunk:
    """``rows`` predictions of one request (or one shadow micro-batch) for one tenant, by column.

    Every column is either one value for all ``rows`` rows or a list, tuple or numpy array of
    ``rows`` values (``requested_at_us``: microseconds since the epoch, UTC). The service appends one chunk per
    request instead of one dict per prediction: cheap on the request path, columnar for Parquet.
    """

    rows: int
    role: str | Sequence[str]
    model_version: str | Sequence[str]
    snapshot_version: int | Sequence[int]
    endpoint: str | Sequence[str]
    requested_at_us: int | Sequence[int]
    latency_ms: float | Sequence[float]
    prediction_ids: str | Sequence[str]
    account_ids: str | Sequence[str]
    scores: float | Sequence[float]


class PredictionLogWriter:
    """Buffers prediction records and writes them as closed, immutable Parquet segments.

    A segment is rotated when it holds ``max_rows`` records or is ``max_age_s`` old, and on
    close(). Segments are written to a temporary name and renamed, so the ingestion asset only
    ever sees complete files.

    After ``start()``, a background thread writes the segments: ``append``/``append_chunk`` only
    buffer (a lock, a list append), so a request never waits for Parquet. Without ``start()``,
    the caller rotates with ``rotate_due`` and a full segment is written by the appending call.
    """

    def __init__(self, home: Path, max_rows: int = 5000, max_age_s: float = 5.0):
        self.home = Path(home)
        self.max_rows, self.max_age_s = max_rows, max_age_s
        self._chunks: dict[str, list[LogChunk]] = {}
        self._rows: dict[str, int] = {}
        self._opened: dict[str, float] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one segment write at a time, in sequence order
        self._seq = 0
        self._token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- buffering (the request path) ---
    def append(self, records: list[dict], now: float) -> None:
        """Append records given as dicts with the columns of ``PREDICTION_LOG_COLUMNS``."""
        by_tenant: dict[str, list[dict]] = {}
        for record in records:
            by_tenant.setdefault(record["tenant"], []).append(record)
        for tenant, rows in by_tenant.items():
            column = lambda name, rows=rows: [r[name] for r in rows]  # noqa: E731
            self.append_chunk(tenant, LogChunk(
                rows=len(rows), role=column("role"), model_version=column("model_version"),
                snapshot_version=column("snapshot_version"), endpoint=column("endpoint"),
                requested_at_us=[_epoch_us(r["requested_at"]) for r in rows], latency_ms=column("latency_ms"),
                prediction_ids=column("prediction_id"), account_ids=column("account_id"), scores=column("score"),
            ), now)

    def append_chunk(self, tenant: str, chunk: LogChunk, now: float) -> None:
        full = False
        with self._lock:
            chunks = self._chunks.get(tenant)
            if not chunks:
                chunks = self._chunks[tenant] = []
                self._opened[tenant] = now
                self._rows[tenant] = 0
            chunks.append(chunk)
            self._rows[tenant] += chunk.rows
            full = self._rows[tenant] >= self.max_rows
        if full:
            if self._thread is not None:
                self._wake.set()
            else:
                self._flush(lambda t, opened, rows: rows >= self.max_rows)

    # --- writing ---
    def start(self) -> None:
        """Write segments from a background thread from now on (rotation by age and size)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        tick = max(min(self.max_age_s / 4, 0.25), 0.01)
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            try:
                self.rotate_due(time.monotonic())
            except Exception as exc:  # keep buffering; the next tick retries, close() writes the rest
                print(f"prediction log: writing a segment failed: {exc!r}")

    def rotate_due(self, now: float) -> int:
        """Close every segment older than max_age_s or fuller than max_rows; returns how many were written."""
        return self._flush(lambda t, opened, rows: rows >= self.max_rows or now - opened >= self.max_age_s)

    def close(self) -> None:
        """Stop the background thread (if any) and write everything buffered."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout=30)
        self._flush(lambda t, opened, rows: True)

    def _flush(self, due) -> int:
        with self._write_lock:
            with self._lock:
                tenants = [t for t, chunks in self._chunks.items()
                           if chunks and due(t, self._opened[t], self._rows[t])]
                batches = [(t, self._take(t)) for t in tenants]
            for tenant, chunks in batches:
                self._write_segment(tenant, chunks)
        return len(batches)

    def _take(self, tenant: str) -> list[LogChunk]:
        chunks = self._chunks.pop(tenant)
        self._opened.pop(tenant, None)
        self._rows.pop(tenant, None)
        return chunks

    def _write_segment(self, tenant: str, chunks: list) -> Path:
        import pyarrow.parquet as pq

        folder = prediction_log_dir(self.home, tenant) / "closed"
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        target = folder / f"segment-{stamp}-{self._token}-{self._seq:06d}.parquet"
        table = _segment_table(tenant, chunks)
        tmp = folder / f".{target.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, target)
        return target


def _epoch_us(value: dt.datetime) -> int:
    """Microseconds since the epoch of a naive UTC datetime (the log's ``requested_at``)."""
    delta = value - dt.datetime(1970, 1, 1)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@functools.cache
def _segment_schema():
    """The Arrow schema of a segment, with the pandas metadata ``DataFrame.to_parquet`` writes, so
    that readers see the same dtypes as from segments written by pandas."""
    import pandas as pd
    import pyarrow as pa

    empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in PREDICTION_LOG_COLUMNS.items()})
    return pa.Schema.from_pandas(empty, preserve_index=False)


def _segment_table(tenant: str, chunks: list[LogChunk]):
    """One Arrow table from the buffered chunks, column by column, in Arrow and numpy where it can."""
    import numpy as np
    import pyarrow as pa

    counts = np.fromiter(map(attrgetter("rows"), chunks), dtype=np.int64, count=len(chunks))
    # Chunk of each row; None where every chunk holds one row (single predictions).
    expand = None if bool((counts == 1).all()) else np.repeat(np.arange(len(chunks)), counts)
    sequence = (list, tuple, np.ndarray)

    def strings(name: str) -> pa.Array:
        values = list(map(attrgetter(name), chunks))
        if all(map(isinstance, values, repeat(str))):  # one value per chunk
            array = pa.array(values, type=pa.string())
            return array if expand is None else array.take(pa.array(expand))
        flat: list = []
        for value, n in zip(values, counts.tolist(), strict=True):
            flat.extend([value] * n if isinstance(value, str) else value)
        return pa.array(flat, type=pa.string())

    def numbers(name: str, dtype) -> pa.Array:
        values = list(map(attrgetter(name), chunks))
        if not any(map(isinstance, values, repeat(sequence))):  # one value per chunk
            array = np.asarray(values, dtype=dtype)
            return pa.array(array if expand is None else array[expand])
        parts = [np.asarray(v, dtype=dtype) if isinstance(v, sequence) else np.full(n, v, dtype=dtype)
                 for v, n in zip(values, counts.tolist(), strict=True)]
        return pa.array(np.concatenate(parts))

    columns = {
        "prediction_id": strings("prediction_ids"),
        "tenant": pa.repeat(pa.scalar(tenant, type=pa.string()), int(counts.sum())),
        "account_id": strings("account_ids"),
        "role": strings("role"),
        "model_version": strings("model_version"),
        "score": numbers("scores", np.float64),
        "latency_ms": numbers("latency_ms", np.float64),
        "snapshot_version": numbers("snapshot_version", np.int64),
        "endpoint": strings("endpoint"),
        "requested_at": numbers("requested_at_us", np.int64).cast(pa.timestamp("us")),
    }
    return pa.Table.from_arrays(list(columns.values()), schema=_segment_schema())
