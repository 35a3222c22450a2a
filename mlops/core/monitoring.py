"""Model monitoring with NannyML: drift, label-free performance (CBPE), realized performance and
data quality, fitted once per model version on its reference period and run on prediction-log chunks.

The reference of a model version is its training holdout (features, score, label), stored with
the version in ``model_holdout_scores``. The analysis data is the champion's prediction log joined
to the online feature snapshot each prediction was scored from; a prediction's label is known once
its LABEL_HORIZON_DAYS window has closed. Everything here is plain Python on data frames: the
Dagster assets assemble the frames, call ``TenantMonitor`` and store what it returns. The policy
(``resources.monitoring.MonitoringPolicy``, a configurable resource) is passed in.

Decay alerts use NannyML's own alert flags, with a constant lower threshold on ROC AUC (the
reference ROC AUC minus ``max_auc_drop``) so that a tenant with few reference chunks does not get
a threshold from a noisy standard deviation. A binary use case may decay on average precision
instead (``monitoring: {decay_metric: average_precision}``: rare positives, as in fraud), with a
relative floor (the reference's times 1 - ``max_ap_drop``: its scale follows the prevalence).
Univariate and multivariate drift use NannyML's default thresholds and are reported, not acted on:
drift without decay does not retrain.

Every declared use case is monitored the same way, by its problem type (``MonitorSpec``, built
from a ``UseCase`` by ``MonitorSpec.of``; churn's is ``CHURN_SPEC``, the binary case): drift and
data quality on every feature alike; label-free performance by CBPE (binary: ROC AUC, and average
precision where it decays on it; multiclass: macro ROC AUC and F1) or DLE (regression: RMSE and
MAE); realized performance once labels mature; and a decay rule per problem type
(``DECAY_DEFAULTS``, overridden by the policy, then by the use case's ``monitoring`` block, which
may also choose the decay metric: ``decay_metric``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from mlops.core.candidates import holdout_scores, table_prefix
from mlops.core.environment import HomeLayout, write_atomic
from mlops.core.model_inputs import CATEGORICAL_FEATURES, NUMERIC_FEATURES, ModelInputs
from mlops.core.names import CHAMPION
from mlops.core.online import SNAPSHOT_VERSION_REGEX, snapshot_file_name
from mlops.core.prediction_log import PREDICTION_LOG_TABLE, prediction_log_ddl, prediction_log_table
from mlops.core.usecase import DECAY_METRICS, DECAY_RULES, decay_metric_problem, decay_rule_problem

TIMESTAMP = "timestamp"
SCORE = "score"
PREDICTED = "predicted_label"
TARGET = "churned"
PERFORMANCE_METRICS = ("estimated_roc_auc", "realized_roc_auc")
# The score at or above which a prediction counts as positive: NannyML's y_pred, the shadow
# comparison's agreement and the reports' confusion matrices.
DECISION_THRESHOLD = 0.5

RESULTS_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    model_version VARCHAR NOT NULL, metric VARCHAR NOT NULL, feature VARCHAR, method VARCHAR,
    chunk_key VARCHAR NOT NULL, chunk_start TIMESTAMP NOT NULL, chunk_end TIMESTAMP NOT NULL,
    period VARCHAR NOT NULL, chunk_rows BIGINT, value DOUBLE, lower_threshold DOUBLE,
    upper_threshold DOUBLE, alert BOOLEAN NOT NULL, dagster_run_id VARCHAR NOT NULL
)
"""
ALERTS_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    model_version VARCHAR NOT NULL, metric VARCHAR NOT NULL, feature VARCHAR, chunk_key VARCHAR NOT NULL,
    value DOUBLE, lower_threshold DOUBLE, upper_threshold DOUBLE, decay BOOLEAN NOT NULL,
    dagster_run_id VARCHAR NOT NULL, raised_at TIMESTAMP NOT NULL
)
"""


def results_table(use_case: str = "churn") -> str:
    """Where a use case's monitoring results go: churn's ``monitoring_results``, ``<name>_monitoring_results``."""
    return table_prefix(use_case) + "monitoring_results"


def alerts_table(use_case: str = "churn") -> str:
    return table_prefix(use_case) + "monitoring_alerts"


class MonitoringPolicy(Protocol):
    """What monitoring reads of its policy (``resources.monitoring.MonitoringPolicy`` provides it)."""

    chunk_period: str
    chunk_size: int
    max_auc_drop: float
    consecutive_chunks: int
    continuous_drift_methods: list[str]
    categorical_drift_methods: list[str]
    jensen_shannon_threshold: float
    multivariate_drift_margin: float

    def chunking(self) -> dict: ...

    def fingerprint(self) -> str: ...


# The decay rule's thresholds, one dict of defaults: the policy's values override them, and a use
# case's ``monitoring`` block overrides those. Binary and multiclass: (macro) ROC AUC under the
# reference's minus ``max_auc_drop``; binary decaying on average precision: AP under the
# reference's times (1 - ``max_ap_drop``); regression: RMSE over the reference's times
# (1 + ``max_rmse_increase``); any in ``consecutive_chunks`` chunks in a row.
DECAY_DEFAULTS: dict[str, float] = {"max_auc_drop": 0.10, "max_ap_drop": 0.3, "max_rmse_increase": 0.25,
                                    "consecutive_chunks": 3}
# Bumped when the fitted monitor's pickled form changes: monitors pickled by older code are refitted.
MONITOR_FORMAT = 2


def decay_thresholds(policy, overrides: Mapping | None = None) -> dict:
    """``DECAY_DEFAULTS``, overridden by the policy's values, then by ``overrides`` (a use case's)."""
    resolved = dict(DECAY_DEFAULTS)
    resolved.update({k: getattr(policy, k) for k in DECAY_DEFAULTS if getattr(policy, k, None) is not None})
    unknown = sorted(set(overrides or {}) - set(DECAY_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown decay thresholds {unknown}; known: {sorted(DECAY_DEFAULTS)}")
    resolved.update(overrides or {})
    resolved["consecutive_chunks"] = int(resolved["consecutive_chunks"])
    return resolved


# NannyML's performance metrics per problem type (estimated and realized alike), and the one the
# decay rule watches with the side of its threshold. The others are reported without a threshold.
_PERFORMANCE = {
    "binary": (("roc_auc",), "roc_auc", "lower_threshold"),
    "multiclass": (("roc_auc", "f1"), "roc_auc", "lower_threshold"),
    "regression": (("rmse", "mae"), "rmse", "upper_threshold"),
}
# The metrics of a problem type that decays on another metric than its default (``MonitorSpec.decay_on``).
_DECAY_ON = {("binary", "average_precision"): ("roc_auc", "average_precision")}
_NANNYML_PROBLEM = {"binary": "classification_binary", "multiclass": "classification_multiclass",
                    "regression": "regression"}


@dataclass(frozen=True)
class MonitorSpec:
    """What monitoring needs to know of a use case: its problem type, features, label and classes.

    The model's output is ``score`` (binary: the positive class's probability; regression: the
    prediction) or, for multiclass, one probability column per class (``proba_columns``)."""

    problem_type: str
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    target: str
    classes: tuple[str, ...] = ()
    # The use case's overrides of the decay thresholds (keys of DECAY_DEFAULTS).
    overrides: Mapping[str, float] = field(default_factory=dict)
    name: str = "churn"
    # The metric the decay rule watches (the use case's ``monitoring.decay_metric``; binary:
    # "roc_auc" or "average_precision"); "" is the problem type's default (DECAY_METRICS).
    decay_on: str = ""
    # Binary: realized performance on each prediction's label as known this many days after its day
    # (the use case's ``monitoring.realized_after_days``; a censored label, the same rule for the
    # reference), not on matured labels; 0: matured labels.
    realized_after_days: int = 0
    # The use case's ``monitoring.decay_rule`` (``mlops.core.usecase.DECAY_RULES``): "" is the default,
    # consecutive chunks each under the floor; "pooled" judges them pooled as one sample.
    decay_rule: str = ""

    def __post_init__(self):
        if self.problem_type not in _PERFORMANCE:
            raise ValueError(f"problem type {self.problem_type!r}: one of {sorted(_PERFORMANCE)}")
        if self.problem_type == "multiclass" and len(self.classes) < 3:
            raise ValueError("a multiclass monitor needs its classes (at least three)")
        unknown = sorted(set(self.overrides) - set(DECAY_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown decay thresholds {unknown}; known: {sorted(DECAY_DEFAULTS)}")
        if self.decay_on:
            problem = decay_metric_problem(self.problem_type, self.decay_on)
            if problem:
                raise ValueError(problem)
            if self.decay_on == DECAY_METRICS[self.problem_type][0]:  # the default, named: the same spec
                object.__setattr__(self, "decay_on", "")
        if self.decay_rule:
            problem = decay_rule_problem(self.problem_type, self.decay_rule)
            if problem:
                raise ValueError(problem)
            if self.decay_rule == DECAY_RULES[0]:  # the default, named: the same spec
                object.__setattr__(self, "decay_rule", "")

    @classmethod
    def of(cls, usecase) -> MonitorSpec:
        """The spec of a declared use case (``mlops.core.usecase.UseCase``): its model's inputs
        (``ModelInputs.of``), its label column, problem type and classes, and the decay thresholds
        its ``monitoring`` block overrides, its ``decay_metric`` and ``realized_after_days`` (its
        other keys are the policy's business)."""
        inputs = ModelInputs.of(usecase)
        return cls(problem_type=usecase.problem_type, numeric=inputs.numeric, categorical=tuple(inputs.categorical),
                   target=usecase.label.column, classes=tuple(usecase.label.classes or ()),
                   overrides={k: v for k, v in usecase.monitoring.items() if k in DECAY_DEFAULTS},
                   name=usecase.name, decay_on=usecase.monitoring.get("decay_metric") or "",
                   realized_after_days=int(usecase.monitoring.get("realized_after_days") or 0),
                   decay_rule=usecase.monitoring.get("decay_rule") or "")

    @property
    def features(self) -> tuple[str, ...]:
        return (*self.numeric, *self.categorical)

    @property
    def proba_columns(self) -> dict[str, str]:
        """Multiclass: class -> the column of its probability (NannyML's ``y_pred_proba``)."""
        return {c: f"{SCORE}_{c}" for c in self.classes}

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.proba_columns.values()) if self.problem_type == "multiclass" else (SCORE,)

    @property
    def metrics(self) -> tuple[str, ...]:
        if self.decay_on:
            return _DECAY_ON[(self.problem_type, self.decay_on)]
        return _PERFORMANCE[self.problem_type][0]

    @property
    def decay_metric(self) -> str:
        return self.decay_on or _PERFORMANCE[self.problem_type][1]

    @property
    def decay_metrics(self) -> dict[str, str]:
        """The metrics the decay rule watches -> the threshold column it compares with."""
        side = _PERFORMANCE[self.problem_type][2]
        return {f"{kind}_{self.decay_metric}": side for kind in ("estimated", "realized")}

    def fingerprint(self, policy) -> str:
        fields, thresholds = asdict(self), decay_thresholds(policy, self.overrides)
        if not self.decay_on:  # a spec on its default metric keeps the name it had before decay_on existed
            del fields["decay_on"]
        if not self.realized_after_days:  # likewise a spec on matured labels
            del fields["realized_after_days"]
        if not self.decay_rule:  # and one on the default decay rule
            del fields["decay_rule"]
        if self.decay_metric != "average_precision":
            del thresholds["max_ap_drop"]
        payload = json.dumps({"format": MONITOR_FORMAT, **fields, "overrides": dict(self.overrides),
                              "thresholds": thresholds}, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


CHURN_SPEC = MonitorSpec("binary", NUMERIC_FEATURES, tuple(CATEGORICAL_FEATURES), TARGET)
CHURN_DECAY_METRICS = CHURN_SPEC.decay_metrics  # PERFORMANCE_METRICS, compared with their lower thresholds


@dataclass
class MonitoringReport:
    """Tidy results of one monitoring run: one row per metric (and feature) and chunk."""

    results: pd.DataFrame
    reference_roc_auc: float | None
    decay: list[dict] = field(default_factory=list)
    # The reference's own performance by NannyML metric name (roc_auc; rmse and mae; ...).
    reference_performance: dict[str, float] = field(default_factory=dict)

    @property
    def alerts(self) -> pd.DataFrame:
        return self.results[self.results["alert"] & (self.results["period"] == "analysis")]

    def latest(self, metric: str, feature: str | None = None) -> float | None:
        rows = self.results[(self.results["metric"] == metric) & (self.results["period"] == "analysis")
                            & self.results["value"].notna()]
        if feature is not None:
            rows = rows[rows["feature"] == feature]
        return None if rows.empty else float(rows.sort_values("chunk_start")["value"].iloc[-1])

    def drifting_latest(self) -> list[str]:
        """The features whose univariate drift alerts in the newest chunk (sorted)."""
        alerts = self.alerts
        if alerts.empty:
            return []
        latest = self.results["chunk_start"].max()
        rows = alerts[(alerts["metric"] == "univariate_drift") & (alerts["chunk_start"] == latest)]
        return sorted(rows["feature"].dropna().unique())


def prepare(frame: pd.DataFrame, spec: MonitorSpec = CHURN_SPEC) -> pd.DataFrame:
    """The columns NannyML reads: features, timestamp, the model's output, a predicted class
    (classification: binary 0/1 at DECISION_THRESHOLD, multiclass the likeliest class) and the label."""
    outputs = spec.outputs
    out = frame.loc[:, [*spec.features, TIMESTAMP, *outputs]].copy()
    for col in spec.numeric:
        out[col] = pd.to_numeric(out[col], errors="coerce").astype("float64")
    for col in spec.categorical:
        out[col] = out[col].astype("object")
    out[TIMESTAMP] = pd.to_datetime(out[TIMESTAMP])
    for col in outputs:
        out[col] = out[col].astype("float64")
    target = spec.target
    if spec.problem_type == "multiclass":  # class labels, missing until they mature
        likeliest = np.nan_to_num(out[list(outputs)].to_numpy(), nan=-1.0).argmax(axis=1)
        out[PREDICTED] = np.asarray(spec.classes, dtype=object)[likeliest]
        out[target] = frame[target].astype("object") if target in frame else pd.Series(np.nan, out.index, "object")
    else:
        if spec.problem_type == "binary":
            out[PREDICTED] = (out[SCORE] >= DECISION_THRESHOLD).astype("int64")
        out[target] = frame[target].astype("float64") if target in frame else np.nan
    return out.sort_values(TIMESTAMP, kind="stable").reset_index(drop=True)


def reference_performance(reference: pd.DataFrame, spec: MonitorSpec) -> dict[str, float]:
    """The reference's own performance (``prepare``d): the levels the decay thresholds start from."""
    from sklearn import metrics

    y = reference[spec.target]
    if spec.problem_type == "binary":
        found = {"roc_auc": float(metrics.roc_auc_score(y, reference[SCORE]))}
        if "average_precision" in spec.metrics:
            found["average_precision"] = float(metrics.average_precision_score(y, reference[SCORE]))
        return found
    if spec.problem_type == "multiclass":
        classes = sorted(spec.classes)  # scikit-learn (as NannyML) takes the classes in sorted order
        proba = reference[[spec.proba_columns[c] for c in classes]].to_numpy()
        return {"roc_auc": float(metrics.roc_auc_score(y, proba, multi_class="ovr", average="macro",
                                                       labels=classes)),
                "f1": float(metrics.f1_score(y, reference[PREDICTED], average="macro", labels=list(spec.classes)))}
    return {"rmse": float(metrics.root_mean_squared_error(y, reference[SCORE])),
            "mae": float(metrics.mean_absolute_error(y, reference[SCORE]))}


@contextlib.contextmanager
def seeded_sampling_errors(seed: int = 0):
    """Run NannyML fits with numpy's global RNG seeded, then restore its state.

    NannyML 0.13 estimates the sampling error of average precision (binary and multiclass) by
    resampling the reference with ``np.random.choice``, unseeded: the same reference gave a shadow
    comparison's CBPE interval of -0.0053..+1.1888 in the demo's Dagster run and one excluding 0 on
    the simulated clock, a day's difference in a promotion. Under a fixed seed the figures depend on
    the data alone; the caller's random state is left as it was."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class TenantMonitor:
    """NannyML calculators fitted on one model version's reference data, for one use case
    (``spec``; churn's by default: the binary case with churn's columns)."""

    def __init__(self, policy: MonitoringPolicy, reference: pd.DataFrame, spec: MonitorSpec = CHURN_SPEC):
        import nannyml as nml
        from nannyml.thresholds import ConstantThreshold

        self.spec = spec
        target, features, categorical = spec.target, list(spec.features), list(spec.categorical)
        reference = prepare(reference, spec)
        if reference[target].isna().any():
            raise ValueError("reference data must have a label on every row")
        if spec.problem_type != "regression" and reference[target].nunique() < 2:
            raise ValueError("reference data has a single class; ROC AUC is undefined")
        self.thresholds = decay_thresholds(policy, spec.overrides)
        self.reference_performance = reference_performance(reference, spec)
        self.reference_roc_auc = self.reference_performance.get("roc_auc")
        self.consecutive = self.thresholds["consecutive_chunks"]
        # The decay rule's constant threshold (a tenant with few reference chunks would otherwise
        # get one from a noisy standard deviation); the other metrics are reported without one.
        bounds = {m: ConstantThreshold() for m in spec.metrics}
        if spec.problem_type == "regression":
            self.rmse_ceiling = self.reference_performance["rmse"] * (1 + self.thresholds["max_rmse_increase"])
            bounds["rmse"] = ConstantThreshold(upper=self.rmse_ceiling)
        else:
            self.auc_floor = self.reference_roc_auc - self.thresholds["max_auc_drop"]
            if spec.decay_metric == "average_precision":  # relative: AP's scale follows the prevalence
                self.ap_floor = self.reference_performance["average_precision"] * (1 - self.thresholds["max_ap_drop"])
                bounds["average_precision"] = ConstantThreshold(lower=self.ap_floor)
            else:
                bounds["roc_auc"] = ConstantThreshold(lower=self.auc_floor)
        # NannyML draws the resamples of its average-precision sampling error from numpy's global
        # RNG: fitted under a fixed seed, the same reference gives the same monitor in any process.
        with seeded_sampling_errors():
            chunking = {"timestamp_column_name": TIMESTAMP, **policy.chunking()}
            self.univariate = nml.UnivariateDriftCalculator(
                column_names=features, treat_as_categorical=categorical,
                continuous_methods=list(policy.continuous_drift_methods),
                categorical_methods=list(policy.categorical_drift_methods), **chunking,
                thresholds={"jensen_shannon": ConstantThreshold(upper=policy.jensen_shannon_threshold)},
            ).fit(reference)
            # A model's reference (its holdout) spans a few weekly dates only: a threshold from the
            # spread of so few reference chunks is near zero and alerts on every chunk. The threshold
            # is the reference's own reconstruction error plus a margin instead.
            probe = nml.DataReconstructionDriftCalculator(column_names=features, **chunking).fit(reference)
            reference_error = float(probe.calculate(reference).to_df()[("reconstruction_error", "value")].mean())
            self.multivariate_threshold = reference_error * (1 + policy.multivariate_drift_margin)
            self.multivariate = nml.DataReconstructionDriftCalculator(
                column_names=features, threshold=ConstantThreshold(upper=self.multivariate_threshold),
                **chunking).fit(reference)
            metrics = list(spec.metrics)
            if spec.problem_type == "regression":
                self.estimator_method = "dle"
                self.estimator = nml.DLE(feature_column_names=features, y_pred=SCORE, y_true=target, metrics=metrics,
                                         thresholds=bounds, **chunking).fit(reference)
                self.realized_calculator = nml.PerformanceCalculator(
                    metrics=metrics, y_true=target, y_pred=SCORE, problem_type="regression", thresholds=bounds,
                    **chunking).fit(reference)
            else:
                self.estimator_method = "cbpe"
                proba = SCORE if spec.problem_type == "binary" else spec.proba_columns
                classification = {"y_pred_proba": proba, "y_pred": PREDICTED, "y_true": target,
                                  "problem_type": _NANNYML_PROBLEM[spec.problem_type], "metrics": metrics}
                self.estimator = nml.CBPE(**classification, thresholds=bounds, **chunking).fit(reference)
                self.realized_calculator = nml.PerformanceCalculator(**classification, thresholds=bounds,
                                                                     **chunking).fit(reference)
            self.missing = nml.MissingValuesCalculator(column_names=features, **chunking).fit(reference)
            self.unseen = (nml.UnseenValuesCalculator(column_names=categorical, **chunking).fit(reference)
                           if categorical else None)

    @property
    def own_bound(self) -> float:
        """The decay rule's bound from this version's own reference: the ROC AUC floor (reference minus
        ``max_auc_drop``), the average-precision floor (reference times 1 - ``max_ap_drop``) where the
        spec decays on it or, for regression, the RMSE ceiling. ``apply_bound`` may tighten it."""
        if self.spec.problem_type == "regression":
            return self.rmse_ceiling
        return self.ap_floor if self.spec.decay_metric == "average_precision" else self.auc_floor

    @property
    def higher_is_better(self) -> bool:
        return self.spec.problem_type != "regression"

    def apply_bound(self, results: pd.DataFrame, bound: float) -> pd.DataFrame:
        """``results`` with the realized decay metric judged against ``bound`` instead of the version's
        own (a floor inherited from the champion it replaced: ``mlops.core.loop``). The estimate keeps
        the version's own bound: it is the version's view of itself, calibrated on its own reference."""
        if results.empty or bound == self.own_bound:
            return results
        results = results.copy()
        rows = results["metric"] == self.realized_metric
        side = "lower_threshold" if self.higher_is_better else "upper_threshold"
        results.loc[rows, side] = bound
        values = results.loc[rows, "value"]
        results.loc[rows, "alert"] = (values < bound) if self.higher_is_better else (values > bound)
        return results

    @property
    def estimated_metric(self) -> str:
        """The metric every run computes for every chunk (incremental runs key new chunks by it)."""
        return f"estimated_{self.spec.decay_metric}"

    @property
    def realized_metric(self) -> str:
        return f"realized_{self.spec.decay_metric}"

    def decay_alerts(self, results: pd.DataFrame, analysis: pd.DataFrame | None = None) -> list[dict]:
        """The decay rule's alerts, before ``decay_evidence``: ``consecutive_chunks`` chunks each beyond
        the threshold or, for a spec whose ``decay_rule`` is ``pooled``, the same chunks pooled as one
        sample (``pooled_decay_alerts``; it reads the ``analysis`` rows)."""
        if self.spec.decay_rule == "pooled":
            if analysis is None:
                raise ValueError("the pooled decay rule judges the pooled analysis rows: pass them")
            return pooled_decay_alerts(self, analysis, results)
        return decay_alerts(results, self.consecutive, self.spec.decay_metrics)

    def report(self, results: pd.DataFrame, decay: list[dict] | None = None) -> MonitoringReport:
        return MonitoringReport(results, self.reference_roc_auc,
                                self.decay_alerts(results) if decay is None else decay,
                                dict(self.reference_performance))

    # --- the monitoring run ------------------------------------------------------------------
    def _performance(self, frame: pd.DataFrame, kind: str, method: str) -> list[pd.DataFrame]:
        frame = frame.sort_index(axis=1)  # lexsorted columns: fast, warning-free selection
        return [_tidy_simple(frame, m, f"{kind}_{m}", None, method, presorted=True) for m in self.spec.metrics]

    def realized(self, analysis: pd.DataFrame) -> pd.DataFrame:
        """Realized performance alone (chunks computed before whose labels have matured since)."""
        analysis = prepare(analysis, self.spec)
        parts = self._performance(self.realized_calculator.calculate(analysis).filter(period="analysis").to_df(),
                                  "realized", "realized")
        return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)

    def run(self, analysis: pd.DataFrame) -> MonitoringReport:
        analysis = prepare(analysis, self.spec)
        if analysis.empty:
            raise ValueError("no analysis data: the tenant's champion has no logged predictions yet")
        with warnings.catch_warnings():
            # A chunk of one row (the first day of a new champion, say) has a reconstruction error
            # but no spread: NannyML takes the standard deviation of one value (its sampling error
            # is then NaN, as NannyML intends), and numpy warns twice. Nothing else is silenced.
            warnings.filterwarnings("ignore", "Degrees of freedom <= 0 for slice", RuntimeWarning)
            warnings.filterwarnings("ignore", "invalid value encountered in scalar divide", RuntimeWarning)
            multivariate = self.multivariate.calculate(analysis).filter(period="analysis").to_df()
        parts = [
            _tidy_univariate(self.univariate.calculate(analysis).filter(period="analysis").to_df()),
            _tidy_simple(multivariate, "reconstruction_error", "multivariate_drift", None, "pca_reconstruction"),
            *self._performance(self.estimator.estimate(analysis).filter(period="analysis").to_df(),
                               "estimated", self.estimator_method),
        ]
        labelled = analysis[self.spec.target].notna()
        if labelled.any():
            parts += self._performance(self.realized_calculator.calculate(analysis).filter(period="analysis").to_df(),
                                       "realized", "realized")
        parts.append(_tidy_per_column(self.missing.calculate(analysis).filter(period="analysis").to_df(),
                                      "missing_values_rate"))
        if self.unseen is not None:
            parts.append(_tidy_per_column(self.unseen.calculate(analysis).filter(period="analysis").to_df(),
                                          "unseen_values_rate"))
        results = pd.concat(parts, ignore_index=True)
        return self.report(results, self.decay_alerts(results, analysis))




def usecase_monitor(policy: MonitoringPolicy, reference: pd.DataFrame, usecase) -> TenantMonitor:
    """The monitor of a declared use case (``mlops.core.usecase.UseCase``) fitted on ``reference``."""
    return TenantMonitor(policy, reference, MonitorSpec.of(usecase))


def decay_alerts(results: pd.DataFrame, consecutive: int, metrics: Mapping[str, str] | None = None) -> list[dict]:
    """A decay alert per performance metric whose newest ``consecutive`` chunks with a value all
    alert: the metric, the chunk, the threshold and the value. ``metrics`` maps each watched metric
    to the threshold column it is compared with (churn's by default: ROC AUC under its lower threshold)."""
    found = []
    for metric, side in (CHURN_DECAY_METRICS if metrics is None else metrics).items():
        rows = results[(results["metric"] == metric) & results["value"].notna()].sort_values("chunk_start")
        newest = rows.tail(consecutive)
        if len(newest) == consecutive and newest["alert"].all():
            last = newest.iloc[-1]
            found.append({"metric": metric, "chunk": str(last["chunk_key"]), "value": float(last["value"]),
                          "threshold": float(last[side]), "consecutive_chunks": consecutive})
    return found


def describe_alert(alert: Mapping, version) -> str:
    """A decay alert in a line: the metric, its value against the threshold, and where (the chunk, or
    the pooled chunks and the bound of their interval)."""
    side = ">" if alert["metric"].endswith(("rmse", "mae")) else "<"
    where = f"chunk {alert['chunk']}"
    if alert.get("rule") == "pooled":
        bound = f", 99% bound {alert['upper_bound']:.3f}" if alert.get("upper_bound") is not None else ""
        where = f"{alert['consecutive_chunks']} chunks pooled to {alert['chunk']}{bound}"
    return f"{alert['metric']} {alert['value']:.3f} {side} {alert['threshold']:.3f} ({where}, v{version})"


def onset_estimate(results: pd.DataFrame, metric: str) -> pd.Timestamp | None:
    """Where the change began as monitoring sees it: the start of the earliest chunk of the newest
    unbroken run of alerting chunks of ``metric`` (chunks without a value are skipped)."""
    rows = results[(results["metric"] == metric) & results["value"].notna()].sort_values("chunk_start")
    flags = rows["alert"].to_numpy(dtype=bool)
    if not len(flags) or not flags[-1]:
        return None
    start = len(flags) - 1
    while start > 0 and flags[start - 1]:
        start -= 1
    return pd.Timestamp(rows["chunk_start"].iloc[start])


def _chunk_columns(frame: pd.DataFrame, prefix: tuple) -> pd.DataFrame:
    chunk = frame[prefix]
    return pd.DataFrame({
        "chunk_key": chunk["key"].astype(str).to_numpy(),
        "chunk_start": pd.to_datetime(chunk["start_date"]).to_numpy(),
        "chunk_end": pd.to_datetime(chunk["end_date"]).to_numpy(),
        "period": chunk["period"].astype(str).to_numpy(),
        "chunk_rows": (chunk["end_index"] - chunk["start_index"] + 1).astype("int64").to_numpy(),
    })


def _blocks(base: pd.DataFrame, parts: list[tuple[pd.DataFrame, str, object, str]]) -> pd.DataFrame:
    """The tidy rows of several result blocks over the same chunks (``base``: ``_chunk_columns``), one
    block per (values, metric, feature, method): the chunk columns, then metric, feature, method,
    value, lower_threshold, upper_threshold and alert. Built from numpy arrays in one frame: a
    frame per block and a concat cost more than NannyML's own computation of a daily chunk."""
    n, k = len(base), len(parts)

    def numbers(values: pd.DataFrame, name: str) -> np.ndarray:
        if name not in values:
            return np.full(n, np.nan)
        return pd.to_numeric(values[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)

    def alerts(values: pd.DataFrame) -> np.ndarray:
        if "alert" not in values:
            return np.zeros(n, dtype=bool)
        return values["alert"].fillna(False).astype(bool).to_numpy()

    def labels(i: int) -> np.ndarray:
        out = np.empty(n * k, dtype=object)
        for j, part in enumerate(parts):
            out[j * n:(j + 1) * n] = part[i]
        return out

    columns = {name: np.tile(base[name].to_numpy(), k) for name in base.columns}
    columns |= {"metric": labels(1), "feature": labels(2), "method": labels(3)}
    for name in ("value", "lower_threshold", "upper_threshold"):
        columns[name] = np.concatenate([numbers(values, name) for values, *_ in parts]) if k else np.empty(0)
    columns["alert"] = np.concatenate([alerts(values) for values, *_ in parts]) if k else np.empty(0, dtype=bool)
    return pd.DataFrame(columns)


def _tidy_simple(frame: pd.DataFrame, source: str, metric: str, feature, method: str,
                 presorted: bool = False) -> pd.DataFrame:
    if not presorted:
        frame = frame.sort_index(axis=1)
    return _blocks(_chunk_columns(frame, ("chunk",)), [(frame[source], metric, feature, method)])


def _tidy_univariate(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.sort_index(axis=1)  # lexsorted columns: fast, warning-free selection
    base = _chunk_columns(frame["chunk"], ("chunk",))
    return _blocks(base, [(frame[(column, method)], "univariate_drift", column, method) for column, method
                          in dict.fromkeys((c[0], c[1]) for c in frame.columns if c[0] != "chunk")])


def _tidy_per_column(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    frame = frame.sort_index(axis=1)
    base = _chunk_columns(frame, ("chunk",))
    return _blocks(base, [(frame[column], metric, column, "nannyml")
                          for column in dict.fromkeys(c[0] for c in frame.columns if c[0] != "chunk")])


def store_report(con, report: MonitoringReport, version: str, run_id: str, use_case: str = "churn") -> pd.DataFrame:
    """Write a monitoring run's results and decay alerts to the warehouse (caller's transaction).
    Chunks of the run replace earlier results of the same chunks (labels mature over time); older
    chunks keep theirs. Returns the stored rows."""
    import datetime as dt

    results_t, alerts_t = results_table(use_case), alerts_table(use_case)
    results = report.results.assign(model_version=version, dagster_run_id=run_id)
    con.execute(RESULTS_DDL.format(table=results_t))
    con.execute(ALERTS_DDL.format(table=alerts_t))
    con.register("new_results", results)
    con.execute(f"DELETE FROM {results_t} r WHERE model_version = ? AND EXISTS (SELECT 1 FROM new_results n "  # noqa: S608
                "WHERE n.chunk_key = r.chunk_key AND n.metric = r.metric)", [version])
    con.execute(f"INSERT INTO {results_t} BY NAME SELECT * FROM new_results")  # noqa: S608 - derived name
    con.unregister("new_results")
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    for alert in report.decay:
        con.execute(f"INSERT INTO {alerts_t} VALUES (?, ?, NULL, ?, ?, ?, NULL, TRUE, ?, ?)",  # noqa: S608
                    [version, alert["metric"], alert["chunk"], alert["value"], alert["threshold"], run_id, now])
    return results


def chunk_keys(frame: pd.DataFrame, policy: MonitoringPolicy) -> pd.Series:
    """The NannyML chunk key of each row under period chunking (e.g. '2026-09-02' for days)."""
    return pd.to_datetime(frame[TIMESTAMP]).dt.to_period(policy.chunk_period).astype(str)


def run_incremental(monitor: TenantMonitor, analysis: pd.DataFrame, stored: pd.DataFrame,
                    policy: MonitoringPolicy) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Only what changed since the last run: every metric for chunks never computed (or that gained
    rows since), and realized performance for chunks whose labels have matured since. NannyML computes each chunk against the
    fitted reference alone, so this equals a full recomputation. Returns (new results, all results).
    Size-based chunks are not stable across runs: they are recomputed over the whole window."""
    if policy.chunk_size > 0 or stored.empty:
        fresh = monitor.run(analysis).results
        return fresh, fresh
    keys = chunk_keys(analysis, policy)
    # A chunk is computed when its stored rows are all the rows it has now: predictions logged
    # late (a segment ingested a day after the others) make it new again, so that what monitoring
    # reports depends on the data alone, never on when it arrived.
    estimated = stored[stored["metric"] == monitor.estimated_metric]
    stored_rows = dict(zip(estimated["chunk_key"], estimated["chunk_rows"], strict=True))
    counts = keys.value_counts()
    computed = {k for k, n in counts.items() if stored_rows.get(k) == n}
    realized = set(stored.loc[(stored["metric"] == monitor.realized_metric) & stored["value"].notna(), "chunk_key"])
    parts = []
    new_rows = analysis[~keys.isin(computed)]
    if len(new_rows):
        parts.append(monitor.run(new_rows).results)
    target = monitor.spec.target
    matured = analysis[keys.isin(computed) & ~keys.isin(realized) & analysis[target].notna()]
    if len(matured):
        parts.append(monitor.realized(matured))
    fresh = pd.concat(parts, ignore_index=True) if parts else stored.iloc[0:0][list(stored.columns)]
    fresh = fresh.drop(columns=["model_version", "dagster_run_id"], errors="ignore")
    kept = stored.drop(columns=["model_version", "dagster_run_id"], errors="ignore")
    if len(fresh):
        replaced = kept.set_index(["chunk_key", "metric"]).index.isin(fresh.set_index(["chunk_key", "metric"]).index)
        kept = kept[~replaced]
    return fresh, pd.concat([kept, fresh], ignore_index=True)


def monitoring_step(monitor: TenantMonitor, analysis: pd.DataFrame, stored: pd.DataFrame, raised: set,
                    bound: float, policy: MonitoringPolicy) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """One monitoring run as the platform does it every day: the incremental results (``run_incremental``),
    judged against ``bound`` (the version's floor, ``mlops.core.loop.decay_floor``), and the decay
    alerts of chunks not alerted before (``raised``: (metric, chunk) pairs), once per alerting chunk.
    Returns (new results, all results, new decay alerts)."""
    fresh, everything = run_incremental(monitor, analysis, stored, policy)
    fresh, everything = monitor.apply_bound(fresh, bound), monitor.apply_bound(everything, bound)
    decay = [a for a in monitor.decay_alerts(everything, analysis) if (a["metric"], a["chunk"]) not in raised]
    if policy.decay_confidence:
        judged = []
        for alert in decay:
            significant, upper = decay_evidence(monitor, analysis, everything, alert, bound, policy.decay_confidence)
            if significant:
                judged.append(alert | ({} if upper is None else {"upper_bound": round(upper, 4)}))
        decay = judged
    return fresh, everything, decay


def pooled_decay_alerts(monitor: TenantMonitor, analysis: pd.DataFrame, results: pd.DataFrame) -> list[dict]:
    """The ``pooled`` decay rule's alerts before the evidence (``decay_evidence`` judges them): per
    watched metric, the newest ``consecutive_chunks`` chunks with a value pooled as one sample, when
    its value is beyond the threshold (realized: the metric over the pooled rows; estimated: the mean
    of the chunks' estimates). One alert per window, keyed by its newest chunk."""
    found = []
    higher = monitor.higher_is_better
    for metric, side in monitor.spec.decay_metrics.items():
        rows = results[(results["metric"] == metric) & results["value"].notna()].sort_values("chunk_start")
        newest = rows.tail(monitor.consecutive)
        if len(newest) < monitor.consecutive:
            continue
        last = newest.iloc[-1]
        threshold = float(last[side])
        value = float(newest["value"].mean())
        if metric.startswith("realized_"):
            pooled = _pooled_rows(monitor, analysis, newest, labelled=True)
            y = pooled[monitor.spec.target].to_numpy(dtype=float)
            if len(pooled) == 0 or len(np.unique(y)) < 2:
                continue
            value = float(_metric_function(metric)(y, pooled[SCORE].to_numpy(dtype=float)))
        if (value < threshold) if higher else (value > threshold):
            # Where the change began: the window's first chunk, or the start of an unbroken run of
            # alerting chunks that reaches further back.
            onset = min(d for d in (pd.Timestamp(newest["chunk_start"].min()), onset_estimate(results, metric))
                        if d is not None)
            found.append({"metric": metric, "chunk": str(last["chunk_key"]), "value": value, "threshold": threshold,
                          "consecutive_chunks": monitor.consecutive, "rule": "pooled", "onset": str(onset)})
    return found


def _pooled_rows(monitor: TenantMonitor, analysis: pd.DataFrame, chunks: pd.DataFrame, labelled: bool) -> pd.DataFrame:
    """The analysis rows of ``chunks`` (results rows), those with a label only if ``labelled``."""
    start, end = pd.Timestamp(chunks["chunk_start"].min()), pd.Timestamp(chunks["chunk_end"].max())
    stamps = pd.to_datetime(analysis[TIMESTAMP])
    keep = (stamps >= start) & (stamps <= end)
    if labelled:
        keep &= analysis[monitor.spec.target].notna()
    return analysis[keep]


def _metric_function(metric: str):
    from sklearn import metrics

    return metrics.average_precision_score if metric.endswith("average_precision") else metrics.roc_auc_score


def batched_binary_metric(metric: str, y: np.ndarray, score: np.ndarray, weight: np.ndarray | None = None
                          ) -> np.ndarray:
    """``metric`` (average precision or ROC AUC, as sklearn computes them) of ``score`` against each
    row of ``y`` (labels, shape (B, n) or (n,)) with each row of ``weight`` (sample weights, shape
    (B, n) or None), in one pass: the bootstraps of ``decay_evidence`` draw hundreds of label or
    weight vectors for the same scores, and sklearn's per-call validation cost more than the metric
    (over a quarter of a fraud replay's time). The scores are sorted once; a threshold is each
    distinct score, as in ``sklearn.metrics.precision_recall_curve`` / ``roc_curve``. NaN where a row
    has no positive or no negative weight. ``tests/test_monitoring.py`` checks it against sklearn."""
    score = np.asarray(score, dtype=float)
    y = np.atleast_2d(np.asarray(y, dtype=float))
    w = np.ones_like(y) if weight is None else np.atleast_2d(np.asarray(weight, dtype=float))
    y, w = np.broadcast_arrays(y, w)  # one label vector with many weight vectors, or the reverse
    order = np.argsort(score, kind="mergesort")[::-1]  # sklearn's order: descending, stable
    ranked = score[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last row of each distinct score
    tps = np.cumsum((y * w)[:, order], axis=1)[:, last]
    fps = np.cumsum(((1.0 - y) * w)[:, order], axis=1)[:, last]
    positives, negatives = tps[:, -1], fps[:, -1]
    out = np.full(len(y), np.nan)
    ok = (positives > 0) & (negatives > 0)
    tps, fps, positives, negatives = tps[ok], fps[ok], positives[ok, None], negatives[ok, None]
    if metric.endswith("average_precision"):
        called = tps + fps
        precision = np.divide(tps, called, out=np.zeros_like(tps), where=called != 0)
        recall_step = np.diff(np.c_[np.zeros(len(tps)), tps / positives], axis=1)
        out[ok] = np.maximum(0.0, np.sum(recall_step * precision, axis=1))
    else:
        tpr = np.c_[np.zeros(len(tps)), tps / positives]
        fpr = np.c_[np.zeros(len(fps)), fps / negatives]
        out[ok] = np.trapezoid(tpr, fpr, axis=1)
    return out


def decay_evidence(monitor: TenantMonitor, analysis: pd.DataFrame, results: pd.DataFrame, alert: dict,
                   bound: float, confidence: float, n_boot: int = 400) -> tuple[bool, float | None]:
    """Whether a decay alert is beyond the noise, judged on the alert's consecutive chunks pooled
    as one: the interval's bound nearest the floor (one-sided, at ``confidence``) must lie under
    ``bound``. Binary problems only; the others are not re-judged. Returns (significant, that bound).

    - A realized alert: the realized metric with an interval from a bootstrap clustered by entity
      (an account is scored every day and its one label window covers many daily chunks, so
      consecutive chunks share most of their positives and are nearly one observation).
    - A label-free (estimated) alert: what the realized metric would be if the model's calibrated
      probabilities (CBPE's calibrator) hold, CBPE's own premise: labels are drawn from them, one
      uniform per entity, and the metric of each draw gives the interval. A draw with a single
      class has no metric and counts as no evidence, so a pool that expects too few positives to
      measure (a small tenant's rare fraud) cannot alert on the estimate alone."""
    metric = alert["metric"]
    if monitor.spec.problem_type != "binary" or not metric.startswith(("realized_", "estimated_")):
        return True, None
    rows = results[(results["metric"] == metric) & results["value"].notna()].sort_values("chunk_start")
    newest = rows.tail(int(alert.get("consecutive_chunks", 1)))
    target = monitor.spec.target
    estimated = metric.startswith("estimated_")
    pooled = _pooled_rows(monitor, analysis, newest, labelled=not estimated)
    if len(pooled) == 0:
        return True, None
    groups = pooled["account_id"].to_numpy() if "account_id" in pooled else np.arange(len(pooled))
    _, cluster = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(0)
    if estimated:
        return _estimated_evidence(monitor, metric, pooled[SCORE].to_numpy(dtype=float), cluster, rng,
                                   bound, confidence, n_boot)
    y, score = pooled[target].to_numpy(dtype=float), pooled[SCORE].to_numpy(dtype=float)
    if len(np.unique(y)) < 2:
        return True, None
    clusters = cluster.max() + 1
    uniform = np.full(clusters, 1 / clusters)
    # Resample the entities (each draw a weight per row), in batches of draws scored at once.
    values = np.concatenate([
        batched_binary_metric(metric, y, score, np.stack([
            rng.multinomial(clusters, uniform)[cluster] for _ in range(size)]))
        for size in _batches(n_boot, len(y))])
    values = values[~np.isnan(values)]  # a draw with one class has no metric
    if not len(values):
        return True, None
    upper = float(np.quantile(values, confidence))
    return upper < bound, upper


def _batches(n_boot: int, n_rows: int, cells: int = 2_000_000) -> list[int]:
    """Draws per batch of ``n_boot``, so that a batch holds about ``cells`` values."""
    size = max(1, min(n_boot, cells // max(n_rows, 1)))
    return [min(size, n_boot - start) for start in range(0, n_boot, size)]


def _estimated_evidence(monitor: TenantMonitor, metric: str, score: np.ndarray, cluster: np.ndarray, rng,
                        bound: float, confidence: float, n_boot: int) -> tuple[bool, float]:
    """``decay_evidence`` of a label-free alert: labels drawn from the calibrated probabilities."""
    estimator = monitor.estimator
    proba = np.clip(estimator.calibrator.calibrate(score) if estimator.needs_calibration else score, 0.0, 1.0)
    clusters = cluster.max() + 1
    values = np.concatenate([
        batched_binary_metric(metric, np.stack([
            (rng.random(clusters)[cluster] < proba).astype(float) for _ in range(size)]), score)
        for size in _batches(n_boot, len(score))])
    values[np.isnan(values)] = np.inf  # a draw without both classes is no evidence of decay
    upper = float(np.quantile(values, confidence, method="higher"))  # an order statistic: inf stays inf
    return upper < bound, upper


# --- the data monitoring reads ------------------------------------------------------------------
# The logged predictions of one model version (``(LOG_TABLE)``) and the snapshots they were scored
# from: the first two CTEs of every analysis query (churn's and the use cases').
_LOGGED = """
WITH snapshots AS (
    SELECT * EXCLUDE (filename),
           CAST(regexp_extract(filename, '(VERSION_REGEX)', 1) AS BIGINT) AS snapshot_version
    FROM read_parquet($files, filename = true)
),
predictions AS (
    SELECT p.prediction_id, p.account_id, p.score, p.snapshot_version
    FROM (LOG_TABLE) p
    WHERE p.role = $role AND p.model_version = $version
)"""
ANALYSIS_SQL = _LOGGED + """
SELECT p.prediction_id, p.score, s.*  EXCLUDE (snapshot_version), s.available_at AS timestamp,
       CASE WHEN s.available_at + INTERVAL (HORIZON) DAY <= CAST($origin AS TIMESTAMP)
            THEN CAST(c.churned_at IS NOT NULL AND c.churned_at < s.available_at + INTERVAL (HORIZON) DAY AS INTEGER)
            WHEN s.available_at + INTERVAL (EARLY) DAY <= CAST($origin AS TIMESTAMP)
            THEN CAST(c.churned_at IS NOT NULL AND c.churned_at < CAST($origin AS TIMESTAMP) AS INTEGER)
       END AS churned
FROM predictions p
JOIN snapshots s ON s.account_id = p.account_id AND s.snapshot_version = p.snapshot_version
LEFT JOIN raw_churn_events c ON c.account_id = p.account_id AND c.churned_at >= s.available_at
WHERE s.available_at >= CAST($origin AS TIMESTAMP) - INTERVAL (WINDOW) DAY
QUALIFY row_number() OVER (PARTITION BY p.prediction_id ORDER BY c.churned_at) = 1
"""


def _logged_snapshot_files(con, table: str, online_dir: Path, version: str, role: str) -> list[str]:
    """The snapshot files the logged predictions of one model version were scored from (those that exist)."""
    con.execute(prediction_log_ddl(table))
    versions = [r[0] for r in con.execute(
        f"SELECT DISTINCT snapshot_version FROM {table} WHERE role = ? AND model_version = ?",  # noqa: S608 - derived name
        [role, version]).fetchall()]
    files = [Path(online_dir) / snapshot_file_name(v) for v in versions]
    return [str(f) for f in files if f.exists()]


def _analysis_sql(template: str, table: str, window_days: int) -> str:
    return (template.replace("(WINDOW)", str(int(window_days))).replace("(VERSION_REGEX)", SNAPSHOT_VERSION_REGEX)
            .replace("(LOG_TABLE)", table))


def analysis_frame(con, online_dir: Path, version: str, window_days: int, origin, horizon_days: int,
                   role: str = CHAMPION, early_after_days: int | None = None) -> pd.DataFrame:
    """Logged predictions of one model version with the features they were scored from and, once
    mature (``horizon_days`` after the features, by ``origin``: the day after the newest event),
    their label: the analysis data of monitoring. With ``early_after_days``, rows observed that long
    but not yet mature get their early label (churned so far), for the shadow comparison's evidence."""
    files = _logged_snapshot_files(con, PREDICTION_LOG_TABLE, online_dir, version, role)
    if not files:
        return pd.DataFrame()
    early = int(horizon_days) + 1 if early_after_days is None else int(early_after_days)
    sql = (_analysis_sql(ANALYSIS_SQL, PREDICTION_LOG_TABLE, window_days).replace("(HORIZON)", str(int(horizon_days)))
           .replace("(EARLY)", str(early)))
    return con.execute(sql, {"files": files, "role": role, "version": version, "origin": origin}).df()


USECASE_ANALYSIS_SQL = _LOGGED + """,
labels AS (
    SELECT CAST(l.(KEY) AS VARCHAR) AS label_key, CAST(l.prediction_time AS TIMESTAMP) AS label_time,
           l.(LABEL) AS label_value
    FROM (
(LABELS_SQL)
    ) l
)
SELECT p.prediction_id, p.score, s.* EXCLUDE (snapshot_version), s.available_at AS timestamp,
       CASE WHEN s.available_at + to_days(CAST($horizon_days AS INTEGER)) <= CAST($as_of AS TIMESTAMP)
            THEN l.label_value(EARLY_BRANCH) END AS (LABEL)
FROM predictions p
JOIN snapshots s ON CAST(s.(KEY) AS VARCHAR) = p.account_id AND s.snapshot_version = p.snapshot_version
LEFT JOIN labels l ON l.label_key = p.account_id AND l.label_time = s.available_at
WHERE s.available_at >= CAST($as_of AS TIMESTAMP) - INTERVAL (WINDOW) DAY
"""  # noqa: S608 - constant text


# Early labels (``early_after_days``): rows whose snapshot row is that old get the label as known at $as_of.
_USECASE_EARLY_BRANCH = """
            WHEN s.available_at + to_days(CAST($early_days AS INTEGER)) <= CAST($as_of AS TIMESTAMP)
            THEN l.label_value"""


# A use case whose features are another entity's (a payment scored with its account's row): the
# logged entity key finds the prediction's label row, which carries the lookup key and the request
# fields as the request did (the labels contract); the lookup key and the logged snapshot version
# find the feature row. Only predictions the labels SQL knows are analysed (fraud: settled payments).
USECASE_LOOKUP_ANALYSIS_SQL = _LOGGED + """,
labels AS (
    SELECT CAST(l.(KEY) AS VARCHAR) AS label_key, CAST(l.(FKEY) AS VARCHAR) AS lookup_key,
           CAST(l.prediction_time AS TIMESTAMP) AS label_time, l.(LABEL) AS label_value(FIELDS)
    FROM (
(LABELS_SQL)
    ) l
)
SELECT p.prediction_id, p.score, p.account_id AS (KEY), s.* EXCLUDE (snapshot_version)(LFIELDS),
       s.available_at AS timestamp, l.label_time,
       CASE WHEN l.label_time + to_days(CAST($horizon_days AS INTEGER)) <= CAST($as_of AS TIMESTAMP)
            THEN l.label_value(EARLY_BRANCH) END AS (LABEL)
FROM predictions p
JOIN labels l ON l.label_key = p.account_id
JOIN snapshots s ON CAST(s.(FKEY) AS VARCHAR) = l.lookup_key AND s.snapshot_version = p.snapshot_version
WHERE s.available_at >= CAST($as_of AS TIMESTAMP) - INTERVAL (WINDOW) DAY
"""  # noqa: S608 - constant text


def usecase_analysis_frame(con, usecase, online_dir: Path, version: str, window_days: int, origin,
                           role: str = CHAMPION, early_after_days: int | None = None,
                           realized_after_days: int | None = None) -> pd.DataFrame:
    """``analysis_frame`` for a declared use case (``mlops.core.usecase.UseCase``): the logged
    predictions of one model version (table ``prediction_log_table(usecase.name)``, the entity key
    in ``account_id``) with the snapshot row each was scored from (the use case's online folder)
    and, once mature, its label: the use case's labels SQL run at ``$as_of`` = ``origin`` (the day
    after the newest event) and ``$horizon_days``, joined on the entity key with the snapshot
    row's ``available_at`` as prediction time, kept where ``available_at + horizon_days <= origin``.

    A use case scored with another entity's features (``features.key`` is not the entity key: a
    payment with its account's row) is joined to its label row by the entity key, which gives the
    lookup key, the request fields and ``prediction_time`` (``USECASE_LOOKUP_ANALYSIS_SQL``); its
    label is kept where ``prediction_time + horizon_days <= origin``.

    With ``early_after_days`` (a binary use case's ``label.early_after_days``), rows whose snapshot
    row (``available_at``, as churn's) is that old but not yet mature get their label as known at
    ``origin`` (the labels SQL runs at it: a positive already reported is a known positive), as
    ``analysis_frame``'s early labels: the evidence of an episode's shadow comparison.

    With ``realized_after_days`` (monitoring of a use case that declares it), every row's label is
    instead its label as known that many days after its day, once that day has come
    (``usecase_store.censored_labels``; ``usecase_reference_frame`` censors the reference alike)."""
    table = prediction_log_table(usecase.name)
    files = _logged_snapshot_files(con, table, online_dir, version, role)
    if not files:
        return pd.DataFrame()
    labels_sql = usecase.labels_sql.strip().rstrip(";")
    lookup = usecase.feature_key != usecase.entity.key
    fields = list(usecase.request_field_names) if lookup else []
    template = (USECASE_LOOKUP_ANALYSIS_SQL.replace("(FKEY)", usecase.feature_key)
                .replace("(FIELDS)", "".join(f", l.{f}" for f in fields))
                .replace("(LFIELDS)", "".join(f", l.{f}" for f in fields))) if lookup else USECASE_ANALYSIS_SQL
    early = "" if early_after_days is None else _USECASE_EARLY_BRANCH
    sql = (_analysis_sql(template, table, window_days).replace("(EARLY_BRANCH)", early)
           .replace("(KEY)", usecase.entity.key).replace("(LABEL)", usecase.label.column)
           .replace("(LABELS_SQL)", labels_sql + "\n"))
    params = {"files": files, "role": role, "version": str(version), "as_of": origin,
              "horizon_days": int(usecase.label.horizon_days),
              **({} if early_after_days is None else {"early_days": int(early_after_days)})}
    frame = con.execute(sql, params).df()
    if frame["prediction_id"].duplicated().any():
        raise ValueError(f"use case {usecase.name!r}: its labels SQL returns more than one label for an "
                         f"entity and prediction_time")
    times = frame.pop("label_time") if lookup else frame[TIMESTAMP]
    if realized_after_days:
        from mlops.core import usecase_store

        frame[usecase.label.column] = usecase_store.censored_labels(
            con, usecase, frame[usecase.entity.key], times, realized_after_days, origin)
    return frame


def reference_frame(con, version: str, use_case: str = "churn") -> pd.DataFrame:
    """The reference of a model version: its training holdout, with scores and labels."""
    return holdout_scores(con, version, use_case=use_case).rename(columns={"prediction_time": TIMESTAMP})


def usecase_reference_frame(con, usecase, version: str) -> pd.DataFrame:
    """``reference_frame`` of a declared use case's version; with ``monitoring.realized_after_days``
    its labels are censored as the analysis frame's are (``usecase_store.censored_labels``): each
    holdout row's label as known that many days after its day, so that the reference performance
    and the floor are measured on the labels monitoring will compare them with."""
    return censor_reference(con, usecase, reference_frame(con, version, use_case=usecase.name))


def censor_reference(con, usecase, frame: pd.DataFrame) -> pd.DataFrame:
    """A reference frame (holdout rows with ``TIMESTAMP`` = prediction time) labelled as monitoring
    labels the traffic under ``monitoring.realized_after_days`` (unchanged without it), from the
    labels SQL on ``con`` at its clock; rows whose censored label is not known are left out."""
    days = MonitorSpec.of(usecase).realized_after_days
    if not days or frame.empty:
        return frame
    from mlops.core import usecase_store

    frame = frame.assign(**{usecase.label.column: usecase_store.censored_labels(
        con, usecase, frame[usecase.entity.key], frame[TIMESTAMP], days, usecase_store.clock(con, usecase))})
    # An episode's retrain may hold out rows observed for fewer days (early labels): not comparable.
    return frame[frame[usecase.label.column].notna()].reset_index(drop=True)


# --- fitted monitors: once per model version ------------------------------------------------
def monitor_path(root: Path, tenant: str, version: str, policy: MonitoringPolicy,
                 spec: MonitorSpec = CHURN_SPEC) -> Path:
    """Churn's monitors directly under the tenant's monitoring folder, a use case's in a folder of
    its own; the name changes with the policy, the spec, its thresholds and the monitor's format."""
    folder = HomeLayout(Path(root)).monitoring_dir(tenant)
    if spec.name != CHURN_SPEC.name:
        folder = folder / spec.name
    return folder / f"v{version}-{policy.fingerprint()}-{spec.fingerprint(policy)}.pkl"


def load_or_fit(root: Path, tenant: str, version: str, policy: MonitoringPolicy,
                reference_loader, spec: MonitorSpec = CHURN_SPEC) -> tuple[TenantMonitor, bool]:
    """The fitted monitor of a model version; fitted (and stored) on first use only."""
    path = monitor_path(root, tenant, version, policy, spec)
    if path.exists():
        with path.open("rb") as fh:
            return pickle.load(fh), False
    monitor = TenantMonitor(policy, reference_loader(), spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, pickle.dumps(monitor))
    return monitor, True


# --- plots ------------------------------------------------------------------------------------
def performance_plot(results: pd.DataFrame, title: str) -> bytes:
    """Estimated (CBPE) and realized ROC AUC per chunk, with the alert threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for metric, style in (("estimated_roc_auc", "-o"), ("realized_roc_auc", "-s")):
        rows = results[(results["metric"] == metric) & results["value"].notna()].sort_values("chunk_start")
        if rows.empty:
            continue
        ax.plot(rows["chunk_start"], rows["value"], style, ms=3, label=metric.replace("_", " "))
        alerts = rows[rows["alert"]]
        ax.scatter(alerts["chunk_start"], alerts["value"], color="red", zorder=3, s=18)
        ax.axhline(rows["lower_threshold"].iloc[-1], color="grey", ls="--", lw=1)
    ax.set_title(title)
    ax.set_ylabel("ROC AUC")
    ax.legend(loc="lower left", fontsize=8)
    fig.autofmt_xdate()
    from mlops.core.modeling import figure_png

    return figure_png(fig)


def drift_plot(results: pd.DataFrame, title: str) -> bytes:
    """Multivariate reconstruction error per chunk and how many features drift in each chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True)
    multi = results[results["metric"] == "multivariate_drift"].sort_values("chunk_start")
    top.plot(multi["chunk_start"], multi["value"], "-o", ms=3)
    if len(multi) and multi["upper_threshold"].notna().any():
        top.axhline(multi["upper_threshold"].iloc[-1], color="grey", ls="--", lw=1)
    top.scatter(multi.loc[multi["alert"], "chunk_start"], multi.loc[multi["alert"], "value"], color="red", s=18, zorder=3)
    top.set_ylabel("reconstruction error")
    top.set_title(title)
    uni = results[results["metric"] == "univariate_drift"]
    counts = uni.groupby("chunk_start")["alert"].sum()
    bottom.bar(counts.index, counts.values, width=0.8)
    bottom.set_ylabel("features drifting")
    fig.autofmt_xdate()
    from mlops.core.modeling import figure_png

    return figure_png(fig)


# --- operational monitoring -------------------------------------------------------------------
OPERATIONAL_SUMMARY_SQL = """
SELECT model_version, role, predictions, q[1] AS p50_ms, q[2] AS p95_ms, q[3] AS p99_ms, errors, last_24h
FROM (
    SELECT model_version, role, count(*) AS predictions,
           quantile_cont(latency_ms, [0.5, 0.95, 0.99]) AS q,
           count(*) FILTER (WHERE NOT isfinite(score) OR score < 0 OR score > 1) AS errors,
           count(*) FILTER (WHERE requested_at >= now() - INTERVAL 1 DAY) AS last_24h
    FROM prediction_log
    GROUP BY model_version, role
)
ORDER BY model_version, role
"""


def operational_summary(con) -> pd.DataFrame:
    """Latency percentiles (linear interpolation), volume (all time and the last 24 hours) and errors
    per model version and role, in one DuckDB pass over ``prediction_log``: the log never comes into memory.
    An error is a logged score that is not a probability (NaN, infinite or outside [0, 1])."""
    return con.execute(OPERATIONAL_SUMMARY_SQL).df()


def service_status_dir(root: Path) -> Path:
    return HomeLayout(Path(root)).service_status_dir


def worker_statuses(root: Path, fresh_within_s: float | None = None) -> list[dict]:
    """The status file of every service worker (each rewrites its own every few seconds and on each
    manifest swap: CPU time, predictions, and what it serves); with ``fresh_within_s``, only those
    updated that recently (a worker that exited leaves its last file behind)."""
    import time

    statuses = []
    for path in sorted(service_status_dir(root).glob("worker-*.json")):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if fresh_within_s is None or time.time() - float(status.get("updated_at", 0.0)) <= fresh_within_s:
            statuses.append(status)
    return statuses


def service_cpu_usage(root: Path) -> dict | None:
    """CPU seconds and predictions of the service's workers, summed over their status files."""
    statuses = worker_statuses(root)
    if not statuses:
        return None
    return {"cpu_seconds": sum(float(s.get("cpu_seconds", 0.0)) for s in statuses),
            "predictions": sum(int(s.get("predictions", 0)) for s in statuses), "workers": len(statuses)}


def health_checks_path(root: Path) -> Path:
    return HomeLayout(Path(root)).health_checks_file


def record_health_check(root: Path, ok: bool, detail: str, at: float) -> None:
    """Append one probe of the service's readiness (the health sensor writes these)."""
    path = health_checks_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({"at": at, "ok": ok, "detail": detail}) + "\n")


def read_health_checks(root: Path) -> pd.DataFrame:
    path = health_checks_path(root)
    if not path.exists():
        return pd.DataFrame(columns=["at", "ok", "detail"])
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows, columns=["at", "ok", "detail"])


def compute_kpis(audit_log: pd.DataFrame, run_statuses: list[str], health: pd.DataFrame) -> dict:
    """Delivery KPIs of one tenant from its audit log, its Dagster runs and the service's health checks."""
    audit_log = audit_log.sort_values("seq")
    alerts = audit_log[audit_log["action"] == "decay_alert"]
    promotions = audit_log[audit_log["action"] == "promotion"]
    first_champions = audit_log[(audit_log["action"] == "alias_assigned")
                                & audit_log["details"].str.contains(f'"{CHAMPION}"', regex=False)]
    deployments = pd.concat([promotions, first_champions])
    lead_times = []
    for _, promotion in promotions.iterrows():
        before = alerts[alerts["seq"] < promotion["seq"]]
        if len(before):
            # The incident starts at its first alert after the previous promotion.
            earlier = promotions[promotions["seq"] < promotion["seq"]]
            since = earlier["seq"].max() if len(earlier) else -1
            incident = before[before["seq"] > since]
            if len(incident):
                lead_times.append((promotion["recorded_at"] - incident["recorded_at"].min()).total_seconds())
    span_days = 0.0
    if len(audit_log):
        span_days = max((audit_log["recorded_at"].max() - audit_log["recorded_at"].min()).total_seconds() / 86400, 1.0)
    started = health[health["ok"]]["at"].min() if len(health) and health["ok"].any() else None
    probes = health[health["at"] >= started] if started is not None else health.iloc[0:0]
    return {
        "decay_alerts": len(alerts),
        "promotions": len(promotions),
        "deployments": len(deployments),
        "deployments_per_week": len(deployments) / span_days * 7 if span_days else None,
        "mean_alert_to_promotion_s": float(np.mean(lead_times)) if lead_times else None,
        "last_alert_to_promotion_s": float(lead_times[-1]) if lead_times else None,
        "rollbacks": int((audit_log["action"] == "rollback").sum()),
        "gate_failures": int(((audit_log["action"].str.startswith("gate:") | (audit_log["action"] == "promotion_gate"))
                              & (audit_log["outcome"] == "failed")).sum()),
        "challengers_retired": int((audit_log["action"] == "challenger_retired").sum()),
        "runs": len(run_statuses),
        "failed_runs": sum(s == "FAILURE" for s in run_statuses),
        "health_checks": len(probes),
        "uptime_ratio": float(probes["ok"].mean()) if len(probes) else None,
    }


# --- reading stored results (the drift report) ------------------------------------------------
def read_monitoring_results(con, version: str | None = None, use_case: str = "churn") -> pd.DataFrame:
    """Stored monitoring results (``store_report``) of one model version, or of every version if
    ``version`` is None, in chunk order. Works on a read-only connection; empty, with the table's
    columns, where monitoring has stored nothing yet."""
    return _read_stored(con, results_table(use_case), RESULTS_DDL, version,
                        "model_version, chunk_start, metric, feature NULLS FIRST, method")


def read_monitoring_alerts(con, version: str | None = None, use_case: str = "churn") -> pd.DataFrame:
    """Stored decay alerts (the retraining triggers) of one model version, or of every version."""
    return _read_stored(con, alerts_table(use_case), ALERTS_DDL, version, "raised_at, model_version, metric, chunk_key")


def _read_stored(con, table: str, ddl: str, version: str | None, order: str) -> pd.DataFrame:
    exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]).fetchone()[0]
    if not exists:
        import duckdb

        with duckdb.connect() as scratch:  # the table's columns and types, without writing to the warehouse
            scratch.execute(ddl.format(table=table))
            return scratch.execute(f"SELECT * FROM {table}").df()  # noqa: S608 - constant table
    where, params = ("WHERE model_version = ?", [str(version)]) if version is not None else ("", [])
    return con.execute(f"SELECT * FROM {table} {where} ORDER BY {order}", params).df()  # noqa: S608 - constants
