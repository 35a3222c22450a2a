"""Monitoring throughput: drift on every feature + CBPE over 1 million prediction rows against a
100,000-row reference, through the platform (``TenantMonitor``) and through NannyML called
directly with the same settings, side by side in one process.

    python -m benchmarks.monitoring [--rows 1000000] [--reference 100000] [--repeats 2]

The rows are bootstrapped (with small noise on numeric features) from an offline replay of a
simulated tenant, so features, scores and their relations are the platform's own; timestamps are
spread over 30 days (30 daily chunks). Import time is excluded; fitting is reported apart from the
per-run calculation, since the platform fits once per model version and reuses the fit.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import pandas as pd

from mlops.core.environment import disable_telemetry


def synthetic(source: pd.DataFrame, rows: int, days: int, start: str, seed: int) -> pd.DataFrame:
    from mlops.core.model_inputs import NUMERIC_FEATURES

    rng = np.random.default_rng(seed)
    frame = source.iloc[rng.integers(0, len(source), rows)].reset_index(drop=True)
    for col in NUMERIC_FEATURES:
        values = frame[col].to_numpy(dtype=float)
        frame[col] = values * rng.normal(1.0, 0.02, rows)
    frame["timestamp"] = pd.Timestamp(start) + pd.to_timedelta(rng.integers(0, days, rows), unit="D")
    return frame


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reference", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    disable_telemetry()
    warnings.simplefilter("ignore")

    import nannyml as nml

    from mlops.core.model_inputs import CATEGORICAL_FEATURES, FEATURE_COLUMNS
    from mlops.core.monitoring import (
        PREDICTED,
        SCORE,
        TARGET,
        TIMESTAMP,
        TenantMonitor,
        prepare,
    )
    from mlops.replay import replay_tenant
    from resources.monitoring import MonitoringPolicy
    from resources.tenants import TenantSpec

    t = time.perf_counter()
    replayed = replay_tenant(TenantSpec(name="bench", region="eu", n_accounts=1500, seed=7, days=200), 150, 156)
    print(f"replayed a 1,500-account tenant for 6 days in {time.perf_counter() - t:.1f}s "
          f"({len(replayed.reference)} reference rows, {len(replayed.predictions)} predictions)")
    reference = synthetic(replayed.reference, args.reference, 28, "2026-07-01", 1)
    reference[TARGET] = (np.random.default_rng(2).random(len(reference)) < reference["score"]).astype(int)
    analysis = synthetic(replayed.predictions, args.rows, 30, "2026-09-01", 3)
    print(f"reference {len(reference):,} rows, analysis {len(analysis):,} rows in "
          f"{analysis[TIMESTAMP].dt.date.nunique()} daily chunks, {len(FEATURE_COLUMNS)} features\n")

    policy = MonitoringPolicy()

    def platform():
        t0 = time.perf_counter()
        monitor = TenantMonitor(policy, reference)
        t1 = time.perf_counter()
        report = monitor.run(analysis)
        return t1 - t0, time.perf_counter() - t1, len(report.results)

    def direct():
        # What a user would write with NannyML alone: the same calculators on the same frames.
        t0 = time.perf_counter()
        ref, data = prepare(reference), prepare(analysis).drop(columns=[TARGET])
        common = {"timestamp_column_name": TIMESTAMP, "chunk_period": policy.chunk_period}
        calculators = [
            nml.UnivariateDriftCalculator(column_names=list(FEATURE_COLUMNS),
                                          treat_as_categorical=list(CATEGORICAL_FEATURES),
                                          continuous_methods=policy.continuous_drift_methods,
                                          categorical_methods=policy.categorical_drift_methods, **common),
            nml.DataReconstructionDriftCalculator(column_names=list(FEATURE_COLUMNS), **common),
            nml.CBPE(metrics=["roc_auc"], y_pred_proba=SCORE, y_pred=PREDICTED, y_true=TARGET,
                     problem_type="classification_binary", **common),
            nml.MissingValuesCalculator(column_names=list(FEATURE_COLUMNS), **common),
            nml.UnseenValuesCalculator(column_names=list(CATEGORICAL_FEATURES), **common),
        ]
        for calc in calculators:
            calc.fit(ref)
        t1 = time.perf_counter()
        for calc in calculators:
            (calc.estimate if isinstance(calc, nml.CBPE) else calc.calculate)(data).filter(period="analysis").to_df()
        return t1 - t0, time.perf_counter() - t1, None

    results = {"platform": [], "nannyml": []}
    for i in range(args.repeats):
        for name, fn in (("nannyml", direct), ("platform", platform)):
            fit_s, run_s, _ = fn()
            results[name].append((fit_s, run_s))
            print(f"run {i + 1}  {name:9s} fit {fit_s:6.2f}s  drift + CBPE + data quality over "
                  f"{args.rows:,} rows {run_s:6.2f}s")
    best = {k: min(r for _, r in v) for k, v in results.items()}
    median = {k: statistics.median(r for _, r in v) for k, v in results.items()}
    overhead = best["platform"] / best["nannyml"] - 1
    print(f"\nbest run:   platform {best['platform']:.2f}s, NannyML direct {best['nannyml']:.2f}s, "
          f"overhead {overhead * 100:+.1f}%")
    print(f"median run: platform {median['platform']:.2f}s, NannyML direct {median['nannyml']:.2f}s")
    print(f"target <= 10 s: {'PASS' if best['platform'] <= 10 else 'FAIL'}; "
          f"overhead < 20%: {'PASS' if overhead < 0.20 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
