"""The registered churn model stands alone in MLflow: plain ``mlflow.pyfunc.load_model`` in a process
without the project (nor Dagster) scores feature rows as they are stored, exactly as the platform does."""

import json
import os
import subprocess
import sys
import sysconfig

import duckdb
import numpy as np
import pandas as pd
import pytest

from mlops.core import modeling
from mlops.core.environment import PROJECT_ROOT, TELEMETRY_OFF
from mlops.core.model_inputs import FEATURE_COLUMNS, encode_records
from mlops.core.names import CHAMPION, registered_model_name
from tests.conftest import TEST_TENANT

pytestmark = pytest.mark.slow

# Imports nothing but mlflow and pandas; run with the cwd in a temp dir and without the project on
# sys.path, so the model can only work with what it carries.
STANDALONE_SCORING = r"""
import importlib.util
import json
import os.path
import sys

import mlflow
import pandas as pd

tracking_uri, model_uri, snapshot_file, training_file, project_root = sys.argv[1:]
assert project_root not in {os.path.realpath(p or ".") for p in sys.path}, sys.path
for name in ("mlops", "resources", "assets"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable without the model"
assert not {"mlops", "resources", "assets", "dagster"} & set(sys.modules)

mlflow.set_tracking_uri(tracking_uri)
mlflow.set_registry_uri(tracking_uri)
model = mlflow.pyfunc.load_model(model_uri)
assert "dagster" not in sys.modules, "loading the model imported dagster"
encoding_file = os.path.realpath(sys.modules["mlops.core.model_inputs"].__file__)
assert not encoding_file.startswith(project_root + os.sep), encoding_file

snapshot = pd.read_parquet(snapshot_file)
training = pd.read_parquet(training_file)
example = model.input_example
try:
    model.predict(snapshot.drop(columns=["mrr"]))
    missing_error = None
except Exception as exc:
    missing_error = f"{type(exc).__name__}: {exc}"
print(json.dumps({
    "snapshot": model.predict(snapshot).tolist(),
    "training": model.predict(training).tolist(),
    "inputs": model.metadata.get_input_schema().input_names(),
    "example_columns": list(example.columns),
    "example_scores": model.predict(example).tolist(),
    "missing_error": missing_error,
    "dagster_loaded": "dagster" in sys.modules,
}))
"""


@pytest.fixture(scope="module")
def stored_rows(platform_home, tmp_path_factory):
    """The current online snapshot and the training set rows, as files the standalone script reads."""
    defs = platform_home["defs"]
    feature_store, warehouse = defs.resources["feature_store"], defs.resources["warehouse"]
    pointer = feature_store.current_snapshot_pointer(TEST_TENANT.name)
    snapshot_file = feature_store.online_dir(TEST_TENANT.name) / pointer["path"]
    with duckdb.connect(str(warehouse.path(TEST_TENANT.name)), read_only=True) as con:
        training = con.execute("SELECT * FROM churn_training_set ORDER BY prediction_time, account_id").df()
    training_file = tmp_path_factory.mktemp("rows") / "churn_training_set.parquet"
    training.to_parquet(training_file)
    return {"snapshot": pd.read_parquet(snapshot_file), "snapshot_file": snapshot_file,
            "training": training, "training_file": training_file}


@pytest.fixture(scope="module")
def standalone(platform_home, stored_rows, tmp_path_factory):
    """What the champion scores when loaded by plain MLflow in a separate, project-free process."""
    settings = platform_home["defs"].resources["settings"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # The libraries of this environment but none of its .pth files (``-S``): an editable install of
    # the project would put a checkout of it on sys.path.
    env.update(TELEMETRY_OFF, PYTHONPATH=sysconfig.get_paths()["purelib"])
    result = subprocess.run(
        [sys.executable, "-S", "-c", STANDALONE_SCORING, settings.mlflow_tracking_uri,
         f"models:/{registered_model_name(TEST_TENANT.name)}@{CHAMPION}",
         str(stored_rows["snapshot_file"]), str(stored_rows["training_file"]), os.path.realpath(PROJECT_ROOT)],
        cwd=tmp_path_factory.mktemp("standalone"), env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def champion_booster(platform_home):
    registry = platform_home["defs"].resources["registry"]
    return registry.load_booster(TEST_TENANT.name, registry.alias_version(TEST_TENANT.name, CHAMPION).version)


@pytest.mark.parametrize("rows", ["snapshot", "training"])
def test_standalone_scores_equal_the_platforms(standalone, stored_rows, champion_booster, rows):
    frame = stored_rows[rows]
    scores = np.array(standalone[rows])
    assert len(scores) == len(frame) > 0
    # The training/evaluation path and the service's path (encode_records + the booster's model text).
    np.testing.assert_allclose(scores, modeling.score(champion_booster, frame), rtol=0, atol=1e-12)
    records = frame.loc[:, list(FEATURE_COLUMNS)].to_dict("records")
    np.testing.assert_allclose(scores, champion_booster.predict(encode_records(records)), rtol=0, atol=1e-12)
    assert scores.min() > 0 and scores.max() < 1


def test_signature_names_every_feature_and_the_example_loads(standalone):
    assert standalone["inputs"] == list(FEATURE_COLUMNS)
    assert standalone["example_columns"] == list(FEATURE_COLUMNS)
    assert len(standalone["example_scores"]) > 0
    assert not standalone["dagster_loaded"]


def test_a_frame_missing_a_feature_is_refused_by_name(standalone):
    assert standalone["missing_error"] is not None
    assert "mrr" in standalone["missing_error"]
