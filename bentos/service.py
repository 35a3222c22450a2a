"""The churn prediction service: every tenant, champion + shadow challenger, hot model swaps.

Start it with ``bentoml serve bentos.service:ChurnService``. It reads only the serving bundle (see
``resources.serving``): never the warehouse, never the registry.
"""

from __future__ import annotations

import datetime as dt
import functools
import gc
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import bentoml
import lightgbm as lgb
import numpy as np
import pandas as pd
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from resources.environment import configure_environment
from resources.model_inputs import to_model_matrix
from resources.serving import (
    MANIFEST,
    ApiKeyStore,
    PredictionLogWriter,
    read_manifest,
    serving_dir,
    verify_key,
)

MAX_BATCH = 10_000
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


class ServiceError(BentoMLException):
    """An error with an HTTP status, and a message that names the problem."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message, error_code=status)


@dataclass(frozen=True)
class Model:
    version: str
    booster: lgb.Booster


@dataclass(frozen=True)
class TenantDeployment:
    """Everything needed to score one tenant, immutable: a swap replaces the whole object."""

    tenant: str
    champion: Model
    challenger: Model | None
    snapshot_version: int
    account_index: dict[str, int]
    features: np.ndarray


def load_deployment(folder: Path, tenant: str, entry: dict, previous: TenantDeployment | None) -> TenantDeployment:
    def model(spec: dict | None, old: Model | None) -> Model | None:
        if spec is None:
            return None
        if old is not None and old.version == spec["version"]:
            return old
        return Model(str(spec["version"]), lgb.Booster(model_file=str(folder / spec["model_file"])))

    old_models = {}
    if previous is not None:
        old_models = {m.version: m for m in (previous.champion, previous.challenger) if m is not None}
    champion = model(entry["champion"], old_models.get(str(entry["champion"]["version"])))
    challenger_spec = entry.get("challenger")
    if challenger_spec and str(challenger_spec["version"]) == champion.version:
        challenger_spec = None  # a model does not shadow itself
    challenger = model(challenger_spec, old_models.get(str(challenger_spec["version"])) if challenger_spec else None)
    snapshot_version = int(entry["snapshot"]["version"])
    if previous is not None and previous.snapshot_version == snapshot_version:
        index, features = previous.account_index, previous.features
    else:
        frame = pd.read_parquet(folder / entry["snapshot"]["file"])
        index = {account: i for i, account in enumerate(frame["account_id"])}
        features = to_model_matrix(frame)
    return TenantDeployment(tenant, champion, challenger, snapshot_version, index, features)


@bentoml.service(
    name="churn_service",
    workers=2,
    traffic={"timeout": 30},
    # Per-request access logging and tracing cost more than scoring itself; metrics stay on.
    logging={"access": {"enabled": False}},
    # The OpenTelemetry middleware creates spans even at sample rate 0: skip the scoring routes.
    tracing={"sample_rate": 0.0, "excluded_urls": ["/v1/predict"]},
    endpoints={"livez": "/livez", "readyz": "/readyz"},
)
class ChurnService:
    """Churn scores for every tenant from its champion model, with the challenger in shadow."""

    poll_interval_s = 0.5

    def __init__(self) -> None:
        self.home = configure_environment()
        self.folder = serving_dir(self.home)
        # Segments rotate once a second from the watcher thread, not inside a request.
        self.log_writer = PredictionLogWriter(self.home, max_rows=1_000_000, max_age_s=1.0)
        self.shadow_queue: queue.SimpleQueue = queue.SimpleQueue()
        self.deployments: dict[str, TenantDeployment] = {}
        self.api_keys: dict = {}
        self._manifest_mtime: float | None = None
        self._keys_mtime: float | None = None
        self._stop = threading.Event()
        self.refresh()
        # A large, long-lived heap (boosters, feature matrices) makes full collections slow:
        # freeze what start-up allocated so the collector skips it on every request.
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 50, 1000)
        self._watcher = threading.Thread(target=self._watch, name="manifest-watcher", daemon=True)
        self._watcher.start()
        self._shadow_thread = threading.Thread(target=self._shadow_loop, name="shadow", daemon=True)
        self._shadow_thread.start()
        _SERVICE[:] = [self]

    # --- state ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Load a changed manifest or key file; swaps whole objects, so requests never see half."""
        manifest_path, keys_path = self.folder / MANIFEST, self.folder / "api_keys.json"
        mtime = manifest_path.stat().st_mtime if manifest_path.exists() else None
        if mtime != self._manifest_mtime:
            manifest = read_manifest(self.folder)
            self.deployments = {
                tenant: load_deployment(self.folder, tenant, entry, self.deployments.get(tenant))
                for tenant, entry in manifest["tenants"].items()
            }
            self._manifest_mtime = mtime
        kmtime = keys_path.stat().st_mtime if keys_path.exists() else None
        if kmtime != self._keys_mtime:
            self.api_keys = ApiKeyStore(self.folder).snapshot()
            self._keys_mtime = kmtime

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception as exc:  # a bad manifest must not kill the watcher; keep serving the last good one
                print(f"churn_service: manifest reload failed, still serving the previous models: {exc!r}")
            self.log_writer.rotate_due(time.monotonic())

    def __is_ready__(self) -> bool:
        return bool(self.deployments) and all(d.champion is not None for d in self.deployments.values())

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self._stop.set()
        self.shadow_queue.put(None)
        self._shadow_thread.join(timeout=10)
        self.log_writer.close()

    # --- request handling ----------------------------------------------------------------
    def _authorize(self, ctx: bentoml.Context, tenant: str) -> TenantDeployment:
        headers = ctx.request.headers
        presented = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if not presented and auth.lower().startswith("bearer "):
            presented = auth[7:].strip()
        key = verify_key(self.api_keys, presented)
        if key is None:
            raise ServiceError(HTTPStatus.UNAUTHORIZED, "missing or invalid API key (send 'Authorization: Bearer <key>')")
        if key.tenant != tenant:
            raise ServiceError(HTTPStatus.FORBIDDEN, f"this API key belongs to another tenant, not {tenant!r}")
        deployment = self.deployments.get(tenant)
        if deployment is None:
            raise ServiceError(HTTPStatus.NOT_FOUND, f"tenant {tenant!r} has no deployed model")
        return deployment

    def _rows(self, deployment: TenantDeployment, account_ids: list[str]) -> list[int]:
        index = deployment.account_index
        missing = [a for a in account_ids if a not in index]
        if missing:
            shown = ", ".join(repr(a) for a in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ServiceError(HTTPStatus.NOT_FOUND, f"unknown account(s) for tenant {deployment.tenant!r}: {shown}{more}")
        return [index[a] for a in account_ids]

    def _score(self, deployment: TenantDeployment, model: Model, rows: list[int], role: str) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        scores = self._scores(model, deployment.features[rows])
        elapsed = time.perf_counter() - start
        latency_metric, count_metric = self._metric_children(deployment.tenant, model.version, role)
        latency_metric.observe(elapsed)
        count_metric.inc(len(rows))
        return scores, elapsed * 1000

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - the service lives as long as its process
    def _metric_children(self, tenant: str, version: str, role: str):
        return REQUEST_LATENCY.labels(tenant, version, role), PREDICTIONS.labels(tenant, version, role)

    def _scores(self, model: Model, matrix: np.ndarray) -> np.ndarray:
        """Churn probabilities of ``matrix`` from ``model``; the GPU service overrides this."""
        # One OpenMP thread: champion and shadow already run on two threads of a small machine.
        return model.booster.predict(matrix, num_threads=1)

    def _log(self, deployment, model, role, ids, accounts, scores, latency_ms, endpoint) -> None:
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        per_row = latency_ms / max(len(ids), 1)
        self.log_writer.append(
            [
                {
                    "prediction_id": pid, "tenant": deployment.tenant, "account_id": account, "role": role,
                    "model_version": model.version, "score": float(score), "latency_ms": per_row,
                    "snapshot_version": deployment.snapshot_version, "endpoint": endpoint, "requested_at": now,
                }
                for pid, account, score in zip(ids, accounts, scores, strict=True)
            ],
            time.monotonic(),
        )

    def _shadow(self, deployment: TenantDeployment, rows, ids, accounts, endpoint) -> None:
        challenger = deployment.challenger
        scores, latency = self._score(deployment, challenger, rows, "challenger")
        self._log(deployment, challenger, "challenger", ids, accounts, scores, latency, endpoint)

    def _shadow_loop(self) -> None:
        """Score queued shadow work in micro-batches: one predict per deployment every ~20 ms."""
        while True:
            item = self.shadow_queue.get()
            if item is None:
                return
            time.sleep(0.02)  # let a micro-batch accumulate
            items, stop = [item], False
            while True:
                try:
                    nxt = self.shadow_queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            groups: dict = {}
            for dep, rows, ids, accounts, endpoint in items:
                group = groups.setdefault((id(dep), endpoint), (dep, endpoint, [], [], []))
                group[2].extend(rows)
                group[3].extend(ids)
                group[4].extend(accounts)
            for dep, endpoint, rows, ids, accounts in groups.values():
                try:
                    self._shadow(dep, rows, ids, accounts, endpoint)
                except Exception as exc:  # the shadow must never take the service down
                    print(f"churn_service: shadow scoring failed: {exc!r}")
            if stop:
                return

    def _predict(self, tenant: str, account_ids: list[str], ctx: bentoml.Context, endpoint: str):
        deployment = self._authorize(ctx, tenant)
        rows = self._rows(deployment, account_ids)
        scores, latency = self._score(deployment, deployment.champion, rows, "champion")
        ids = [uuid.uuid4().hex for _ in account_ids]
        self._log(deployment, deployment.champion, "champion", ids, account_ids, scores, latency, endpoint)
        if deployment.challenger is not None:
            # Off the hot path: the response carries the champion's score alone.
            self.shadow_queue.put((deployment, rows, ids, account_ids, endpoint))
        return deployment, ids, scores

    @bentoml.api(route="/v1/predict")
    def predict(self, tenant: TenantName, account_id: AccountId, ctx: bentoml.Context) -> Prediction:
        """Churn probability of one account, from the tenant's online features and champion model."""
        deployment, ids, scores = self._predict(tenant, [account_id], ctx, "predict")
        return Prediction(prediction_id=ids[0], tenant=tenant, account_id=account_id, score=float(scores[0]),
                          model_version=deployment.champion.version)

    @bentoml.api(route="/v1/predict_batch")
    def predict_batch(
        self,
        tenant: TenantName,
        account_ids: Annotated[list[AccountId], Field(min_length=1, max_length=MAX_BATCH)],
        ctx: bentoml.Context,
    ) -> BatchPrediction:
        """Churn probabilities of up to 10,000 accounts in one request."""
        deployment, ids, scores = self._predict(tenant, account_ids, ctx, "predict_batch")
        version = deployment.champion.version
        return BatchPrediction(
            tenant=tenant, model_version=version,
            predictions=[
                Prediction(prediction_id=pid, tenant=tenant, account_id=a, score=float(s), model_version=version)
                for pid, a, s in zip(ids, account_ids, scores, strict=True)
            ],
        )


# --- fast path for single predictions ------------------------------------------------------------
class PredictInput(BaseModel):
    tenant: TenantName
    account_id: AccountId


class _RequestContext:
    """What ``_authorize`` reads from ``bentoml.Context``."""

    __slots__ = ("request",)

    def __init__(self, request: Request):
        self.request = request


_SERVICE: list = []


async def _fast_predict(request: Request) -> Response:
    service = _SERVICE[0]
    try:
        payload = PredictInput.model_validate_json(await request.body())
        deployment, ids, scores = service._predict(
            payload.tenant, [payload.account_id], _RequestContext(request), "predict")
    except ValidationError as exc:
        return JSONResponse({"error": f"{exc.error_count()} validation error for {exc.title}",
                             "detail": exc.errors(include_context=False, include_input=False)}, status_code=400)
    except ServiceError as exc:
        status = exc.error_code.value
        body = {"error": "Authorization error"} if status in (401, 403) else [{"error": str(exc)}]
        return JSONResponse(body, status_code=status)
    body = Prediction(prediction_id=ids[0], tenant=payload.tenant, account_id=payload.account_id,
                      score=float(scores[0]), model_version=deployment.champion.version).model_dump_json()
    return Response(body, media_type="application/json")


class FastPredictMiddleware:
    """Answers POST /v1/predict with the contract of ``ChurnService.predict`` (same input, output
    and error bodies), skipping BentoML's per-request IO-descriptor machinery. ``predict`` stays
    the documented API (OpenAPI, clients); the middleware sits inside BentoML's metrics middleware,
    so /metrics still counts these requests."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/predict" or scope["method"] != "POST" or not _SERVICE:
            return await self.app(scope, receive, send)
        response = await _fast_predict(Request(scope, receive))
        await response(scope, receive, send)


ChurnService.add_asgi_middleware(FastPredictMiddleware)
