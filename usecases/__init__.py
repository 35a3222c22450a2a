"""The use cases: each AI feature of the product, declared in a folder of its own.

A folder with a ``usecase.yaml`` (see ``mlops.core.usecase``) is discovered and run by the generated
lifecycle (``assets.usecases``). ``churn`` predates declarations: its raw tables are declared here
(``churn/tables.yaml``, the same fields as a use case's ``tables``), the rest of its declaration still
lives in code (``resources.feature_store``, ``mlops.core.model_inputs``); its simulator is here.
"""
