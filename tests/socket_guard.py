"""A socket guard for a whole process tree: proof that a command opens no connection off the machine.

``guarded_env`` writes a ``sitecustomize.py`` into a folder and puts that folder first on PYTHONPATH,
so every Python process started with the environment (and every Python child it starts, which
inherits PYTHONPATH) imports it at start-up. The guard wraps ``socket.socket.connect``,
``connect_ex``, ``sendto``, ``socket.create_connection``, ``getaddrinfo``, ``gethostbyname``,
``gethostbyname_ex`` and ``gethostbyaddr``: a loopback address, a unix socket or this machine's own
name passes; anything else is recorded (one JSON line in the record file: pid, call, target, command
line) and refused with an OSError, so no packet leaves. Each guarded process also records that it
loaded the guard, which proves the guard was really in force where the test says it was.

Not covered: processes that are not Python (a ``uv`` or ``git`` binary, a browser), Python started
with ``-I``/``-E`` (which ignores PYTHONPATH), and C extensions that call the C library's
``connect`` themselves. The tests that use the guard keep their other barriers for those (offline
package-manager settings, a network namespace where ``unshare`` is allowed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RECORD_ENV = "MLOPS_SOCKET_GUARD_RECORD"

SITECUSTOMIZE = r'''
import os as _os

_RECORD = _os.environ.get("MLOPS_SOCKET_GUARD_RECORD")
if _RECORD:
    import errno as _errno
    import ipaddress as _ipaddress
    import json as _json
    import socket as _socket
    import sys as _sys

    _real = {
        "connect": _socket.socket.connect, "connect_ex": _socket.socket.connect_ex,
        "sendto": _socket.socket.sendto, "getaddrinfo": _socket.getaddrinfo,
        "gethostbyname": _socket.gethostbyname, "gethostbyname_ex": _socket.gethostbyname_ex,
        "gethostbyaddr": _socket.gethostbyaddr, "create_connection": _socket.create_connection,
    }
    try:
        _OWN = {_socket.gethostname().lower()}
    except OSError:
        _OWN = set()
    _LOCAL_NAMES = {"", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"} | _OWN

    def _write(kind, target):
        line = _json.dumps({"pid": _os.getpid(), "call": kind, "target": repr(target), "argv": _sys.argv[:4]})
        with open(_RECORD, "a") as fh:
            fh.write(line + "\n")

    def _off_machine(host):
        if host is None:
            return False
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        host = str(host).strip("[]").lower()
        if host in _LOCAL_NAMES or host.endswith(".localhost"):
            return False
        try:
            ip = _ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return True  # any other name: resolving it may ask a DNS server
        return not (ip.is_loopback or ip.is_unspecified)

    def _check(kind, host, target):
        if _off_machine(host):
            _write(kind, target)
            raise OSError(_errno.ENETUNREACH, f"socket guard: {kind} to {target!r} refused (off the machine)")

    def _inet_host(sock, address):
        if sock.family in (_socket.AF_INET, _socket.AF_INET6) and isinstance(address, tuple):
            return address[0]
        return None

    def connect(self, address):
        _check("connect", _inet_host(self, address), address)
        return _real["connect"](self, address)

    def connect_ex(self, address):
        try:
            _check("connect_ex", _inet_host(self, address), address)
        except OSError as exc:
            return exc.errno
        return _real["connect_ex"](self, address)

    def sendto(self, data, *args):
        address = args[-1] if args else None
        _check("sendto", _inet_host(self, address), address)
        return _real["sendto"](self, data, *args)

    def getaddrinfo(host, *args, **kwargs):
        _check("getaddrinfo", host, host)
        return _real["getaddrinfo"](host, *args, **kwargs)

    def gethostbyname(host):
        _check("gethostbyname", host, host)
        return _real["gethostbyname"](host)

    def gethostbyname_ex(host):
        _check("gethostbyname_ex", host, host)
        return _real["gethostbyname_ex"](host)

    def gethostbyaddr(host):
        _check("gethostbyaddr", host, host)
        return _real["gethostbyaddr"](host)

    def create_connection(address, *args, **kwargs):
        _check("create_connection", address[0], address)
        return _real["create_connection"](address, *args, **kwargs)

    _socket.socket.connect, _socket.socket.connect_ex, _socket.socket.sendto = connect, connect_ex, sendto
    _socket.getaddrinfo, _socket.gethostbyname, _socket.gethostbyname_ex = getaddrinfo, gethostbyname, gethostbyname_ex
    _socket.gethostbyaddr = gethostbyaddr
    _socket.create_connection = create_connection
    _write("loaded", None)
'''


def guarded_env(folder: Path, env: dict[str, str] | None = None) -> tuple[dict[str, str], Path]:
    """``env`` (default: this process's) with the guard first on PYTHONPATH; returns it and the
    record file the guarded processes write to."""
    folder = Path(folder)
    guard = folder / "socket_guard"
    guard.mkdir(parents=True, exist_ok=True)
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE)
    record = folder / "socket_guard.jsonl"
    record.write_text("")
    env = dict(os.environ if env is None else env)
    path = [str(guard), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env[RECORD_ENV] = str(record)
    return env, record


def read_record(record: Path) -> tuple[set[int], list[dict]]:
    """(pids that loaded the guard, refused off-machine attempts)."""
    entries = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    return {e["pid"] for e in entries if e["call"] == "loaded"}, [e for e in entries if e["call"] != "loaded"]


# A guarded Python that starts a guarded child; both try to reach TEST-NET-3 (RFC 5737: documentation
# only, never routed), the child through a name lookup as HTTP clients do.
CONTROL = r'''
import socket, subprocess, sys
with socket.socket() as s:
    code = s.connect_ex(("203.0.113.1", 443))
    print("connect_ex", code)
child = "import urllib.request\ntry:\n    urllib.request.urlopen('http://telemetry.example.com/', timeout=2)\nexcept OSError as e:\n    print('refused', e)"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); s.listen()
    with socket.create_connection(s.getsockname()):
        print("loopback ok")
'''


def control_run(folder: Path) -> tuple[set[int], list[dict], str]:
    """The guard's control: a deliberate off-machine connect in a guarded process and its child is
    recorded and refused, while loopback passes."""
    env, record = guarded_env(folder)
    proc = subprocess.run([sys.executable, "-c", CONTROL], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded, attempts = read_record(record)
    return loaded, attempts, proc.stdout
