"""Resources own every external system and every piece of shared state.

They are plain Python objects as well as Dagster resources, so command-line tools, notebooks and
the BentoML service import the same code as the assets.
"""

# Every library of the stack reports usage unless told otherwise, and some (nannyml) decide at call
# time. Any process that imports the platform's code gets telemetry off, before anything else runs.
from resources.environment import disable_telemetry as _disable_telemetry

_disable_telemetry()
