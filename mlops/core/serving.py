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
(``<tenant>/closed`` for churn, ``<use case>/<tenant>/closed`` for the others), each record first
journaled in ``prediction_logs/_journal`` so that a killed worker loses none (see "prediction log").
Every file others read is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import struct
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

from mlops.core.environment import HomeLayout, atomic_path, file_lock, write_atomic
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


# Serializes read-modify-write of the manifest across threads and processes (tenant workers, run
# workers, the CLI): without it, two publications at once each write back what they read, and the
# first one's tenant disappears from the manifest.
_MANIFEST_LOCK = ".manifest.lock"


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
    with file_lock(folder / _MANIFEST_LOCK):
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
    with file_lock(folder / _MANIFEST_LOCK):
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
# Every prediction is written twice. In the request path, before the response is sent, its record
# is appended to the worker's *journal*: one ``os.write`` of a few dozen bytes on an O_APPEND file
# descriptor (no Python buffering), so it survives the death of the process (the bytes are in the
# OS page cache). A writer thread turns the same rows, buffered in memory column by column, into
# Parquet *segments* renamed into ``<log dir>/closed/``; once a segment is there (fsynced unless
# MLOPS_LOG_FSYNC=none), the journal records it covers are deleted.
#
#     prediction_logs/_journal/<token>.lock                held with flock(LOCK_EX) while the worker lives
#     prediction_logs/_journal/<token>-<generation>.journal   its journal, one file per rotation
#     <log dir>/closed/segment-<UTC stamp>-<token>-<first seq>-<last seq>.parquet
#
# ``<token>`` is ``<pid>-<8 hex digits>``. Every record carries a sequence number of its worker, and
# a segment's name says which worker wrote it and the range of that worker's sequence numbers it
# holds (of its tenant). A journal whose lock can be taken belongs to a dead worker: the next
# worker to start, or the next ingestion, converts the records no segment of that worker covers
# into a segment of the same kind (exactly once: a crash half-way is resumed by the next recovery,
# which sees the segments already written), then deletes the journal. ``_journal`` cannot be a
# tenant or use-case folder: their names start with a letter.
JOURNAL_FOLDER = "_journal"
QUARANTINE_FOLDER = "quarantine"
LOG_FSYNC_ENV = "MLOPS_LOG_FSYNC"
FSYNC_POLICIES = ("none", "interval", "always")
DEFAULT_LOG_FSYNC = "interval"
_SEGMENT_NAME = re.compile(r"^segment-\d{8}T\d{12}-(?P<token>\d+-[0-9a-f]{8})-(?P<first>\d{12})-(?P<last>\d{12})"
                           r"\.parquet$")
# A journal record: u32 body length, u32 CRC-32 of the body, the body (its first byte: its kind).
_HEAD = struct.Struct("<II")
_GROUP = struct.Struct("<BI")  # "G", code; then JSON [use case, tenant, role, model version, snapshot, endpoint]
_ROW = struct.Struct("<BQIqddII")  # "R", seq, code, requested_at_us, latency_ms, score, len(id), len(account)
_CHUNK = struct.Struct("<BQI")  # "C", first seq, rows; then the columns (int32 codes, int64 requested_at_us,
#                                 float64 latency_ms, float64 score), the prediction ids then the account ids
#                                 (``_encode_strings``)
_G, _R, _C = b"G"[0], b"R"[0], b"C"[0]
_MAX_RECORD = 1 << 30


def prediction_log_dir(home: Path, tenant: str, use_case: str | None = None) -> Path:
    """``prediction_logs/<tenant>`` (churn) or ``prediction_logs/<use case>/<tenant>``."""
    return HomeLayout(Path(home)).prediction_log_dir(tenant, use_case)


def journal_dir(home: Path) -> Path:
    """``prediction_logs/_journal``: the workers' journals (beside the tenants' log folders)."""
    return HomeLayout(Path(home)).prediction_log_dir(JOURNAL_FOLDER)


def log_fsync_policy(value: str | None = None) -> str:
    """``MLOPS_LOG_FSYNC`` (or ``value``): when the journal and segments are fsynced.

    ``none``: never; a record is in the OS page cache when the response goes out, which survives
    the death of the process (kill -9, OOM) but not of the machine. ``interval`` (default): the
    writer thread fsyncs the journal every 0.25 s and every segment before its journal records go,
    so a machine crash loses at most the last quarter second. ``always``: an fdatasync per request
    before the response (a machine crash loses nothing answered; costs a disk flush per request).
    """
    raw = os.environ.get(LOG_FSYNC_ENV, "") if value is None else value
    policy = raw.strip().lower() or DEFAULT_LOG_FSYNC
    if policy not in FSYNC_POLICIES:
        raise ValueError(f"{LOG_FSYNC_ENV}={raw!r}: expected one of {', '.join(FSYNC_POLICIES)}")
    return policy


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _record(body: bytes) -> bytes:
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


def _encode_strings(values: list[str]) -> bytes:
    """Strings as ``b"\\n"`` + their newline-joined UTF-8 (5x cheaper than JSON), or ``b"["`` + JSON
    when one of them holds a newline."""
    joined = "\n".join(values)
    if joined.count("\n") == len(values) - 1:
        return b"\n" + joined.encode()
    return json.dumps(values).encode()


def _decode_strings(data: bytes) -> list[str]:
    if data[:1] == b"\n":
        return data[1:].decode().split("\n")
    return json.loads(data)


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


def _values(value, n: int):
    """A ``LogChunk`` column as ``n`` values (checked)."""
    if _one_value(value):
        return repeat(value, n)
    if len(value) != n:
        raise ValueError(f"a prediction-log chunk of {n} rows has a column of {len(value)} values")
    return value.tolist() if hasattr(value, "tolist") else value


class _SegmentBuffer:
    """One tenant's open segment, column by column, as Python lists.

    Role, model version, snapshot version and endpoint repeat over many rows: each row holds the
    code of its combination (``groups``), decoded when the segment is written. Appending a row is a
    few list appends, and turning the lists into Arrow arrays costs the writer thread (which
    competes with the event loop for the GIL) little per row. ``first_seq``/``last_seq``: the
    writer's sequence numbers of its first and last row (the segment's name carries them).
    """

    __slots__ = ("opened", "prediction_ids", "account_ids", "scores", "latency_ms", "requested_at_us", "groups",
                 "codes", "first_seq", "last_seq")

    def __init__(self, opened: float, first_seq: int = 0):
        self.opened = opened
        self.first_seq = self.last_seq = first_seq
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
        # Every column is checked before any list grows: a bad chunk leaves the buffer as it was.
        rows = [_values(c, n) for c in (chunk.requested_at_us, chunk.latency_ms, chunk.prediction_ids,
                                        chunk.account_ids, chunk.scores)]
        group = (chunk.role, chunk.model_version, chunk.snapshot_version, chunk.endpoint)
        if all(map(_one_value, group)):
            codes = repeat(self.code(*group), n)
        else:
            codes = [self.code(*row) for row in zip(*(_values(v, n) for v in group), strict=True)]
        for target, column in zip(self.columns(), (*rows, codes), strict=True):
            target.extend(column)

    def absorb(self, newer: _SegmentBuffer) -> None:
        """Append the rows of a buffer opened after this one (its codes mapped to this one's)."""
        codes = [self.code(*key) for key in newer.codes]  # newer.codes is in code order
        for target, column in zip(self.columns()[:-1], newer.columns()[:-1], strict=True):
            target.extend(column)
        self.groups.extend(codes[g] for g in newer.groups)
        if len(newer):
            self.last_seq = newer.last_seq

    def drop_oldest(self, rows: int) -> None:
        for column in self.columns():
            del column[:rows]

    def __len__(self) -> int:
        return len(self.groups)


class _Journal:
    """One worker's journal: generation files appended with ``os.write``, and the lock file that says
    the worker lives. Writes happen under the writer's lock; rotation and deletion on its thread."""

    def __init__(self, folder: Path, token: str, fsync: str):
        self.folder, self.token, self.fsync = folder, token, fsync
        folder.mkdir(parents=True, exist_ok=True)
        # The lock is taken under a temporary name and renamed into place, so that a recovery never
        # sees the lock file of a live worker unlocked.
        tmp = folder / f".{token}.lock.tmp"
        self._lock_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._lock_fd, f"pid {os.getpid()} since {dt.datetime.now(dt.UTC).isoformat()}\n".encode())
        os.replace(tmp, folder / f"{token}.lock")
        self._generation = 0
        self._closed_files: list[tuple[Path, int]] = []  # (file, its last seq), oldest first, still needed
        self.fd, self.path = self.open_next()
        self.codes: dict[tuple, int] = {}  # (use case, tenant, role, version, snapshot, endpoint) -> code
        self.last_seq = -1  # of the current file's last row (-1: no row yet)
        self.broken = False  # a write failed: nothing more goes to this file
        self.dirty = False  # written since the last fsync

    def open_next(self) -> tuple[int, Path]:
        """A new, empty generation file (not yet the current one)."""
        self._generation += 1
        path = self.folder / f"{self.token}-{self._generation:06d}.journal"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        if self.fsync != "none":
            _fsync_dir(self.folder)
        return fd, path

    def write(self, data: bytes, last_seq: int) -> None:
        """Append records (called with the writer's lock held); raises OSError, the file then broken."""
        if self.broken:
            raise OSError(f"journal {self.path.name} is unusable since an earlier write failed")
        try:
            written = os.write(self.fd, data)
            while written < len(data):  # a regular file takes it whole unless the disk is full
                written += os.write(self.fd, data[written:])
            if self.fsync == "always":
                os.fdatasync(self.fd)
        except OSError:
            self.broken = True  # a torn record may end this file: recovery drops it
            raise
        self.last_seq = last_seq
        self.dirty = True

    def swap(self, fd: int, path: Path) -> tuple[int, Path, int]:
        """Make a file from ``open_next`` the current one (writer's lock held); returns the old one."""
        old = (self.fd, self.path, self.last_seq)
        self.fd, self.path, self.last_seq, self.codes, self.broken = fd, path, -1, {}, False
        return old

    def retire(self, fd: int, path: Path, last_seq: int) -> None:
        """Close a swapped-out file (fsynced unless the policy is none); forgotten if it holds no row."""
        try:
            if self.fsync != "none":
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if last_seq < 0:
            path.unlink(missing_ok=True)
        else:
            self._closed_files.append((path, last_seq))

    def sync(self) -> None:
        if self.dirty and self.fsync == "interval":
            self.dirty = False
            os.fdatasync(self.fd)

    def release(self, pending_seq: int) -> None:
        """Delete the closed files whose rows all lie in segments (every seq below ``pending_seq``)."""
        while self._closed_files and self._closed_files[0][1] < pending_seq:
            path, _ = self._closed_files.pop(0)
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Everything is in segments: delete the journal and the lock, release it."""
        os.close(self.fd)
        for path, _ in self._closed_files:
            path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        (self.folder / f"{self.token}.lock").unlink(missing_ok=True)
        os.close(self._lock_fd)


def _say(message: str) -> None:
    """One line to stdout in one write: the writer's thread reports while others print, and print()
    writes the text and its newline separately (two threads' lines would interleave)."""
    sys.stdout.write(f"{message}\n")
    sys.stdout.flush()


class PredictionLogWriter:
    """Journals prediction records and writes them as closed, immutable Parquet segments.

    Each append is first written to the worker's journal (see above: it survives the death of the
    process), then buffered. A segment is rotated when it holds ``max_rows`` records or is
    ``max_age_s`` old, and on close(). Segments are written to a temporary name and renamed, so the
    ingestion asset only ever sees complete files. At construction the writer converts the journals
    of dead workers of the same home into segments (``recover_journals``).

    After ``start()``, a background thread writes the segments: ``append_one``/``append_chunk``
    only journal and buffer (a lock, one ``os.write``, a few list appends), so a request never
    waits for Parquet. Without ``start()``, the caller rotates with ``rotate_due`` and a full
    segment is written by the appending call.

    ``journal=False``: memory only (rows lost with the process). ``fsync``: see ``log_fsync_policy``
    (default ``$MLOPS_LOG_FSYNC``). ``on_failure(stage)`` is called for each failed segment write
    (``"segment"``: the rows stay buffered and journaled, retried) and each record that could not
    be journaled (``"journal"``: it is in memory only until its segment is written).
    """

    def __init__(self, home: Path, max_rows: int = 5000, max_age_s: float = 5.0, max_backlog_rows: int = 1_000_000,
                 *, journal: bool = True, fsync: str | None = None, on_failure=None):
        self.home = Path(home)
        self.max_rows, self.max_age_s = max_rows, max_age_s
        # Rows kept per tenant while segments cannot be written (a full disk): beyond it the oldest go,
        # with a message, rather than the process's memory.
        self.max_backlog_rows = max_backlog_rows
        self.fsync = log_fsync_policy(fsync)
        self.failures = {"segment": 0, "journal": 0}
        self._on_failure = on_failure
        self._reported: dict[str, float] = {}
        self._buffers: dict[tuple[str | None, str], _SegmentBuffer] = {}  # by (use case or None, tenant)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one segment write at a time, in sequence order
        self._next_seq = 0
        self._token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._journal: _Journal | None = None
        if journal:
            try:
                self._journal = _Journal(journal_dir(self.home), self._token, self.fsync)
            except OSError as exc:
                self._failed("journal", f"cannot open a journal in {journal_dir(self.home)} ({exc!r}); predictions "
                                        "are kept in memory only until their segments are written")
            else:
                try:
                    recover_journals(self.home)
                except Exception as exc:  # serving goes on; the next start or ingestion tries again
                    _say(f"prediction log: recovering the journals of dead workers failed: {exc!r}")

    def _failed(self, stage: str, message: str) -> None:
        """Count a failure (``on_failure``), and say so at most every 10 s per stage."""
        self.failures[stage] += 1
        if self._on_failure is not None:
            with contextlib.suppress(Exception):  # a metric must never fail a request
                self._on_failure(stage)
        now = time.monotonic()
        if now - self._reported.get(stage, -1e9) >= 10.0:
            self._reported[stage] = now
            _say(f"prediction log: {message} ({self.failures[stage]} {stage} failure(s) so far)")

    # --- buffering (the request path) ---
    def append_one(self, tenant: str, group: tuple, requested_at_us: int, latency_ms: float, prediction_id: str,
                   account_id: str, score: float, now: float, use_case: str | None = None) -> None:
        """One prediction; ``group`` is (role, model_version, snapshot_version, endpoint). Churn's
        predictions (``use_case`` None) go to ``prediction_logs/<tenant>``, a use case's to
        ``prediction_logs/<use case>/<tenant>`` (``account_id``: the use case's entity key)."""
        with self._lock:
            buffer = self._open((use_case, tenant), now)
            seq = self._next_seq
            if not len(buffer):
                buffer.first_seq = seq
            buffer.append_one(group, requested_at_us, latency_ms, prediction_id, account_id, score)
            self._next_seq = seq + 1
            buffer.last_seq = seq
            journal = self._journal
            if journal is not None:
                key = (use_case, tenant, *group)
                code = journal.codes.get(key)
                head = b""
                if code is None:
                    code = len(journal.codes)
                    head = _record(_GROUP.pack(_G, code) + json.dumps(key).encode())
                ident, account = prediction_id.encode(), account_id.encode()
                body = _ROW.pack(_R, seq, code, requested_at_us, latency_ms, score, len(ident), len(account))
                body += ident + account
                try:
                    journal.write(head + _HEAD.pack(len(body), zlib.crc32(body)) + body, seq)
                    if head:
                        journal.codes[key] = code
                except OSError as exc:
                    self._failed("journal", f"could not journal a prediction ({exc!r}); it is in memory only "
                                            "until its segment is written")
            full = len(buffer) >= self.max_rows
        if full:
            self._full()

    def append_chunk(self, tenant: str, chunk: LogChunk, now: float, use_case: str | None = None) -> None:
        with self._lock:
            buffer = self._open((use_case, tenant), now)
            seq = self._next_seq
            if not len(buffer):
                buffer.first_seq = seq
            buffer.extend(chunk)
            self._next_seq = seq + chunk.rows
            buffer.last_seq = self._next_seq - 1
            if self._journal is not None and chunk.rows:
                try:
                    self._journal_chunk(self._journal, use_case, tenant, chunk, seq)
                except OSError as exc:
                    self._failed("journal", f"could not journal {chunk.rows} predictions ({exc!r}); they are in "
                                            "memory only until their segment is written")
            full = len(buffer) >= self.max_rows
        if full:
            self._full()

    @staticmethod
    def _journal_chunk(journal: _Journal, use_case: str | None, tenant: str, chunk: LogChunk, seq: int) -> None:
        import numpy as np

        n = chunk.rows
        defined: list[bytes] = []
        new_codes: dict[tuple, int] = {}

        def code_of(group: tuple) -> int:
            key = (use_case, tenant, *group)
            code = journal.codes.get(key, new_codes.get(key))
            if code is None:
                code = new_codes[key] = len(journal.codes) + len(new_codes)
                defined.append(_record(_GROUP.pack(_G, code) + json.dumps(key).encode()))
            return code

        group = (chunk.role, chunk.model_version, chunk.snapshot_version, chunk.endpoint)
        if all(map(_one_value, group)):
            codes = np.full(n, code_of(group), dtype=np.int32)
        else:
            codes = np.fromiter((code_of(g) for g in zip(*(_values(v, n) for v in group), strict=True)),
                                dtype=np.int32, count=n)

        def column(value, dtype):
            return np.broadcast_to(np.asarray(value, dtype=dtype), (n,)).tobytes()

        body = b"".join((_CHUNK.pack(_C, seq, n), codes.tobytes(), column(chunk.requested_at_us, np.int64),
                         column(chunk.latency_ms, np.float64), column(chunk.scores, np.float64),
                         _encode_strings(list(_values(chunk.prediction_ids, n)) + list(_values(chunk.account_ids, n)))))
        journal.write(b"".join(defined) + _record(body), seq + n - 1)
        journal.codes.update(new_codes)

    def _open(self, key: tuple[str | None, str], now: float) -> _SegmentBuffer:
        """The open segment of a (use case, tenant) (called with the lock held)."""
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _SegmentBuffer(now, self._next_seq)
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
            except Exception as exc:  # the rows stay buffered (and journaled); retry, less often while it fails
                delay = min(delay * 2, 5.0)
                with self._lock:
                    backlog = sum(map(len, self._buffers.values()))
                self._failed("segment", f"writing a segment failed, {backlog} predictions kept buffered and "
                                        f"journaled (next try in {delay:.1f} s): {exc!r}")
            self._tend_journal()

    def _tend_journal(self) -> None:
        """The writer thread's journal chores: fsync (policy ``interval``), a new file after a failure."""
        journal = self._journal
        if journal is None:
            return
        try:
            if journal.broken:
                self._rotate_journal()
            journal.sync()
        except OSError as exc:
            self._failed("journal", f"journal upkeep failed: {exc!r}")

    def _rotate_journal(self) -> None:
        """Start a new journal file (the writer's thread, the write lock held or no thread running)."""
        with self._write_lock:
            journal = self._journal
            fd, path = journal.open_next()
            with self._lock:
                old = journal.swap(fd, path)
            journal.retire(*old)

    def rotate_due(self, now: float) -> int:
        """Close every segment older than max_age_s or fuller than max_rows; returns how many were written."""
        return self._flush(lambda t, opened, rows: rows >= self.max_rows or now - opened >= self.max_age_s)

    def close(self) -> None:
        """Stop the background thread (if any) and write everything buffered; the journal goes once all
        of it is in segments (if some cannot be written, it stays for the next start to recover)."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout=30)
        self._flush(lambda t, opened, rows: True)
        if self._journal is not None:
            with self._lock:
                journal, self._journal = self._journal, None
            journal.close()

    def _flush(self, due) -> int:
        with self._write_lock:
            with self._lock:
                keys = [k for k, buffer in self._buffers.items() if len(buffer) and due(k, buffer.opened, len(buffer))]
            if not keys:
                return 0
            journal = self._journal
            if journal is not None:
                try:  # the rows of these segments end the current journal file (later rows go to a new one)
                    fd, path = journal.open_next()
                except OSError as exc:
                    journal = None
                    self._failed("journal", f"could not start a new journal file: {exc!r}")
            with self._lock:
                batches = [(k, self._buffers.pop(k)) for k in keys]
                old = journal.swap(fd, path) if journal is not None else None
            try:
                if old is not None:
                    try:
                        journal.retire(*old)
                    except OSError as exc:  # the file stays; its rows are still written to segments
                        self._failed("journal", f"could not close journal file {old[1].name}: {exc!r}")
                for i, (key, buffer) in enumerate(batches):
                    try:
                        self._write_segment(key, buffer)
                    except BaseException:
                        for unwritten in batches[i:]:  # nothing is lost: the rows go back in front
                            self._restore(*unwritten)
                        raise
            finally:
                if self._journal is not None:
                    with self._lock:
                        pending = min((b.first_seq for b in self._buffers.values() if len(b)), default=self._next_seq)
                    self._journal.release(pending)
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
                _say(f"prediction log: segments of {where} cannot be written; dropped its {excess} oldest "
                      f"rows to keep at most {self.max_backlog_rows} buffered (they stay in the journal only "
                      "if the process dies before the backlog is written)")

    def _write_segment(self, key: tuple[str | None, str], buffer: _SegmentBuffer) -> Path:
        use_case, tenant = key
        return write_segment(self.home, tenant, use_case, buffer, self._token, durable=self.fsync != "none")


_DICTIONARY_COLUMNS = ["tenant", "account_id", "role", "model_version", "snapshot_version", "endpoint"]


def write_segment(home: Path, tenant: str, use_case: str | None, buffer: _SegmentBuffer, token: str,
                  durable: bool = True) -> Path:
    """A closed segment of a buffer, named after its writer's ``token`` and its rows' sequence numbers;
    written to a temporary name, fsynced and renamed (``durable``: the folder fsynced too)."""
    import pyarrow.parquet as pq

    folder = prediction_log_dir(home, tenant, use_case) / "closed"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    target = folder / f"segment-{stamp}-{token}-{buffer.first_seq:012d}-{buffer.last_seq:012d}.parquet"
    table = _segment_table(tenant, buffer)
    with atomic_path(target, fsync=durable) as tmp:
        # Dictionary pages only where values repeat (not for the unique prediction ids).
        pq.write_table(table, tmp, use_dictionary=_DICTIONARY_COLUMNS)
    if durable:
        _fsync_dir(folder)
    return target


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


# --- recovery of dead workers' journals ----------------------------------------------------------
@dataclass
class JournalRecovery:
    """What ``recover_journals`` did: dead workers' journals converted, rows written to segments, rows
    already in segments (skipped), segments written, torn tails dropped, files quarantined."""

    journals: int = 0
    rows: int = 0
    already_in_segments: int = 0
    segments: list[Path] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    quarantined: list[Path] = field(default_factory=list)
    temporaries_removed: int = 0  # partial segments of killed workers deleted


@dataclass(frozen=True)
class _JournalRow:
    seq: int
    group: tuple  # (role, model version, snapshot version, endpoint)
    requested_at_us: int
    latency_ms: float
    prediction_id: str
    account_id: str
    score: float


def read_journal(path: Path) -> tuple[dict[tuple, list[_JournalRow]], str | None, str | None]:
    """The rows of a journal file by (use case, tenant), and why it ends early: ``torn`` (the last
    record is incomplete: the process died writing it; dropped) or ``corrupt`` (a damaged record
    before the end: the rows before it are returned, nothing after it can be read)."""
    import numpy as np

    data = path.read_bytes()
    rows: dict[tuple, list[_JournalRow]] = {}
    groups: dict[int, tuple] = {}
    offset, records = 0, 0
    while offset < len(data):
        where = f"record {records + 1} at byte {offset} of {len(data)}"
        if len(data) - offset < _HEAD.size:
            return rows, f"{where}: {len(data) - offset} bytes, shorter than a record header", None
        length, crc = _HEAD.unpack_from(data, offset)
        end = offset + _HEAD.size + length
        if length > _MAX_RECORD:
            return rows, None, f"{where}: impossible length {length}"
        if end > len(data):
            return rows, f"{where}: {length} bytes announced, {len(data) - offset - _HEAD.size} written", None
        body = data[offset + _HEAD.size:end]
        if zlib.crc32(body) != crc:
            if end == len(data):
                return rows, f"{where}: the last record's checksum does not match (a partial write)", None
            return rows, None, f"{where}: checksum mismatch"
        try:
            kind = body[0]
            if kind == _G:
                _, code = _GROUP.unpack_from(body)
                use_case, tenant, role, version, snapshot, endpoint = json.loads(body[_GROUP.size:])
                groups[code] = ((use_case, tenant), (role, version, snapshot, endpoint))
            elif kind == _R:
                _, seq, code, at, latency, score, n_id, n_account = _ROW.unpack_from(body)
                key, group = groups[code]
                start = _ROW.size
                ident = body[start:start + n_id].decode()
                account = body[start + n_id:start + n_id + n_account].decode()
                if start + n_id + n_account != len(body):
                    raise ValueError("row record length does not match its strings")
                rows.setdefault(key, []).append(_JournalRow(seq, group, at, latency, ident, account, score))
            elif kind == _C:
                _, seq, n = _CHUNK.unpack_from(body)
                start = _CHUNK.size
                codes = np.frombuffer(body, dtype=np.int32, count=n, offset=start)
                at = np.frombuffer(body, dtype=np.int64, count=n, offset=start + 4 * n)
                latency = np.frombuffer(body, dtype=np.float64, count=n, offset=start + 12 * n)
                score = np.frombuffer(body, dtype=np.float64, count=n, offset=start + 20 * n)
                strings = _decode_strings(body[start + 28 * n:])
                if len(strings) != 2 * n:
                    raise ValueError(f"chunk record of {n} rows holds {len(strings)} ids, not {2 * n}")
                idents, accounts = strings[:n], strings[n:]
                for i, (code, ident, account) in enumerate(zip(codes.tolist(), idents, accounts, strict=True)):
                    key, group = groups[code]
                    rows.setdefault(key, []).append(_JournalRow(seq + i, group, int(at[i]), float(latency[i]),
                                                                ident, account, float(score[i])))
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        except (ValueError, KeyError, TypeError, IndexError, struct.error, UnicodeDecodeError) as exc:
            return rows, None, f"{where}: unreadable ({exc!r})"
        offset, records = end, records + 1
    return rows, None, None


def _covered(home: Path, use_case: str | None, tenant: str, token: str) -> list[tuple[int, int]]:
    """The (first, last) sequence ranges of a worker's segments of a tenant: closed, ingested or
    quarantined. (A range covers only the rows of the folder's tenant: a worker numbers the rows
    of all its tenants in one sequence.)"""
    folder = prediction_log_dir(home, tenant, use_case)
    names: set[str] = set()
    for sub in ("closed", "ingested", QUARANTINE_FOLDER):
        names.update(p.name for p in (folder / sub).glob(f"segment-*-{token}-*.parquet"))
    ranges = []
    for name in names:
        match = _SEGMENT_NAME.match(name)
        if match and match["token"] == token:
            ranges.append((int(match["first"]), int(match["last"])))
    return ranges


def quarantine(path: Path, folder: Path, reason: str) -> Path:
    """Move a file that cannot be read into ``folder`` (``quarantine/``), with ``<name>.reason`` saying why."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    write_atomic(folder / f"{path.name}.reason", f"{reason}\n".encode())
    path.replace(target)
    _say(f"prediction log: quarantined {path} in {folder}: {reason}")
    return target


def recover_journals(home: Path) -> JournalRecovery:
    """Convert the journals of dead workers (their lock can be taken) into closed segments, exactly once.

    Rows that a segment of the same worker already holds (in ``closed/``, ``ingested/`` or
    ``quarantine/``) are skipped, so a recovery that died half-way is finished by the next one
    without duplicates. A torn last record is dropped
    (said why); a corrupt journal gives the rows before the damage and is moved to
    ``_journal/quarantine/`` with a ``.reason`` file. Two processes recovering at once never both
    convert a journal: each holds its lock while converting it.
    """
    report = JournalRecovery()
    folder = journal_dir(home)
    if not folder.is_dir():
        return report
    for lock_path in sorted(folder.glob("*.lock")):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # converted by another process meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live worker's
            try:
                if os.stat(lock_path).st_ino != os.fstat(fd).st_ino:
                    continue  # converted and removed by another process after we opened it
            except FileNotFoundError:
                continue
            _recover_journal(home, folder, lock_path.name.removesuffix(".lock"), report)
            lock_path.unlink()
        finally:
            os.close(fd)
    # A lock taken under its temporary name by a worker that died before renaming it holds nothing.
    for stale in folder.glob(".*.lock.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 60:
                stale.unlink()
    report.temporaries_removed = remove_orphan_temporaries(folder.parent)
    return report


def remove_orphan_temporaries(log_root: Path, min_age_s: float = 60.0) -> int:
    """Delete the partial segments (``atomic_path``'s ``.<name>.tmp-<pid>-<thread>``) that a worker
    killed while writing left in a ``closed/`` folder under ``log_root``: their rows are still in
    the worker's journal, which recovery converts. Only files of a process that no longer exists and
    older than ``min_age_s`` (so a reused pid's fresh file is left alone). Returns how many."""
    removed = 0
    for path in log_root.glob("**/closed/.*.tmp-*"):
        try:
            pid = int(path.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        with contextlib.suppress(OSError):
            if _process_alive(pid) or time.time() - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_journal(home: Path, folder: Path, token: str, report: JournalRecovery) -> None:
    files = sorted(folder.glob(f"{token}-*.journal"))
    rows_before, skipped_before = report.rows, report.already_in_segments
    by_key: dict[tuple, list[_JournalRow]] = {}
    corrupt: list[tuple[Path, str]] = []
    for path in files:
        rows, torn, damage = read_journal(path)
        for key, key_rows in rows.items():
            by_key.setdefault(key, []).extend(key_rows)
        if torn:
            _say(f"prediction log: journal {path.name} of a dead worker ends in a torn record, dropped: {torn}")
            report.torn.append(f"{path.name}: {torn}")
        if damage:
            corrupt.append((path, f"corrupt journal of a dead worker: {damage}; the "
                                  f"{sum(map(len, rows.values()))} rows before it were recovered"))
    for (use_case, tenant), rows in by_key.items():
        covered = _covered(home, use_case, tenant, token)
        unique = {r.seq: r for r in reversed(rows)}  # a sequence number is one prediction (the first copy)
        fresh = sorted((r for r in unique.values() if not any(first <= r.seq <= last for first, last in covered)),
                       key=lambda r: r.seq)
        report.already_in_segments += len(unique) - len(fresh)
        if not fresh:
            continue
        buffer = _SegmentBuffer(0.0, fresh[0].seq)
        for r in fresh:
            buffer.append_one(r.group, r.requested_at_us, r.latency_ms, r.prediction_id, r.account_id, r.score)
        buffer.last_seq = fresh[-1].seq
        report.segments.append(write_segment(home, tenant, use_case, buffer, token, durable=True))
        report.rows += len(fresh)
    for path, reason in corrupt:
        report.quarantined.append(quarantine(path, folder / QUARANTINE_FOLDER, reason))
    for path in files:
        path.unlink(missing_ok=True)
    report.journals += 1
    if files:
        _say(f"prediction log: recovered the journal of dead worker {token}: {report.rows - rows_before} rows "
              f"to segments, {report.already_in_segments - skipped_before} already in segments")
