"""Benchmark: batch scoring on the GPU (LightGBM compiled by Hummingbird) against LightGBM on every CPU core.

Run from the repository root::

    .venv/bin/python -m benchmarks.gpu_scoring                  # 10 million rows
    .venv/bin/python -m benchmarks.gpu_scoring --rows 200000    # quick run
    .venv/bin/python -m benchmarks.gpu_scoring --model .mlops/serving/models/acme/v3.txt

The model is a real churn booster: by default trained by the pipeline's own code and parameters
(``mlops.core.modeling.train_booster``, 250 rounds) on a simulated tenant run through the feature
store; ``--model`` scores a LightGBM model file instead. The rows are the tenant's real feature
rows (``to_model_matrix``), resampled to ``--rows``, a few with unseen categories.

In one process it times ``booster.predict`` on all CPU cores and ``BatchScorer.predict`` (numpy in,
numpy out: transfers included), prints rows/s for both, the speed-up against the target (GPU at
least 10x the CPU) and the largest score difference. Building the scorer (compiling and checking
the program) is timed apart. Without CUDA it says so and which backend scored. The exit status is
0 whether or not the target is met (a benchmark, not a test), 1 when scores differ by more than 1e-5.
"""

from __future__ import annotations

import argparse
import sys
import time

import duckdb
import lightgbm as lgb
import numpy as np

from bentos.gpu_scoring import BatchScorer, cuda_available, default_threads, torch_available
from mlops.core.modeling import time_split, train_booster
from resources import feature_store as fs
from resources.tenants import TenantSpec
from usecases.churn.simulator import simulate_tenant

DEFAULT_ROWS = 10_000_000
TARGET_SPEEDUP = 10.0
TOLERANCE = 1e-5
TENANT = TenantSpec(name="benchco", region="us", n_accounts=3000, seed=42, days=180)


def churn_model_and_rows(model_file: str | None) -> tuple[lgb.Booster, np.ndarray]:
    con = duckdb.connect()
    for name, frame in simulate_tenant(TENANT).items():
        con.register(name, frame)
    fs.build_feature_table(con)
    training_set = con.execute("WITH churn_labels AS (" + fs.LABELS_SQL + ") " + fs.TRAINING_SET_SQL).df()
    if model_file:
        booster = lgb.Booster(model_file=model_file)
    else:
        booster = train_booster(time_split(training_set).train)
    return booster, fs.to_model_matrix(training_set)


def resample(rows: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = rows[rng.integers(0, len(rows), n)]
    unseen = rng.random(n) < 0.001  # a category the model never saw arrives as NaN
    matrix[unseen, list(fs.FEATURE_COLUMNS).index("plan")] = np.nan
    return matrix


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "lightgbm"],
                        help="the scorer's device (default: the GPU when there is one, else LightGBM)")
    parser.add_argument("--model", help="a LightGBM model file to score (default: train one)")
    parser.add_argument("--batch-rows", type=int, default=None, help="rows per device batch (default: by free memory)")
    args = parser.parse_args(argv)

    threads = default_threads()
    print(f"torch + hummingbird-ml installed: {torch_available()}; CUDA available: {cuda_available()}")
    if not cuda_available():
        print("CUDA is not available: the scorer runs "
              + ("the compiled program on CPU PyTorch" if args.device == "cpu" else "on LightGBM (CPU)"))
    seconds, (booster, rows) = timed(churn_model_and_rows, args.model)
    print(f"model: {booster.num_trees()} trees, {booster.num_feature()} features ({seconds:.1f}s to prepare)")
    matrix = resample(rows, args.rows)
    print(f"rows: {len(matrix):,} x {matrix.shape[1]} float64 ({matrix.nbytes / 2**30:.2f} GiB)")

    build_s, scorer = timed(lambda: BatchScorer(booster, device=args.device, batch_rows=args.batch_rows,
                                                num_threads=threads))
    info = scorer.describe()
    print(f"scorer: {info} (built and checked in {build_s:.1f}s)")

    warm = matrix[: min(len(matrix), 100_000)]
    booster.predict(warm[:1000], num_threads=threads)
    scorer.predict(warm)  # CUDA context, kernels, allocator

    cpu_s, expected = timed(lambda: booster.predict(matrix, num_threads=threads))
    dev_s, scores = timed(scorer.predict, matrix)
    diff = float(np.max(np.abs(scores - expected)))
    cpu_rate, dev_rate = len(matrix) / cpu_s, len(matrix) / dev_s
    speedup = cpu_s / dev_s

    print()
    print(f"{'path':<34}{'seconds':>10}{'rows/s':>16}")
    print(f"{f'LightGBM, {threads} CPU threads':<34}{cpu_s:>10.2f}{cpu_rate:>16,.0f}")
    print(f"{f'BatchScorer ({scorer.backend})':<34}{dev_s:>10.2f}{dev_rate:>16,.0f}")
    print()
    verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    print(f"speed-up: {speedup:.2f}x (target >= {TARGET_SPEEDUP:.0f}x with a GPU: {verdict})")
    if scorer.backend != "hummingbird-cuda":
        print(f"(no GPU scoring in this run: backend {scorer.backend}"
              + (f", because {scorer.fallback_reason}" if scorer.fallback_reason else "") + ")")
    print(f"max |score difference|: {diff:.3g} (tolerance {TOLERANCE:g})")
    return 0 if diff <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
