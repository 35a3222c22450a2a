"""Dagster resources: each owns one external system (settings and paths, tenants, warehouse,
feature store, registry, notebook runner) or one policy (gates, monitoring), built on ``mlops.core``.

Importing the core first switches every library's telemetry off for this process.
"""

import mlops  # noqa: F401 - telemetry off before any library below is imported
