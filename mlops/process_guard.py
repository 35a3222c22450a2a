"""Run a command so that a stop request ends all of it within a bounded time.

``python -m mlops.process_guard --grace 8 -- dagster-daemon run -w workspace.yaml``

The guard starts the command in its own process group (the caller starts the guard as a group
leader, ``start_new_session``). On SIGTERM, SIGINT or SIGHUP it forwards SIGTERM to the group, gives
the command and everything below it ``--grace`` seconds to end, then SIGKILLs the group and what is
left of the command's process tree (a process that started a session of its own included). It exits
with the command's exit status.

Why: a Dagster daemon told to stop finishes its threads' iterations and shuts down its code server
first, which on a loaded 2-core machine took over 15 s; when the demo's driver is killed outright
(SIGKILL, so it cannot escalate), the kernel's ``PR_SET_PDEATHSIG`` SIGTERM is the only stop request
the daemon ever gets. The guard receives that request and bounds it. Standard library only: it must
start fast and never fail to import.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SCAN_INTERVAL_S = 2.0  # how often the command's process tree is read


def exit_without_teardown(code: int):
    """End a driver whose work is done (its children stopped, its files written) without the
    interpreter's teardown: the exit handlers run (logging flushes, multiprocessing and
    concurrent.futures join what is left), then the process exits. With Dagster, MLflow, pandas and
    SQLAlchemy loaded, finalization clears every module and garbage-collects for seconds on a loaded
    machine (seen: over 3 s of "Garbage-collecting" after the demo's last line, 8 s in a CI run),
    which whoever pressed Ctrl-C waits through for nothing."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _prctl():
    """libc's ``prctl`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux)."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def child_dies_with(parent: int):
    """A ``preexec_fn``: SIGTERM to the child when ``parent`` (the driver) dies, even by SIGKILL.
    libc is looked up here, before the fork: the child only calls it."""
    prctl = _prctl()

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the driver died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere), with its start time."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return {p: started for p in found if (started := start_time(p)) is not None}


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (None when gone or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def still_running(processes: dict[int, str]) -> dict[int, str]:
    """Those of ``processes`` still running as the same process (a reused id is not)."""
    return {pid: started for pid, started in processes.items() if start_time(pid) == started}


def kill_leftovers(processes: dict[int, str], deadline: float) -> None:
    """SIGKILL the processes of ``processes`` still running at ``deadline``."""
    alive = still_running(processes)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = still_running(alive)
    for pid in alive:
        if start_time(pid) == alive[pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def run(argv: list[str], grace_s: float) -> int:
    stop: list[int] = []

    def request_stop(signum, frame) -> None:
        stop.append(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)
    child = subprocess.Popen(argv)
    tree: dict[int, str] = {}
    scanned = 0.0
    while child.poll() is None and not stop:
        if time.monotonic() - scanned > SCAN_INTERVAL_S:
            # Remembered: a process whose parent ended is no longer below the guard, yet is the command's.
            tree = {**still_running(tree), **descendants(os.getpid())}
            scanned = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=0.1)
    if stop:
        deadline = time.monotonic() + grace_s
        tree.update(descendants(os.getpid()))
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # the group's SIGTERM below reaches the guard too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgrp(), signal.SIGTERM)
        kill_leftovers(tree, deadline)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    else:
        kill_leftovers(tree, time.monotonic() + grace_s)  # the command ended: so does what it left
    code = child.poll()
    return 128 + stop[0] if code is None else (code if code >= 0 else 128 - code)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlops.process_guard", description=__doc__.split("\n")[0])
    parser.add_argument("--grace", type=float, default=8.0, help="seconds a stop may take before SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    parsed = parser.parse_args(args)
    command = parsed.command[1:] if parsed.command[:1] == ["--"] else parsed.command
    if not command:
        parser.error("no command to run (give it after --)")
    return run(command, parsed.grace)


if __name__ == "__main__":
    sys.exit(main())
