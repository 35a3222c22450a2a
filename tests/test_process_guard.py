"""``mlops.process_guard``: a stop request to the guard ends the command and every process below it
(one that ignores SIGTERM, one in a session of its own) within the grace period; the command's exit
status passes through."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mlops.core.environment import PROJECT_ROOT
from tests.servers import wait_until

pytestmark = pytest.mark.timeout(60)
GRACE_S = 2.0

# A command that ignores SIGTERM and starts a child, in a session of its own, that ignores it too.
STUBBORN = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)'], start_new_session=True)\n"
    "time.sleep(120)\n"
)


def guard(*command: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlops.process_guard", "--grace", str(GRACE_S), "--", *command],
                            cwd=PROJECT_ROOT, start_new_session=True, **popen)


def tree_of(pid: int, size: int) -> list[psutil.Process]:
    """``pid``'s process and its descendants, once there are ``size`` of them below it."""
    root = psutil.Process(pid)
    wait_until(lambda: len(root.children(recursive=True)) >= size, f"{size} processes below {pid}", timeout_s=20)
    return [root, *root.children(recursive=True)]


def running(processes: list[psutil.Process]) -> list[str]:
    return [f"{p.pid} {' '.join(p.cmdline())}" for p in processes
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_stop_request_ends_a_command_that_ignores_it_and_its_whole_tree():
    guarded = guard(sys.executable, "-c", STUBBORN)
    tree = tree_of(guarded.pid, 2)
    try:
        sent = time.monotonic()
        guarded.send_signal(signal.SIGTERM)
        code = guarded.wait(timeout=GRACE_S + 5)
        psutil.wait_procs(tree, timeout=2)
        assert not running(tree), running(tree)
        took = time.monotonic() - sent
        assert GRACE_S - 0.5 <= took <= GRACE_S + 3, took  # the grace, then SIGKILL
        assert code == 128 + signal.SIGKILL  # the command itself was killed
    finally:
        for p in tree:
            if p.is_running():
                p.kill()


def test_a_command_that_stops_when_asked_ends_at_once_with_its_status():
    guarded = guard(sys.executable, "-c", "import signal, sys, time\n"
                    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\ntime.sleep(120)\n")
    tree_of(guarded.pid, 1)
    sent = time.monotonic()
    guarded.send_signal(signal.SIGTERM)
    assert guarded.wait(timeout=GRACE_S + 5) == 3
    assert time.monotonic() - sent < GRACE_S


def test_the_exit_status_of_a_command_that_ends_passes_through():
    assert guard(sys.executable, "-c", "raise SystemExit(7)").wait(timeout=30) == 7


def test_a_guard_whose_parent_is_killed_ends_everything():
    """The demo's case: the driver dies by SIGKILL; the kernel's PR_SET_PDEATHSIG SIGTERM reaches
    the guard alone, and the guard ends the command's tree."""
    parent_code = (
        "import os, signal, subprocess, sys, time\n"
        "from mlops.process_guard import child_dies_with\n"
        f"subprocess.Popen([sys.executable, '-m', 'mlops.process_guard', '--grace', '{GRACE_S}', '--', "
        f"sys.executable, '-c', {STUBBORN!r}], start_new_session=True, preexec_fn=child_dies_with(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=PROJECT_ROOT,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    tree = tree_of(parent.pid, 3)[1:]
    try:
        parent.kill()
        parent.wait(timeout=5)
        psutil.wait_procs(tree, timeout=GRACE_S + 5)
        assert not running(tree), running(tree)
    finally:
        for p in tree:
            if p.is_running():
                p.kill()


def test_no_command_is_an_error():
    done = subprocess.run([sys.executable, "-m", "mlops.process_guard", "--grace", "1"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "no command to run" in done.stderr
