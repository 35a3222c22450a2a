"""The generic core runs a declared use case end to end from its folder alone: the ``spend`` regression
(tests/usecase_fixtures.py) and variants of it (binary, multiclass, bad declarations), over a DuckDB
file in a temporary folder: ingest -> features -> training set -> online snapshot -> train -> gates
-> a standalone MLflow pyfunc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from mlops.core import usecase_model as um
from mlops.core import usecase_store as st
from mlops.core.hashing import content_hash
from mlops.core.usecase import UseCaseError, load_usecase
from resources.tenants import TenantSpec
from tests.usecase_fixtures import write_spend_usecase

TENANT = TenantSpec(name="acme", region="eu", n_accounts=300, seed=3, days=150, today=120)
SOURCE = "simulator"


def variant(root: Path, *, yaml: dict[str, str] | None = None, files: dict[str, dict[str, str]] | None = None):
    """The spend use case written under ``root`` with text replaced in its YAML and other files."""
    folder = write_spend_usecase(root)
    for name, replacements in {"usecase.yaml": yaml or {}, **(files or {})}.items():
        text = (folder / name).read_text()
        for old, new in replacements.items():
            assert old in text, (name, old)
            text = text.replace(old, new)
        (folder / name).write_text(text)
    return load_usecase(folder)


def ingest(uc, db: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(db))
    st.replace_rows(con, uc, st.load_simulator(uc)(TENANT), SOURCE)
    return con


@pytest.fixture(scope="module")
def spend(tmp_path_factory):
    root = tmp_path_factory.mktemp("spend")
    uc = load_usecase(write_spend_usecase(root / "usecases"))
    con = ingest(uc, root / "warehouse.duckdb")
    feature_rows = st.build_feature_table(con, uc)
    training = st.build_training_set(con, uc)
    split = um.time_split(uc, training)
    booster = um.train(uc, split.train)
    yield {"root": root, "uc": uc, "con": con, "feature_rows": feature_rows, "training": training,
           "split": split, "booster": booster, "scores": um.predict(uc, booster, split.holdout)}
    con.close()


# --- store -----------------------------------------------------------------------------------------
def test_ingest_features_and_training_set_are_point_in_time(spend):
    uc, con, training = spend["uc"], spend["con"], spend["training"]
    counts = dict(con.execute("SELECT 'raw_customers', count(*) FROM raw_customers UNION ALL "
                              "SELECT 'raw_orders', count(*) FROM raw_orders").fetchall())
    assert counts["raw_customers"] == TENANT.n_accounts and counts["raw_orders"] > 0
    assert spend["feature_rows"] > 0 and len(training) > 0
    assert list(training.columns) == [uc.entity.key, "prediction_time", uc.label.column, "available_at",
                                      *uc.features.columns]
    assert (training["available_at"] <= training["prediction_time"]).all()

    # Independently of DuckDB: the newest feature row available at each label's time.
    features = con.execute(f"SELECT * FROM {st.feature_table(uc)}").df()  # noqa: S608 - test
    expected = pd.merge_asof(
        training[[uc.entity.key, "prediction_time"]].sort_values("prediction_time"),
        features.sort_values("available_at"), left_on="prediction_time", right_on="available_at",
        by=uc.entity.key, direction="backward", allow_exact_matches=True,
    ).sort_values(["prediction_time", uc.entity.key]).reset_index(drop=True)
    pd.testing.assert_frame_equal(training[list(expected.columns)].reset_index(drop=True), expected,
                                  check_dtype=False)

    # Labels exist whose window has not closed yet; none of them reaches the training set.
    as_of = st.clock(con, uc)
    assert as_of == pd.Timestamp("2026-04-01") + pd.Timedelta(days=TENANT.today)
    raw = con.execute(uc.labels_sql, {"as_of": as_of.to_pydatetime(), "horizon_days": uc.label.horizon_days}).df()
    immature = raw["prediction_time"] + pd.Timedelta(days=uc.label.horizon_days) > as_of
    assert immature.any()
    assert (training["prediction_time"] + pd.Timedelta(days=uc.label.horizon_days) <= as_of).all()
    assert not set(raw.loc[immature, "prediction_time"]) & set(training["prediction_time"])


def test_online_snapshot_equals_offline_rows_and_is_published_atomically(spend, tmp_path):
    uc, con = spend["uc"], spend["con"]
    as_of = st.clock(con, uc)
    snapshot = st.compute_online_snapshot(con, uc)
    assert len(snapshot) == TENANT.n_accounts and snapshot[uc.entity.key].is_monotonic_increasing
    assert (snapshot["available_at"] <= as_of).all()
    offline = st.offline_rows_at(con, uc, snapshot[uc.entity.key].tolist(), as_of)
    assert st.compare_feature_rows(uc, snapshot, offline) == []
    # The comparison does see a difference.
    changed = snapshot.copy()
    changed.loc[0, "spend_7d"] += 1.0
    changed.loc[1, "region"] = "west" if changed.loc[1, "region"] != "west" else "north"
    problems = st.compare_feature_rows(uc, changed, offline)
    assert len(problems) == 2 and "spend_7d" in problems[0] and "region" in problems[1]

    first = st.write_online_snapshot(tmp_path, uc, snapshot, as_of)
    second = st.write_online_snapshot(tmp_path, uc, snapshot.head(10), as_of)
    assert (first["version"], second["version"]) == (1, 2)
    pointer, current = st.read_online_snapshot(tmp_path)
    assert pointer == second and pointer["rows"] == 10 and pointer["as_of"] == str(as_of)
    assert pointer["content_hash"] == content_hash(current)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / first["path"]), snapshot)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT.json", first["path"], second["path"]]


def test_bad_rows_are_refused_by_table_and_column_and_change_nothing(spend, tmp_path):
    uc = spend["uc"]
    frames = st.load_simulator(uc)(TENANT)
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    st.replace_rows(con, uc, frames, SOURCE)
    before = {t: content_hash(con.execute(f"SELECT * FROM {t} ORDER BY ALL").df())  # noqa: S608 - test
              for t in ("raw_customers", "raw_orders")}
    bad = frames["raw_customers"].copy()
    bad.loc[3, "region"] = "east"
    with pytest.raises(ValueError, match=r"table raw_customers.*column region.*isin.*east"):
        st.replace_rows(con, uc, {"raw_orders": frames["raw_orders"].head(5), "raw_customers": bad}, SOURCE)
    with pytest.raises(ValueError, match=r"table raw_orders: .*column amount: missing"):
        st.replace_rows(con, uc, {"raw_orders": frames["raw_orders"].drop(columns=["amount"])}, SOURCE)
    with pytest.raises(ValueError, match=r"raw_payments"):
        st.replace_rows(con, uc, {"raw_payments": bad}, SOURCE)
    after = {t: content_hash(con.execute(f"SELECT * FROM {t} ORDER BY ALL").df())  # noqa: S608 - test
             for t in ("raw_customers", "raw_orders")}
    assert after == before
    # Replacing a source's rows replaces them, not adds to them.
    assert st.replace_rows(con, uc, {"raw_orders": frames["raw_orders"].head(5)}, SOURCE) == {"raw_orders": 5}
    assert con.execute("SELECT count(*) FROM raw_orders").fetchall()[0][0] == 5
    con.close()


def test_a_feature_sql_missing_a_declared_column_is_named_with_its_file(spend, tmp_path):
    uc = variant(tmp_path, files={"features.sql": {"AS spend_28d,": "AS spend_four_weeks,"}})
    con = ingest(uc, tmp_path / "w.duckdb")
    with pytest.raises(ValueError, match=r"features\.sql.*\['spend_28d'\]"):
        st.build_feature_table(con, uc)
    con.close()


def test_the_simulator_and_the_clock_fail_clearly(tmp_path):
    uc = variant(tmp_path, yaml={"function: simulate": "function: nowhere"})
    with pytest.raises(UseCaseError, match=r"simulator\.py has no function 'nowhere'"):
        st.load_simulator(uc)
    con = duckdb.connect()
    st.ensure_tables(con, uc)
    with pytest.raises(ValueError, match="raw_orders is empty"):
        st.clock(con, uc)


# --- model and gates -------------------------------------------------------------------------------
def test_the_spend_model_beats_the_mean_and_passes_every_default_gate(spend):
    uc, split, scores = spend["uc"], spend["split"], spend["scores"]
    assert split.train["prediction_time"].max() < split.cutoff <= split.holdout["prediction_time"].min()
    metrics = um.evaluate(uc, split.holdout[uc.label.column], scores)
    assert metrics["r2"] > 0.2, metrics
    assert set(metrics) == {"rmse", "mae", "r2", "mean_target"}
    outcomes = um.evaluate_gates(uc, split.holdout, scores, spend["booster"], um.model_bytes(spend["booster"]))
    assert tuple(o.gate for o in outcomes) == um.gate_names(uc) == (
        "r2_gate", "fairness_gate", "latency_gate", "model_size_gate")
    assert all(o.passed for o in outcomes), outcomes
    assert "not declared" in outcomes[1].reason


def test_thresholds_from_the_declaration_fail_gates_with_reasons(spend, tmp_path):
    split, scores, booster = spend["split"], spend["scores"], spend["booster"]
    strict = variant(tmp_path / "strict", yaml={"gates: {min_r2: 0.2}": "gates: {min_r2: 0.99, max_model_bytes: 1000}"})
    outcomes = {o.gate: o for o in um.evaluate_gates(strict, split.holdout, scores, booster, um.model_bytes(booster))}
    assert not outcomes["r2_gate"].passed and outcomes["r2_gate"].threshold == 0.99
    assert "below the floor 0.9900" in outcomes["r2_gate"].reason
    assert not outcomes["model_size_gate"].passed and "limit 1,000" in outcomes["model_size_gate"].reason

    # Against a champion that predicts the truth, the candidate is worse beyond the tolerance.
    truth = split.holdout[spend["uc"].label.column].to_numpy()
    champion = {o.gate: o for o in um.evaluate_gates(spend["uc"], split.holdout, scores, booster, 1,
                                                       champion_scores=truth)}
    assert not champion["r2_gate"].passed and "worse than the champion" in champion["r2_gate"].reason

    fair = variant(tmp_path / "fair", yaml={"gates: {min_r2: 0.2}":
                                            "gates: {fairness_attribute: region, fairness_min_group_size: 50}"})
    fairness = {o.gate: o for o in um.evaluate_gates(fair, split.holdout, scores, booster, 1)}["fairness_gate"]
    assert "r2 gap across region" in fairness.reason and fairness.value > 0

    unknown = variant(tmp_path / "unknown", yaml={"gates: {min_r2: 0.2}": "gates: {min_roc_auc: 0.9}"})
    with pytest.raises(UseCaseError, match="min_roc_auc"):
        um.gate_thresholds(unknown)


CLASSIFIERS = {
    "binary": ({"problem_type: regression": "problem_type: binary", "objective: regression": "objective: binary",
                "gates: {min_r2: 0.2}": "gates: {min_roc_auc: 0.6}"},
               "CAST(coalesce(sum(o.amount), 0.0) > 100 AS INTEGER) AS spend_next_14d"),
    "multiclass": ({"problem_type: regression": "problem_type: multiclass",
                    "objective: regression": "objective: multiclass",
                    "horizon_days: 14": "horizon_days: 14\n  classes: [low, mid, high]",
                    "gates: {min_r2: 0.2}": "gates: {}"},
                   "CASE WHEN coalesce(sum(o.amount), 0.0) < 30 THEN 'low' "
                   "WHEN coalesce(sum(o.amount), 0.0) < 100 THEN 'mid' ELSE 'high' END AS spend_next_14d"),
}


@pytest.mark.parametrize("problem_type", sorted(CLASSIFIERS))
def test_classification_variants_train_and_gate(problem_type, tmp_path):
    yaml, label = CLASSIFIERS[problem_type]
    uc = variant(tmp_path, yaml=yaml, files={"labels.sql": {"coalesce(sum(o.amount), 0.0) AS spend_next_14d": label}})
    con = ingest(uc, tmp_path / "w.duckdb")
    st.build_feature_table(con, uc)
    training = st.build_training_set(con, uc)
    con.close()
    split = um.time_split(uc, training)
    booster = um.train(uc, split.train)
    scores = um.predict(uc, booster, split.holdout)
    metrics = um.evaluate(uc, split.holdout[uc.label.column], scores)
    outcomes = um.evaluate_gates(uc, split.holdout, scores, booster, um.model_bytes(booster))
    names = tuple(o.gate for o in outcomes)
    assert names == um.gate_names(uc)
    if problem_type == "binary":
        assert scores.ndim == 1 and scores.min() > 0 and scores.max() < 1
        assert metrics["roc_auc"] > 0.7, metrics
        assert names == ("roc_auc_gate", "calibration_gate", "fairness_gate", "latency_gate", "model_size_gate")
        assert "expected calibration error" in outcomes[1].reason
    else:
        assert scores.shape == (len(split.holdout), 3)
        np.testing.assert_allclose(scores.sum(axis=1), 1.0)
        assert metrics["macro_f1"] > 0.4 and metrics["accuracy"] > 0.5, metrics
        assert names[0] == "macro_f1_gate" and "calibration_gate" not in names
    assert outcomes[0].passed, outcomes[0]


def test_a_single_class_is_refused(spend):
    uc = spend["uc"].model_copy(update={"problem_type": "binary"})
    frame = spend["training"].assign(spend_next_14d=0)
    with pytest.raises(ValueError, match="single class"):
        um.time_split(uc, frame)
    with pytest.raises(ValueError, match="at least 4"):
        um.time_split(spend["uc"], spend["training"].head(10))


# --- the registered model --------------------------------------------------------------------------
STANDALONE = r"""
import importlib.util, json, os.path, sys
import mlflow
import pandas as pd

tracking_uri, model_uri, snapshot_file, project_root = sys.argv[1:]
assert project_root not in {os.path.realpath(p or ".") for p in sys.path}, sys.path
assert importlib.util.find_spec("mlops") is None
mlflow.set_tracking_uri(tracking_uri)
mlflow.set_registry_uri(tracking_uri)
model = mlflow.pyfunc.load_model(model_uri)
encoding = os.path.realpath(sys.modules["mlops.core.model_inputs"].__file__)
assert not encoding.startswith(project_root + os.sep), encoding
print(json.dumps({"scores": model.predict(pd.read_parquet(snapshot_file)).tolist(),
                  "inputs": model.metadata.get_input_schema().input_names(),
                  "dagster_loaded": "dagster" in sys.modules}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("problem_type", ["regression", "multiclass"])
def test_the_registered_model_scores_stored_rows_alone(spend, problem_type, tmp_path):
    import mlflow

    from mlops.core.environment import PROJECT_ROOT, TELEMETRY_OFF, HomeLayout
    from mlops.core.pyfunc_model import booster_from_model_dir, model_requirements

    if problem_type == "regression":
        uc, booster, train_rows = spend["uc"], spend["booster"], spend["split"].train
        snapshot = st.compute_online_snapshot(spend["con"], uc)
    else:
        yaml, label = CLASSIFIERS[problem_type]
        uc = variant(tmp_path / "uc", yaml=yaml,
                     files={"labels.sql": {"coalesce(sum(o.amount), 0.0) AS spend_next_14d": label}})
        with ingest(uc, tmp_path / "w.duckdb") as con:
            st.build_feature_table(con, uc)
            train_rows = st.build_training_set(con, uc)
            snapshot = st.compute_online_snapshot(con, uc)
        booster = um.train(uc, train_rows)
    layout = HomeLayout(tmp_path / "home")
    layout.mlflow_dir.mkdir(parents=True)
    snapshot_file = tmp_path / "snapshot.parquet"
    snapshot.to_parquet(snapshot_file)
    expected = um.predict(uc, booster, snapshot)
    name = uc.registered_model_name(TENANT.name)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(layout.mlflow_tracking_uri)
    mlflow.set_registry_uri(layout.mlflow_tracking_uri)
    try:
        experiment = mlflow.create_experiment("usecase-core", artifact_location=layout.mlflow_artifact_uri)
        with mlflow.start_run(experiment_id=experiment):
            info = um.log_model(uc, booster, train_rows, registered_model_name=name,
                                pip_requirements=model_requirements())
        model_dir = mlflow.artifacts.download_artifacts(f"models:/{name}/{info.registered_model_version}",
                                                        dst_path=str(tmp_path / "download"))
        # The rest of the platform reads the booster back from the same version.
        np.testing.assert_allclose(um.predict(uc, booster_from_model_dir(model_dir), snapshot), expected,
                                   rtol=0, atol=1e-12)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # The libraries of this environment but none of its .pth files (``-S``): an editable install of
    # the project would put a checkout of it on sys.path.
    env.update(TELEMETRY_OFF, PYTHONPATH=sysconfig.get_paths()["purelib"])
    result = subprocess.run(
        [sys.executable, "-S", "-c", STANDALONE, layout.mlflow_tracking_uri,
         f"models:/{name}/{info.registered_model_version}", str(snapshot_file), os.path.realpath(PROJECT_ROOT)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["inputs"] == list(uc.features.columns) and not out["dagster_loaded"]
    scores = np.array(out["scores"])
    assert scores.shape == expected.shape and len(scores) == len(snapshot) > 0
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)



def test_binary_rare_positive_gates_are_off_by_default_and_declarable(tmp_path):
    """PR AUC and recall at a fixed precision: gates a binary use case with rare positives may declare."""
    binary = {"problem_type: regression": "problem_type: binary", "objective: regression": "objective: binary"}
    plain = variant(tmp_path / "plain", yaml={**binary, "gates: {min_r2: 0.2}": "gates: {}"})
    assert um.gate_names(plain) == ("roc_auc_gate", "calibration_gate", "fairness_gate", "latency_gate",
                                    "model_size_gate")
    rare = variant(tmp_path / "rare", yaml={**binary, "gates: {min_r2: 0.2}":
                                            "gates: {min_pr_auc: 0.6, min_recall_at_precision: 0.6, "
                                            "recall_precision: 0.8}"})
    assert um.gate_names(rare)[:3] == ("roc_auc_gate", "pr_auc_gate", "recall_at_precision_gate")

    # Four positives among 100 rows; by score: positive, two negatives, positive, positive, ... positive.
    y = np.array([0] * 96 + [1] * 4)
    scores = np.linspace(0.0, 0.2, 100)
    scores[[10, 20, 97, 98]] = [0.9, 0.8, 0.95, 0.1]
    assert um.recall_at_precision(y, scores, 0.5) == 0.75  # three positives in the top five
    assert um.recall_at_precision(y, scores, 0.8) == 0.25
    assert np.isnan(um.recall_at_precision(np.zeros(5), np.linspace(0, 1, 5), 0.5))  # nothing to recall
    holdout = pd.DataFrame({c: np.arange(100.0) for c in rare.features.numeric}).assign(
        region="north", **{rare.label.column: y})
    booster = um.train(rare, holdout)
    outcomes = {o.gate: o for o in um.evaluate_gates(rare, holdout, scores, booster, 10)}
    assert set(outcomes) == set(um.gate_names(rare))
    assert not outcomes["pr_auc_gate"].passed and "0.5442 is below the floor 0.6000" in outcomes["pr_auc_gate"].reason
    assert outcomes["recall_at_precision_gate"].value == 0.25
    assert "recall at precision 0.8 0.2500 is below the floor 0.6000" in outcomes["recall_at_precision_gate"].reason
    assert um.evaluate(rare, y, scores)["recall_at_precision"] == 0.25
    assert "recall_at_precision" not in um.evaluate(plain, y, scores)

    missing = variant(tmp_path / "missing", yaml={**binary, "gates: {min_r2: 0.2}": "gates: {min_recall_at_precision: 0.5}"})
    with pytest.raises(UseCaseError, match="needs gates.recall_precision"):
        um.gate_names(missing)
    wrong = variant(tmp_path / "wrong", yaml={**binary, "gates: {min_r2: 0.2}": "gates: {recall_precision: 1.5}"})
    with pytest.raises(UseCaseError, match=r"recall_precision must be in \(0, 1\]"):
        um.gate_thresholds(wrong)
