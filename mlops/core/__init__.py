"""The core: the lifecycle's domain operations in plain Python, free of Dagster.

Assets, the CLI, the BentoML service and the notebooks call these functions, which is how they can
never disagree. Nothing here imports ``dagster``, ``assets``, ``definitions``, ``resources`` or
``bentos`` (import-linter contracts in pyproject.toml).
"""
