"""A real `lmcache server` process on 127.0.0.1 at a free port, and small clients of it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile

from lmcache.testing.processes import wait_until
from lmcache.v1.mp import protocol as P
from lmcache.testing.processes import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHUNK = 16


class CacheServerProcess:
    def __init__(self, l1_gb: float = 0.02, extra_args: tuple[str, ...] = (), chunk_size: int = CHUNK):
        self.port = free_port()
        self.chunk_size = chunk_size
        self.l1_gb = l1_gb
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="lmcache-server-", suffix=".log", delete=False)

    def start(self) -> "CacheServerProcess":
        starts = self.log().count("listening on")  # the log goes on across restarts
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        self.proc = subprocess.Popen(self.argv(), cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        assert wait_until(lambda: self.log().count("listening on") > starts or self.proc.poll() is not None,
                          60), self.log()
        assert self.proc.poll() is None, self.log()
        return self

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "lmcache", "server", "--port", str(self.port), "--l1-size-gb", str(self.l1_gb),
                "--chunk-size", str(self.chunk_size), *self.extra_args]

    def log(self) -> str:
        with open(self._log.name) as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def status(self) -> dict:
        with RawClient(self.port) as c:
            return c.call("stats")["status"]

    def config(self, **more) -> dict:
        return {"chunk_size": self.chunk_size, "mp_host": "127.0.0.1", "mp_port": self.port,
                "remote_retry_interval": 0.3, "remote_timeout": 2.0, **more}


class RawClient:
    """Speaks the protocol by hand (hello and auth unless told not to)."""

    def __init__(self, port: int, admit: bool = True, timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.next_id = 0
        if admit:
            reply = self.exchange(P.hello())
            from lmcache.v1.mp.arena import Arena

            self.arena = Arena.open(reply["arena"], reply["arena_bytes"])
            assert self.exchange({"op": "auth", "token": self.arena.token, "name": "raw"}) == {"ok": True}

    def exchange(self, message: dict) -> dict:
        P.send(self.sock, message)
        return P.recv(self.sock)

    def call(self, op: str, **fields) -> dict:
        self.next_id += 1
        reply = self.exchange({"op": op, "id": self.next_id, **fields})
        assert reply.get("id") == self.next_id, reply
        return reply

    def post(self, op: str, **fields) -> None:
        P.send(self.sock, {"op": op, **fields})

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
