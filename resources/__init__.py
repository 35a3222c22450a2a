"""Resources own every external system and every piece of shared state.

They are plain Python objects as well as Dagster resources, so command-line tools, notebooks and
the BentoML service import the same code as the assets.
"""
