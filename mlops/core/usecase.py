"""Use cases: each AI feature of the product (churn prediction, fraud detection, ...) declared once, in
a folder of its own, and run by the same lifecycle for every tenant.

A use case is a folder holding ``usecase.yaml`` and the SQL files it names::

    usecases/<name>/
      usecase.yaml      entity, raw tables, features, label, problem type, model, gates,
                        monitoring, serving request, simulator
      features.sql      the feature view (see FEATURE_VIEW_CONTRACT)
      labels.sql        the labels (see LABELS_CONTRACT)
      simulator.py      optional: ``simulate(spec) -> {table: DataFrame}`` for demos and tests

``load_usecase`` reads and checks a folder and names the file and field of every problem it finds;
``discover_usecases`` loads every folder under the use-case roots. Plain Python: the asset factory,
the CLI, the service and the notebooks all read the same declaration.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

USECASE_FILE = "usecase.yaml"
# Use-case roots beyond the project's own ``usecases/``: folders separated by os.pathsep.
USECASE_PATHS_ENV = "MLOPS_USECASE_PATHS"
NAME_PATTERN = r"^[a-z][a-z0-9_]{1,30}$"
SQL_TYPES = ("VARCHAR", "BIGINT", "INTEGER", "DOUBLE", "BOOLEAN", "DATE", "TIMESTAMP")

FEATURE_VIEW_CONTRACT = """\
The feature view is one SELECT over the use case's raw tables that returns, for each entity and each
time a feature row becomes available, the entity key, ``available_at`` (TIMESTAMP: from then on the
row may be used) and every declared feature. It must only read events before ``available_at``.
Bound parameters: ``$as_of`` (TIMESTAMP, the clock: the day after the newest event) and ``$since``
(TIMESTAMP: rows with ``available_at`` before it may be left out, and the rows from it on must be
exactly those the start of time gives; the online snapshot passes ``$as_of`` minus
``features.lookback_days``, the offline table the start of time or, built incrementally, its last
build's clock)."""
LABELS_CONTRACT = """\
The labels are one SELECT that returns the entity key, ``prediction_time`` (TIMESTAMP) and the label
column; also the feature view's key where it is not the entity's (``features.key``), and the value of
every request field (``serving.request_fields``) as the request carried it at ``prediction_time``.
Bound parameters: ``$as_of`` and ``$horizon_days``. The platform keeps only labels whose
window has closed (``prediction_time + horizon_days <= as_of``) and joins each to the newest feature
row available at ``prediction_time`` (point in time)."""


class UseCaseError(ValueError):
    """A use-case declaration that cannot be used; the message names the file and the field."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnSpec(_Spec):
    name: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$")]
    type: Literal[SQL_TYPES]  # type: ignore[valid-type]
    nullable: bool = False
    isin: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_length: int | None = None
    max_length: int | None = None

    @property
    def sql_type(self) -> str:
        return self.type

    @property
    def pandas_dtype(self) -> str:
        return {"VARCHAR": "str", "BIGINT": "int64", "INTEGER": "int64", "DOUBLE": "float64", "BOOLEAN": "bool",
                "DATE": "datetime64[ns]", "TIMESTAMP": "datetime64[ns]"}[self.type]

    def checks(self) -> list:
        import pandera.pandas as pa

        checks = []
        if self.isin is not None:
            checks.append(pa.Check.isin(list(self.isin)))
        # One bound names itself in a rejection ("greater_than_or_equal_to(0)"), not an infinite range.
        if self.min is not None and self.max is not None:
            checks.append(pa.Check.in_range(self.min, self.max))
        elif self.min is not None:
            checks.append(pa.Check.ge(self.min))
        elif self.max is not None:
            checks.append(pa.Check.le(self.max))
        if self.min_length is not None or self.max_length is not None:
            checks.append(pa.Check.str_length(self.min_length, self.max_length))
        return checks


class TableSpec(_Spec):
    """A raw table: one declaration gives its DuckDB DDL and its pandera schema."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    columns: tuple[ColumnSpec, ...]
    key: tuple[str, ...]
    time_column: str | None = None
    # Inbox files whose name starts with this feed the table (default: the name without "raw_").
    file_prefix: str | None = None
    # Columns a delivered file may carry or leave out: validated when present, not stored as such
    # (the ingestion that reads the file decides what they mean).
    optional_columns: tuple[ColumnSpec, ...] = ()

    @model_validator(mode="after")
    def _known_columns(self) -> TableSpec:
        names = [c.name for c in (*self.columns, *self.optional_columns)]
        if len(set(names)) != len(names):
            raise ValueError(f"table {self.name}: duplicate column names")
        for col in (*self.key, *([self.time_column] if self.time_column else [])):
            if col not in self.column_names:
                raise ValueError(f"table {self.name}: key or time column {col!r} is not one of its columns")
        return self

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def inbox_prefix(self) -> str:
        return self.file_prefix or self.name.removeprefix("raw_")

    def ddl(self) -> str:
        cols = ", ".join(f"{c.name} {c.type}{'' if c.nullable else ' NOT NULL'}" for c in self.columns)
        # `source` records where each row came from: the simulator or an inbox file.
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({cols}, source VARCHAR NOT NULL)"

    def pandera_schema(self):
        import pandera.pandas as pa

        return pa.DataFrameSchema(
            {c.name: pa.Column(c.pandas_dtype, checks=c.checks(), nullable=c.nullable, coerce=True)
             for c in self.columns}
            | {c.name: pa.Column(c.pandas_dtype, checks=c.checks(), nullable=True, coerce=True, required=False)
               for c in self.optional_columns},
            unique=list(self.key), strict="filter", report_duplicates="all", name=self.name,
        )

    def column(self, name: str) -> ColumnSpec:
        for c in (*self.columns, *self.optional_columns):
            if c.name == name:
                return c
        raise KeyError(f"table {self.name} has no column {name!r}")


class EntitySpec(_Spec):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    key: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]


class FeatureSpec(_Spec):
    sql: str  # file name in the use case's folder
    # The feature view's key, when it is not the entity's: a payment (the entity) is scored with the
    # features of its account (``key: account_id``). The online snapshot is keyed by it, a request
    # carries it, and the labels return it beside the entity key.
    key: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")] | None = None
    numeric: tuple[str, ...] = ()
    categorical: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    # The clock: the day after the newest value of this column of this table is "now" ($as_of).
    clock_table: str
    clock_column: str
    # How far back the online snapshot reads: the newest row per entity must be this recent.
    lookback_days: Annotated[int, Field(ge=1, le=3660)] = 120
    # Whether a daily build may keep the rows available before the last build and compute only the
    # newer ones (``usecase_store.build_feature_table``). That holds when a row's values and its
    # ``available_at`` depend on the events before it alone; a view whose rows are anchored to the
    # clock (churn's weeks end on the day before ``$as_of``, so every row moves by a day each day)
    # declares ``false`` and is rebuilt over the whole history at every build.
    incremental: bool = True

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.numeric, *self.categorical)

    @model_validator(mode="after")
    def _features(self) -> FeatureSpec:
        if not self.columns:
            raise ValueError("features: declare at least one numeric or categorical feature")
        duplicated = sorted({c for c in self.columns if self.columns.count(c) > 1})
        if duplicated:
            raise ValueError(f"features: {duplicated} declared more than once")
        empty = [c for c, levels in self.categorical.items() if not levels]
        if empty:
            raise ValueError(f"features: categorical {empty} need at least one level")
        return self


class LabelSpec(_Spec):
    sql: str
    column: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    horizon_days: Annotated[int, Field(ge=0, le=3660)]
    # multiclass only: the classes, in the order of the model's outputs
    classes: tuple[str, ...] | None = None
    # binary only, optional: labels whose window has not closed yet but that were observed at least
    # this many days are known early (a positive already reported is a known positive; the rest are
    # provisional negatives): a retrain inside a decay episode learns from them and the shadow
    # comparison of an episode takes them as evidence (``mlops.core.retraining``). Under horizon_days.
    early_after_days: Annotated[int, Field(ge=1, le=3660)] | None = None


_OBJECTIVES = {
    "binary": ("binary", "cross_entropy"),
    "multiclass": ("multiclass", "multiclassova"),
    "regression": ("regression", "regression_l1", "huber", "fair", "poisson", "quantile", "mape", "gamma",
                   "tweedie"),
}


# The performance metric the decay rule watches, by problem type, its default first: a use case's
# ``monitoring`` block may choose another (``decay_metric``): a binary use case with rare positives
# (fraud) decays on average precision (PR AUC), which collapses where ROC AUC barely moves.
DECAY_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("roc_auc", "average_precision"),
    "multiclass": ("roc_auc",),
    "regression": ("rmse",),
}


def _realized_after_problem(days, problem_type: str, horizon_days: int) -> str | None:
    """What is wrong with ``monitoring.realized_after_days`` (None if nothing): realized performance
    on each prediction's label as known that many days after its day (binary labels only: a positive
    already reported is known), at most the label's horizon."""
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        return f"monitoring.realized_after_days {days!r} must be a whole number of days >= 1"
    if problem_type != "binary":
        return (f"monitoring.realized_after_days: early realized labels are for a binary label (a positive "
                f"already reported is known); problem_type is {problem_type!r}")
    if days > horizon_days:
        return f"monitoring.realized_after_days {days} must be at most label.horizon_days {horizon_days}"
    return None


# How the decay rule reads the chunks (the use case's ``monitoring.decay_rule``): ``consecutive`` (the
# default): the newest ``consecutive_chunks`` chunks each under the floor; ``pooled``: those chunks
# pooled as one sample, its metric's one-sided upper bound under the floor (``decay_confidence``). A
# rare positive class (fraud: a handful of positives a day) gives daily values that swing across the
# floor without any drift, so a run of daily chunks each under it comes late or never.
DECAY_RULES = ("consecutive", "pooled")
# What a use case's ``monitoring`` block may set: the decay thresholds (``mlops.core.monitoring.
# DECAY_DEFAULTS``), the decay metric and rule, and the realized labels' age.
MONITORING_KEYS = ("max_auc_drop", "max_ap_drop", "max_rmse_increase", "consecutive_chunks", "decay_metric",
                   "decay_rule", "realized_after_days")


def decay_rule_problem(problem_type: str, rule: Any) -> str | None:
    """What is wrong with ``rule`` as the decay rule of a ``problem_type`` use case, or None."""
    if rule not in DECAY_RULES:
        return f"monitoring.decay_rule {rule!r} is not a decay rule; known: {list(DECAY_RULES)}"
    if rule == "pooled" and problem_type != "binary":
        return (f"monitoring.decay_rule 'pooled' judges a binary metric on pooled chunks; problem_type is "
                f"{problem_type!r}")
    return None


def decay_metric_problem(problem_type: str, metric: Any) -> str | None:
    """What is wrong with ``metric`` as the decay metric of a ``problem_type`` use case, or None."""
    choices = DECAY_METRICS.get(problem_type, ())
    if metric in choices:
        return None
    known = sorted({m for ms in DECAY_METRICS.values() for m in ms})
    if not isinstance(metric, str) or metric not in known:
        return f"monitoring.decay_metric {metric!r} is not a decay metric; known: {known}"
    return (f"monitoring.decay_metric {metric!r} does not fit problem_type {problem_type!r}; "
            f"use one of {choices}")


class ModelSpec(_Spec):
    objective: str
    params: dict[str, Any] = Field(default_factory=dict)
    num_boost_round: Annotated[int, Field(ge=1, le=100_000)] = 200
    # Rows of the latest prediction dates held out for the gates and as the monitoring reference.
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    # Training rows whose label window (this many days from their prediction time) reaches into the
    # holdout are left out of training, so no label the model learns from overlaps the rows it is
    # judged on (churn: its 30-day window). 0: every row before the holdout trains.
    embargo_days: Annotated[int, Field(ge=0, le=3660)] = 0


class ServingSpec(_Spec):
    # The request names an entity whose features come from the online snapshot...
    lookup: bool = True
    # ...and/or carries fields of its own (scored at request time: a payment's amount, say).
    request_fields: tuple[ColumnSpec, ...] = ()


class SimulatorSpec(_Spec):
    module: str = "simulator.py"  # file in the use case's folder
    function: str = "simulate"


class UseCase(_Spec):
    """One AI feature of the product, as declared in its folder."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    title: str
    description: str = ""
    entity: EntitySpec
    problem_type: Literal["binary", "multiclass", "regression"]
    tables: tuple[TableSpec, ...]
    features: FeatureSpec
    label: LabelSpec
    model: ModelSpec
    gates: dict[str, Any] = Field(default_factory=dict)  # overrides of the gate policy's thresholds
    # Overrides of the monitoring policy's decay thresholds, and the decay metric (DECAY_METRICS).
    monitoring: dict[str, Any] = Field(default_factory=dict)
    serving: ServingSpec = ServingSpec()
    simulator: SimulatorSpec | None = None
    # Where the declaration was read from (set by load_usecase).
    folder: Path | None = None

    @field_validator("tables")
    @classmethod
    def _unique_tables(cls, tables: tuple[TableSpec, ...]) -> tuple[TableSpec, ...]:
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"tables: {sorted({n for n in names if names.count(n) > 1})} declared more than once")
        return tables

    @model_validator(mode="after")
    def _consistent(self) -> UseCase:
        if self.model.objective not in _OBJECTIVES[self.problem_type]:
            raise ValueError(f"model.objective {self.model.objective!r} does not fit problem_type "
                             f"{self.problem_type!r}; use one of {_OBJECTIVES[self.problem_type]}")
        if "decay_metric" in self.monitoring:
            problem = decay_metric_problem(self.problem_type, self.monitoring["decay_metric"])
            if problem:
                raise ValueError(problem)
        unknown = sorted(set(self.monitoring) - set(MONITORING_KEYS))
        if unknown:
            raise ValueError(f"monitoring: unknown key(s) {unknown}; known: {list(MONITORING_KEYS)}")
        if "decay_rule" in self.monitoring:
            problem = decay_rule_problem(self.problem_type, self.monitoring["decay_rule"])
            if problem:
                raise ValueError(problem)
        if "realized_after_days" in self.monitoring:
            problem = _realized_after_problem(self.monitoring["realized_after_days"], self.problem_type,
                                              self.label.horizon_days)
            if problem:
                raise ValueError(problem)
        if self.problem_type == "multiclass" and not self.label.classes:
            raise ValueError("label.classes: a multiclass use case lists its classes")
        early = self.label.early_after_days
        if early is not None and self.problem_type != "binary":
            raise ValueError(f"label.early_after_days: early labels are for a binary label (a positive already "
                             f"reported is known); problem_type is {self.problem_type!r}")
        if early is not None and early >= self.label.horizon_days:
            raise ValueError(f"label.early_after_days {early} must be under label.horizon_days "
                             f"{self.label.horizon_days}: a label observed that long has matured")
        if self.label.column in self.features.columns:
            raise ValueError(f"label.column {self.label.column!r} is also a feature")
        table = next((t for t in self.tables if t.name == self.features.clock_table), None)
        if table is None:
            raise ValueError(f"features.clock_table {self.features.clock_table!r} is not one of the declared tables")
        if self.features.clock_column not in table.column_names:
            raise ValueError(f"features.clock_column {self.features.clock_column!r} is not a column of "
                             f"{table.name}")
        clash = set(self.features.columns) & {f.name for f in self.serving.request_fields}
        if clash:
            raise ValueError(f"serving.request_fields {sorted(clash)} are also looked-up features")
        return self

    # --- what the lifecycle derives from the declaration -----------------------------------------
    @property
    def feature_key(self) -> str:
        """The key of the feature view and of the online snapshot (the entity's unless declared)."""
        return self.features.key or self.entity.key

    @property
    def request_field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.serving.request_fields)

    def registered_model_name(self, tenant: str) -> str:
        from mlops.core.names import registered_model_name

        return registered_model_name(tenant, self.name)

    def table(self, name: str) -> TableSpec:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(f"use case {self.name!r} declares no table {name!r}")

    @cached_property
    def feature_sql(self) -> str:
        return self._read(self.features.sql)

    @cached_property
    def labels_sql(self) -> str:
        return self._read(self.label.sql)

    def _read(self, name: str) -> str:
        if self.folder is None:
            raise UseCaseError(f"use case {self.name!r} was not loaded from a folder")
        return (self.folder / name).read_text()


def _read_mapping(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UseCaseError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise UseCaseError(f"{path}: expected a mapping of fields, got {type(raw).__name__}")
    return raw


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())


class _Tables(_Spec):
    tables: tuple[TableSpec, ...]


def load_tables(path: Path | str) -> dict[str, TableSpec]:
    """The raw tables declared in a YAML file's ``tables`` list (the same fields as a use case's
    ``tables``), by name; every problem names the file and the field."""
    path = Path(path)
    try:
        tables = _Tables(**_read_mapping(path)).tables
    except ValidationError as exc:
        raise UseCaseError(f"{path}: {_problems(exc)}") from None
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise UseCaseError(f"{path}: tables: a table is declared twice")
    return {t.name: t for t in tables}


def load_usecase(folder: Path | str, file: str = USECASE_FILE) -> UseCase:
    """Read and check the use case declared in ``folder`` (its ``file``); every problem names file and
    field. ``tables`` is a list of tables, or the name of a YAML file in the folder whose ``tables``
    list declares them (``load_tables``), which the platform's own code may read too."""
    folder = Path(folder).resolve()
    path = folder / file
    if not path.is_file():
        raise UseCaseError(f"{folder}: no {file}")
    raw = _read_mapping(path)
    if raw.get("name") != folder.name:
        raise UseCaseError(f"{path}: name {raw.get('name')!r} must be the folder's name {folder.name!r}")
    if isinstance(raw.get("tables"), str):
        tables_file = raw["tables"]
        if Path(tables_file).name != tables_file or not (folder / tables_file).is_file():
            raise UseCaseError(f"{path}: tables: no file {tables_file!r} in {folder}")
        raw = {**raw, "tables": list(load_tables(folder / tables_file).values())}
    try:
        usecase = UseCase(**raw, folder=folder)
    except ValidationError as exc:
        raise UseCaseError(f"{path}: {_problems(exc)}") from None
    for field, name in (("features.sql", usecase.features.sql), ("label.sql", usecase.label.sql),
                        *((("simulator.module", usecase.simulator.module),) if usecase.simulator else ())):
        if Path(name).name != name or not (folder / name).is_file():
            raise UseCaseError(f"{path}: {field}: no file {name!r} in {folder}")
    for field, name, sql in (("features.sql", usecase.features.sql, usecase.feature_sql),
                             ("label.sql", usecase.label.sql, usecase.labels_sql)):
        if not re.match(r"^\s*(--[^\n]*\n\s*)*(WITH|SELECT)\b", sql, flags=re.IGNORECASE):
            raise UseCaseError(f"{path}: {field}: {name} must be one SELECT (or WITH ... SELECT) statement")
    return usecase


def discover_usecases(roots: list[Path]) -> dict[str, UseCase]:
    """Every use case under ``roots`` (each a folder of use-case folders), by name. Two use cases of
    one name, or two declarations of one table that differ, are refused."""
    found: dict[str, UseCase] = {}
    tables: dict[str, tuple[str, TableSpec]] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if (p / USECASE_FILE).is_file()):
            usecase = load_usecase(folder)
            if usecase.name in found:
                raise UseCaseError(f"use case {usecase.name!r} is declared twice: {found[usecase.name].folder} "
                                   f"and {folder}")
            for table in usecase.tables:
                owner = tables.setdefault(table.name, (usecase.name, table))
                if owner[1] != table:
                    raise UseCaseError(f"table {table.name!r} is declared differently by use cases {owner[0]!r} "
                                       f"and {usecase.name!r}; a tenant's warehouse holds one table of a name")
            found[usecase.name] = usecase
    return found


def usecase_roots(extra: list[Path | str] | None = None) -> list[Path]:
    """Where use cases are declared: the project's ``usecases/``, the folders in
    ``$MLOPS_USECASE_PATHS`` and ``extra``."""
    import os

    from mlops.core.environment import PROJECT_ROOT

    configured = [p for p in os.environ.get(USECASE_PATHS_ENV, "").split(os.pathsep) if p]
    return [PROJECT_ROOT / "usecases", *(Path(p) for p in configured), *(Path(p) for p in extra or [])]
