"""The warehouse side of any declared use case (``mlops.core.usecase``): raw tables, the offline
feature table, point-in-time training sets and the online snapshot, all from the declaration.

The functions take an open DuckDB connection and leave the transaction to the caller. Every
identifier that reaches SQL comes from the declaration (checked by ``_ident``); every value is a
bound parameter. The feature and label SQL see only the parameters of their contracts
(``FEATURE_VIEW_CONTRACT``, ``LABELS_CONTRACT``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from mlops.core.online import POINTER_FILE, compare_rows, publish_snapshot
from mlops.core.usecase import UseCase, UseCaseError

AVAILABLE_AT = "available_at"
PREDICTION_TIME = "prediction_time"
START_OF_TIME = pd.Timestamp("1970-01-01")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def _ident(name: str) -> str:
    """A declared name, quoted for SQL; anything but a plain identifier is refused."""
    if not _IDENT.match(name):
        raise UseCaseError(f"{name!r} is not a plain SQL identifier")
    return f'"{name}"'


def _bind(sql: str, values: dict) -> dict:
    """The parameters ``sql`` uses (DuckDB refuses extra ones); an unknown ``$name`` is an error."""
    used = set(_PARAM.findall(sql))
    unknown = sorted(used - set(values))
    if unknown:
        raise UseCaseError(f"the SQL uses parameters {unknown}; only {sorted(values)} are bound")
    return {k: v for k, v in values.items() if k in used}


def feature_table(uc: UseCase) -> str:
    return f"{uc.name}_features"


def training_table(uc: UseCase) -> str:
    return f"{uc.name}_training_set"


def feature_columns(uc: UseCase) -> list[str]:
    """The feature table's columns, in order: its key (``uc.feature_key``), ``available_at``, the features."""
    return [uc.feature_key, AVAILABLE_AT, *uc.features.columns]


def feature_view_version(uc: UseCase) -> str:
    """A version of what a feature row and a label mean: the SQL and the declared features and label."""
    spec = [uc.feature_sql, uc.labels_sql, uc.entity.model_dump(), uc.features.model_dump(),
            # early labels change when a label is used, not what it means
            uc.label.model_dump(exclude={"early_after_days"})]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- raw tables --------------------------------------------------------------------------------------
def ensure_tables(con: duckdb.DuckDBPyConnection, uc: UseCase) -> None:
    """Create every declared raw table that does not exist yet."""
    for table in uc.tables:
        con.execute(table.ddl())


def load_simulator(uc: UseCase) -> Callable:
    """The use case's simulator function, imported from its folder by path."""
    if uc.simulator is None:
        raise UseCaseError(f"use case {uc.name!r} declares no simulator")
    if uc.folder is None:
        raise UseCaseError(f"use case {uc.name!r} was not loaded from a folder")
    path = Path(uc.folder) / uc.simulator.module
    if not path.is_file():
        raise UseCaseError(f"use case {uc.name!r}: simulator.module: no file {path}")
    # One module name per folder: two folders' simulators never replace each other in sys.modules.
    digest = hashlib.sha256(str(Path(uc.folder).resolve()).encode()).hexdigest()[:12]
    name = f"mlops_usecase_{uc.name}_{digest}_simulator"
    stamp = path.stat().st_mtime_ns
    module = sys.modules.get(name)
    # The module is imported once per process while its file is unchanged: a simulator caches its
    # world (fraud's whole horizon), which a daily cycle would otherwise simulate again every day.
    if module is None or getattr(module, "_mlops_loaded_from", None) != (str(path), stamp):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise UseCaseError(f"use case {uc.name!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
        module._mlops_loaded_from = (str(path), stamp)
        sys.modules[name] = module
    function = getattr(module, uc.simulator.function, None)
    if not callable(function):
        raise UseCaseError(f"use case {uc.name!r}: {path} has no function {uc.simulator.function!r}")
    return function


def _validate(uc: UseCase, name: str, frame: pd.DataFrame) -> pd.DataFrame:
    import pandera.errors

    table = uc.table(name)
    try:
        return table.pandera_schema().validate(frame, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        missing = cases["check"].astype(str) == "column_in_dataframe"
        problems = [f"column {c}: missing from the frame" for c in cases.loc[missing, "failure_case"].astype(str)]
        cases = cases.loc[~missing]
        for (column, check), group in cases.groupby([cases["column"].fillna("(table)"), cases["check"].astype(str)],
                                                    sort=True):
            values = group["failure_case"].dropna().astype(str).unique()[:5].tolist()
            problems.append(f"column {column}: {check}" + (f" (e.g. {values})" if values else ""))
        raise ValueError(f"table {name}: {len(problems)} problem(s): " + "; ".join(problems)) from None


SIMULATOR_STATE_DDL = """
CREATE TABLE IF NOT EXISTS usecase_simulator_state (
    use_case VARCHAR NOT NULL, source VARCHAR NOT NULL, world VARCHAR NOT NULL, loaded_until TIMESTAMP,
    PRIMARY KEY (use_case, source)
)
"""


def world_fingerprint(uc: UseCase, spec) -> str:
    """What a simulated world depends on besides its clock: the tenant's settings (``spec.world``,
    ``today`` left out) and the simulator's code."""
    code = hashlib.sha256((Path(uc.folder) / uc.simulator.module).read_bytes()).hexdigest()[:16] \
        if uc.simulator is not None and uc.folder is not None else ""
    return f"{uc.name}|{spec.world}|{code}"


def replace_rows(con: duckdb.DuckDBPyConnection, uc: UseCase, tables: dict[str, pd.DataFrame],
                 source: str, world: str | None = None) -> dict[str, int]:
    """Validate every frame against its table's declared schema, then replace the rows of ``source``
    in each table by the frame's. Nothing is written unless every frame is valid.

    ``world`` (a simulated world's fingerprint, ``world_fingerprint``): when the same world was
    loaded before at an earlier clock, only its rows from the newest day loaded then on are
    validated and replaced (a simulated clock only adds rows, each visible from its table's time
    column on: a payment once made, a chargeback once reported); tables without a time column, and
    any other world, are replaced whole. Returns the rows written per table."""
    declared = {t.name for t in uc.tables}
    unknown = sorted(set(tables) - declared)
    if unknown:
        raise ValueError(f"use case {uc.name!r} declares no tables {unknown}; it declares {sorted(declared)}")
    since = None
    if world is not None:
        con.execute(SIMULATOR_STATE_DDL)
        state = con.execute("SELECT world, loaded_until FROM usecase_simulator_state WHERE use_case = ? AND source = ?",
                            [uc.name, source]).fetchone()
        since = pd.Timestamp(state[1]) if state is not None and state[0] == world and state[1] is not None else None

    def newer(name: str, frame: pd.DataFrame) -> pd.DataFrame:
        column = uc.table(name).time_column
        if since is None or column is None:
            return frame
        return frame[pd.to_datetime(frame[column]) >= since]

    valid = {name: _validate(uc, name, newer(name, frame)) for name, frame in tables.items()}
    ensure_tables(con, uc)
    counts = {}
    for name, frame in valid.items():
        table = uc.table(name)
        view = f"_mlops_rows_{name}"
        con.register(view, frame.loc[:, table.column_names].reset_index(drop=True))
        try:
            if since is None or table.time_column is None:
                con.execute(f"DELETE FROM {_ident(name)} WHERE source = ?", [source])  # noqa: S608 - declared name
            else:
                con.execute(f"DELETE FROM {_ident(name)} WHERE source = ? AND {_ident(table.time_column)} >= ?",  # noqa: S608
                            [source, since.to_pydatetime()])
            columns = ", ".join(_ident(c.name) for c in table.columns)
            values = ", ".join(f"CAST({_ident(c.name)} AS {c.sql_type})" for c in table.columns)
            con.execute(f"INSERT INTO {_ident(name)} ({columns}, source) "  # noqa: S608 - declared names
                        f"SELECT {values}, ? FROM {_ident(view)}", [source])
        finally:
            con.unregister(view)
        counts[name] = len(frame)
    if world is not None:
        clock_table, clock_column = uc.features.clock_table, uc.features.clock_column
        # the simulator's own newest row (an inbox delivery may reach further)
        newest = con.execute(f"SELECT max({_ident(clock_column)}) FROM {_ident(clock_table)} "  # noqa: S608
                             "WHERE source = ?", [source]).fetchall()[0][0]
        loaded_until = None if newest is None else pd.Timestamp(newest).normalize().to_pydatetime()
        con.execute("INSERT OR REPLACE INTO usecase_simulator_state VALUES (?, ?, ?, ?)",
                    [uc.name, source, world, loaded_until])
    return counts


# --- the clock and the offline side ---------------------------------------------------------------
def clock(con: duckdb.DuckDBPyConnection, uc: UseCase) -> pd.Timestamp:
    """``$as_of``: midnight after the newest ``features.clock_column`` of ``features.clock_table``."""
    table, column = uc.features.clock_table, uc.features.clock_column
    newest = con.execute(f"SELECT max({_ident(column)}) FROM {_ident(table)}").fetchall()[0][0]  # noqa: S608
    if newest is None:
        raise ValueError(f"{table} is empty: there is no clock (newest {column}) to build features from")
    return pd.Timestamp(newest).normalize() + pd.Timedelta(days=1)


def _feature_select(uc: UseCase, inner: str) -> str:
    return f"SELECT {', '.join(_ident(c) for c in feature_columns(uc))} FROM ({inner}\n) _feature_view"  # noqa: S608


def _check_output(con, sql: str, params: dict, required: list[str], what: str, file: str) -> None:
    """``sql`` returns every required column, or an error names the missing ones and the file."""
    cursor = con.execute(f"SELECT * FROM ({sql}\n) _probe LIMIT 0", _bind(sql, params))  # noqa: S608
    returned = {d[0] for d in cursor.description}
    cursor.fetchall()  # DuckDB wants a result finished before the connection does other work
    missing = [c for c in required if c not in returned]
    if missing:
        raise ValueError(f"{what} {file} does not return the columns {missing} (it returns {sorted(returned)})")


def _feature_params(uc: UseCase, as_of: pd.Timestamp, since: pd.Timestamp) -> dict:
    return {"as_of": as_of.to_pydatetime(), "since": since.to_pydatetime()}


FEATURE_STATE_DDL = """
CREATE TABLE IF NOT EXISTS usecase_feature_state (
    use_case VARCHAR PRIMARY KEY, view_version VARCHAR NOT NULL, built_as_of TIMESTAMP NOT NULL,
    raw_before VARCHAR NOT NULL, built_since TIMESTAMP NOT NULL
)
"""


def feature_build_state(con: duckdb.DuckDBPyConnection, uc: UseCase) -> dict | None:
    """The last build of the use case's feature table: ``built_as_of`` (its clock), ``built_since``
    (the start of time: a full build), ``view_version`` and ``raw_before`` (``_raw_before`` then)."""
    con.execute(FEATURE_STATE_DDL)
    row = con.execute("SELECT view_version, built_as_of, raw_before, built_since FROM usecase_feature_state "
                      "WHERE use_case = ?", [uc.name]).fetchone()
    if row is None:
        return None
    return {"view_version": row[0], "built_as_of": pd.Timestamp(row[1]), "raw_before": row[2],
            "built_since": pd.Timestamp(row[3])}


def _raw_before(con: duckdb.DuckDBPyConnection, uc: UseCase, before: pd.Timestamp) -> str:
    """A fingerprint of every raw row a feature row available at or before ``before`` may read: the
    rows of each table whose time column is before it (a table without one: every row), by content
    (row count and the XOR of the rows' hashes, the order of the rows left out)."""
    parts = []
    for table in uc.tables:
        columns = ", ".join(_ident(c) for c in [*table.column_names, "source"])
        where, params = "", []
        if table.time_column is not None:
            where, params = f"WHERE {_ident(table.time_column)} < ?", [before.to_pydatetime()]
        count, digest = con.execute(f"SELECT count(*), bit_xor(hash({columns})) FROM {_ident(table.name)} "  # noqa: S608
                                    f"{where}", params).fetchall()[0]
        parts.append(f"{table.name}:{count}:{digest}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def build_feature_table(con: duckdb.DuckDBPyConnection, uc: UseCase) -> int:
    """Bring the offline feature table up to the clock; returns its rows.

    Incremental where that gives the same table: when the feature view is the one built last time
    at clock A and no raw row before A changed since (``_raw_before``), the rows available before A
    are kept (by the feature view's contract they read only events before their ``available_at``)
    and only those from A on are computed again, with ``$since`` = A. Otherwise, and the first
    time, the whole history is built. A daily load of new events so costs a day's rows; a delivery
    that changes an old row (a corrected payment, a new attribute) rebuilds everything, and so does
    every build of a view declared ``features.incremental: false``. The state's ``built_since``
    says which (the start of time: a full build)."""
    as_of = clock(con, uc)
    sql = uc.feature_sql
    table, version = _ident(feature_table(uc)), feature_view_version(uc)
    state = feature_build_state(con, uc)
    exists = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?",
                         [feature_table(uc)]).fetchall()[0][0]
    since = START_OF_TIME
    if uc.features.incremental and state is not None and exists and state["view_version"] == version:
        built = state["built_as_of"]
        if built <= as_of and _raw_before(con, uc, built) == state["raw_before"]:
            since = built
    params = _feature_params(uc, as_of, since)
    _check_output(con, sql, params, feature_columns(uc), "the feature SQL", str(Path(uc.folder or ".") / uc.features.sql))
    if since == START_OF_TIME:
        con.execute(f"CREATE OR REPLACE TABLE {table} AS {_feature_select(uc, sql)}", _bind(sql, params))
    else:
        con.execute(f"DELETE FROM {table} WHERE {AVAILABLE_AT} >= ?", [since.to_pydatetime()])  # noqa: S608
        con.execute(f"INSERT INTO {table} SELECT * FROM ({_feature_select(uc, sql)}) _new "  # noqa: S608
                    f"WHERE {AVAILABLE_AT} >= $since_", {**_bind(sql, params), "since_": since.to_pydatetime()})
    raw_before = _raw_before(con, uc, as_of) if uc.features.incremental else ""  # read by incremental builds only
    con.execute("INSERT OR REPLACE INTO usecase_feature_state VALUES (?, ?, ?, ?, ?)",
                [uc.name, version, as_of.to_pydatetime(), raw_before, since.to_pydatetime()])
    return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]  # noqa: S608


def provisional_table(uc: UseCase) -> str:
    return f"{uc.name}_provisional_set"


# Which label rows a set keeps, by the age of the label's window at ``$as_of``: the training set the
# closed windows, the provisional set those observed ``$early_after_days`` or more but not closed yet.
_MATURED = "CAST({pt} AS TIMESTAMP) + to_days(CAST($horizon_days AS INTEGER)) <= CAST($as_of AS TIMESTAMP)"
_EARLY = ("CAST({pt} AS TIMESTAMP) + to_days(CAST($horizon_days AS INTEGER)) > CAST($as_of AS TIMESTAMP) "
          "AND CAST({pt} AS TIMESTAMP) + to_days(CAST($early_after_days AS INTEGER)) <= CAST($as_of AS TIMESTAMP)")


def _labelled_set(con: duckdb.DuckDBPyConnection, uc: UseCase, table: str, keep: str, extra: dict) -> pd.DataFrame:
    """The label rows ``keep`` selects (run at ``$as_of``, the clock: a positive reported before it is
    known), joined point in time to the offline feature table, stored as ``table``."""
    as_of = clock(con, uc)
    key, label, fkey = _ident(uc.entity.key), _ident(uc.label.column), _ident(uc.feature_key)
    sql = uc.labels_sql
    params = {"as_of": as_of.to_pydatetime(), "horizon_days": int(uc.label.horizon_days), **extra}
    # Beside the entity key and the label: the feature view's key (when it differs) and the request
    # fields, as the request carried them at prediction time.
    carried = [c for c in dict.fromkeys([uc.feature_key, *uc.request_field_names]) if c != uc.entity.key]
    _check_output(con, sql, params, [uc.entity.key, PREDICTION_TIME, uc.label.column, *carried], "the label SQL",
                  str(Path(uc.folder or ".") / uc.label.sql))
    features = ", ".join(f"f.{_ident(c)}" for c in uc.features.columns)
    carried_sql = "".join(f", {_ident(c)}" for c in carried)
    carried_out = "".join(f", l.{_ident(c)}" for c in carried if c != uc.feature_key)
    carried_key = f", l.{fkey}" if uc.feature_key != uc.entity.key else ""
    # The labels go in as a CTE: an ASOF join against a table created earlier in the same
    # transaction is planned without statistics and runs far slower.
    query = f"""
        WITH labels AS (
            SELECT {key}, CAST({PREDICTION_TIME} AS TIMESTAMP) AS {PREDICTION_TIME}, {label}{carried_sql}
            FROM ({sql}
            ) _labels
            WHERE {keep.format(pt=PREDICTION_TIME)}
        )
        SELECT l.{key}, l.{PREDICTION_TIME}, l.{label}{carried_key}, f.{AVAILABLE_AT}, {features}{carried_out}
        FROM labels l
        ASOF JOIN {_ident(feature_table(uc))} f
          ON l.{fkey} = f.{fkey} AND l.{PREDICTION_TIME} >= f.{AVAILABLE_AT}
        ORDER BY l.{PREDICTION_TIME}, l.{key}
    """  # noqa: S608 - declared names, checked by _ident
    con.execute(f"CREATE OR REPLACE TABLE {_ident(table)} AS {query}", _bind(query, params))
    return con.execute(f"SELECT * FROM {_ident(table)} ORDER BY {PREDICTION_TIME}, {key}").df()  # noqa: S608


def labels_as_of(con: duckdb.DuckDBPyConnection, uc: UseCase, as_of, since=None, until=None) -> pd.DataFrame:
    """The entity key, ``prediction_time`` and the label as the labels SQL gives them at ``as_of``
    (every row, matured or not): what was known of each label then; only the rows predicted in
    [``since``, ``until``) when given."""
    key, label = _ident(uc.entity.key), _ident(uc.label.column)
    sql = uc.labels_sql
    params = {"as_of": pd.Timestamp(as_of).to_pydatetime(), "horizon_days": int(uc.label.horizon_days)}
    query = (f"SELECT {key}, CAST({PREDICTION_TIME} AS TIMESTAMP) AS {PREDICTION_TIME}, {label} "  # noqa: S608
             f"FROM ({sql}\n) _labels")
    if since is not None:
        query = f"SELECT * FROM ({query}) _known WHERE {PREDICTION_TIME} >= $since AND {PREDICTION_TIME} < $until"  # noqa: S608
        params |= {"since": pd.Timestamp(since).to_pydatetime(), "until": pd.Timestamp(until).to_pydatetime()}
    return con.execute(query, _bind(query, params)).df()


def censored_labels(con: duckdb.DuckDBPyConnection, uc: UseCase, keys: pd.Series, times: pd.Series,
                    after_days: int, origin) -> np.ndarray:
    """Each prediction's label as known ``after_days`` after the midnight that starts its day
    (``keys``: entity keys, ``times``: prediction times): the labels SQL run at that clock
    (``labels_as_of``), e.g. fraud = a chargeback reported within two weeks. A censored label, but
    one rule for a model's reference and for everything it scores later, so their realized
    performance compares weeks before the labels mature. NaN where that clock is after ``origin``
    (not known yet) or the labels SQL has no row for the prediction."""
    days = pd.to_datetime(pd.Series(times).reset_index(drop=True)).dt.floor("D")
    wanted = pd.DataFrame({"k": pd.Series(keys).astype(str).to_numpy(), "day": days,
                           "clock": days + pd.Timedelta(days=int(after_days))})
    out = np.full(len(wanted), np.nan)
    key, label = uc.entity.key, uc.label.column
    for clock, rows in wanted[wanted["clock"] <= pd.Timestamp(origin)].groupby("clock"):
        day = clock - pd.Timedelta(days=int(after_days))
        known = labels_as_of(con, uc, clock, since=day, until=day + pd.Timedelta(days=1))
        found = dict(zip(known[key].astype(str), known[label].astype(float), strict=True))
        out[rows.index.to_numpy()] = rows["k"].map(found).to_numpy(dtype=float)
    return out


def build_training_set(con: duckdb.DuckDBPyConnection, uc: UseCase) -> pd.DataFrame:
    """Mature labels joined point in time to the offline feature table, stored as the training table.

    A label at ``prediction_time`` gets the newest feature row with ``available_at <= prediction_time``
    (an ASOF join); labels whose window has not closed by ``$as_of`` are left out, and so are labels
    of entities without a feature row by then.
    """
    return _labelled_set(con, uc, training_table(uc), _MATURED, {})


def training_set_problems(uc: UseCase, frame: pd.DataFrame, clock: pd.Timestamp,
                          max_staleness_days: int | None = None) -> list[str]:
    """What makes a training set unfit to train on (empty when nothing): no rows, rows without a
    label, two rows of one entity and prediction time, a feature row newer than its label (a leak),
    and, with ``max_staleness_days``, a newest label older than that at ``clock`` (deliveries
    stopped, so the model would learn from an old world)."""
    if frame.empty:
        return ["no mature labels joined to features"]
    problems = []
    missing = int(frame[uc.label.column].isna().sum())
    if missing:
        problems.append(f"{missing} rows without a label")
    twice = int(frame.duplicated([uc.entity.key, PREDICTION_TIME]).sum())
    if twice:
        problems.append(f"{twice} rows repeat an {uc.entity.name} and prediction time")
    leaks = int((frame[AVAILABLE_AT] > frame[PREDICTION_TIME]).sum())
    if leaks:
        problems.append(f"{leaks} rows use features newer than their label (leak)")
    if max_staleness_days is not None:
        newest = pd.Timestamp(frame[PREDICTION_TIME].max())
        age = (pd.Timestamp(clock) - newest).days
        if age > int(max_staleness_days):
            problems.append(f"the newest label (predicted {newest.date()}) is {age} days old at the clock "
                            f"{pd.Timestamp(clock).date()}: older than gates.max_label_staleness_days "
                            f"{max_staleness_days}")
    return problems


def build_provisional_set(con: duckdb.DuckDBPyConnection, uc: UseCase) -> pd.DataFrame:
    """Early labels (``label.early_after_days``): the label rows whose window has not closed by the
    clock but that were observed at least ``early_after_days``, with the label as known so far (a
    positive reported before the clock is a known positive; the rest are provisional negatives),
    joined point in time exactly as the training set (the same SQL), stored as
    ``<use case>_provisional_set``, with the days each was observed (``observed_days``). Training
    evidence for a retrain in a decay episode only (``mlops.core.retraining``)."""
    early = uc.label.early_after_days
    if early is None:
        raise UseCaseError(f"use case {uc.name!r} declares no label.early_after_days: it has no early labels")
    frame = _labelled_set(con, uc, provisional_table(uc), _EARLY, {"early_after_days": int(early)})
    observed = (clock(con, uc) - pd.to_datetime(frame[PREDICTION_TIME])) / pd.Timedelta(days=1)
    return frame.assign(observed_days=observed.to_numpy())


# --- the online side -------------------------------------------------------------------------------
def compute_online_snapshot(con: duckdb.DuckDBPyConnection, uc: UseCase) -> pd.DataFrame:
    """The newest feature row per entity as of the clock, from the feature SQL over the look-back
    window only: the serving path, independent of the offline table (the skew check compares them)."""
    as_of = clock(con, uc)
    since = as_of - pd.Timedelta(days=uc.features.lookback_days)
    sql = uc.feature_sql
    params = _feature_params(uc, as_of, since)
    _check_output(con, sql, params, feature_columns(uc), "the feature SQL", str(Path(uc.folder or ".") / uc.features.sql))
    key = _ident(uc.feature_key)
    query = (  # declared names, checked by _ident
        f"SELECT * FROM ({_feature_select(uc, sql)}) _rows WHERE {AVAILABLE_AT} <= CAST($as_of AS TIMESTAMP) "  # noqa: S608
        f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {AVAILABLE_AT} DESC) = 1 ORDER BY {key}"
    )
    return con.execute(query, _bind(query, params)).df().reset_index(drop=True)


def offline_rows_at(con: duckdb.DuckDBPyConnection, uc: UseCase, keys: list[str], as_of) -> pd.DataFrame:
    """Offline feature rows of ``keys`` as of ``as_of``, through the same ASOF join as training."""
    key = _ident(uc.feature_key)
    spine = pd.DataFrame({uc.feature_key: list(keys), "_skew_as_of": pd.Timestamp(as_of)})
    view = f"_mlops_skew_spine_{uc.name}"
    con.register(view, spine)
    try:
        columns = ", ".join(f"f.{_ident(c)}" for c in feature_columns(uc))
        return con.execute(
            f"SELECT {columns} FROM {_ident(view)} s ASOF JOIN {_ident(feature_table(uc))} f "  # noqa: S608
            f"ON s.{key} = f.{key} AND s._skew_as_of >= f.{AVAILABLE_AT} ORDER BY f.{key}"
        ).df()
    finally:
        con.unregister(view)


def compare_feature_rows(uc: UseCase, online: pd.DataFrame, offline: pd.DataFrame, rtol: float = 1e-9) -> list[str]:
    """Every disagreement between two sets of feature rows keyed by the feature key (``compare_rows``)."""
    return compare_rows(online, offline, uc.feature_key, uc.features.columns, uc.features.categorical, rtol)


def write_online_snapshot(online_dir: Path, uc: UseCase, snapshot: pd.DataFrame, as_of) -> dict:
    """Publish ``snapshot`` as a new immutable version in ``online_dir`` (one folder per use case and
    tenant) and point ``CURRENT.json`` at it; returns the pointer."""
    return publish_snapshot(online_dir, snapshot, {"use_case": uc.name, "as_of": str(pd.Timestamp(as_of)),
                                                   "feature_view_version": feature_view_version(uc)})


def read_online_snapshot(online_dir: Path) -> tuple[dict, pd.DataFrame]:
    """The current pointer of ``online_dir`` and the snapshot it names."""
    pointer_file = Path(online_dir) / POINTER_FILE
    if not pointer_file.exists():
        raise FileNotFoundError(f"{online_dir} has no online feature snapshot yet (no {POINTER_FILE})")
    pointer = json.loads(pointer_file.read_text())
    return pointer, pd.read_parquet(Path(online_dir) / pointer["path"])
