"""MLflow "models from code" script of the churn model: MLflow runs it when the model loads.

The platform never imports it (``set_model`` is a side effect); ``mlops.core.pyfunc_model`` logs it.
"""

import mlflow

from mlops.core.pyfunc_model import ChurnModel

mlflow.models.set_model(ChurnModel())
