"""The lm:// cache server (`python -m lmcache.v1.server HOST PORT [ARGS]`) as a child process
on a loopback port, stopped by PID: the one launcher of it for tests and benchmarks alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping

from lmcache.testing.processes import child_env, free_port, kill_and_reap, wait_until


def accepts_connections(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class LmServerProcess:
    def __init__(self, workdir: Path, args: tuple[str, ...] = (), *, port: int | None = None,
                 host: str = "127.0.0.1", env: Mapping[str, str] | None = None,
                 ready: Callable[[int], bool] = accepts_connections):
        """`env`: the child's whole environment (default: this one, importing this tree);
        `ready(port)`: whether the server answers (default: it accepts a connection)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = tuple(args)
        self.host = host
        self.port = port or free_port()
        self.env = dict(env) if env is not None else None
        self.ready = ready
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"lm-server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"lm://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "LmServerProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lmcache.v1.server", self.host, str(self.port), *self.args],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                env=self.env if self.env is not None else child_env())
        up = wait_until(lambda: self.proc.poll() is not None or self.ready(self.port), timeout, interval=0.05)
        if not up or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"lm server on port {self.port} did not start:\n{self.log()[-4000:]}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        kill_and_reap(self.proc)
        self.proc = None

    stop = kill

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.terminate()
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")
