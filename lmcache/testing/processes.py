"""What every launcher of a test or benchmark server needs: a free loopback port, an
environment in which the child imports this tree's lmcache, waiting for a condition with a
deadline, and stopping by PID (the launchers: redis_servers.py, s3_server.py,
cache_server.py, lm_server.py, vllm_server.py)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, Mapping

REPO = Path(__file__).resolve().parents[2]


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


def child_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict:
    """`base` (default: this process's environment) with `extra`, and this repository first
    on PYTHONPATH, so that a child (vLLM's spawned engine included) imports this tree's lmcache."""
    env = dict(os.environ if base is None else base)
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env
