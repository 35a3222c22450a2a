"""Benchmark: a declared use case's daily feature build, incremental against a full rebuild.

Run from the repository root::

    .venv/bin/python -m benchmarks.usecase_features                     # fraud, 3,000 accounts
    .venv/bin/python -m benchmarks.usecase_features --accounts 6000 --days 5

It simulates one fraud tenant (``usecases/fraud``'s simulator, the demo's acme size by default)
up to ``--start`` days into a DuckDB database file, builds its feature table once, then advances
the clock one day at a time as the daily cycle does (``usecase_store.replace_rows`` with the world's
fingerprint) and times, each day and side by side in this process:

- **incremental**: ``usecase_store.build_feature_table`` as the ``fraud__features`` asset runs it
  now (only the rows from the last build's clock on are computed);
- **full**: the same function with its state dropped first, so that it rebuilds the whole history
  (what every daily run did before).

Both run on copies of the same database at the same clock, and the two feature tables are compared
row for row each day (numbers to 1e-9 relative: ``_same``). The exit status is 1 when they differ, else 0 (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import pandas as pd

from mlops.core import usecase_store as st
from mlops.core.environment import PROJECT_ROOT
from mlops.core.usecase import load_usecase
from resources.tenants import TenantSpec


def _table(con: duckdb.DuckDBPyConnection, uc) -> pd.DataFrame:
    return con.execute(f"SELECT * FROM {st.feature_table(uc)} ORDER BY ALL").df()  # noqa: S608 - declared name


def _same(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Row for row, numbers to 1e-9 relative: DuckDB's parallel sums add in no fixed order, so two full
    builds of the same data may already differ in the last bits."""
    try:
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-9)
    except AssertionError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=3000)
    parser.add_argument("--start", type=int, default=180, help="simulated days loaded before the first timed day")
    parser.add_argument("--days", type=int, default=5, help="timed daily builds")
    args = parser.parse_args(argv)
    uc = load_usecase(PROJECT_ROOT / "usecases" / "fraud")
    simulate = st.load_simulator(uc)
    spec = TenantSpec(name="acme", region="us", n_accounts=args.accounts, seed=11, days=args.start + args.days + 60)
    world = st.world_fingerprint(uc, spec)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"incremental": Path(tmp) / "incremental.duckdb", "full": Path(tmp) / "full.duckdb"}
        with duckdb.connect(str(paths["incremental"])) as con:
            st.replace_rows(con, uc, simulate(dataclasses.replace(spec, today=args.start)), "simulator", world=world)
            rows = st.build_feature_table(con, uc)
            payments = con.execute("SELECT count(*) FROM raw_payments").fetchall()[0][0]
        shutil.copy(paths["incremental"], paths["full"])
        print(f"fraud tenant of {args.accounts} accounts, {args.start} days loaded: {payments:,} payments, "
              f"{rows:,} feature rows")
        times: dict[str, list[float]] = {"incremental": [], "full": []}
        status = 0
        for today in range(args.start + 1, args.start + args.days + 1):
            frames = simulate(dataclasses.replace(spec, today=today))
            tables = {}
            for kind, path in paths.items():
                with duckdb.connect(str(path)) as con:
                    st.replace_rows(con, uc, frames, "simulator", world=world)
                    if kind == "full":
                        con.execute("DELETE FROM usecase_feature_state")
                    started = time.perf_counter()
                    st.build_feature_table(con, uc)
                    times[kind].append(time.perf_counter() - started)
                    tables[kind] = _table(con, uc)
            same = _same(tables["incremental"], tables["full"])
            status |= 0 if same else 1
            print(f"day {today}: incremental {times['incremental'][-1]:.3f} s, full {times['full'][-1]:.3f} s, "
                  f"{len(tables['full']):,} rows, {'identical' if same else 'DIFFERENT'}")
    inc, full = statistics.median(times["incremental"]), statistics.median(times["full"])
    print(f"median daily build: incremental {inc:.3f} s, full rebuild {full:.3f} s ({full / inc:.1f}x)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
