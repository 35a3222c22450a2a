"""The prediction service: every use case and every tenant, champion + shadow challenger, hot model swaps.

Start it with ``bentoml serve bentos.service:ChurnService``. It reads only the serving bundle (see
``mlops.core.serving``): never the warehouse, never the registry. Churn answers at ``/v1/predict``
and ``/v1/predict_batch`` (and ``/v1/churn/...``); every use case published with
``mlops.core.serving.publish_usecase`` at ``/v1/<use case>/predict`` and ``/v1/<use case>/predict_batch``
(``bentos.usecase_serving``), with the same authentication, validation, shadow scoring, prediction
log and hot swaps.

Settings (environment variables, read at start-up):

- ``CHURN_SHADOW_SAMPLE`` (default 1): the fraction of ``/v1/predict`` requests the challenger
  shadows;
- ``CHURN_SHADOW_BATCH_SAMPLE`` (default 0.1): the fraction of ``/v1/predict_batch`` requests the
  challenger shadows. A shadowed request is shadowed whole: every prediction in it gets a
  challenger row in the prediction log under the same ``prediction_id``; the prediction log says
  which requests were shadowed (those with challenger rows), and the counter
  ``churn_shadow_requests_total`` counts requests by outcome (``shadowed``, ``sampled_out``, and
  ``dropped`` when the shadow backlog exceeds ``CHURN_SHADOW_MAX_PENDING`` rows, default 20,000:
  shadowing never slows the response down);
- ``CHURN_SERVICE_WORKERS`` (default 2): BentoML worker processes;
- ``CHURN_KEEPALIVE_REQUESTS`` (default 100; 0: never): a scoring response closes its keep-alive
  connection with this probability's inverse (``Connection: close`` on 1 response in 100, chosen
  at random), as nginx's ``keepalive_requests`` does. BentoML's workers share one listening
  socket and a connection stays with the worker that accepted it, so a client's few long-lived
  connections often all land on one worker while the other idles; recycled connections are
  accepted by whichever worker is free, which spreads the load;
- ``MLOPS_MAX_BODY_BYTES`` (default 1 MiB) and ``MLOPS_MAX_BATCH_BODY_BYTES`` (default 16 MiB: 10,000
  instances of up to ~1.6 KiB each): the largest request body of a single-prediction route and of a
  ``.../predict_batch`` route. A larger body gets 413 before it is read: a ``Content-Length`` over the
  limit is refused at once, and a chunked body is counted while it streams and refused as soon as
  it passes the limit;
- ``MLOPS_RATE_LIMIT_PER_S`` (default 0: off) and ``MLOPS_RATE_LIMIT_BURST`` (default: the rate, at
  least 1): a token bucket per API key, checked before the body is read; a key over its rate gets
  429 with ``Retry-After`` (whole seconds). The buckets live in each worker process: with N
  workers a key may get up to N times the rate (run one worker, or divide the rate by N, for an
  exact limit);
- ``MLOPS_METRICS_TOKEN`` (default unset: ``/metrics`` is open, as BentoML serves it): when set,
  ``/metrics`` answers 401 unless the request carries ``Authorization: Bearer <token>``. The
  metrics name every tenant: set it wherever the port is reachable by more than the scraper.

The API contract (``/docs.json``): BentoML's generated OpenAPI document, completed by
``openapi_document``: the package version, the bearer-key security scheme, and on every scoring
route each status it answers (200, 400, 401, 403, 404, 413, 429, 503, 504) with the one error body
``ErrorBody`` (``{"error": message, "detail": [validation issues]}``, ``detail`` only on a 400 of
request validation).

Scoring: each model version is scored by its trees compiled to native code (``CompiledBooster``,
the object file that publication built with lleaves; 3-5x faster than LightGBM's predictor),
after the worker checked on snapshot rows that it scores as LightGBM does; otherwise by
LightGBM's C library (``NativeBooster``).

Start-up is kept short: the ``bentoml serve`` process only reads the service definition (no
LightGBM, no pandas); the workers call LightGBM's C library directly, without importing the
``lightgbm`` Python package (which imports scikit-learn and SciPy), and load compiled objects
without compiling anything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import gc
import hmac
import importlib.util
import itertools
import json
import math
import os
import random
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
import pydantic_core
from bentoml._internal.server.http import instruments as _instruments
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from bentos.usecase_serving import UseCaseDeclaration
from mlops.core.environment import HomeLayout, configure_environment, write_atomic
from mlops.core.names import CHALLENGER, CHAMPION
from mlops.core.serving import (
    MANIFEST,
    ApiKey,
    ApiKeyStore,
    LogChunk,
    PredictionLogWriter,
    read_manifest,
    serving_dir,
    verify_key,
)

MAX_BATCH = 10_000
CHURN = "churn"  # served from manifest["tenants"] until it is migrated to a declared use case
SHADOW_SAMPLE = float(os.environ.get("CHURN_SHADOW_SAMPLE", "1"))
SHADOW_BATCH_SAMPLE = float(os.environ.get("CHURN_SHADOW_BATCH_SAMPLE", "0.1"))
SHADOW_MAX_PENDING = int(os.environ.get("CHURN_SHADOW_MAX_PENDING", "20000"))
WORKERS = int(os.environ.get("CHURN_SERVICE_WORKERS", "2"))
KEEPALIVE_REQUESTS = int(os.environ.get("CHURN_KEEPALIVE_REQUESTS", "100"))


def _setting(name: str, default: float) -> float:
    """A non-negative number from the environment variable ``name``; an error names a bad value."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name}={raw!r} must be a finite number >= 0")
    return value


MAX_BODY_BYTES = int(_setting("MLOPS_MAX_BODY_BYTES", 1 << 20))
MAX_BATCH_BODY_BYTES = int(_setting("MLOPS_MAX_BATCH_BODY_BYTES", 16 << 20))
RATE_LIMIT_PER_S = _setting("MLOPS_RATE_LIMIT_PER_S", 0.0)
RATE_LIMIT_BURST = _setting("MLOPS_RATE_LIMIT_BURST", 0.0) or max(1.0, RATE_LIMIT_PER_S)
# How old a prediction-log segment gets before it is closed (ingestible); at least 0.05 s.
LOG_SEGMENT_SECONDS = max(0.05, _setting("MLOPS_LOG_SEGMENT_SECONDS", 1.0))
METRICS_TOKEN = os.environ.get("MLOPS_METRICS_TOKEN", "")
# Batches at least this large are scored on a thread of their own, so the event loop keeps serving.
OFFLOAD_ROWS = 64
# Shadow work is scored in micro-batches this often.
SHADOW_BATCH_S = 0.02

TenantName = Annotated[str, Field(min_length=2, max_length=40, pattern=r"^[a-z][a-z0-9_-]+$")]
AccountId = Annotated[str, Field(min_length=1, max_length=64)]

REQUEST_LATENCY = bentoml.metrics.Histogram(
    name="churn_prediction_latency_seconds",
    documentation="Scoring latency per tenant, model version and role (champion or challenger)",
    labelnames=["tenant", "model_version", "role"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
PREDICTIONS = bentoml.metrics.Counter(
    name="churn_predictions_total",
    documentation="Predictions served per tenant, model version and role",
    labelnames=["tenant", "model_version", "role"],
)
SHADOW_REQUESTS = bentoml.metrics.Counter(
    name="churn_shadow_requests_total",
    documentation="Requests to tenants with a challenger, by endpoint and shadow outcome "
                  "(shadowed, sampled_out, dropped)",
    labelnames=["tenant", "endpoint", "outcome"],
)
LOG_WRITE_FAILURES = bentoml.metrics.Counter(
    name="prediction_log_write_failures_total",
    documentation="Prediction-log writes that failed, by stage: segment (a Parquet segment could not be "
                  "written; its rows stay buffered and journaled, retried) or journal (a record could not be "
                  "journaled; it is in memory only until its segment is written)",
    labelnames=["stage"],
)
# The same metrics for the other use cases (``/v1/<use case>/...``), with the use case as a label.
USECASE_LATENCY = bentoml.metrics.Histogram(
    name="usecase_prediction_latency_seconds",
    documentation="Scoring latency per use case, tenant, model version and role (champion or challenger)",
    labelnames=["use_case", "tenant", "model_version", "role"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
USECASE_PREDICTIONS = bentoml.metrics.Counter(
    name="usecase_predictions_total",
    documentation="Predictions served per use case, tenant, model version and role",
    labelnames=["use_case", "tenant", "model_version", "role"],
)
USECASE_SHADOW_REQUESTS = bentoml.metrics.Counter(
    name="usecase_shadow_requests_total",
    documentation="Requests to a use case's tenants with a challenger, by endpoint and shadow outcome",
    labelnames=["use_case", "tenant", "endpoint", "outcome"],
)


# The churn routes' contract, written once: ``predict``/``predict_batch`` declare it as their input
# (OpenAPI documents it) and the fast path validates with the same models.
class PredictInput(BaseModel):
    model_config = ConfigDict(title="Input")

    tenant: TenantName
    account_id: AccountId


class PredictBatchInput(BaseModel):
    model_config = ConfigDict(title="Input")

    tenant: TenantName
    account_ids: Annotated[list[AccountId], Field(min_length=1, max_length=MAX_BATCH)]


class Prediction(BaseModel):
    prediction_id: str
    tenant: str
    account_id: str
    score: float
    model_version: str


class BatchPrediction(BaseModel):
    tenant: str
    model_version: str
    predictions: list[Prediction]


class ValidationIssue(BaseModel):
    """One problem of a request that failed validation (pydantic's error, without the input)."""

    type: str = Field(description="the kind of problem, e.g. missing, string_type, json_invalid")
    loc: list[str | int] = Field(description="where: the field names and list indexes leading to the value")
    msg: str = Field(description="what is wrong, in words")


class ErrorBody(BaseModel):
    """The body of every error answer of the scoring routes."""

    model_config = ConfigDict(title="Error", extra="forbid")

    error: str = Field(description="what went wrong, naming the field, tenant, key or limit concerned")
    detail: list[ValidationIssue] = Field(
        default_factory=list, description="present on a 400 of request validation: one item per problem")


NO_KEY = "Authorization error: missing or invalid API key (send 'Authorization: Bearer <key>')"


class ServiceError(BentoMLException):
    """An error with an HTTP status, and a message that names the problem (and response headers)."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message, error_code=status)
        self.headers = headers


# --- LightGBM without the lightgbm package ---------------------------------------------------------
_C_API_DTYPE_FLOAT64 = 1
_C_API_PREDICT_NORMAL = 0


@functools.cache
def _lightgbm_library() -> ctypes.CDLL:
    """``lib_lightgbm`` of the installed lightgbm package, loaded without importing the package."""
    spec = importlib.util.find_spec("lightgbm")
    candidates = [Path(p) / "lib" / "lib_lightgbm.so" for p in (spec.submodule_search_locations or [])] if spec else []
    path = next((p for p in candidates if p.exists()), None)
    if path is None:  # an unusual layout: let the package find its library
        from lightgbm.basic import _LIB

        lib = _LIB
    else:
        lib = ctypes.cdll.LoadLibrary(str(path))
    lib.LGBM_GetLastError.restype = ctypes.c_char_p
    handle, i32, i64p, dp = ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_double)
    lib.LGBM_BoosterCreateFromModelfile.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(handle)]
    lib.LGBM_BoosterGetNumClasses.argtypes = [handle, ctypes.POINTER(ctypes.c_int)]
    lib.LGBM_BoosterGetNumFeature.argtypes = [handle, ctypes.POINTER(ctypes.c_int)]
    lib.LGBM_BoosterNumberOfTotalModel.argtypes = [handle, ctypes.POINTER(ctypes.c_int)]
    lib.LGBM_BoosterFree.argtypes = [handle]
    lib.LGBM_BoosterPredictForMat.argtypes = [
        handle, ctypes.c_void_p, ctypes.c_int, i32, i32, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_char_p, i64p, dp,
    ]
    return lib


def _check(lib: ctypes.CDLL, rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"LightGBM: {lib.LGBM_GetLastError().decode(errors='replace')}")


class NativeBooster:
    """A LightGBM model file scored through LightGBM's C API, as ``lightgbm.Booster.predict`` does
    for a float64 numpy matrix (same library call, same scores, bit for bit), minus its Python
    overhead and minus ``import lightgbm`` (scikit-learn, SciPy: about 2 s per process).
    The C library releases the GIL while it scores, and concurrent predictions run in parallel."""

    def __init__(self, model_file: str | os.PathLike):
        self._lib = lib = _lightgbm_library()
        self._handle = ctypes.c_void_p()
        iterations, out = ctypes.c_int(0), ctypes.c_int(0)
        _check(lib, lib.LGBM_BoosterCreateFromModelfile(os.fsencode(model_file), ctypes.byref(iterations),
                                                        ctypes.byref(self._handle)))
        _check(lib, lib.LGBM_BoosterGetNumClasses(self._handle, ctypes.byref(out)))
        self.num_class = out.value
        _check(lib, lib.LGBM_BoosterGetNumFeature(self._handle, ctypes.byref(out)))
        self._num_feature = out.value
        self._params: dict[int, bytes] = {}

    def num_feature(self) -> int:
        """Input columns (``Booster.num_feature()``)."""
        return self._num_feature

    def num_trees(self) -> int:
        out = ctypes.c_int(0)
        _check(self._lib, self._lib.LGBM_BoosterNumberOfTotalModel(self._handle, ctypes.byref(out)))
        return out.value

    def predict(self, matrix: np.ndarray, num_threads: int = 1) -> np.ndarray:
        """Probabilities for the rows of a 2-D float64 matrix (``Booster.predict(matrix)``)."""
        matrix = np.ascontiguousarray(matrix, dtype=np.float64)
        nrow, ncol = matrix.shape
        out = np.empty(nrow * self.num_class, dtype=np.float64)
        out_len = ctypes.c_int64(0)
        params = self._params.get(num_threads)
        if params is None:
            params = self._params[num_threads] = f"num_threads={num_threads}".encode()
        _check(self._lib, self._lib.LGBM_BoosterPredictForMat(
            self._handle, matrix.ctypes.data, _C_API_DTYPE_FLOAT64, nrow, ncol, 1, _C_API_PREDICT_NORMAL, 0, 0,
            params, ctypes.byref(out_len), out.ctypes.data_as(ctypes.POINTER(ctypes.c_double))))
        return out if self.num_class == 1 else out.reshape(nrow, self.num_class)

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle and handle.value and self._lib is not None:
            self._lib.LGBM_BoosterFree(handle)
            self._handle = None


class CompiledBooster:
    """A published model's trees compiled to native code by lleaves (the bundle's ``v<N>-<hash>.o``,
    built at publication by ``mlops.core.serving.compile_model``), with ``NativeBooster.predict``'s
    interface.

    The compiled function is called directly, not through ``lleaves.Model.predict`` (whose argument
    conversion costs more than scoring one row), and without releasing the GIL below HOLD_GIL_ROWS
    rows (under a millisecond of scoring): handing the GIL over would let the log-writer thread
    hold the event loop up for a switch interval. Larger batches release it."""

    HOLD_GIL_ROWS = 256

    def __init__(self, model_file: Path, object_file: Path, load_options: dict):
        import lleaves

        if not object_file.exists():
            raise FileNotFoundError(f"compiled model {object_file} is missing")
        self._model = model = lleaves.Model(model_file=str(model_file))
        model.compile(cache=str(object_file), **load_options)  # loads the object, compiles nothing
        if model.num_model_per_iteration() != 1:
            raise ValueError("only single-output (binary) models are scored compiled")
        self._num_feature = model.num_feature()
        # forest_root(double *data, double *out, int32 start, int32 end): rows [start, end) of a
        # C-contiguous float64 matrix of num_feature columns.
        address = model._execution_engine.get_function_address("forest_root")
        signature = (None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32)
        self._holding_gil = ctypes.PYFUNCTYPE(*signature)(address)
        self._releasing_gil = ctypes.CFUNCTYPE(*signature)(address)

    def num_feature(self) -> int:
        """Input columns (``Booster.num_feature()``)."""
        return self._num_feature

    def predict(self, matrix: np.ndarray, num_threads: int = 1) -> np.ndarray:
        matrix = np.ascontiguousarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != self._num_feature:  # the compiled code reads num_feature columns
            raise ValueError(f"expected a matrix of {self._num_feature} feature columns, got shape {matrix.shape}")
        rows = matrix.shape[0]
        if rows >= 2**31 - 1:
            raise ValueError(f"{rows} rows: score at most 2^31 - 2 rows at a time")
        out = np.empty(rows, dtype=np.float64)
        call = self._holding_gil if rows < self.HOLD_GIL_ROWS else self._releasing_gil
        call(matrix.ctypes.data, out.ctypes.data, 0, rows)
        return out


# Scores of a compiled model and of LightGBM differ by float rounding in the final sum (~1e-16).
COMPILED_TOLERANCE = 1e-12
VERIFY_ROWS = 1000


def load_scorer(folder: Path, spec: dict, sample: np.ndarray):
    """The scorer of a published model version: its compiled object when the bundle has one that this
    host can run and that scores ``sample`` (snapshot rows) as LightGBM does; otherwise LightGBM."""
    native = NativeBooster(folder / spec["model_file"])
    compiled = spec.get("compiled")
    if not compiled:
        return native
    try:
        import llvmlite.binding as llvm

        from mlops.core.serving import LOAD_OPTIONS, compiled_model_name

        if compiled.get("triple") != llvm.get_process_triple():
            raise RuntimeError(f"compiled for {compiled.get('triple')}, this host is {llvm.get_process_triple()}")
        expected = compiled_model_name(folder / spec["model_file"])  # this model text, options and compiler
        if Path(compiled["file"]).name != expected:
            raise RuntimeError(f"{compiled['file']} is not the object of this model and compiler ({expected})")
        booster = CompiledBooster(folder / spec["model_file"], folder / compiled["file"], LOAD_OPTIONS)
        if len(sample):
            gap = float(np.max(np.abs(booster.predict(sample) - native.predict(sample))))
            if not gap <= COMPILED_TOLERANCE:
                raise RuntimeError(f"its scores differ from LightGBM's by up to {gap:.3g}")
        return booster
    except Exception as exc:  # slower, never wrong: score with LightGBM
        print(f"churn_service: model {spec['model_file']} is scored by LightGBM, not its compiled object: {exc!r}")
        return native


@dataclass(frozen=True)
class Model:
    version: str
    booster: Any  # CompiledBooster, NativeBooster, or anything with .predict(matrix, num_threads=...)


@dataclass(frozen=True)
class TenantDeployment:
    """Everything needed to score one tenant (of churn, or of ``use_case``), immutable: a swap replaces
    the whole object. ``account_index`` maps the entity key (churn: the account) to its snapshot row."""

    tenant: str
    champion: Model
    challenger: Model | None
    snapshot_version: int
    account_index: dict[str, int]
    features: np.ndarray
    use_case: str | None = None  # None: churn
    declaration: UseCaseDeclaration | None = None


def load_deployment(folder: Path, tenant: str, entry: dict, previous: TenantDeployment | None,
                    load_model=load_scorer, declaration: UseCaseDeclaration | None = None) -> TenantDeployment:
    """``load_model(folder, spec, sample)`` loads one model version of the manifest entry; churn's
    tenant without a ``declaration``, a use case's with it."""
    snapshot_version = int(entry["snapshot"]["version"])
    if (previous is not None and previous.snapshot_version == snapshot_version
            and previous.declaration is declaration):
        index, features = previous.account_index, previous.features
    elif declaration is not None:
        index, features = declaration.read_snapshot(folder / entry["snapshot"]["file"])
    else:
        import pandas as pd  # in the workers only, not in the `bentoml serve` process

        from mlops.core.model_inputs import to_model_matrix

        frame = pd.read_parquet(folder / entry["snapshot"]["file"])
        index = {account: i for i, account in enumerate(frame["account_id"].tolist())}
        features = to_model_matrix(frame)
    sample = features[:VERIFY_ROWS] if declaration is None else declaration.verify_sample(features, VERIFY_ROWS)

    def model(spec: dict | None, old: Model | None) -> Model | None:
        if spec is None:
            return None
        if old is not None and old.version == spec["version"]:
            return old
        booster = load_model(folder, spec, sample)
        if declaration is not None:
            takes = booster.num_feature()
            if takes != len(declaration.inputs.columns):
                raise ValueError(f"model {spec['model_file']} takes {takes} features, the use case "
                                 f"{declaration.name!r} declares {len(declaration.inputs.columns)}")
        return Model(str(spec["version"]), booster)

    old_models = {}
    if previous is not None:
        old_models = {m.version: m for m in (previous.champion, previous.challenger) if m is not None}
    champion = model(entry[CHAMPION], old_models.get(str(entry[CHAMPION]["version"])))
    challenger_spec = entry.get(CHALLENGER)
    if challenger_spec and str(challenger_spec["version"]) == champion.version:
        challenger_spec = None  # a model does not shadow itself
    challenger = model(challenger_spec, old_models.get(str(challenger_spec["version"])) if challenger_spec else None)
    return TenantDeployment(tenant, champion, challenger, snapshot_version, index, features,
                            declaration.name if declaration is not None else None, declaration)


def new_prediction_ids(n: int) -> list[str]:
    """``n`` random UUID4s as 32 hex digits (``uuid.uuid4().hex``), vectorized for batches."""
    if n == 1:
        return [uuid.uuid4().hex]
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    digits = raw.tobytes().hex()
    return [digits[i : i + 32] for i in range(0, 32 * n, 32)]


class TokenBuckets:
    """A token bucket per name (an API key id): ``rate`` tokens a second up to ``burst``; each request
    takes one. Used from the event loop only (no lock). Buckets exist for valid keys only, so their
    number is bounded by the key file."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, list[float]] = {}  # name -> [tokens, updated at]

    def take(self, name: str) -> float:
        """0 when a token was taken; otherwise the seconds until one is available (nothing taken)."""
        now = self._clock()
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate


@dataclass(frozen=True)
class ServedUseCase:
    """A use case's declaration and its tenants' deployments, swapped together."""

    declaration: UseCaseDeclaration
    tenants: dict[str, TenantDeployment]


@dataclass(frozen=True)
class _ShadowItem:
    deployment: TenantDeployment
    matrix: np.ndarray  # the encoded inputs the champion scored
    ids: list[str]
    accounts: list[str]
    endpoint: str
    requested_at_us: int


@bentoml.service(
    name="churn_service",
    workers=WORKERS,
    # BentoML's TimeoutMiddleware schedules a timer per request that stays in the event loop for the
    # whole timeout even after the response (about 0.4 KiB per request): at a few thousand requests
    # a second a 30 s timeout held ~40 MiB per worker. Scoring takes milliseconds; 5 s is plenty.
    traffic={"timeout": 5},
    # Per-request access logging and tracing cost more than scoring itself; metrics stay on.
    logging={"access": {"enabled": False}},
    # The OpenTelemetry middleware creates spans even at sample rate 0: skip the scoring routes.
    tracing={"sample_rate": 0.0, "excluded_urls": ["/v1/predict", "/v1/predict_batch", r"/v1/[a-z][a-z0-9_]*/predict"]},
    endpoints={"livez": "/livez", "readyz": "/readyz"},
)
class ChurnService:
    """Churn scores for every tenant from its champion model, with the challenger in shadow."""

    poll_interval_s = 0.5

    def __init__(self) -> None:
        self.home = configure_environment()
        self.folder = serving_dir(self.home)
        # Segments rotate once a second (MLOPS_LOG_SEGMENT_SECONDS), written by the writer's own
        # thread, never by a request. Each record is journaled before the response (MLOPS_LOG_FSYNC:
        # none|interval|always).
        self.log_writer = PredictionLogWriter(self.home, max_rows=200_000, max_age_s=LOG_SEGMENT_SECONDS,
                                              on_failure=lambda stage: LOG_WRITE_FAILURES.labels(stage).inc())
        self._shadow_items: list[_ShadowItem] = []  # for the shadow thread
        self._loop_shadow_items: list[_ShadowItem] = []  # for the event loop (single predictions)
        self._loop_shadow_scheduled = False
        self._shadow_pending = 0
        self._shadow_cond = threading.Condition()
        self._shadow_closed = False
        self.deployments: dict[str, TenantDeployment] = {}  # churn's, by tenant
        self.usecases: dict[str, ServedUseCase] = {}  # the other use cases', by name
        self._keys: tuple[dict, dict] = ({}, {})  # (key file snapshot, verified-key cache), swapped together
        self._manifest_mtime: float | None = None
        self._keys_mtime: float | None = None
        self._stop = threading.Event()
        self._started_at, self._predictions_served = time.time(), 0
        self._batch_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="batch")
        self._rate_limiter = TokenBuckets(RATE_LIMIT_PER_S, RATE_LIMIT_BURST) if RATE_LIMIT_PER_S > 0 else None
        self.refresh()
        # A large, long-lived heap (feature matrices, BentoML) makes full collections slow: freeze
        # what start-up allocated so the collector skips it; requests allocate little.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 1000)
        # Background threads (shadow, log writer) hand the GIL back to the event loop within 1 ms
        # (Python's default is 5 ms: a request could wait that long behind them).
        sys.setswitchinterval(0.001)
        self.log_writer.start()
        self._watcher = threading.Thread(target=self._watch, name="manifest-watcher", daemon=True)
        self._watcher.start()
        self._shadow_thread = threading.Thread(target=self._shadow_loop, name="shadow", daemon=True)
        self._shadow_thread.start()
        _SERVICE[:] = [self]

    # --- state ---------------------------------------------------------------------------
    def _load_model(self, folder: Path, spec: dict, sample: np.ndarray):
        return load_scorer(folder, spec, sample)

    def refresh(self) -> None:
        """Load a changed manifest or key file; swaps whole objects, so requests never see half."""
        manifest_path, keys_path = self.folder / MANIFEST, self.folder / "api_keys.json"
        mtime = manifest_path.stat().st_mtime if manifest_path.exists() else None
        if mtime != self._manifest_mtime:
            manifest = read_manifest(self.folder)
            tenants = list(manifest["tenants"].items())
            # Tenants load in parallel: reading Parquet and parsing model files release the GIL.
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, len(tenants)))) as pool:
                loaded = pool.map(
                    lambda item: load_deployment(self.folder, item[0], item[1], self.deployments.get(item[0]),
                                                 self._load_model),
                    tenants,
                )
                deployments = dict(zip((t for t, _ in tenants), loaded, strict=True))
                usecases = self._load_usecases(manifest.get("use_cases", {}), pool)
            self.deployments, self.usecases = deployments, usecases
            self._manifest_mtime = mtime
            self._write_status()  # what this worker now serves, for whoever waits on a swap
        kmtime = keys_path.stat().st_mtime if keys_path.exists() else None
        if kmtime != self._keys_mtime:
            self._keys = (ApiKeyStore(self.folder).snapshot(), {})
            self._keys_mtime = kmtime

    def _load_usecases(self, declared: dict, pool: concurrent.futures.Executor) -> dict[str, ServedUseCase]:
        """The use cases of the manifest. One that cannot be loaded (a bad declaration, a model that does
        not fit it) keeps its previous deployments, or is not served, and says why: the others serve on."""
        served: dict[str, ServedUseCase] = {}
        jobs = []
        for name, entry in declared.items():
            previous = self.usecases.get(name)
            try:
                if previous is not None and previous.declaration.spec == entry["declaration"]:
                    declaration = previous.declaration  # unchanged: keep its request models and snapshots
                else:
                    declaration = UseCaseDeclaration(entry["declaration"])
            except Exception as exc:
                print(f"churn_service: use case {name!r} cannot be served: {exc!r}")
                if previous is not None:
                    served[name] = previous
                continue
            old = previous.tenants if previous is not None else {}
            for tenant, tenant_entry in entry["tenants"].items():
                jobs.append((name, tenant, pool.submit(load_deployment, self.folder, tenant, tenant_entry,
                                                       old.get(tenant), self._load_model, declaration)))
            served[name] = ServedUseCase(declaration, {})
        for name, tenant, job in jobs:
            try:
                served[name].tenants[tenant] = job.result()
            except Exception as exc:
                previous = self.usecases.get(name)
                kept = previous.tenants.get(tenant) if previous is not None else None
                print(f"churn_service: tenant {tenant!r} of use case {name!r} cannot be loaded"
                      f"{', still serving its previous models' if kept else ''}: {exc!r}")
                if kept is not None:
                    served[name].tenants[tenant] = kept
        return served

    def _all_deployments(self) -> list[TenantDeployment]:
        return [*self.deployments.values(), *(d for u in self.usecases.values() for d in u.tenants.values())]

    @property
    def api_keys(self) -> dict:
        return self._keys[0]

    def _watch(self) -> None:
        last_status = 0.0
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception as exc:  # a bad manifest must not kill the watcher; keep serving the last good one
                print(f"churn_service: manifest reload failed, still serving the previous models: {exc!r}")
            if time.monotonic() - last_status >= 2.0:
                last_status = time.monotonic()
                self._write_status()

    def _write_status(self) -> None:
        """This worker's CPU time and prediction count (the cost-per-prediction metric) and what it
        serves: per use case and tenant, the champion, challenger and online snapshot versions."""
        import json

        def served(deployments: dict) -> dict:
            return {tenant: {"champion": d.champion.version if d.champion else None,
                             "challenger": d.challenger.version if d.challenger else None,
                             "snapshot_version": d.snapshot_version} for tenant, d in deployments.items()}

        status = {"pid": os.getpid(), "started_at": self._started_at, "updated_at": time.time(),
                  "cpu_seconds": time.process_time(), "predictions": self._predictions_served,
                  "manifest_mtime": self._manifest_mtime,
                  "serving": {"churn": served(self.deployments),
                              **{name: served(u.tenants) for name, u in self.usecases.items()}}}
        try:
            folder = HomeLayout(self.home).service_status_dir
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / f"worker-{os.getpid()}.json", json.dumps(status).encode())
        except OSError as exc:  # monitoring must never take serving down
            print(f"churn_service: could not write worker status: {exc!r}")

    def __is_ready__(self) -> bool:
        deployments = self._all_deployments()
        return bool(deployments) and all(d.champion is not None for d in deployments)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self._stop.set()
        with self._shadow_cond:
            self._shadow_closed = True
            self._shadow_cond.notify()
        self._shadow_thread.join(timeout=10)
        self._flush_loop_shadow()  # what the event loop had queued and not yet scored
        self.log_writer.close()
        self._batch_pool.shutdown(wait=False)

    # --- request handling ----------------------------------------------------------------
    def _authorize(self, headers, tenant: str) -> TenantDeployment:
        """Churn's deployment of ``tenant``, for a request that carries a key of that tenant."""
        self._check_key(headers, tenant)
        deployment = self.deployments.get(tenant)
        if deployment is None:
            raise ServiceError(HTTPStatus.NOT_FOUND, f"tenant {tenant!r} has no deployed model")
        return deployment

    def _api_key(self, headers) -> ApiKey | None:
        """The valid, unrevoked key the request carries (``Authorization: Bearer`` or ``X-API-Key``), or None."""
        presented = headers.get("x-api-key")
        if not presented:
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                presented = auth[7:].strip()
        keys, verified = self._keys
        key = verified.get(presented)
        if key is None:
            key = verify_key(keys, presented)
            if key is not None and len(verified) < 4096:  # valid keys only; the cache goes with the key file snapshot
                verified[presented] = key
        return key

    def _check_key(self, headers, tenant: str) -> None:
        """401 without a valid key, 403 with a key of another tenant."""
        key = self._api_key(headers)
        if key is None:
            raise ServiceError(HTTPStatus.UNAUTHORIZED, NO_KEY)
        if key.tenant != tenant:
            raise ServiceError(HTTPStatus.FORBIDDEN,
                               f"Authorization error: this API key belongs to another tenant, not {tenant!r}")

    def _check_rate(self, key: ApiKey) -> None:
        """429 when ``key`` is over its rate (``MLOPS_RATE_LIMIT_PER_S``)."""
        if self._rate_limiter is None:
            return
        wait_s = self._rate_limiter.take(key.key_id)
        if wait_s > 0:
            retry_after = max(1, math.ceil(wait_s))
            raise ServiceError(HTTPStatus.TOO_MANY_REQUESTS,
                               f"rate limit of API key {key.key_id!r} exceeded: {RATE_LIMIT_PER_S:g} requests/s "
                               f"(burst {RATE_LIMIT_BURST:g}); retry in {retry_after} s",
                               headers={"retry-after": str(retry_after)})

    def _rows(self, deployment: TenantDeployment, account_ids: list[str]) -> np.ndarray:
        index = deployment.account_index
        try:
            return np.fromiter(map(index.__getitem__, account_ids), dtype=np.intp, count=len(account_ids))
        except KeyError:
            missing = [a for a in account_ids if a not in index]
            shown = ", ".join(repr(a) for a in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            what = "account(s)" if deployment.declaration is None else f"{deployment.declaration.lookup_key}(s)"
            where = "" if deployment.use_case is None else f" of use case {deployment.use_case!r}"
            raise ServiceError(HTTPStatus.NOT_FOUND,
                               f"unknown {what} for tenant {deployment.tenant!r}{where}: {shown}{more}") from None

    def _score(self, deployment: TenantDeployment, model: Model, matrix: np.ndarray,
               role: str) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        scores = self._scores(model, matrix)
        elapsed = time.perf_counter() - start
        latency_metric, count_metric = self._metric_children(deployment.use_case, deployment.tenant, model.version,
                                                             role)
        latency_metric.observe(elapsed)
        count_metric.inc(len(matrix))
        return scores, elapsed * 1000

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - the service lives as long as its process
    def _metric_children(self, use_case: str | None, tenant: str, version: str, role: str):
        if use_case is None:
            return REQUEST_LATENCY.labels(tenant, version, role), PREDICTIONS.labels(tenant, version, role)
        return (USECASE_LATENCY.labels(use_case, tenant, version, role),
                USECASE_PREDICTIONS.labels(use_case, tenant, version, role))

    @functools.lru_cache(maxsize=1024)  # noqa: B019
    def _shadow_counter(self, use_case: str | None, tenant: str, endpoint: str, outcome: str):
        if use_case is None:
            return SHADOW_REQUESTS.labels(tenant, endpoint, outcome)
        return USECASE_SHADOW_REQUESTS.labels(use_case, tenant, endpoint, outcome)

    def _scores(self, model: Model, matrix: np.ndarray) -> np.ndarray:
        """Scores of ``matrix`` from ``model`` (churn: probabilities; multiclass: one column per class);
        the GPU service overrides this."""
        # One thread per prediction: requests and the shadow already keep a small machine's cores busy.
        return model.booster.predict(matrix, num_threads=1)

    def _log(self, deployment: TenantDeployment, model: Model, role: str, ids: list[str], accounts: list[str],
             scores: np.ndarray, latency_per_row_ms: float, endpoint: str, requested_at_us) -> None:
        """Log predictions; for a use case, ``accounts`` are the entity keys (the log's ``account_id``)."""
        rows = len(ids)
        if role == CHAMPION:
            self._predictions_served += rows
        if deployment.declaration is not None:
            scores = deployment.declaration.logged_scores(scores)  # multiclass: one number per prediction
        if rows == 1:  # a single prediction: a few list appends
            self.log_writer.append_one(deployment.tenant, (role, model.version, deployment.snapshot_version, endpoint),
                                       requested_at_us, latency_per_row_ms, ids[0], accounts[0], float(scores[0]),
                                       time.monotonic(), deployment.use_case)
            return
        chunk = LogChunk(rows, role, model.version, deployment.snapshot_version, endpoint, requested_at_us,
                         latency_per_row_ms, ids, accounts, scores)
        self.log_writer.append_chunk(deployment.tenant, chunk, time.monotonic(), deployment.use_case)

    # --- shadow ----------------------------------------------------------------------------
    def _enqueue_shadow(self, item: _ShadowItem, sample: float) -> None:
        """Queue the request for the challenger (or skip it: sampled out, or the backlog is full).

        Requests answered on the event loop (single predictions) are shadowed on the event loop too,
        in a micro-batch every SHADOW_BATCH_S scheduled with ``call_later``: after their responses
        are written, holding the GIL throughout (a micro-batch of compiled scoring takes well under a
        millisecond). Handing them to a thread made the loop and the thread trade the GIL every
        switch interval, which showed in the tail latency. Batches scored on worker threads go to
        the shadow thread, which releases the GIL while it scores."""
        tenant, endpoint, use_case = item.deployment.tenant, item.endpoint, item.deployment.use_case
        if sample < 1.0 and random.random() >= sample:
            self._shadow_counter(use_case, tenant, endpoint, "sampled_out").inc()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the event loop: a worker thread
            loop = None
        schedule = False
        with self._shadow_cond:
            if self._shadow_closed or self._shadow_pending + len(item.ids) > SHADOW_MAX_PENDING:
                outcome = "dropped"
            else:
                outcome = "shadowed"
                self._shadow_pending += len(item.ids)
                if loop is not None and len(item.ids) < OFFLOAD_ROWS:
                    self._loop_shadow_items.append(item)
                    schedule, self._loop_shadow_scheduled = not self._loop_shadow_scheduled, True
                else:
                    self._shadow_items.append(item)
                    if len(self._shadow_items) == 1:
                        self._shadow_cond.notify()
        if schedule:
            loop.call_later(SHADOW_BATCH_S, self._flush_loop_shadow)
        if outcome == "dropped":  # "shadowed" is counted per micro-batch, once scored
            self._shadow_counter(use_case, tenant, endpoint, outcome).inc()

    def _flush_loop_shadow(self) -> None:
        """Score the event loop's queued shadow work (also called at shutdown)."""
        with self._shadow_cond:
            items, self._loop_shadow_items = self._loop_shadow_items, []
            self._loop_shadow_scheduled = False
        self._shadow_batch(items)

    def _shadow_batch(self, items: list[_ShadowItem]) -> None:
        """One challenger predict per deployment and endpoint for the queued items."""
        groups: dict = {}
        for item in items:
            groups.setdefault((id(item.deployment), item.endpoint), []).append(item)
        for group in groups.values():
            try:
                self._shadow(group)
                deployment = group[0].deployment
                self._shadow_counter(deployment.use_case, deployment.tenant, group[0].endpoint,
                                     "shadowed").inc(len(group))
            except Exception as exc:  # the shadow must never take the service down
                print(f"churn_service: shadow scoring failed: {exc!r}")
            finally:
                with self._shadow_cond:
                    self._shadow_pending -= sum(len(i.ids) for i in group)

    def _shadow_loop(self) -> None:
        """Score queued shadow work in micro-batches: one predict per deployment every SHADOW_BATCH_S."""
        while True:
            with self._shadow_cond:
                while not self._shadow_items and not self._shadow_closed:
                    self._shadow_cond.wait()
                closed = self._shadow_closed
            if not closed:
                time.sleep(SHADOW_BATCH_S)  # let a micro-batch accumulate
            with self._shadow_cond:
                items, self._shadow_items = self._shadow_items, []
            self._shadow_batch(items)
            if closed:
                with self._shadow_cond:
                    if not self._shadow_items:
                        return

    def _shadow(self, group: list[_ShadowItem]) -> None:
        deployment, endpoint = group[0].deployment, group[0].endpoint
        challenger = deployment.challenger
        matrix = group[0].matrix if len(group) == 1 else np.concatenate([i.matrix for i in group])
        scores, latency = self._score(deployment, challenger, matrix, CHALLENGER)
        per_row = latency / len(matrix)
        if len(group) == 1:
            requested_at = group[0].requested_at_us
            ids, accounts = group[0].ids, group[0].accounts
        else:
            requested_at = np.repeat([i.requested_at_us for i in group], [len(i.ids) for i in group])
            ids = list(itertools.chain.from_iterable(i.ids for i in group))
            accounts = list(itertools.chain.from_iterable(i.accounts for i in group))
        self._log(deployment, challenger, CHALLENGER, ids, accounts, scores, per_row, endpoint, requested_at)

    # --- predictions ---------------------------------------------------------------------
    def _predict_rows(self, deployment: TenantDeployment, account_ids: list[str], rows: np.ndarray, endpoint: str,
                      requested_at_us: int) -> tuple[list[str], np.ndarray]:
        return self._predict_matrix(deployment, account_ids, deployment.features.take(rows, axis=0), endpoint,
                                    requested_at_us)

    def _predict_matrix(self, deployment: TenantDeployment, account_ids: list[str], matrix: np.ndarray, endpoint: str,
                        requested_at_us: int) -> tuple[list[str], np.ndarray]:
        """Score encoded inputs with the champion, log, and queue the challenger's shadow scoring."""
        scores, latency = self._score(deployment, deployment.champion, matrix, CHAMPION)
        ids = new_prediction_ids(len(account_ids))
        self._log(deployment, deployment.champion, CHAMPION, ids, account_ids, scores, latency / len(ids),
                  endpoint, requested_at_us)
        if deployment.challenger is not None:
            # Off the hot path: the response carries the champion's score alone.
            sample = SHADOW_SAMPLE if endpoint == "predict" else SHADOW_BATCH_SAMPLE
            self._enqueue_shadow(_ShadowItem(deployment, matrix, ids, account_ids, endpoint, requested_at_us), sample)
        return ids, scores

    def _predict(self, tenant: str, account_ids: list[str], headers, endpoint: str):
        requested_at_us = time.time_ns() // 1000
        deployment = self._authorize(headers, tenant)
        rows = self._rows(deployment, account_ids)
        ids, scores = self._predict_rows(deployment, account_ids, rows, endpoint, requested_at_us)
        return deployment, ids, scores

    async def _predict_async(self, tenant: str, account_ids: list[str], headers, endpoint: str):
        """``_predict``, with large batches scored on a worker thread (LightGBM releases the GIL)."""
        if len(account_ids) < OFFLOAD_ROWS:
            return self._predict(tenant, account_ids, headers, endpoint)
        requested_at_us = time.time_ns() // 1000
        deployment = self._authorize(headers, tenant)
        rows = self._rows(deployment, account_ids)
        ids, scores = await asyncio.get_running_loop().run_in_executor(
            self._batch_pool, self._predict_rows, deployment, account_ids, rows, endpoint, requested_at_us)
        return deployment, ids, scores

    @bentoml.api(route="/v1/predict", input_spec=PredictInput)
    def predict(self, tenant: str, account_id: str, ctx: bentoml.Context) -> Prediction:
        """Churn probability of one account, from the tenant's online features and champion model."""
        deployment, ids, scores = self._predict(tenant, [account_id], ctx.request.headers, "predict")
        return Prediction(prediction_id=ids[0], tenant=tenant, account_id=account_id, score=float(scores[0]),
                          model_version=deployment.champion.version)

    @bentoml.api(route="/v1/predict_batch", input_spec=PredictBatchInput)
    def predict_batch(self, tenant: str, account_ids: list[str], ctx: bentoml.Context) -> BatchPrediction:
        """Churn probabilities of up to 10,000 accounts in one request."""
        deployment, ids, scores = self._predict(tenant, account_ids, ctx.request.headers, "predict_batch")
        version = deployment.champion.version
        return BatchPrediction(
            tenant=tenant, model_version=version,
            predictions=[
                Prediction(prediction_id=pid, tenant=tenant, account_id=a, score=float(s), model_version=version)
                for pid, a, s in zip(ids, account_ids, scores, strict=True)
            ],
        )

    # --- every other use case: /v1/<use case>/predict and /v1/<use case>/predict_batch --------------
    # The use cases are known only at run time (the manifest), so each endpoint is one API method
    # with a path parameter: BentoML 1.4 adds an API's route to its Starlette router as it stands
    # (``Route(route, ...)``), so ``{use_case}`` is a Starlette path parameter, read from
    # ``ctx.request.path_params``. Unlike an ASGI sub-app (``@bentoml.asgi_app``), the routes stay
    # API methods of this one service: listed in its OpenAPI document (the body as a JSON object;
    # its fields depend on the use case, as the method's docstring says), with BentoML's error
    # handling (400 for validation errors, the generic 401/403 body), metrics and context. The body
    # is taken whole (a positional-only ``dict`` parameter: BentoML's root input) and validated
    # here by the use case's request model, built from the manifest's declaration.
    def deploys(self, use_case: str) -> bool:
        """Whether this service answers for ``use_case``: a declared one deployed, or churn when it is
        (asked for every request's metrics label, so no set is built)."""
        return use_case in self.usecases or (use_case == CHURN and bool(self.deployments))

    def deployed_use_cases(self) -> list[str]:
        """The use cases this service answers for, sorted (``deploys``)."""
        return sorted(u for u in {*self.usecases, CHURN} if self.deploys(u))

    def _served_usecase(self, use_case: str) -> ServedUseCase:
        served = self.usecases.get(use_case)
        if served is None:
            deployed = self.deployed_use_cases()
            raise ServiceError(HTTPStatus.NOT_FOUND,
                               f"unknown use case {use_case!r}; deployed: {', '.join(deployed) or 'none'}")
        return served

    async def _predict_usecase(self, use_case: str, body: dict, headers, endpoint: str) -> dict[str, Any]:
        requested_at_us = time.time_ns() // 1000
        served = self._served_usecase(use_case)
        declaration = served.declaration
        if endpoint == "predict":
            payload = declaration.predict_model.model_validate(body)
            records = [payload]
        else:
            payload = declaration.batch_model.model_validate(body)
            records = payload.instances
        tenant = payload.tenant
        self._check_key(headers, tenant)
        deployment = served.tenants.get(tenant)
        if deployment is None:
            raise ServiceError(HTTPStatus.NOT_FOUND, f"tenant {tenant!r} has no deployed model for use case {use_case!r}")
        keys = [getattr(r, declaration.key) for r in records]
        lookups = keys if declaration.lookup_key == declaration.key else [getattr(r, declaration.lookup_key)
                                                                         for r in records]
        rows = self._rows(deployment, lookups) if declaration.lookup else None
        # The prediction log's account_id column holds the use case's entity key ("" when a use case that
        # looks nothing up is sent none).
        logged_keys = keys if declaration.lookup else [k or "" for k in keys]

        def score() -> tuple[list[str], np.ndarray]:
            matrix = declaration.encode(deployment.features, rows, records)
            return self._predict_matrix(deployment, logged_keys, matrix, endpoint, requested_at_us)

        if len(records) < OFFLOAD_ROWS:
            ids, scores = score()
        else:  # large batches on a worker thread, as churn's: the event loop keeps serving
            ids, scores = await asyncio.get_running_loop().run_in_executor(self._batch_pool, score)
        version = deployment.champion.version
        predictions = declaration.predictions(tenant, version, ids, keys, scores)
        if endpoint == "predict":
            return predictions[0]
        return {"tenant": tenant, "model_version": version, "predictions": predictions}

    async def _predict_churn(self, body: dict, headers, endpoint: str) -> dict[str, Any]:
        """``/v1/churn/...``: churn's ``/v1/predict`` and ``/v1/predict_batch`` (same input and output)."""
        if endpoint == "predict":
            payload = PredictInput.model_validate(body)
            account_ids = [payload.account_id]
        else:
            payload = PredictBatchInput.model_validate(body)
            account_ids = payload.account_ids
        deployment, ids, scores = await self._predict_async(payload.tenant, account_ids, headers, endpoint)
        tenant, version = payload.tenant, deployment.champion.version
        predictions = [{"prediction_id": pid, "tenant": tenant, "account_id": a, "score": s, "model_version": version}
                       for pid, a, s in zip(ids, account_ids, scores.tolist(), strict=True)]
        if endpoint == "predict":
            return predictions[0]
        return {"tenant": tenant, "model_version": version, "predictions": predictions}

    async def _route_usecase(self, use_case: str, body: Any, headers, endpoint: str) -> dict[str, Any]:
        if use_case == CHURN and CHURN not in self.usecases:  # churn is not yet a declared use case
            return await self._predict_churn(body, headers, endpoint)
        return await self._predict_usecase(use_case, body, headers, endpoint)

    @bentoml.api(route="/v1/{use_case}/predict")
    async def predict_usecase(self, body: dict[str, Any], /, ctx: bentoml.Context) -> dict[str, Any]:
        """One prediction of a deployed use case. Body: ``tenant``, the use case's entity key (e.g.
        ``customer_id``; when it looks features up) and its declared request fields. Answer:
        ``{prediction_id, tenant, <entity key>, score, model_version}``; ``score`` is the predicted value
        (regression), the probability (binary) or the probabilities by class (multiclass, with
        ``predicted_class``). ``/v1/churn/predict`` answers as ``/v1/predict``. 404 names an unknown use
        case and lists the deployed ones."""
        return await self._route_usecase(_path_use_case(ctx.request), body, ctx.request.headers, "predict")

    @bentoml.api(route="/v1/{use_case}/predict_batch")
    async def predict_batch_usecase(self, body: dict[str, Any], /, ctx: bentoml.Context) -> dict[str, Any]:
        """Up to 10,000 predictions of a deployed use case. Body: ``tenant`` and ``instances``, a list of
        objects with the entity key and request fields. Answer: ``{tenant, model_version, predictions}``.
        ``/v1/churn/predict_batch`` answers as ``/v1/predict_batch`` (``account_ids``)."""
        return await self._route_usecase(_path_use_case(ctx.request), body, ctx.request.headers, "predict_batch")


# --- fast path for the scoring routes ------------------------------------------------------------
_SERVICE: list = []


def _error_response(exc: Exception) -> Response:
    """The ``ErrorBody`` of a validation error (400) or a ``ServiceError``, as JSON. Escaped to ASCII: a
    field name of the request echoed in ``detail`` may hold characters UTF-8 cannot encode."""
    if isinstance(exc, ValidationError):
        status, headers = 400, None
        body = {"error": f"{exc.error_count()} validation error for {exc.title}",
                "detail": exc.errors(include_url=False, include_context=False, include_input=False)}
    else:
        status, headers = exc.error_code.value, exc.headers
        body = {"error": str(exc)}
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


def _json_response(result: Any) -> Response:
    try:
        return Response(pydantic_core.to_json(result), media_type="application/json")
    except pydantic_core.PydanticSerializationError:  # an echoed key that UTF-8 cannot encode: escape it
        return Response(json.dumps(result), media_type="application/json")


async def _fast_predict(service: ChurnService, headers, body: bytes) -> Response:
    try:
        payload = PredictInput.model_validate_json(body)
        deployment, ids, scores = service._predict(payload.tenant, [payload.account_id], headers, "predict")
    except (ValidationError, ServiceError) as exc:
        return _error_response(exc)
    # The fields of ``Prediction``, serialized by pydantic-core as model_dump_json would (no model instance).
    body = pydantic_core.to_json({"prediction_id": ids[0], "tenant": payload.tenant, "account_id": payload.account_id,
                                  "score": float(scores[0]), "model_version": deployment.champion.version})
    return Response(body, media_type="application/json")


async def _fast_predict_batch(service: ChurnService, headers, body: bytes) -> Response:
    try:
        payload = PredictBatchInput.model_validate_json(body)
        deployment, ids, scores = await service._predict_async(
            payload.tenant, payload.account_ids, headers, "predict_batch")
    except (ValidationError, ServiceError) as exc:
        return _error_response(exc)
    tenant, version = payload.tenant, deployment.champion.version
    body = pydantic_core.to_json({
        "tenant": tenant, "model_version": version,
        "predictions": [
            {"prediction_id": pid, "tenant": tenant, "account_id": a, "score": s, "model_version": version}
            for pid, a, s in zip(ids, payload.account_ids, scores.tolist(), strict=True)
        ],
    })
    return Response(body, media_type="application/json")


async def _fast_predict_usecase(service: ChurnService, headers, body: bytes, use_case: str,
                                endpoint: str) -> Response:
    """``ChurnService.predict_usecase`` and ``predict_batch_usecase`` (same contract), with the body parsed
    here: a body that is not JSON is a 400, as for churn (BentoML's root-input parsing answers 500)."""
    try:
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack
            raise ServiceError(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON: {exc}") from None
        result = await service._route_usecase(use_case, parsed, headers, endpoint)
    except (ValidationError, ServiceError) as exc:
        return _error_response(exc)
    return _json_response(result)


_FAST_ROUTES = {"/v1/predict": _fast_predict, "/v1/predict_batch": _fast_predict_batch}
_USECASE_ENDPOINTS = ("predict", "predict_batch")


def _path_use_case(request: Request) -> str:
    """The ``{use_case}`` of the request's route (from its path if a middleware copied the scope)."""
    return request.path_params.get("use_case") or request.url.path.rstrip("/").split("/")[-2]


def _usecase_route(path: str) -> tuple[str, str] | None:
    """(use case, endpoint) of ``/v1/<use case>/predict`` or ``/v1/<use case>/predict_batch``. Any other
    path of that shape (an empty name, a name with a slash) is an unknown use case too: 404, as JSON."""
    if not path.startswith("/v1/"):
        return None
    use_case, _, endpoint = path[4:].rpartition("/")
    if endpoint in _USECASE_ENDPOINTS and (use_case or path.startswith("/v1//")):
        return use_case, endpoint
    return None


async def _read_body(receive, limit: int, setting: str) -> bytes:
    """The request body, counted as it streams: 413 as soon as it passes ``limit`` bytes (``setting``)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ServiceError(HTTPStatus.BAD_REQUEST, "the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, setting)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int, setting: str) -> ServiceError:
    return ServiceError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the request body is over this route's limit of {limit} bytes ({setting})",
                        headers={"connection": "close"})  # the rest of the body is never read


def _content_length(headers) -> int | None:
    raw = headers.get("content-length")
    return int(raw) if raw is not None and raw.isdigit() else None


def _metrics_authorized(headers) -> bool:
    auth = headers.get("authorization", "")
    return auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), METRICS_TOKEN.encode())


class FastPredictMiddleware:
    """Answers POST /v1/predict and /v1/predict_batch with the contract of ``ChurnService.predict``
    and ``predict_batch`` (same input, output and error bodies), and /v1/<use case>/predict[_batch]
    with that of ``predict_usecase`` and ``predict_batch_usecase``, skipping BentoML's per-request
    IO-descriptor machinery. The two methods stay the documented API (OpenAPI, clients); the
    middleware sits inside BentoML's metrics middleware, so /metrics still counts these requests.

    Before a scoring route reads anything: 413 for a ``Content-Length`` over the limit, 401 without a
    valid key, 429 for a key over its rate; then the body is read, counted (413 past the limit). It
    also serves the completed OpenAPI document at /docs.json, and guards /metrics with
    ``MLOPS_METRICS_TOKEN`` when it is set."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if method != "POST":
            if method == "GET" and path == "/docs.json":
                return await _json_response(openapi_document())(scope, receive, send)
            if path == "/metrics" and METRICS_TOKEN and not _metrics_authorized(Headers(scope=scope)):
                response = _error_response(ServiceError(
                    HTTPStatus.UNAUTHORIZED, "/metrics needs the metrics token (send 'Authorization: Bearer <token>')",
                    headers={"www-authenticate": 'Bearer realm="metrics"'}))
                return await response(scope, receive, send)
            return await self.app(scope, receive, send)
        handler = _FAST_ROUTES.get(path)
        route = None if handler is not None else _usecase_route(path)
        if handler is None and route is None:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        limit, setting = ((MAX_BATCH_BODY_BYTES, "MLOPS_MAX_BATCH_BODY_BYTES") if path.endswith("_batch")
                          else (MAX_BODY_BYTES, "MLOPS_MAX_BODY_BYTES"))
        try:
            if not _SERVICE or _SERVICE[0]._stop.is_set():
                raise ServiceError(HTTPStatus.SERVICE_UNAVAILABLE, "the service is starting or shutting down; retry",
                                   headers={"retry-after": "1"})
            service = _SERVICE[0]
            length = _content_length(headers)
            if length is not None and length > limit:
                raise _too_large(limit, setting)
            key = service._api_key(headers)
            if key is None:  # before anything is read or looked up: nothing answers a request without a key
                raise ServiceError(HTTPStatus.UNAUTHORIZED, NO_KEY, headers={"www-authenticate": "Bearer"})
            service._check_rate(key)
            body = await _read_body(receive, limit, setting)
        except ServiceError as exc:
            response = _error_response(exc)
        else:
            if handler is not None:
                response = await handler(service, headers, body)
            else:
                response = await _fast_predict_usecase(service, headers, body, *route)
        if KEEPALIVE_REQUESTS and random.random() * KEEPALIVE_REQUESTS < 1.0:
            response.headers["connection"] = "close"  # the client reconnects, to whichever worker is free
        await response(scope, receive, send)


ChurnService.add_asgi_middleware(FastPredictMiddleware)


# --- bounded labels for BentoML's request metrics --------------------------------------------------
# Paths labelled as they are: churn's routes and BentoML's own pages.
_LABELLED_PATHS = frozenset({*_FAST_ROUTES, "/", "/docs", "/docs.json", "/schema.json", "/livez", "/readyz",
                             "/healthz", "/metrics"})
UNMATCHED_ENDPOINT = "/{unmatched}"
_RAW_PATH = "mlops.raw_path"


def metrics_endpoint(path: str) -> str:
    """The ``endpoint`` label of a request in BentoML's request metrics: one of the service's routes
    as it is; ``/v1/<use case>/predict[_batch]`` by its use case when that is deployed, else by the
    route's template; anything else one label (``UNMATCHED_ENDPOINT``). Labels come from a fixed set,
    whatever paths clients send."""
    if path in _LABELLED_PATHS:
        return path
    if path.startswith("/static_content/"):  # the Swagger UI's files
        return "/static_content/{file}"
    route = _usecase_route(path)
    if route is not None:
        use_case, endpoint = route
        deployed = bool(_SERVICE) and _SERVICE[0].deploys(use_case)
        return f"/v1/{use_case}/{endpoint}" if deployed else f"/v1/{{use_case}}/{endpoint}"
    return UNMATCHED_ENDPOINT


class _RestorePath:
    """Hands the request on with the path its client sent (see ``BoundedEndpointMetrics``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if _RAW_PATH in scope:
            scope = {k: v for k, v in scope.items() if k != _RAW_PATH} | {"path": scope[_RAW_PATH]}
        await self.app(scope, receive, send)


class BoundedEndpointMetrics(_instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's request metrics (request count, duration histogram, in progress), labelled by
    ``metrics_endpoint`` instead of the raw path. BentoML 1.4 labels each request by its path, so
    every distinct path a client sends (a scanner's, a typo, any caller without a key) adds about 20
    series to every worker for good: 200 requests to made-up paths grew /metrics from 107 to 4,107
    lines (850 KB). The request itself reaches the service with its own path."""

    def __init__(self, app, **options):
        super().__init__(_RestorePath(app), **options)

    async def __call__(self, scope, receive, send):
        if scope["type"].startswith("http"):
            label = metrics_endpoint(scope["path"])
            if label != scope["path"]:
                scope = {**scope, "path": label, _RAW_PATH: scope["path"]}
        await super().__call__(scope, receive, send)


# BentoML builds each worker's middleware stack after importing this module, and looks the class up
# in its module then (``_bentoml_impl.server.app.ServiceAppFactory.middlewares``).
_instruments.RunnerTrafficMetricsMiddleware = BoundedEndpointMetrics


# --- the API contract (/docs.json) ----------------------------------------------------------------
DISTRIBUTION = "saas-mlops"  # pyproject.toml's [project] name
SCORING_ROUTES = ("/v1/predict", "/v1/predict_batch", "/v1/{use_case}/predict", "/v1/{use_case}/predict_batch")
SECURITY_SCHEME = "apiKey"
METRICS_SECURITY_SCHEME = "metricsToken"
_SCHEMA_REF = "#/components/schemas/{model}"
# Every status a scoring route answers besides 200, and when.
ERROR_STATUSES = {
    400: "The body is not JSON or fails validation (`detail` lists each problem: field, kind, message).",
    401: "No API key, or an unknown or revoked one.",
    403: "The API key belongs to another tenant than the request's `tenant`.",
    404: "Unknown use case (the deployed ones are listed), a tenant without a deployed model, or unknown "
         "accounts / entity keys (named).",
    413: "The body is over the route's limit (`MLOPS_MAX_BODY_BYTES`, `MLOPS_MAX_BATCH_BODY_BYTES` for "
         "`predict_batch`); refused before it is read.",
    429: "The API key is over its rate limit (`MLOPS_RATE_LIMIT_PER_S`); retry after `Retry-After` seconds.",
    503: "The service is starting or shutting down; retry after `Retry-After` seconds.",
    504: "Not answered within the service's timeout (5 s).",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "required": True,
                                "schema": {"type": "integer", "minimum": 1}}}
_openapi_cache: dict = {}


@functools.cache
def package_version() -> str:
    """The installed project's version (``info.version``); in a bento, where the project is source files
    and not an installed distribution, the bento's version."""
    import importlib.metadata

    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        bento = ChurnService.bento
        return str(bento.tag.version) if bento is not None and bento.tag.version else "0+unknown"


def openapi_document() -> dict:
    """BentoML's OpenAPI document of the service, completed: ``info.version`` the package version; the
    bearer key as a security scheme required by the scoring routes; on each scoring route every status
    it answers with the ``ErrorBody`` schema (``Retry-After`` on 429 and 503); the ``{use_case}`` path
    parameter with the deployed use cases as examples; ``/metrics`` guarded when its token is set."""
    deployed = tuple(sorted({*(_SERVICE[0].usecases if _SERVICE else ()), CHURN}))
    cached = _openapi_cache.get(deployed)
    if cached is not None:
        return cached
    served = getattr(_SERVICE[0], "bento_service", ChurnService) if _SERVICE else ChurnService  # or the GPU service
    spec = served.openapi_spec.asdict()
    spec["info"] = {"title": served.name, "version": package_version(),
                    "description": (served.inner.__doc__ or "").strip() + "\n\n"
                    "Send the tenant's API key as `Authorization: Bearer <key>` on every scoring route. Every "
                    "error answer is an `Error` object: `error` names the problem, `detail` (on a 400 of "
                    "validation) lists each invalid field."}
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorBody.model_json_schema(ref_template=_SCHEMA_REF)
    schemas.update(error_schema.pop("$defs", {}))
    schemas[ErrorBody.model_config["title"]] = error_schema
    components["securitySchemes"] = {SECURITY_SCHEME: {
        "type": "http", "scheme": "bearer",
        "description": "A tenant's API key (`mlk_<id>_<secret>`, made by `mlops keys create`); it scores that tenant "
                       "only. `X-API-Key: <key>` is accepted too."}}
    error_ref = {"application/json": {"schema": {"$ref": _SCHEMA_REF.format(model=ErrorBody.model_config["title"])}}}

    def error(status: int, description: str) -> dict:
        response = {"description": f"{HTTPStatus(status).phrase}. {description}", "content": error_ref}
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        return response

    use_case_parameter = {
        "name": "use_case", "in": "path", "required": True,
        "description": "A deployed use case (any other name is a 404 that names the deployed ones); `churn` answers "
                       "as `/v1/predict`.",
        "schema": {"type": "string"},
        "examples": {name: {"value": name} for name in deployed},
    }
    for path in SCORING_ROUTES:
        operation = spec["paths"][path]["post"]
        ok = operation["responses"].get(200) or operation["responses"]["200"]
        operation["responses"] = {"200": ok, **{str(code): error(code, text) for code, text in ERROR_STATUSES.items()}}
        operation["security"] = [{SECURITY_SCHEME: []}]
        if "{use_case}" in path:
            operation["parameters"] = [use_case_parameter]
    if METRICS_TOKEN:
        components["securitySchemes"][METRICS_SECURITY_SCHEME] = {
            "type": "http", "scheme": "bearer", "description": "The metrics token (`MLOPS_METRICS_TOKEN`)."}
        metrics = spec["paths"]["/metrics"]["get"]
        metrics["security"] = [{METRICS_SECURITY_SCHEME: []}]
        metrics["responses"]["401"] = error(401, "Without the metrics token.")
    # BentoML's own error schemas are no longer referenced: one error model, documented once.
    text = json.dumps(spec["paths"])
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        if _SCHEMA_REF.format(model=name) not in text:
            schemas.pop(name, None)
    _openapi_cache[deployed] = spec
    return spec
