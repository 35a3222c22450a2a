"""What the service knows of a declared use case (other than churn, which ``bentos.service`` serves as
it always has): its request models, its encoding and its responses, all built from the JSON that
publication wrote to ``manifest["use_cases"][<use case>]["declaration"]``
(``mlops.core.serving.serving_declaration``). The service never reads use-case folders or YAML.

A request carries ``tenant``, the entity key (when the use case looks features up in the online
snapshot) and the declared request fields; the features are the snapshot row of the entity merged
with the request fields, encoded by the same ``ModelInputs`` that training used.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model

from mlops.core.model_inputs import ModelInputs

MAX_BATCH = 10_000

TenantName = Annotated[str, Field(min_length=2, max_length=40, pattern=r"^[a-z][a-z0-9_-]+$")]
EntityKey = Annotated[str, Field(min_length=1, max_length=64)]


class _Request(BaseModel):
    # Unknown fields are refused (400 naming them): a misspelt request field must not score as missing.
    model_config = ConfigDict(extra="forbid")


def _field_type(spec: dict):
    """The pydantic type of a declared request field (strict: "12" is not a number, 1 is not true)."""
    bounds = {k: v for k, v in (("ge", spec.get("min")), ("le", spec.get("max"))) if v is not None}
    sql_type = spec["type"]
    if spec.get("isin") is not None:
        typ = Literal[tuple(spec["isin"])]
    elif sql_type == "DOUBLE":
        typ = Annotated[float, Field(strict=True, allow_inf_nan=False, **bounds)]
    elif sql_type in ("BIGINT", "INTEGER"):
        typ = Annotated[int, Field(strict=True, **bounds)]
    elif sql_type == "BOOLEAN":
        typ = Annotated[bool, Field(strict=True)]
    else:  # publication refuses these (mlops.core.serving.REQUEST_FIELD_TYPES)
        raise ValueError(f"request field {spec['name']!r}: type {sql_type} cannot be a model input")
    if spec.get("nullable"):
        return (typ | None, None)  # may be left out: a missing value, as LightGBM treats it in training
    return (typ, ...)


class UseCaseDeclaration:
    """One use case as the service serves it; immutable once built (a manifest change builds a new one)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.name: str = spec["name"]
        self.key: str = spec["entity"]["key"]
        self.lookup: bool = bool(spec["lookup"])
        # The snapshot's key: the entity's, or (a payment scored with its account's features) another
        # field the request carries beside the entity key.
        self.lookup_key: str = spec.get("lookup_key") or self.key
        self.problem_type: str = spec["problem_type"]
        self.classes: list[str] | None = spec.get("classes")
        self.inputs = ModelInputs(tuple(spec["inputs"]["numeric"]), dict(spec["inputs"]["categorical"]))
        self.request_fields: list[dict] = list(spec["request_fields"])
        columns = self.inputs.columns
        # (column index in the model matrix, field name, level codes or None for a number)
        self._fields = [(columns.index(f["name"]), f["name"], self.inputs._codes.get(f["name"]))
                        for f in self.request_fields]
        key_field = (EntityKey, ...) if self.lookup else (EntityKey | None, None)
        fields = {f["name"]: _field_type(f) for f in self.request_fields}
        if self.key in fields or self.lookup_key in fields:
            raise ValueError(f"use case {self.name!r}: a request field is also the entity or lookup key")
        keys = {self.key: key_field}
        if self.lookup_key != self.key:
            keys = {self.key: (EntityKey, ...), self.lookup_key: key_field}
        self.instance_model = create_model(f"{self.name}_instance", __base__=_Request, **keys, **fields)
        self.predict_model = create_model(f"{self.name}_predict", __base__=_Request,
                                          tenant=(TenantName, ...), **keys, **fields)
        self.batch_model = create_model(
            f"{self.name}_predict_batch", __base__=_Request, tenant=(TenantName, ...),
            instances=(Annotated[list[self.instance_model], Field(min_length=1, max_length=MAX_BATCH)], ...))

    # --- the online snapshot ---
    def read_snapshot(self, path) -> tuple[dict[str, int], np.ndarray]:
        """(lookup key -> row, the encoded rows), request-field columns left missing (filled per request)."""
        import pandas as pd  # in the workers only

        frame = pd.read_parquet(path)
        for _, name, codes in self._fields:
            frame[name] = None if codes is not None else np.nan
        index = {str(key): i for i, key in enumerate(frame[self.lookup_key].tolist())}
        return index, self.inputs.to_model_matrix(frame)

    def verify_sample(self, features: np.ndarray, rows: int) -> np.ndarray:
        """Rows to check a compiled model on: snapshot rows with the request fields drawn at random (a
        fixed seed), so that the branches on request fields are checked too, not only their missing side."""
        sample = features[:rows].copy()
        if not self._fields:
            return sample
        if not len(sample):
            sample = np.full((rows, len(self.inputs.columns)), np.nan)
        rng = np.random.default_rng(0)
        n = len(sample)
        for (column, _, codes), spec in zip(self._fields, self.request_fields, strict=True):
            if codes is not None:
                values = rng.integers(0, len(codes), n).astype(np.float64)
            elif spec["type"] == "BOOLEAN":
                values = rng.integers(0, 2, n).astype(np.float64)
            else:
                values = rng.normal(0.0, 1.0, n) * 10.0 ** rng.uniform(-1, 4, n)
                values = np.clip(values, spec.get("min") if spec.get("min") is not None else -np.inf,
                                 spec.get("max") if spec.get("max") is not None else np.inf)
                if spec["type"] != "DOUBLE":
                    values = np.round(values)
            values[rng.random(n) < 0.05] = np.nan
            sample[:, column] = values
        return sample

    # --- a request ---
    def encode(self, features: np.ndarray, rows: np.ndarray | None, records: list[BaseModel]) -> np.ndarray:
        """The model matrix of validated request records: their snapshot rows (``rows``; None when the use
        case looks nothing up) with the request fields filled in."""
        if rows is not None:
            matrix = features.take(rows, axis=0)
        else:
            matrix = np.full((len(records), len(self.inputs.columns)), np.nan)
        for column, name, codes in self._fields:
            if codes is not None:
                matrix[:, column] = [codes.get(getattr(r, name), np.nan) for r in records]
            else:
                matrix[:, column] = [np.nan if (v := getattr(r, name)) is None else float(v) for r in records]
        return matrix

    def logged_scores(self, scores: np.ndarray) -> np.ndarray:
        """One number per prediction for the prediction log: the score, or (multiclass) the probability
        of the predicted class."""
        return scores if scores.ndim == 1 else scores.max(axis=1)

    def predictions(self, tenant: str, version: str, ids: list[str], keys: list[str | None],
                    scores: np.ndarray) -> list[dict[str, Any]]:
        """The response items: regression, the predicted value; binary, the probability of the positive
        class; multiclass, the probabilities by class and the predicted class."""
        key = self.key
        if scores.ndim == 1:
            return [{"prediction_id": pid, "tenant": tenant, key: k, "score": s, "model_version": version}
                    for pid, k, s in zip(ids, keys, scores.tolist(), strict=True)]
        classes = self.classes or [str(i) for i in range(scores.shape[1])]
        best = scores.argmax(axis=1).tolist()
        return [{"prediction_id": pid, "tenant": tenant, key: k, "score": dict(zip(classes, row, strict=True)),
                 "predicted_class": classes[b], "model_version": version}
                for pid, k, row, b in zip(ids, keys, scores.tolist(), best, strict=True)]
