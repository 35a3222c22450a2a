"""A model as a self-contained MLflow pyfunc: ``mlflow.pyfunc.load_model(...).predict(rows)`` scores
feature rows as they are stored (online snapshot or training set rows, extra columns and all). One
pyfunc for every use case (``log_feature_rows_model``); churn's is ``log_churn_model``.

The model is logged as MLflow "models from code" (``pyfunc_model_code.py``, no pickle) and carries:
- the LightGBM model text as an artifact, which is also what the rest of the platform loads
  (``booster_from_model_dir``: publication, gates, notebooks);
- the encoding itself: the few modules of ``mlops`` it imports, shipped as ``code_paths``, so the
  pyfunc, training and serving run the same ``model_inputs`` code, never a copy of the feature list;
- the encoder's spec (numeric columns, categorical columns and levels, problem type, classes) as the
  model's ``model_config``, so the code file reads no project file;
- a signature derived from the ``ModelInputs`` and an input example.

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

from mlops.core.model_inputs import ModelInputs

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
                    "mlops/core/model_inputs.py", "mlops/core/pyfunc_model.py")
EXAMPLE_ROWS = 5


PROBLEM_TYPES = ("binary", "multiclass", "regression")


def model_config(inputs: ModelInputs, problem_type: str, classes: tuple[str, ...] | None = None) -> dict:
    """The spec the pyfunc rebuilds its encoder from. Lists, not mappings: MLflow writes the MLmodel
    file with sorted keys, and the column order is the model's."""
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type {problem_type!r} is not one of {PROBLEM_TYPES}")
    return {
        "numeric": list(inputs.numeric),
        "categorical": [[col, list(levels)] for col, levels in inputs.categorical.items()],
        "problem_type": problem_type,
        "classes": list(classes) if classes else None,
    }


def inputs_from_config(config: dict | None) -> ModelInputs:
    """The encoder of a ``model_config``; churn's when there is none (versions logged before it)."""
    if not config:
        from mlops.core.model_inputs import CHURN_INPUTS

        return CHURN_INPUTS
    return ModelInputs(tuple(config["numeric"]), {col: tuple(levels) for col, levels in config["categorical"]})


class FeatureRowsModel(PythonModel):
    """Scores a frame of stored feature rows, encoded by the ``ModelInputs`` of its ``model_config``:
    a probability per row (binary), a row of class probabilities (multiclass, in ``classes`` order)
    or a value (regression)."""

    def load_context(self, context) -> None:
        self.booster = lgb.Booster(model_file=context.artifacts[BOOSTER_ARTIFACT])
        self.inputs = inputs_from_config(context.model_config)

    # A ``pd.DataFrame`` hint is one MLflow 3 infers no schema from: the signature below stays the one
    # contract (without a hint, MLflow warns on every log and load).
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        return self.booster.predict(self.inputs.to_model_matrix(model_input))




def signature(inputs: ModelInputs, n_outputs: int = 1) -> ModelSignature:
    """Inputs: every feature column, numbers as doubles (as the feature views store them) and the
    categories as strings; output: one score per row (``n_outputs`` > 1: a row of class probabilities)."""
    cols = [ColSpec(DataType.string if col in inputs.categorical else DataType.double, col) for col in inputs.columns]
    shape = (-1,) if n_outputs == 1 else (-1, n_outputs)
    return ModelSignature(inputs=Schema(cols), outputs=Schema([TensorSpec(np.dtype(np.float64), shape)]))


def model_requirements() -> list[str]:
    """What loading a logged model needs, pinned to the versions that trained it (stated, not inferred:
    MLflow's inference exports the whole uv lock on every run, ~3 s)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("lightgbm", "numpy", "pandas", "scikit-learn", "scipy")]


def log_feature_rows_model(booster: lgb.Booster, rows: pd.DataFrame, *, inputs: ModelInputs, problem_type: str,
                           classes: tuple[str, ...] | None = None, registered_model_name: str,
                           pip_requirements: list[str]) -> ModelInfo:
    """Log ``booster`` as a standalone pyfunc in the active run and register it.

    ``rows``: stored feature rows; the first few rows' model columns become the input example.
    """
    config = model_config(inputs, problem_type, classes)
    n_outputs = len(classes) if problem_type == "multiclass" and classes else 1
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
                model_config=config,
                signature=signature(inputs, n_outputs),
                input_example=rows.loc[:, list(inputs.columns)].head(EXAMPLE_ROWS).reset_index(drop=True),
                registered_model_name=registered_model_name,
                pip_requirements=pip_requirements,
            )


def log_churn_model(booster: lgb.Booster, rows: pd.DataFrame, *, registered_model_name: str,
                    pip_requirements: list[str]) -> ModelInfo:
    """Log ``booster`` as the standalone churn pyfunc (binary, ``CHURN_INPUTS``) and register it."""
    from mlops.core.model_inputs import CHURN_INPUTS

    return log_feature_rows_model(booster, rows, inputs=CHURN_INPUTS, problem_type="binary",
                                  registered_model_name=registered_model_name, pip_requirements=pip_requirements)


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
