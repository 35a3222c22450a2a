"""The churn service on a GPU: the same API, bundle and behaviour as ``ChurnService``, with large
batches scored by the booster compiled into a tensor program (``bentos.gpu_scoring.BatchScorer``).

Start it with ``bentoml serve bentos.service_gpu:ChurnServiceGPU``; build it with
``bentoml build -f bentos/bentofile.gpu.yaml .``. Without a GPU (or without torch) every batch is
scored by LightGBM, exactly as in ``ChurnService``.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref

import bentoml
import numpy as np

from bentos.gpu_scoring import BatchScorer
from bentos.service import ChurnService, FastPredictMiddleware, Model

# Below this many rows one LightGBM thread beats a round trip to the device.
GPU_MIN_ROWS = int(os.environ.get("CHURN_GPU_MIN_ROWS", "2048"))
# "auto" (the GPU when CUDA is available, else LightGBM), "cuda", "cpu" or "lightgbm".
SCORER_DEVICE = os.environ.get("CHURN_SCORER_DEVICE", "auto")

_config = copy.deepcopy(dict(ChurnService.config))
_config["resources"] = {**_config.get("resources", {}), "gpu": 1}
_config.pop("name", None)


class ScorerCache:
    """One compiled ``BatchScorer`` per loaded booster; an entry goes away with its booster."""

    def __init__(self, device: str = SCORER_DEVICE) -> None:
        self.device = device
        self._scorers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __contains__(self, model: Model) -> bool:
        return model.booster in self._scorers

    def get(self, model: Model) -> BatchScorer:
        with self._lock:
            scorer = self._scorers.get(model.booster)
            if scorer is None:
                scorer = BatchScorer(model.booster, device=self.device)
                if scorer.fallback_reason:
                    print(f"churn_service_gpu: model {model.version} is scored by LightGBM: {scorer.fallback_reason}")
                self._scorers[model.booster] = scorer
            return scorer


@bentoml.service(name="churn_service_gpu", **_config)
class ChurnServiceGPU(ChurnService.inner):
    """Churn scores for every tenant; batches of ``GPU_MIN_ROWS`` or more are scored on the GPU."""

    def __init__(self) -> None:
        self.scorers = ScorerCache()  # before super().__init__(), whose refresh() compiles
        super().__init__()

    def _load_model(self, folder, spec, sample):
        # The tensor compiler reads a lightgbm.Booster (the CPU service scores with compiled trees).
        import lightgbm as lgb

        return lgb.Booster(model_file=str(folder / spec["model_file"]))

    def refresh(self) -> None:
        super().refresh()
        # Compile new models here (start-up and the manifest watcher), not on the request path.
        for deployment in self._all_deployments():  # churn's tenants and every use case's
            for model in (deployment.champion, deployment.challenger):
                if model is not None:
                    self.scorers.get(model)

    def _scores(self, model: Model, matrix: np.ndarray) -> np.ndarray:
        if len(matrix) < GPU_MIN_ROWS:
            return super()._scores(model, matrix)
        return self.scorers.get(model).predict(matrix)


# The same fast path, limits and API contract (/docs.json) as ChurnService.
ChurnServiceGPU.add_asgi_middleware(FastPredictMiddleware)
