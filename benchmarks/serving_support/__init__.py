"""Helpers for ``benchmarks.serving``: the wrk request script and the bare ASGI baseline."""
