"""MLflow "models from code" script of the churn model: MLflow runs it when the model loads.

The platform never imports it (``set_model`` is a side effect); ``resources.churn_pyfunc`` logs it.
"""

import mlflow

from resources.churn_pyfunc import ChurnModel

mlflow.models.set_model(ChurnModel())
