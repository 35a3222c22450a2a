"""The durable prediction log: every prediction answered 200 reaches exactly one segment row per
role, whatever dies and when (kill -9 of a worker, of the whole service, of an ingestion between its
commit and its archive move), and unreadable files are quarantined with a reason, never blocking
the rest. Real processes, real files, a real DuckDB."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pandas as pd
import psutil
import pytest
import requests

from mlops.core.environment import PROJECT_ROOT
from mlops.core.prediction_log import archive_segments, ingest_closed_segments
from mlops.core.serving import (
    ApiKeyStore,
    PredictionLogWriter,
    journal_dir,
    prediction_log_dir,
    read_journal,
    recover_journals,
    serving_dir,
)
from tests.servers import Load, bentoml_service, wait_until

pytestmark = pytest.mark.slow
TENANT = "testco"


# --- helpers ---------------------------------------------------------------------------------
def _segments(home: Path, tenant: str = TENANT, use_case: str | None = None,
              folders=("closed", "ingested")) -> pd.DataFrame:
    """Every row of the tenant's segments (closed and ingested), with the file each came from."""
    folder = prediction_log_dir(home, tenant, use_case)
    frames = [pd.read_parquet(p).assign(file=p.name) for sub in folders
              for p in sorted((folder / sub).glob("segment-*.parquet"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["prediction_id", "role", "file"])


def _missing_and_duplicated(home: Path, ids: list[str], role: str = "champion") -> tuple[int, int]:
    rows = _segments(home)
    counts = rows[rows["role"] == role]["prediction_id"].value_counts()
    found = counts.reindex(ids, fill_value=0)
    return int((found == 0).sum()), int((counts > 1).sum())


def _journal_files(home: Path) -> list[str]:
    folder = journal_dir(home)
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


WRITER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from mlops.core.serving import LogChunk, PredictionLogWriter

    home, rows, block = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    writer = PredictionLogWriter(home, max_rows=10**6, max_age_s=0.2)
    writer.start()
    for i in range(rows):
        if i == rows // 2 and block != "-":
            os.rename(block, block + ".away")  # the disk refuses segments from here on
            open(block, "w").write("in the way")
        writer.append_one("t1", ("champion", "1", 1, "predict"), 10**15 + i, 0.5, f"one-{i}", f"a-{i}", i / rows,
                          time.monotonic())
        if i % 10 == 0:  # a shadow micro-batch, and a use case's tenant
            writer.append_chunk("t1", LogChunk(2, "challenger", "2", 1, "predict", np.array([i, i + 1]), 0.25,
                                               [f"one-{i}", f"one-{i + 1}"], ["a", "b"], np.array([0.5, 0.25])),
                                time.monotonic())
            writer.append_one("t2", ("champion", "7", 3, "predict"), i, 0.1, f"uc-{i}", "e", 0.5, time.monotonic(),
                              use_case="spend")
        if i == rows // 4:  # some rows reach segments before the end, the rest stays in the journal
            closed = os.path.join(home, "prediction_logs", "t1", "closed")
            deadline = time.monotonic() + 60
            while not (os.path.isdir(closed) and os.listdir(closed)) and time.monotonic() < deadline:
                time.sleep(0.02)
    while block != "-" and not writer.failures["segment"]:
        time.sleep(0.02)  # the backlog has met the refusing disk at least once
    sys.stdout.write("appended\\n")  # one write: the writer's thread may be reporting at the same time
    sys.stdout.flush()
    time.sleep(600)
""")


def _writer_killed_after_appending(home: Path, rows: int, block: Path | None = None) -> None:
    """A real process appends ``rows`` predictions through a started writer and is killed -9."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(home), str(rows), str(block or "-")],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or lines[-1] not in ("appended", ""):
            lines.append(proc.stdout.readline().strip())
        assert lines[-1] == "appended", lines
    finally:
        proc.kill()
        proc.wait()


# --- the writer's journal, process by process ------------------------------------------------
def test_a_killed_writer_loses_nothing_and_recovery_is_exactly_once(tmp_path, capsys):
    home = tmp_path / "home"
    _writer_killed_after_appending(home, 2000)
    assert any(name.endswith(".journal") for name in _journal_files(home))
    before = _segments(home, "t1")
    assert 0 < len(before) < 2200, "some rows in segments before the kill, not all"
    # The journal's files as a crash right after the recovery wrote its segments would leave them.
    saved = {p.name: p.read_bytes() for p in journal_dir(home).iterdir() if p.is_file()}

    # A new writer recovers the dead one's journal at start-up (and leaves its own, live one alone).
    writer = PredictionLogWriter(home)
    assert "recovered the journal of dead worker" in capsys.readouterr().out
    t1, t2 = _segments(home, "t1"), _segments(home, "t2", "spend")
    assert sorted(t1[t1.role == "champion"].prediction_id) == sorted(f"one-{i}" for i in range(2000))
    assert len(t1[t1.role == "challenger"]) == 400 and not t1.duplicated(["prediction_id", "role"]).any()
    assert sorted(t2.prediction_id) == sorted(f"uc-{i}" for i in range(0, 2000, 10))
    recovered = t1[~t1.file.isin(before.file) & (t1.role == "champion")]
    assert len(recovered) and recovered.score.is_monotonic_increasing  # in the order they were answered
    writer.close()
    assert _journal_files(home) == [], "a closed writer leaves no journal behind"

    # A recovery that dies between writing its segments and deleting the journal: the next one
    # finds every row already in a segment of that worker and writes nothing twice.
    for name, data in saved.items():
        (journal_dir(home) / name).write_bytes(data)
    again = recover_journals(home)
    assert again.rows == 0 and again.already_in_segments > 0 and again.segments == []
    assert len(_segments(home, "t1")) == len(t1) and _journal_files(home) == []


def test_rows_stay_in_the_journal_while_segments_cannot_be_written_and_survive_a_kill(tmp_path, capsys):
    home = tmp_path / "home"
    closed = prediction_log_dir(home, "t1") / "closed"
    closed.mkdir(parents=True)
    # Half-way through, the tenant's closed/ folder is replaced by a file: every segment write fails
    # (as for a full or read-only disk); the process is then killed with the backlog in memory.
    _writer_killed_after_appending(home, 1000, block=closed)
    closed.unlink()
    (closed.parent / "closed.away").rename(closed)
    recovered = recover_journals(home)
    assert recovered.rows > 0
    rows = _segments(home, "t1")
    assert sorted(rows[rows.role == "champion"].prediction_id) == sorted(f"one-{i}" for i in range(1000))
    assert not rows.duplicated(["prediction_id", "role"]).any()


def test_a_torn_last_record_is_dropped_and_a_corrupt_journal_quarantined(tmp_path, capsys):
    home = tmp_path / "home"
    _writer_killed_after_appending(home, 300)
    files = sorted(journal_dir(home).glob("*.journal"))
    rows, torn, corrupt = read_journal(files[-1])
    assert torn is None and corrupt is None and rows
    last = files[-1]
    whole = last.read_bytes()
    # the process died in the middle of its last write: the start of a record at the end
    last.write_bytes(whole + whole[:20])
    # and a byte damaged inside a record half-way through a copy of it (a bad disk block)
    offsets, offset = [], 0
    while offset < len(whole):
        offsets.append(offset)
        offset += 8 + int.from_bytes(whole[offset:offset + 4], "little")
    damaged = bytearray(whole)
    damaged[offsets[len(offsets) // 2] + 10] ^= 0xFF
    other = last.with_name(last.name.replace(".journal", "0.journal"))  # same worker, later file
    other.write_bytes(bytes(damaged))

    report = recover_journals(home)
    out = capsys.readouterr().out
    assert report.torn and "torn record" in out
    assert [p.name for p in report.quarantined] == [other.name]
    reason = (journal_dir(home) / "quarantine" / f"{other.name}.reason").read_text()
    assert "corrupt journal" in reason and "checksum mismatch" in reason and "rows before it were recovered" in reason
    # every row answered is there once: the torn tail added nothing, the corrupt copy only duplicates
    t1 = _segments(home, "t1")
    assert sorted(t1[t1.role == "champion"].prediction_id) == sorted(f"one-{i}" for i in range(300))
    assert not t1.duplicated(["prediction_id", "role"]).any()


def test_journal_records_hold_every_column_of_a_prediction(tmp_path):
    import numpy as np

    from mlops.core.serving import LogChunk

    writer = PredictionLogWriter(tmp_path, max_rows=10**6, max_age_s=3600)
    writer.append_one("t1", ("champion", "3", 7, "predict"), 11, 0.5, "id-1", "a-1", 0.25, 0.0)
    writer.append_chunk("t1", LogChunk(2, ["champion", "challenger"], ["3", "4"], 7, "predict_batch",
                                       np.array([12, 13]), 0.125, ["id-2", "id-3"], ["line\nbreak", "é"],
                                       np.array([0.5, 0.75])), 0.0, use_case="spend")
    (journal,) = journal_dir(tmp_path).glob("*.journal")
    rows, torn, corrupt = read_journal(journal)
    assert torn is None and corrupt is None
    assert [(r.seq, r.group, r.requested_at_us, r.latency_ms, r.prediction_id, r.account_id, r.score)
            for r in rows[(None, "t1")]] == [(0, ("champion", "3", 7, "predict"), 11, 0.5, "id-1", "a-1", 0.25)]
    assert [(r.seq, r.group, r.requested_at_us, r.account_id, r.score) for r in rows[("spend", "t1")]] == [
        (1, ("champion", "3", 7, "predict_batch"), 12, "line\nbreak", 0.5),
        (2, ("challenger", "4", 7, "predict_batch"), 13, "é", 0.75)]
    writer.close()


def test_two_processes_recovering_at_once_convert_a_journal_once(tmp_path):
    home = tmp_path / "home"
    for _ in range(3):  # three dead workers
        _writer_killed_after_appending(home, 600)
    script = ("import sys; from mlops.core.serving import recover_journals; "
              "r = recover_journals(sys.argv[1]); print(r.rows)")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(home)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [int(p.communicate(timeout=120)[0].split()[-1]) for p in procs]
    assert sum(outputs) > 0 and _journal_files(home) == []
    t1 = _segments(home, "t1")
    assert (t1[t1.role == "champion"].prediction_id.value_counts() == 3).all()  # each worker logged the same ids
    assert t1.groupby("file").size().sum() == len(t1) and len(t1[t1.role == "champion"]) == 1800


# --- ingestion faults ------------------------------------------------------------------------
def _writer_segments(home: Path, n_segments: int, rows: int = 50, prefix: str = "p") -> list[str]:
    writer = PredictionLogWriter(home, max_rows=rows, max_age_s=3600)
    ids = []
    for i in range(n_segments * rows):
        ids.append(f"{prefix}-{i}")
        writer.append_one(TENANT, ("champion", "1", 1, "predict"), i, 0.1, ids[-1], f"a-{i}", 0.5, 0.0)
    writer.close()
    return ids


def test_a_crash_between_the_commit_and_the_archive_move_ingests_nothing_twice(tmp_path):
    home, db = tmp_path / "home", tmp_path / "warehouse.duckdb"
    ids = _writer_segments(home, 4)
    script = textwrap.dedent(f"""
        import os, signal, duckdb
        from mlops.core.prediction_log import ingest_closed_segments
        con = duckdb.connect({str(db)!r})
        con.begin()
        ingestion = ingest_closed_segments(con, {str(home)!r}, {TENANT!r})
        con.commit()
        print(ingestion.loaded, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # before archive_segments moves anything
    """)
    crashed = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=120)
    assert crashed.returncode == -signal.SIGKILL and crashed.stdout.strip() == "4", crashed.stderr
    closed = prediction_log_dir(home, TENANT) / "closed"
    assert len(list(closed.glob("segment-*.parquet"))) == 4, "the crash left the segments in closed/"
    more = _writer_segments(home, 1, prefix="q")  # and the service wrote one more since

    with duckdb.connect(str(db)) as con:
        con.begin()
        second = ingest_closed_segments(con, home, TENANT)
        con.commit()
        archive_segments(home, TENANT, second.closed)
        assert (second.loaded, second.skipped, second.rows) == (1, 4, 50)
        logged = con.execute("SELECT prediction_id FROM prediction_log").fetchall()
    assert sorted(r[0] for r in logged) == sorted(ids + more)
    assert list(closed.glob("segment-*.parquet")) == []


def test_unreadable_segments_are_quarantined_with_a_reason_and_the_rest_ingested(tmp_path):
    home, db = tmp_path / "home", tmp_path / "warehouse.duckdb"
    ids = _writer_segments(home, 2)
    closed = prediction_log_dir(home, TENANT) / "closed"
    good = sorted(closed.glob("segment-*.parquet"))
    (closed / "segment-20260101T000000000000-1-deadbeef-000000000000-000000000009.parquet").write_bytes(
        good[0].read_bytes()[:300])  # truncated
    (closed / "segment-20260101T000000000001-1-deadbeef-000000000010-000000000019.parquet").write_bytes(
        b"PAR1 this is no parquet")  # damaged
    pd.DataFrame({"x": [1]}).to_parquet(closed / "segment-20260101T000000000002-other.parquet")  # not ours
    with duckdb.connect(str(db)) as con:
        con.begin()
        ingestion = ingest_closed_segments(con, home, TENANT)
        con.commit()
        archive_segments(home, TENANT, ingestion.closed)
        assert ingestion.loaded == 2 and ingestion.rows == 100 and len(ingestion.quarantined) == 3
        assert sorted(r[0] for r in con.execute("SELECT prediction_id FROM prediction_log").fetchall()) == sorted(ids)
    quarantine = prediction_log_dir(home, TENANT) / "quarantine"
    reasons = {p.name.removesuffix(".reason"): p.read_text() for p in quarantine.glob("*.reason")}
    assert len(reasons) == 3 and all((quarantine / name).exists() for name in reasons)
    assert "not a prediction-log segment" in reasons["segment-20260101T000000000002-other.parquet"]
    assert sum("not a readable Parquet file" in r for r in reasons.values()) == 2
    assert list(closed.iterdir()) == []


# --- the service, killed -9 under load -------------------------------------------------------
def _tiny_bundle(home: Path) -> str:
    """A served home without the pipeline (``benchmarks.reliability.tiny_bundle``: champion and
    challenger, so the shadow logs too), and an API key."""
    from benchmarks.reliability import tiny_bundle

    tiny_bundle(home, TENANT)
    return ApiKeyStore(serving_dir(home)).create(TENANT)


def _workers(proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if "bentos.service:ChurnService" in " ".join(p.cmdline()) and "--worker-id" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("durable_home")
    return home, _tiny_bundle(home)


def _load(url: str, key: str) -> Load:
    return Load(f"{url}/v1/predict", {"Authorization": f"Bearer {key}"},
                  lambda i: {"tenant": TENANT, "account_id": f"acc-{i % 400:04d}"}, threads=4)


def _metric(url: str, name: str, **labels) -> float:
    text = requests.get(f"{url}/metrics", timeout=5).text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(w in line for w in want))


def test_the_service_keeps_answering_while_segments_cannot_be_written_and_writes_the_backlog(tiny_home, tmp_path):
    home, key = tiny_home
    closed = prediction_log_dir(home, TENANT) / "closed"
    with bentoml_service(home, tmp_path / "serve.log") as served, _load(served["url"], key) as load:
        wait_until(lambda: closed.is_dir() and any(closed.glob("segment-*.parquet")), "a first segment")
        closed.rename(closed.with_name("closed.away"))
        closed.write_text("the disk refuses")  # every segment write fails from now on
        refused_at = time.monotonic()
        wait_until(lambda: _metric(served["url"], "prediction_log_write_failures_total", stage="segment") >= 2,
                   "the segment failure metric", timeout_s=30)
        wait_until(lambda: sum(s == 200 for _, s, _ in load.answered_after(refused_at)) >= 100,
                   "answers while segments fail")
        closed.unlink()
        closed.with_name("closed.away").rename(closed)
        restored_at = time.monotonic()
        backlog = list(load.ids)
        # the backlog is written once the disk takes segments again, while the service runs
        wait_until(lambda: _missing_and_duplicated(home, backlog)[0] == 0, "the backlog in segments", timeout_s=30)
        wait_until(lambda: sum(s == 200 for _, s, _ in load.answered_after(restored_at)) >= 50, "answers after")
    assert all(s == 200 for _, s, _ in load.results), {s for _, s, _ in load.results}
    log = served["log"].read_text()
    assert "writing a segment failed" in log and "predictions kept buffered and journaled" in log
    missing, duplicated = _missing_and_duplicated(home, load.ids)
    assert (missing, duplicated) == (0, 0) and _journal_files(home) == []


def test_kill_9_of_a_worker_and_of_the_whole_service_under_load_loses_no_answered_prediction(tiny_home, tmp_path):
    home, key = tiny_home
    answered: list[str] = []
    with bentoml_service(home, tmp_path / "serve.log") as served:
        with _load(served["url"], key) as load:
            wait_until(lambda: len(load.ids) >= 300, "300 answers")
            victim = _workers(served["proc"])[0]
            victim.kill()  # SIGKILL: no shutdown hook runs
            killed_at = time.monotonic()
            wait_until(lambda: sum(s == 200 for _, s, _ in load.answered_after(killed_at)) >= 300,
                       "300 answers after a worker was killed")
            # The whole service, mid-load: the workers sit in sessions of their own, so every process
            # of the tree gets SIGKILL, not only the group of `bentoml serve`.
            tree = [psutil.Process(served["proc"].pid), *psutil.Process(served["proc"].pid).children(recursive=True)]
            for process in tree:
                process.send_signal(signal.SIGKILL)
            psutil.wait_procs(tree, timeout=10)
            died_at = time.monotonic()
            wait_until(lambda: any(s is None for _, s, _ in load.answered_after(died_at)), "requests to fail")
        answered = list(load.ids)
    assert all(s == 200 for t, s, _ in load.results if t < killed_at)
    assert len(answered) >= 600
    dead_journals = [n for n in _journal_files(home) if n.endswith(".lock")]
    assert len(dead_journals) >= 2, dead_journals  # the killed worker's and at least one more

    # Restarted: each new worker converts the dead workers' journals at start-up, exactly once.
    with bentoml_service(home, tmp_path / "serve2.log") as served:
        wait_until(lambda: not (set(_journal_files(home)) & set(dead_journals)), "the dead journals recovered")
        ok = requests.post(f"{served['url']}/v1/predict", json={"tenant": TENANT, "account_id": "acc-0001"},
                           headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert ok.status_code == 200
    missing, duplicated = _missing_and_duplicated(home, answered)
    assert (missing, duplicated) == (0, 0), f"{missing} answered predictions missing, {duplicated} duplicated"

    # And the warehouse ingests them once (its primary key would refuse a duplicate).
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        con.begin()
        ingestion = ingest_closed_segments(con, home, TENANT)
        con.commit()
        archive_segments(home, TENANT, ingestion.closed)
        found = con.execute("SELECT count(DISTINCT prediction_id) FROM prediction_log "
                            "WHERE role = 'champion' AND list_contains(?, prediction_id)", [answered]).fetchone()[0]
    assert found == len(set(answered))


def test_the_fsync_policy_is_checked():
    from mlops.core.serving import log_fsync_policy

    assert log_fsync_policy("") == "interval" and log_fsync_policy("ALWAYS") == "always"
    with pytest.raises(ValueError, match="MLOPS_LOG_FSYNC='sometimes': expected one of none, interval, always"):
        log_fsync_policy("sometimes")


def test_partial_segments_of_killed_workers_are_removed_by_recovery(tmp_path):
    """A worker killed while writing a segment leaves ``.<segment>.tmp-<pid>-<thread>`` in closed/
    (its rows are in its journal); recovery deletes it, but never a live process's file or a fresh one."""
    from mlops.core.serving import journal_dir, prediction_log_dir, recover_journals

    journal_dir(tmp_path).mkdir(parents=True)
    closed = prediction_log_dir(tmp_path, "acme") / "closed"
    closed.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 3600
    orphan = closed / f".segment-1.parquet.tmp-{dead.pid}-1"
    live = closed / f".segment-2.parquet.tmp-{os.getpid()}-1"
    fresh = closed / f".segment-3.parquet.tmp-{dead.pid}-2"
    published = closed / "segment-4.parquet"
    for path in (orphan, live, fresh, published):
        path.write_bytes(b"partial")
    for path in (orphan, live, published):
        os.utime(path, (old, old))
    report = recover_journals(tmp_path)
    assert report.temporaries_removed == 1
    assert not orphan.exists() and live.exists() and fresh.exists() and published.exists()
