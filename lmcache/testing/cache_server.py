"""A real `lmcache server` process on 127.0.0.1 at free ports (control and HTTP), started
and stopped by PID: the one launcher of it for tests and benchmarks alike.

`status()` is the server's own `/status` JSON (the HTTP port is always on here)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from lmcache.testing.processes import REPO, child_env, free_port, wait_until


class CacheServerProcess:
    def __init__(self, l1_gb: float = 0.02, extra_args: tuple[str, ...] = (), chunk_size: int = 256,
                 log_path: Path | None = None, log_level: str = "INFO"):
        self.port = free_port()
        self.http_port = free_port()
        self.chunk_size = chunk_size
        self.l1_gb = l1_gb
        self.extra_args = tuple(extra_args)
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        if log_path is None:
            log_path = Path(tempfile.NamedTemporaryFile(prefix="lmcache-server-", suffix=".log", delete=False).name)
        self.log_path = Path(log_path)

    def start(self, timeout: float = 60.0) -> "CacheServerProcess":
        env = child_env({"OMP_NUM_THREADS": "1"})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
        up = wait_until(lambda: self.healthy() or self.proc.poll() is not None, timeout)
        if not up or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"lmcache server did not start (exit status {self.proc.poll()}):\n{self.log()[-4000:]}")
        return self

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "lmcache", "server", "--port", str(self.port), "--l1-size-gb", str(self.l1_gb),
                "--chunk-size", str(self.chunk_size), "--http-port", str(self.http_port),
                "--log-level", self.log_level, *self.extra_args]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: what the server held in shared memory is gone."""
        self.stop(signal.SIGKILL)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthcheck", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def status(self, timeout: float = 10.0) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/status", timeout=timeout) as r:
            return json.loads(r.read())

    def config(self, **more) -> dict:
        """In-process config keys of an engine whose host tier is this server."""
        return {"chunk_size": self.chunk_size, "mp_host": "127.0.0.1", "mp_port": self.port,
                "remote_retry_interval": 0.3, "remote_timeout": 2.0, **more}
