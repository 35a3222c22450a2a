"""Training, evaluation, validation gates and the MLflow model of any declared use case
(``mlops.core.usecase``): binary, multiclass and regression, from the declaration alone.

Encoding goes through ``ModelInputs.of(uc)`` everywhere (training, scoring, latency, the pyfunc), so
no two paths can disagree. Plain Python: the asset factory, the CLI and the notebooks call these.
"""

from __future__ import annotations

from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from mlflow.models.model import ModelInfo
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_curve,
    r2_score,
    roc_auc_score,
)

from mlops.core.candidates import GateOutcome
from mlops.core.model_inputs import ModelInputs
from mlops.core.modeling import (
    TimeSplit,
    expected_calibration_error,
    fairness_gap,
    fairness_table,
    single_row_latency_ms,
)
from mlops.core.modeling import time_split as modeling_time_split
from mlops.core.pyfunc_model import log_feature_rows_model
from mlops.core.usecase import UseCase, UseCaseError

# The primary metric of each problem type: higher is better for all three.
PRIMARY_METRIC = {"binary": "roc_auc", "multiclass": "macro_f1", "regression": "r2"}

# Gate thresholds, one dict per problem type; a declaration's ``gates:`` overrides any of them.
_COMMON_GATES: dict[str, Any] = {
    # A candidate may score at most this much below the champion on the same holdout (primary metric).
    "champion_tolerance": 0.02,
    # Largest gap of the primary metric between groups of ``fairness_attribute`` (None: no fairness gate).
    "max_fairness_gap": 0.15,
    "fairness_attribute": None,
    "fairness_min_group_size": 100,
    # ... and, for a binary label, at least this many rows of each class (as churn's gate).
    "fairness_min_class_rows": 20,
    "max_single_row_p99_ms": 10.0,
    "max_model_bytes": 20_000_000,
    # The training set's newest label may be at most this many days older than the clock (None: not
    # checked). A blocking check of the training set, not of the model.
    "max_label_staleness_days": None,
}
# Optional binary gates for rare positives (off unless declared): a floor on PR AUC (average
# precision), and a floor on the recall reached at a fixed precision (``recall_precision``).
_RARE_POSITIVE_GATES: dict[str, Any] = {"min_pr_auc": None, "min_recall_at_precision": None,
                                        "recall_precision": None}
GATE_DEFAULTS: dict[str, dict[str, Any]] = {
    "binary": {"min_roc_auc": 0.7, "max_expected_calibration_error": 0.05, **_RARE_POSITIVE_GATES,
               **_COMMON_GATES},
    "regression": {"min_r2": 0.0, **_COMMON_GATES},
    "multiclass": {"min_macro_f1": 0.3, **_COMMON_GATES},
}


# --- split, train, predict -------------------------------------------------------------------------
def time_split(uc: UseCase, training: pd.DataFrame) -> TimeSplit:
    """Train on the earlier prediction dates, hold out the latest ``model.holdout_fraction`` of them."""
    return modeling_time_split(training, uc.model.holdout_fraction, label=uc.label.column,
                               classification=uc.problem_type != "regression", who=f"use case {uc.name!r}",
                               embargo_days=uc.model.embargo_days)


def label_array(uc: UseCase, labels: pd.Series | np.ndarray) -> np.ndarray:
    """The label as the model learns it: 0/1 (binary), class index in ``label.classes`` (multiclass),
    a float (regression)."""
    labels = pd.Series(labels)
    if labels.isna().any():
        raise ValueError(f"use case {uc.name!r}: {int(labels.isna().sum())} labels of {uc.label.column!r} are missing")
    if uc.problem_type == "multiclass":
        index = {str(c): i for i, c in enumerate(uc.label.classes)}
        unknown = sorted(set(labels.astype(str)) - set(index))
        if unknown:
            raise ValueError(f"use case {uc.name!r}: labels {unknown[:10]} are not among label.classes "
                             f"{list(uc.label.classes)}")
        return labels.astype(str).map(index).to_numpy(dtype=np.int64)
    if uc.problem_type == "binary":
        values = labels.astype("float64").to_numpy()
        if not np.isin(values, (0.0, 1.0)).all():
            raise ValueError(f"use case {uc.name!r}: a binary label {uc.label.column!r} is 0/1 or a boolean; "
                             f"found {sorted(set(values[~np.isin(values, (0.0, 1.0))]))[:5]}")
        return values.astype(np.int64)
    return labels.astype("float64").to_numpy()


def lgb_params(uc: UseCase) -> dict:
    params = {**uc.model.params, "objective": uc.model.objective}
    if uc.problem_type == "multiclass":
        params["num_class"] = len(uc.label.classes)
    return params


def train(uc: UseCase, frame: pd.DataFrame, weight: np.ndarray | None = None) -> lgb.Booster:
    """A LightGBM booster (native API) on ``frame``'s declared features and label (rows weighted by
    ``weight`` when given: a retrain in a decay episode, ``fit_for_episode``)."""
    inputs = ModelInputs.of(uc)
    dataset = lgb.Dataset(inputs.to_model_frame(frame), label=label_array(uc, frame[uc.label.column]),
                          weight=None if weight is None else np.asarray(weight, dtype=float), free_raw_data=False)
    return lgb.train(lgb_params(uc), dataset, num_boost_round=uc.model.num_boost_round)


def predict(uc: UseCase, booster: lgb.Booster, frame: pd.DataFrame, num_threads: int = 0) -> np.ndarray:
    """Probabilities (binary), class-probability rows in ``label.classes`` order (multiclass) or values."""
    return booster.predict(ModelInputs.of(uc).to_model_matrix(frame), num_threads=num_threads)


def episode_metric(uc: UseCase):
    """The metric a retrain in a decay episode compares its candidates on: the one the decay rule
    watches (fraud: average precision), as ``f(y, scores)``."""
    if uc.problem_type != "binary":
        raise UseCaseError(f"use case {uc.name!r}: an episode retrain with early labels is for a binary label")
    if uc.monitoring.get("decay_metric") == "average_precision":
        return lambda y, p: float(average_precision_score(y, p)) if np.sum(y) else float("nan")
    return _metric_fn(uc)


def fit_for_episode(uc: UseCase, training: pd.DataFrame, early: pd.DataFrame | None, change_point, who: str):
    """A binary use case's retrain in a decay episode (``mlops.core.retraining.retrain_for_episode``)
    with its own trainer, scores and decay metric, as churn's ``fit_churn_for_episode``: matured labels
    plus the early ones (``usecase_store.build_provisional_set``), weighted by the episode's change
    point. A candidate the calibration or PR AUC gate would refuse is chosen only if every one would."""
    from mlops.core.retraining import retrain_for_episode

    limits = gate_thresholds(uc)

    def acceptable(y, scores) -> str | None:
        ece, max_ece = expected_calibration_error(y, scores), limits["max_expected_calibration_error"]
        if max_ece is not None and ece > float(max_ece):
            return f"ECE {ece:.3f} > {max_ece}"
        floor = limits["min_pr_auc"]
        if floor is not None and np.sum(y) and (pr_auc := average_precision_score(y, scores)) < float(floor):
            return f"PR AUC {pr_auc:.3f} < {floor}"
        return None

    return retrain_for_episode(
        training, early, change_point, horizon_days=uc.label.horizon_days,
        fit=lambda rows, weight: train(uc, rows, weight=weight), score=lambda booster, rows: predict(uc, booster, rows),
        metric=episode_metric(uc), label=uc.label.column, holdout_fraction=uc.model.holdout_fraction,
        who=who, acceptable=acceptable, embargo_days=uc.model.embargo_days)


# --- metrics ---------------------------------------------------------------------------------------
def recall_at_precision(y_true, scores, precision: float) -> float:
    """The largest recall of any score threshold whose precision is at least ``precision`` (0 if none)."""
    y = np.asarray(y_true)
    if y.sum() == 0:
        return float("nan")
    prec, rec, _ = precision_recall_curve(y, np.asarray(scores))
    reached = rec[prec >= precision]
    return float(reached.max()) if len(reached) else 0.0


def _metric_fn(uc: UseCase):
    """The primary metric as ``f(y_true_encoded, y_pred)``; for multiclass y_pred is the class index."""
    if uc.problem_type == "binary":
        return lambda y, p: float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    if uc.problem_type == "regression":
        return lambda y, p: float(r2_score(y, p)) if len(y) >= 2 else float("nan")
    labels = list(range(len(uc.label.classes)))
    return lambda y, p: float(f1_score(y, p, labels=labels, average="macro", zero_division=0))


def _metric_input(uc: UseCase, scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores).argmax(axis=1) if uc.problem_type == "multiclass" else np.asarray(scores)


def evaluate(uc: UseCase, y_true, y_pred: np.ndarray) -> dict[str, float]:
    """Holdout metrics of the problem type; ``y_true`` as stored (class names for multiclass)."""
    y = label_array(uc, y_true)
    p = np.asarray(y_pred)
    if uc.problem_type == "binary":
        metrics = {
            "roc_auc": float(roc_auc_score(y, p)),
            "pr_auc": float(average_precision_score(y, p)),
            "brier": float(brier_score_loss(y, p)),
            "ece": expected_calibration_error(y, p),
            "base_rate": float(np.mean(y)),
        }
        precision = gate_thresholds(uc)["recall_precision"]
        if precision is not None:
            metrics["recall_at_precision"] = recall_at_precision(y, p, float(precision))
        return metrics
    if uc.problem_type == "regression":
        return {
            "rmse": float(np.sqrt(mean_squared_error(y, p))),
            "mae": float(mean_absolute_error(y, p)),
            "r2": float(r2_score(y, p)),
            "mean_target": float(np.mean(y)),
        }
    labels = list(range(len(uc.label.classes)))
    try:
        auc = float(roc_auc_score(y, p, multi_class="ovr", labels=labels))
    except ValueError:  # a class absent from the holdout
        auc = float("nan")
    return {
        "accuracy": float(accuracy_score(y, p.argmax(axis=1))),
        "macro_f1": _metric_fn(uc)(y, p.argmax(axis=1)),
        "log_loss": float(log_loss(y, p, labels=labels)),
        "roc_auc_ovr": auc,
    }


# --- gates -----------------------------------------------------------------------------------------
def gate_thresholds(uc: UseCase) -> dict[str, Any]:
    """The problem type's defaults overridden by the declaration's ``gates:``; unknown keys are refused."""
    defaults = GATE_DEFAULTS[uc.problem_type]
    unknown = sorted(set(uc.gates) - set(defaults))
    if unknown:
        raise UseCaseError(f"use case {uc.name!r}: gates {unknown} are not thresholds of a {uc.problem_type} "
                           f"use case; known: {sorted(defaults)}")
    limits = {**defaults, **uc.gates}
    if uc.problem_type == "binary":
        precision = limits["recall_precision"]
        if precision is not None and not 0 < float(precision) <= 1:
            raise UseCaseError(f"use case {uc.name!r}: gates.recall_precision must be in (0, 1], got {precision}")
        if limits["min_recall_at_precision"] is not None and precision is None:
            raise UseCaseError(f"use case {uc.name!r}: gates.min_recall_at_precision needs gates.recall_precision "
                               "(the precision at which recall is measured)")
    return limits


def gate_names(uc: UseCase) -> tuple[str, ...]:
    """Every gate a version must pass, in evaluation order."""
    primary = (f"{PRIMARY_METRIC[uc.problem_type]}_gate",)
    rare, calibration = (), ()
    if uc.problem_type == "binary":
        limits = gate_thresholds(uc)
        rare = (*(("pr_auc_gate",) if limits["min_pr_auc"] is not None else ()),
                *(("recall_at_precision_gate",) if limits["min_recall_at_precision"] is not None else ()))
        calibration = ("calibration_gate",)
    return (*primary, *rare, *calibration, "fairness_gate", "latency_gate", "model_size_gate")


def _floor_gate(gate: str, what: str, value: float, floor: float) -> GateOutcome:
    passed = value >= floor  # NaN fails too
    return GateOutcome(gate, passed, value, floor,
                       f"{what} {value:.4f} {'>=' if passed else 'is below'} the floor {floor:.4f}")


def _primary_gate(uc: UseCase, y: np.ndarray, scores: np.ndarray, champion_scores, limits: dict) -> GateOutcome:
    metric = PRIMARY_METRIC[uc.problem_type]
    gate, floor = f"{metric}_gate", float(limits[f"min_{metric}"])
    value = _metric_fn(uc)(y, _metric_input(uc, scores))
    if not value >= floor:  # NaN fails too
        return GateOutcome(gate, False, value, floor, f"{metric} {value:.4f} is below the floor {floor:.4f}")
    if champion_scores is None:
        return GateOutcome(gate, True, value, floor,
                           f"{metric} {value:.4f} >= floor {floor:.4f}; no champion to compare with")
    tolerance = float(limits["champion_tolerance"])
    champion = _metric_fn(uc)(y, _metric_input(uc, champion_scores))
    bar = champion - tolerance
    passed = value >= bar
    return GateOutcome(gate, passed, value, bar,
                       f"{metric} {value:.4f} vs the champion's {champion:.4f} on the same holdout (tolerance "
                       f"{tolerance}, so at least {bar:.4f}): {'ok' if passed else 'worse than the champion'}")


def _fairness_gate(uc: UseCase, holdout: pd.DataFrame, y, scores, limits: dict) -> GateOutcome:
    attribute, limit = limits["fairness_attribute"], float(limits["max_fairness_gap"])
    if not attribute:
        return GateOutcome("fairness_gate", True, 0.0, limit,
                           "fairness: not declared (no gates.fairness_attribute), so there is no gap to measure")
    if attribute not in holdout.columns:
        return GateOutcome("fairness_gate", False, float("nan"), limit,
                           f"fairness: the holdout has no column {attribute!r} (gates.fairness_attribute)")
    metric = PRIMARY_METRIC[uc.problem_type]
    table = fairness_table(y, _metric_input(uc, scores), holdout[attribute], metric=metric, metric_fn=_metric_fn(uc),
                           min_group_size=int(limits["fairness_min_group_size"]),
                           min_class_rows=int(limits["fairness_min_class_rows"]) if uc.problem_type == "binary" else None)
    evaluated = table.loc[table["evaluated"], metric]
    gap = fairness_gap(table, metric)
    passed = gap <= limit
    return GateOutcome("fairness_gate", passed, gap, limit,
                       f"{metric} gap across {attribute} is {gap:.4f} over {len(evaluated)} groups of at least "
                       f"{limits['fairness_min_group_size']} rows ({'within' if passed else 'over'} the limit {limit})")


def evaluate_gates(uc: UseCase, holdout: pd.DataFrame, scores: np.ndarray, booster: lgb.Booster, model_bytes: int,
                   champion_scores: np.ndarray | None = None) -> list[GateOutcome]:
    """Every gate of ``gate_names(uc)`` on the holdout, each with a reason naming value and threshold.

    ``scores``: the candidate's predictions of ``holdout`` (``predict``); ``champion_scores``: the
    champion's on the same rows, when there is a champion.
    """
    limits = gate_thresholds(uc)
    y = label_array(uc, holdout[uc.label.column])
    scores = np.asarray(scores)
    outcomes = [_primary_gate(uc, y, scores, champion_scores, limits)]
    if uc.problem_type == "binary" and limits["min_pr_auc"] is not None:
        value = float(average_precision_score(y, scores)) if y.sum() else float("nan")
        outcomes.append(_floor_gate("pr_auc_gate", "PR AUC (average precision)", value, float(limits["min_pr_auc"])))
    if uc.problem_type == "binary" and limits["min_recall_at_precision"] is not None:
        precision = float(limits["recall_precision"])
        outcomes.append(_floor_gate("recall_at_precision_gate", f"recall at precision {precision:g}",
                                    recall_at_precision(y, scores, precision),
                                    float(limits["min_recall_at_precision"])))
    if uc.problem_type == "binary":
        ece, limit = expected_calibration_error(y, scores), float(limits["max_expected_calibration_error"])
        passed = ece <= limit
        outcomes.append(GateOutcome("calibration_gate", passed, ece, limit,
                                    f"expected calibration error {ece:.4f} {'<=' if passed else '>'} {limit}"))
    outcomes.append(_fairness_gate(uc, holdout, y, scores, limits))
    latency = single_row_latency_ms(booster, holdout, inputs=ModelInputs.of(uc))
    budget = float(limits["max_single_row_p99_ms"])
    outcomes.append(GateOutcome("latency_gate", latency["p99_ms"] <= budget, latency["p99_ms"], budget,
                                f"single-row p99 {latency['p99_ms']:.2f} ms (p50 {latency['p50_ms']:.2f} ms; the best of "
                                f"{latency['rounds']} rounds), budget {budget} ms"))
    size_limit = int(limits["max_model_bytes"])
    outcomes.append(GateOutcome("model_size_gate", int(model_bytes) <= size_limit, int(model_bytes), size_limit,
                                f"model file is {int(model_bytes):,} bytes, limit {size_limit:,}"))
    return outcomes


def model_bytes(booster: lgb.Booster) -> int:
    """The size of the booster's model text, as the registry stores it."""
    return len(booster.model_to_string().encode())


# --- the registered model ---------------------------------------------------------------------------
def log_model(uc: UseCase, booster: lgb.Booster, rows: pd.DataFrame, *, registered_model_name: str,
              pip_requirements: list[str]) -> ModelInfo:
    """Log ``booster`` in the active MLflow run as a standalone pyfunc and register it: plain
    ``mlflow.pyfunc.load_model(...).predict(rows)`` scores stored feature rows as ``predict`` does."""
    return log_feature_rows_model(booster, rows, inputs=ModelInputs.of(uc), problem_type=uc.problem_type,
                                  classes=uc.label.classes, registered_model_name=registered_model_name,
                                  pip_requirements=pip_requirements)
