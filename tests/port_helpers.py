"""TCP ports for daemons and launchers that must be told a port number before they start.

A port found free by binding and releasing it can be taken by a neighbouring test (another xdist
worker, or the kernel handing it to anyone's outgoing connection) before its user binds it. A port
from here lies below the kernel's ephemeral range, which it never hands out by itself, and is held
by a lock file that this process keeps until it ends, so two test processes never share one.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import zlib

_LOCK_DIR = os.path.join(tempfile.gettempdir(), "mellama-test-ports")
_held: list[int] = []  # the locks' file descriptors: released when this process ends


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def reserved_port() -> int:
    """A port on 127.0.0.1 that no other test process is handed while this one runs."""
    top = min(_ephemeral_low(), 65536)
    low = max(1024, top - 8192)
    span = top - low
    os.makedirs(_LOCK_DIR, exist_ok=True)
    # start each worker at its own place in the range, so they seldom try the same locks
    start = zlib.crc32(f"{os.environ.get('PYTEST_XDIST_WORKER', '')}:{os.getpid()}".encode()) % span
    for i in range(span):
        port = low + (start + i) % span
        fd = os.open(os.path.join(_LOCK_DIR, f"{port}.lock"), os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if _bindable(port):
            _held.append(fd)
            return port
        os.close(fd)
    raise RuntimeError(f"no free TCP port between {low} and {top}")
