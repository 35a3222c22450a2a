"""The churn model as a self-contained MLflow pyfunc: ``mlflow.pyfunc.load_model(...).predict(rows)``
scores feature rows as they are stored (online snapshot or training set rows, extra columns and all).

The model is logged as MLflow "models from code" (``pyfunc_model_code.py``, no pickle) and carries:
- the LightGBM model text as an artifact, which is also what the rest of the platform loads
  (``booster_from_model_dir``: publication, gates, notebooks);
- the encoding itself: the few modules of ``mlops`` it imports, shipped as ``code_paths``, so the
  pyfunc, training and serving run the same ``model_inputs`` code, never a copy of the feature list;
- a signature derived from ``model_inputs`` and an input example.

Free of Dagster: loading the model imports this module, and nothing here may pull Dagster in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import lightgbm as lgb
import mlflow
import numpy as np
import pandas as pd
from mlflow.environment_variables import MLFLOW_UV_AUTO_DETECT
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

from mlops.core.model_inputs import CATEGORICAL_FEATURES, FEATURE_COLUMNS, to_model_matrix

BOOSTER_ARTIFACT = "booster"
BOOSTER_FILE = "model.txt"
MODEL_CODE = Path(__file__).with_name("pyfunc_model_code.py")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The modules of ``mlops`` that loading the model imports: this module and its imports within the
# package. Shipping only these, not the whole package, keeps the model free of Dagster (the CLI, the
# demo) even where Dagster is installed; the ``__init__`` files and ``environment`` come along because
# Python runs a package's ``__init__`` first (it switches telemetry off, which the loading process
# wants too). tests/test_mlflow_model.py loads the model without the project on sys.path, so a
# module missing here fails there.
PACKAGED_MODULES = ("mlops/__init__.py", "mlops/core/__init__.py", "mlops/core/environment.py",
                    "mlops/core/vocabulary.py", "mlops/core/model_inputs.py", "mlops/core/pyfunc_model.py")
EXAMPLE_ROWS = 5


class ChurnModel(PythonModel):
    """Churn probabilities for a frame of stored feature rows, encoded by ``model_inputs``."""

    def load_context(self, context) -> None:
        self.booster = lgb.Booster(model_file=context.artifacts[BOOSTER_ARTIFACT])

    # A ``pd.DataFrame`` hint is one MLflow 3 infers no schema from: the signature below stays the one
    # contract (without a hint, MLflow warns on every log and load).
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        return self.booster.predict(to_model_matrix(model_input))


def signature() -> ModelSignature:
    """Inputs: every feature column, numbers as doubles (as the feature views store them) and the
    categories as strings; output: one churn probability per row."""
    inputs = [ColSpec(DataType.string if col in CATEGORICAL_FEATURES else DataType.double, col)
              for col in FEATURE_COLUMNS]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([TensorSpec(np.dtype(np.float64), (-1,))]))


def log_churn_model(booster: lgb.Booster, rows: pd.DataFrame, *, registered_model_name: str,
                    pip_requirements: list[str]) -> ModelInfo:
    """Log ``booster`` as the standalone churn pyfunc in the active run and register it.

    ``rows``: stored feature rows; the first few feature columns become the input example.
    """
    with tempfile.TemporaryDirectory() as tmp:
        for module in PACKAGED_MODULES:
            (Path(tmp) / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_PROJECT_ROOT / module, Path(tmp) / module)
        package = Path(tmp) / "mlops"
        booster_file = Path(tmp) / BOOSTER_FILE
        booster.save_model(str(booster_file))
        with _uv_lock_not_copied():
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                code_paths=[str(package)],
                artifacts={BOOSTER_ARTIFACT: str(booster_file)},
                signature=signature(),
                input_example=rows.loc[:, list(FEATURE_COLUMNS)].head(EXAMPLE_ROWS).reset_index(drop=True),
                registered_model_name=registered_model_name,
                pip_requirements=pip_requirements,
            )


@contextmanager
def _uv_lock_not_copied():
    """MLflow 3 copies ``uv.lock`` and ``pyproject.toml`` of the working directory into a pyfunc model
    when it finds them: the whole platform's lock (Dagster and all), present or not depending on
    where training runs. The stated requirements are the model's environment, so that is off here."""
    previous = os.environ.get(MLFLOW_UV_AUTO_DETECT.name)
    os.environ[MLFLOW_UV_AUTO_DETECT.name] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[MLFLOW_UV_AUTO_DETECT.name]
        else:
            os.environ[MLFLOW_UV_AUTO_DETECT.name] = previous


def booster_from_model_dir(model_dir: str | Path) -> lgb.Booster:
    """The LightGBM booster of a downloaded model version: the pyfunc's model-text artifact, or the
    booster of a version logged with the ``lightgbm`` flavor (before the pyfunc existed)."""
    flavors = Model.load(str(model_dir)).flavors
    if "lightgbm" in flavors:
        return mlflow.lightgbm.load_model(str(model_dir))
    artifact = flavors["python_function"]["artifacts"][BOOSTER_ARTIFACT]["path"]
    return lgb.Booster(model_file=str(Path(model_dir) / artifact))
