"""The platform's own Python package.

``mlops.core`` is the lifecycle's domain layer (plain Python, no Dagster): feature rows in, models,
gates, registry operations, publication, prediction logs, monitoring and audit out. ``mlops.cli``
(the ``mlops`` command) and ``mlops.demo`` are tools on top of every other layer. The layers are
enforced by import-linter (``[tool.importlinter]`` in pyproject.toml).

Every library of the stack reports usage unless told otherwise, and some (nannyml) decide at call
time. Any process that imports the platform's code gets telemetry off, before anything else runs.
"""

import os as _os

from mlops.core.environment import disable_telemetry as _disable_telemetry

_disable_telemetry()
# LightGBM's OpenMP threads spin while they wait. When two processes train at once on a 2-core
# machine (the demo's tenant workers, a retrain beside a daily cycle), spinning threads starve each
# other: one build measured 273 s instead of ~5 s. Waiting threads sleep instead. Set before
# LightGBM loads (it reads the variable then); a value set by the user wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# MLflow talks on every logged or downloaded model (INFO lines, per-file progress bars): in the
# platform's processes (the demo, the CLI, Dagster runs) only its errors are news. A value set by the
# user wins.
_os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
