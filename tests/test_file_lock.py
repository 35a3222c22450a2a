"""``file_lock``: the one exclusive lock on shared files (serving manifest, alert ledger, tenant
catalog). Real processes, and threads of one process, each do read-modify-write increments of a
JSON counter under it; none may be lost. The lock must be released when the block raises."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mlops.core.environment import file_lock

WORKERS = 4
INCREMENTS = 50


def _increment(counter: Path, lock: Path, times: int) -> None:
    for _ in range(times):
        with file_lock(lock):
            value = json.loads(counter.read_text())["count"]
            time.sleep(0.0005)  # widen the read-modify-write window: without the lock, updates are lost
            counter.write_text(json.dumps({"count": value + 1}))


def _nonblocking_try(lock: Path) -> bool:
    """Whether another process could take the lock right now."""
    code = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n"
        "    sys.exit(1)\n"
        "sys.exit(0)\n"
    )
    return subprocess.run([sys.executable, "-c", code, str(lock)], timeout=30).returncode == 0


def test_processes_incrementing_a_counter_under_the_lock_lose_no_update(tmp_path):
    counter = tmp_path / "counter.json"
    counter.write_text(json.dumps({"count": 0}))
    lock = tmp_path / "locks" / "counter.lock"  # its folder does not exist yet: file_lock creates it
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_increment, args=(counter, lock, INCREMENTS)) for _ in range(WORKERS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0] * WORKERS
    assert json.loads(counter.read_text())["count"] == WORKERS * INCREMENTS


def test_threads_of_one_process_are_serialized_too(tmp_path):
    # No threading lock in file_lock: each call opens its own file description, and flock
    # excludes descriptions of one process from each other as it does other processes.
    counter = tmp_path / "counter.json"
    counter.write_text(json.dumps({"count": 0}))
    lock = tmp_path / "counter.lock"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _increment(counter, lock, INCREMENTS)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert json.loads(counter.read_text())["count"] == WORKERS * INCREMENTS


def test_the_lock_is_held_in_the_block_and_released_when_the_block_raises(tmp_path):
    lock = tmp_path / "ledger.lock"
    with pytest.raises(RuntimeError, match="boom"), file_lock(lock):
        assert not _nonblocking_try(lock)  # held: another process cannot take it
        raise RuntimeError("boom")
    assert _nonblocking_try(lock)  # released, for other processes
    fd = os.open(lock, os.O_RDWR)  # and for this one
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    with file_lock(lock):  # and it can be taken again
        pass


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_subprocess_started_in_the_block_does_not_inherit_the_lock_file(tmp_path):
    lock = tmp_path / "manifest.lock"
    code = (
        "import os\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        print(os.readlink(f'/proc/self/fd/{fd}'))\n"
        "    except OSError:\n"
        "        pass  # the descriptor listdir itself used, closed by now\n"
    )
    with file_lock(lock):
        out = subprocess.run([sys.executable, "-c", code], close_fds=False, capture_output=True, text=True,
                             timeout=30, check=True).stdout
    assert str(lock) not in out.splitlines()
