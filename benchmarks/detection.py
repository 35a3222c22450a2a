"""Benchmark (issue 13): the day a drift is detected, by ``MonitoringPolicy.decay_confidence``.

Run from the repository root::

    .venv/bin/python -m benchmarks.detection                      # the default worlds below
    .venv/bin/python -m benchmarks.detection --only concept_drift:101 none:10 --confidences 0 0.99

Each world is one 900-account churn tenant (seed, scenario, drift on day 182) replayed from day
150 to day 250 with ``mlops.replay.replay_tenant`` (the day-150 champion scores every account of
each day's snapshot), then ``mlops.replay.first_decay_day`` gives, side by side for each
confidence, the first day the daily monitoring would raise a decay alert: three consecutive chunks
under the floor, and (confidence > 0) the pooled chunks' entity-clustered bootstrap bound under it
too (``mlops.core.monitoring.decay_evidence``, what ``monitoring_step`` applies). "-" is no alert
by day 250. The loop benchmark (``benchmarks/loop.py``) measures what follows an alert.
"""

from __future__ import annotations

import argparse
import time
import warnings

from mlops.replay import first_decay_day, replay_tenant
from resources.monitoring import MonitoringPolicy
from resources.tenants import TenantSpec

START, DRIFT, END = 150, 182, 250
WORLDS = ("concept_drift:101", "concept_drift:1", "concept_drift:2", "concept_drift:3", "none:4", "none:10",
          "covariate_shift:10")


def detection_days(scenario: str, seed: int, confidences: list[float]) -> dict[float, int | None]:
    drift = {} if scenario == "none" else {"scenario": scenario, "drift_day": DRIFT}
    spec = TenantSpec(name="detection", region="eu", n_accounts=900, seed=seed, days=END + 40, **drift)
    replayed = replay_tenant(spec, START, END)
    found = {c: first_decay_day(replayed, MonitoringPolicy(decay_confidence=c), END) for c in confidences}
    return {c: None if f is None else f[0] for c, f in found.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", default=list(WORLDS), metavar="SCENARIO:SEED")
    parser.add_argument("--confidences", nargs="+", type=float, default=[0.0, 0.9, 0.95, 0.99])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print("| world | " + " | ".join("off" if c == 0 else f"{c:.2f}" for c in args.confidences) + " | wall |")
    print("|---|" + "---|" * (len(args.confidences) + 1))
    for world in args.only:
        scenario, seed = world.split(":")
        started = time.monotonic()
        days = detection_days(scenario, int(seed), args.confidences)
        print(f"| {scenario} seed {seed} | " + " | ".join("-" if days[c] is None else str(days[c])
                                                          for c in args.confidences)
              + f" | {time.monotonic() - started:.0f} s |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
