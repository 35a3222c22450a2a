"""What the serving layer reads and writes, shared by Dagster, the CLI and the BentoML service.

The service never opens a warehouse or the registry. It reads a *serving bundle*:

    <serving dir>/manifest.json                      tenant -> champion, challenger, snapshot, history
    <serving dir>/models/<tenant>/v<N>.txt           LightGBM model files exported from the registry
    <serving dir>/models/<tenant>/v<N>-<hash>.o      the same trees compiled to native code (lleaves)
    <serving dir>/online/<tenant>/features-vNNNNN.parquet   online feature snapshots
    <serving dir>/api_keys.json                      hashed API keys

Churn (for now) sits at the top level: ``manifest["tenants"][<tenant>]``, ``models/<tenant>/``,
``online/<tenant>/``. Every other use case has its own level below the same bundle::

    manifest["use_cases"][<use case>]["declaration"]      what the service needs of the declaration
    manifest["use_cases"][<use case>]["tenants"][<tenant>]  the entry churn's tenants have
    <serving dir>/models/<use case>/<tenant>/v<N>.txt (and its compiled object)
    <serving dir>/online/<use case>/<tenant>/features-vNNNNN.parquet

and appends prediction logs as closed Parquet segments under ``MLOPS_HOME/prediction_logs``
(``<tenant>/closed`` for churn, ``<use case>/<tenant>/closed`` for the others).
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
from pathlib import Path

from mlops.core.environment import HomeLayout, atomic_path, write_atomic
from mlops.core.names import CHALLENGER, CHAMPION

MANIFEST = "manifest.json"
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
    return HomeLayout(Path(home)).serving_dir


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        return {"tenants": {}, "use_cases": {}, "written_at": None}
    manifest = json.loads(path.read_text())
    manifest.setdefault("use_cases", {})  # manifests written before use cases were served
    return manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    manifest["written_at"] = dt.datetime.now(dt.UTC).isoformat()
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


class NotDeployedError(KeyError):
    """Nothing of this tenant (or use case) is in the serving manifest."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class NoPreviousChampionError(ValueError):
    pass


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
        with atomic_path(target) as tmp:
            lleaves.Model(model_file=str(model_file)).compile(cache=str(tmp), **COMPILE_OPTIONS)
    return {"file": target.name, "triple": llvm.get_process_triple()}


def _model_entry(folder: Path, prefix: str, version: str) -> dict:
    """The manifest entry of a published model version (``models/<prefix>/v<N>.txt``, ``prefix`` being a
    tenant for churn, ``<use case>/<tenant>`` otherwise): its file, and its compiled object when one exists."""
    model_file = folder / "models" / prefix / f"v{version}.txt"
    entry = {"version": version, "model_file": f"models/{prefix}/v{version}.txt"}
    try:
        compiled = compile_model(model_file)
    except Exception as exc:  # the service scores with LightGBM instead: slower, same scores
        print(f"serving: could not compile {model_file.name} of {prefix!r}, LightGBM will score it: {exc!r}")
    else:
        entry["compiled"] = {**compiled, "file": f"models/{prefix}/{compiled['file']}"}
    return entry


def _tenant_entries(manifest: dict, use_case: str | None) -> dict:
    """The manifest's tenant entries of churn (``use_case`` None) or of a use case (created if missing)."""
    if use_case is None:
        return manifest["tenants"]
    return manifest["use_cases"].setdefault(use_case, {"tenants": {}})["tenants"]


def _publish(folder: Path, use_case: str | None, tenant: str, *, champion: tuple[str, Path],
             challenger: tuple[str, Path] | None, snapshot: tuple[int, Path], declaration: dict | None = None) -> dict:
    """Copy model files and the online snapshot into the bundle, then switch the manifest atomically
    (churn's tenants when ``use_case`` is None, else the use case's, with its ``declaration``)."""
    prefix = tenant if use_case is None else f"{use_case}/{tenant}"
    models = folder / "models" / prefix
    online = folder / "online" / prefix
    models.mkdir(parents=True, exist_ok=True)
    online.mkdir(parents=True, exist_ok=True)
    entries = {}
    for version, source in [champion] + ([challenger] if challenger else []):
        _copy_atomic(source, models / f"v{version}.txt")
        entries[version] = _model_entry(folder, prefix, version)  # compiled before the manifest names it
    snap_version, snap_source = snapshot
    _copy_atomic(snap_source, online / snap_source.name)
    with _manifest_lock:
        manifest = read_manifest(folder)
        tenants = _tenant_entries(manifest, use_case)
        if declaration is not None:
            manifest["use_cases"][use_case]["declaration"] = declaration
        previous = tenants.get(tenant, {})
        history = list(previous.get("champion_history", []))
        if not history or history[-1] != champion[0]:
            history.append(champion[0])
        tenants[tenant] = {
            CHAMPION: entries[champion[0]],
            CHALLENGER: entries[challenger[0]] if challenger else None,
            "snapshot": {"version": snap_version, "file": f"online/{prefix}/{snap_source.name}"},
            "champion_history": history,
        }
        _write_manifest(folder, manifest)
    return tenants[tenant]


def _rollback(folder: Path, use_case: str | None, tenant: str) -> tuple[str, str]:
    what = f"tenant {tenant!r}" if use_case is None else f"tenant {tenant!r} of use case {use_case!r}"
    with _manifest_lock:
        manifest = read_manifest(folder)
        if use_case is not None and use_case not in manifest["use_cases"]:
            raise NotDeployedError(f"use case {use_case!r} is not deployed")
        entry = _tenant_entries(manifest, use_case).get(tenant)
        if entry is None:
            raise NotDeployedError(f"{what} is not deployed")
        history = entry["champion_history"]
        if len(history) < 2:
            raise NoPreviousChampionError(f"{what} has no previous champion to roll back to")
        current, previous = history[-1], history[-2]
        entry[CHAMPION] = _model_entry(folder, tenant if use_case is None else f"{use_case}/{tenant}", previous)
        entry["champion_history"] = history[:-1]
        entry[CHALLENGER] = None  # the rolled-back model must not keep shadowing
        _write_manifest(folder, manifest)
    return current, previous


def publish_tenant(
    folder: Path,
    tenant: str,
    *,
    champion: tuple[str, Path],
    challenger: tuple[str, Path] | None,
    snapshot: tuple[int, Path],
) -> dict:
    """Publish churn's models and online snapshot of ``tenant`` (``manifest["tenants"][tenant]``).

    ``champion``/``challenger`` are (version, model file); ``snapshot`` is (version, parquet file).
    Files are copied before the manifest names them, so a reader never sees a missing file.
    """
    return _publish(folder, None, tenant, champion=champion, challenger=challenger, snapshot=snapshot)


def rollback_tenant(folder: Path, tenant: str) -> tuple[str, str]:
    """Point churn's champion of the tenant back at its previous champion; returns (from, to) versions."""
    return _rollback(folder, None, tenant)


# The SQL types a request field may have, as the service parses them (VARCHAR only with levels: a
# categorical input). Dates and free text are no model input.
REQUEST_FIELD_TYPES = ("DOUBLE", "BIGINT", "INTEGER", "BOOLEAN", "VARCHAR")


def serving_declaration(usecase) -> dict:
    """What the service needs of a use-case declaration (``mlops.core.usecase.UseCase``), as JSON: the
    service reads it from the manifest and never reads use-case folders."""
    from mlops.core.model_inputs import ModelInputs

    inputs = ModelInputs.of(usecase)
    fields = []
    for spec in usecase.serving.request_fields:
        if spec.type not in REQUEST_FIELD_TYPES or (spec.type == "VARCHAR" and spec.isin is None):
            raise ValueError(f"use case {usecase.name!r}: serving.request_fields {spec.name!r}: a request field is "
                             f"one of {REQUEST_FIELD_TYPES} (VARCHAR with isin levels), not {spec.type}"
                             f"{' without isin' if spec.type == 'VARCHAR' else ''}")
        fields.append({k: v for k, v in spec.model_dump(mode="json").items()
                       if k in ("name", "type", "nullable", "isin", "min", "max")})
    return {
        "name": usecase.name,
        "title": usecase.title,
        "entity": {"name": usecase.entity.name, "key": usecase.entity.key},
        # the online snapshot's key: the entity's, or another entity's (a payment looks up its account)
        "lookup_key": usecase.feature_key,
        "problem_type": usecase.problem_type,
        "classes": list(usecase.label.classes) if usecase.label.classes else None,
        "lookup": usecase.serving.lookup,
        # categorical as [name, levels] pairs: the manifest is written with sorted keys, and the order of
        # the columns is the model's input order
        "inputs": {"numeric": list(inputs.numeric), "categorical": [[c, list(v)] for c, v in inputs.categorical.items()]},
        "features": list(usecase.features.columns),  # the columns the online snapshot holds
        "request_fields": fields,
    }


def publish_usecase(
    folder: Path,
    usecase,
    tenant: str,
    *,
    champion: tuple[str, Path],
    challenger: tuple[str, Path] | None,
    snapshot: tuple[int, Path],
) -> dict:
    """``publish_tenant`` for a declared use case (``mlops.core.usecase.UseCase``): models under
    ``models/<use case>/<tenant>/``, the snapshot (entity key, ``available_at``, the features) under
    ``online/<use case>/<tenant>/``, the entry under ``manifest["use_cases"][<use case>]["tenants"]``,
    and the declaration the service needs under ``manifest["use_cases"][<use case>]["declaration"]``."""
    return _publish(folder, usecase.name, tenant, champion=champion, challenger=challenger, snapshot=snapshot,
                    declaration=serving_declaration(usecase))


def rollback_usecase(folder: Path, use_case_name: str, tenant: str) -> tuple[str, str]:
    """``rollback_tenant`` for a declared use case; returns (from, to) versions."""
    return _rollback(folder, use_case_name, tenant)


def _copy_atomic(source: Path, target: Path) -> None:
    if target.exists():
        return  # model files and snapshots are immutable once published
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


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
def prediction_log_dir(home: Path, tenant: str, use_case: str | None = None) -> Path:
    """``prediction_logs/<tenant>`` (churn) or ``prediction_logs/<use case>/<tenant>``."""
    return HomeLayout(Path(home)).prediction_log_dir(tenant, use_case)


@dataclass(frozen=True)
class LogChunk:
    """``rows`` predictions of one request (or one shadow micro-batch) for one tenant, by column.

    Every column is either one value for all ``rows`` rows or a list, tuple or numpy array of
    ``rows`` values (``requested_at_us``: microseconds since the epoch, UTC). A single prediction
    is cheaper to append with ``PredictionLogWriter.append_one``.
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


def _one_value(value) -> bool:
    """Whether a ``LogChunk`` column is one value for every row (not a sequence of values)."""
    return isinstance(value, str) or not hasattr(value, "__len__")


class _SegmentBuffer:
    """One tenant's open segment, column by column, as Python lists.

    Role, model version, snapshot version and endpoint repeat over many rows: each row holds the
    code of its combination (``groups``), decoded when the segment is written. Appending a row is a
    few list appends, and turning the lists into Arrow arrays costs the writer thread (which
    competes with the event loop for the GIL) little per row.
    """

    __slots__ = ("opened", "prediction_ids", "account_ids", "scores", "latency_ms", "requested_at_us", "groups",
                 "codes")

    def __init__(self, opened: float):
        self.opened = opened
        self.prediction_ids: list[str] = []
        self.account_ids: list[str] = []
        self.scores: list[float] = []
        self.latency_ms: list[float] = []
        self.requested_at_us: list[int] = []
        self.groups: list[int] = []
        self.codes: dict[tuple, int] = {}  # (role, model_version, snapshot_version, endpoint) -> code

    def code(self, role: str, model_version: str, snapshot_version: int, endpoint: str) -> int:
        key = (role, model_version, snapshot_version, endpoint)
        code = self.codes.get(key)
        if code is None:
            code = self.codes[key] = len(self.codes)
        return code

    def columns(self) -> tuple[list, ...]:
        """The row columns, in the order of ``append_one``'s arguments after ``group``, then the codes."""
        return (self.requested_at_us, self.latency_ms, self.prediction_ids, self.account_ids, self.scores,
                self.groups)

    def append_one(self, group: tuple, requested_at_us: int, latency_ms: float, prediction_id: str, account_id: str,
                   score: float) -> None:
        code = self.code(*group)
        self.requested_at_us.append(requested_at_us)
        self.latency_ms.append(latency_ms)
        self.prediction_ids.append(prediction_id)
        self.account_ids.append(account_id)
        self.scores.append(score)
        self.groups.append(code)

    def extend(self, chunk: LogChunk) -> None:
        n = chunk.rows

        def values(value):
            if _one_value(value):
                return repeat(value, n)
            if len(value) != n:
                raise ValueError(f"a prediction-log chunk of {n} rows has a column of {len(value)} values")
            return value.tolist() if hasattr(value, "tolist") else value

        # Every column is checked before any list grows: a bad chunk leaves the buffer as it was.
        rows = [values(c) for c in (chunk.requested_at_us, chunk.latency_ms, chunk.prediction_ids, chunk.account_ids,
                                    chunk.scores)]
        group = (chunk.role, chunk.model_version, chunk.snapshot_version, chunk.endpoint)
        if all(map(_one_value, group)):
            codes = repeat(self.code(*group), n)
        else:
            codes = [self.code(*row) for row in zip(*map(values, group), strict=True)]
        for target, column in zip(self.columns(), (*rows, codes), strict=True):
            target.extend(column)

    def absorb(self, newer: _SegmentBuffer) -> None:
        """Append the rows of a buffer opened after this one (its codes mapped to this one's)."""
        codes = [self.code(*key) for key in newer.codes]  # newer.codes is in code order
        for target, column in zip(self.columns()[:-1], newer.columns()[:-1], strict=True):
            target.extend(column)
        self.groups.extend(codes[g] for g in newer.groups)

    def drop_oldest(self, rows: int) -> None:
        for column in self.columns():
            del column[:rows]

    def __len__(self) -> int:
        return len(self.groups)


class PredictionLogWriter:
    """Buffers prediction records and writes them as closed, immutable Parquet segments.

    A segment is rotated when it holds ``max_rows`` records or is ``max_age_s`` old, and on
    close(). Segments are written to a temporary name and renamed, so the ingestion asset only
    ever sees complete files.

    After ``start()``, a background thread writes the segments: ``append_one``/``append_chunk``
    only buffer (a lock, a few list appends), so a request never waits for Parquet. Without
    ``start()``, the caller rotates with ``rotate_due`` and a full segment is written by the
    appending call.
    """

    def __init__(self, home: Path, max_rows: int = 5000, max_age_s: float = 5.0, max_backlog_rows: int = 1_000_000):
        self.home = Path(home)
        self.max_rows, self.max_age_s = max_rows, max_age_s
        # Rows kept per tenant while segments cannot be written (a full disk): beyond it the oldest go,
        # with a message, rather than the process's memory.
        self.max_backlog_rows = max_backlog_rows
        self._buffers: dict[tuple[str | None, str], _SegmentBuffer] = {}  # by (use case or None, tenant)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one segment write at a time, in sequence order
        self._seq = 0
        self._token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- buffering (the request path) ---
    def append_one(self, tenant: str, group: tuple, requested_at_us: int, latency_ms: float, prediction_id: str,
                   account_id: str, score: float, now: float, use_case: str | None = None) -> None:
        """One prediction; ``group`` is (role, model_version, snapshot_version, endpoint). Churn's
        predictions (``use_case`` None) go to ``prediction_logs/<tenant>``, a use case's to
        ``prediction_logs/<use case>/<tenant>`` (``account_id``: the use case's entity key)."""
        with self._lock:
            buffer = self._open((use_case, tenant), now)
            buffer.append_one(group, requested_at_us, latency_ms, prediction_id, account_id, score)
            full = len(buffer) >= self.max_rows
        if full:
            self._full()

    def append_chunk(self, tenant: str, chunk: LogChunk, now: float, use_case: str | None = None) -> None:
        with self._lock:
            buffer = self._open((use_case, tenant), now)
            buffer.extend(chunk)
            full = len(buffer) >= self.max_rows
        if full:
            self._full()

    def _open(self, key: tuple[str | None, str], now: float) -> _SegmentBuffer:
        """The open segment of a (use case, tenant) (called with the lock held)."""
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _SegmentBuffer(now)
        return buffer

    def _full(self) -> None:
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
        delay = tick
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            try:
                self.rotate_due(time.monotonic())
                delay = tick
            except Exception as exc:  # the rows stay buffered; retry, less often while it keeps failing
                delay = min(delay * 2, 30.0)
                print(f"prediction log: writing a segment failed (next try in {delay:.1f} s): {exc!r}")

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
                keys = [k for k, buffer in self._buffers.items() if len(buffer) and due(k, buffer.opened, len(buffer))]
                batches = [(k, self._buffers.pop(k)) for k in keys]
            for i, (key, buffer) in enumerate(batches):
                try:
                    self._write_segment(key, buffer)
                except BaseException:
                    for unwritten in batches[i:]:  # nothing is lost: the rows go back in front
                        self._restore(*unwritten)
                    raise
        return len(batches)

    def _restore(self, key: tuple[str | None, str], buffer: _SegmentBuffer) -> None:
        """Put the rows of a segment that could not be written back in front of the newer ones."""
        use_case, tenant = key
        with self._lock:
            newer = self._buffers.get(key)
            self._buffers[key] = buffer
            if newer is not None:
                buffer.absorb(newer)
            excess = len(buffer) - self.max_backlog_rows
            if excess > 0:
                buffer.drop_oldest(excess)
                where = f"tenant {tenant!r}" + (f" of use case {use_case!r}" if use_case else "")
                print(f"prediction log: segments of {where} cannot be written; dropped its {excess} oldest "
                      f"rows to keep at most {self.max_backlog_rows} buffered")

    def _write_segment(self, key: tuple[str | None, str], buffer: _SegmentBuffer) -> Path:
        import pyarrow.parquet as pq

        use_case, tenant = key
        folder = prediction_log_dir(self.home, tenant, use_case) / "closed"
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        target = folder / f"segment-{stamp}-{self._token}-{self._seq:06d}.parquet"
        table = _segment_table(tenant, buffer)
        with atomic_path(target) as tmp:
            # Dictionary pages only where values repeat (not for the unique prediction ids).
            pq.write_table(table, tmp, use_dictionary=_DICTIONARY_COLUMNS)
        return target


_DICTIONARY_COLUMNS = ["tenant", "account_id", "role", "model_version", "snapshot_version", "endpoint"]


@functools.cache
def _segment_schema():
    """The Arrow schema of a segment, with the pandas metadata ``DataFrame.to_parquet`` writes, so
    that readers see the same dtypes as from segments written by pandas."""
    import pandas as pd
    import pyarrow as pa

    empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in PREDICTION_LOG_COLUMNS.items()})
    return pa.Schema.from_pandas(empty, preserve_index=False)


def _segment_table(tenant: str, buffer: _SegmentBuffer):
    """One Arrow table from a tenant's buffered columns."""
    import pyarrow as pa

    groups = pa.array(buffer.groups, type=pa.int32())
    keys = list(buffer.codes)  # in code order

    def grouped(i: int, type_) -> pa.Array:
        return pa.array([key[i] for key in keys], type=type_).take(groups)

    columns = {
        "prediction_id": pa.array(buffer.prediction_ids, type=pa.string()),
        "tenant": pa.repeat(pa.scalar(tenant, type=pa.string()), len(buffer)),
        "account_id": pa.array(buffer.account_ids, type=pa.string()),
        "role": grouped(0, pa.string()),
        "model_version": grouped(1, pa.string()),
        "score": pa.array(buffer.scores, type=pa.float64()),
        "latency_ms": pa.array(buffer.latency_ms, type=pa.float64()),
        "snapshot_version": grouped(2, pa.int64()),
        "endpoint": grouped(3, pa.string()),
        "requested_at": pa.array(buffer.requested_at_us, type=pa.int64()).cast(pa.timestamp("us")),
    }
    return pa.Table.from_arrays(list(columns.values()), schema=_segment_schema())
