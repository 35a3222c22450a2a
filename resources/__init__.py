"""Resources own every external system and every piece of shared state.

They are plain Python objects as well as Dagster resources, so command-line tools, notebooks and
the BentoML service import the same code as the assets.
"""

# Every library of the stack reports usage unless told otherwise, and some (nannyml) decide at call
# time. Any process that imports the platform's code gets telemetry off, before anything else runs.
import os as _os

from resources.environment import disable_telemetry as _disable_telemetry

_disable_telemetry()
# LightGBM's OpenMP threads spin while they wait. When two processes train at once on a 2-core
# machine (the demo's tenant workers, a retrain beside a daily cycle), spinning threads starve each
# other: one build measured 273 s instead of ~5 s. Waiting threads sleep instead. Set before
# LightGBM loads (it reads the variable then); a value set by the user wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
