"""MLflow "models from code" script of every feature-rows model (churn and the declared use cases):
MLflow runs it when the model loads.

The platform never imports it (``set_model`` is a side effect); ``mlops.core.pyfunc_model`` logs it.
"""

import mlflow

from mlops.core.pyfunc_model import FeatureRowsModel

mlflow.models.set_model(FeatureRowsModel())
