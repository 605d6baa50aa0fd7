"""What every launcher of a test or benchmark server needs: a free loopback port, and
waiting for a condition with a deadline (the servers themselves: redis_servers.py,
s3_server.py, bench/workload/services.py)."""

from __future__ import annotations

import socket
import time
from typing import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def kill_and_reap(proc) -> None:
    """SIGKILL a started server by PID (what it held in memory is lost) and reap it; None or
    an exited process is left as it is (reaped)."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
