"""lm:// cache servers for tests, as real processes: ours (`python -m
lmcache.v1.server`) or upstream 0.5.6's (from tests/helpers/upstream_wheel.py),
and a raw protocol client for poking at them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmcache.v1.server import protocol as P
from lmcache.testing.processes import free_port

REPO = Path(__file__).resolve().parents[2]
# Upstream's server parses the key of every request, HEALTH included.
PROBE_KEY = b"probe@1@0@0@half"


class LMServerProc:
    def __init__(self, workdir: Path, args: tuple[str, ...] = (), upstream_tree: Path | None = None,
                 port: int | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = tuple(args)
        self.upstream_tree = upstream_tree
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"lm://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "LMServerProc":
        if self.upstream_tree is None:
            env = dict(os.environ, PYTHONPATH=str(REPO))
        else:
            from tests.helpers.upstream_wheel import upstream_env

            env = upstream_env(self.upstream_tree)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmcache.v1.server", self.host, str(self.port), *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with RawClient(self.port, timeout=1.0) as c:
                    if c.request(P.HEALTH, PROBE_KEY).code == P.SUCCESS:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"lm server on port {self.port} did not answer HEALTH:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


class RawClient:
    """One TCP connection speaking the protocol by hand."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> P.Reply:
        buf = bytearray(P.REPLY.size)
        if P.recv_exact(self.sock, memoryview(buf)) < len(buf):
            raise ConnectionResetError("no reply")
        return P.unpack_reply(buf)

    def request(self, command: int, key: bytes, **fields) -> P.Reply:
        self.send(P.pack_request(command, key, **fields))
        return self.reply()

    def put(self, key: bytes, data: bytes, fmt=P.FMT_BINARY, dtype=6, shape=None) -> None:
        self.send(P.pack_request(P.PUT, key, len(data), fmt, dtype, shape or (len(data), 0, 0, 0)) + data)

    def get(self, key: bytes) -> tuple[P.Reply, bytes | None]:
        reply = self.request(P.GET, key)
        if reply.code != P.SUCCESS:
            return reply, None
        buf = bytearray(reply.length)
        assert P.recv_exact(self.sock, memoryview(buf)) == reply.length
        return reply, bytes(buf)

    def exists(self, key: bytes) -> bool:
        return self.request(P.EXIST, key).code == P.SUCCESS


@pytest.fixture
def lm_factory(tmp_path):
    servers = []

    def make(*args: str, upstream_tree: Path | None = None, port: int | None = None,
             host: str = "127.0.0.1") -> LMServerProc:
        server = LMServerProc(tmp_path / f"lm{len(servers)}", args, upstream_tree, port, host)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def lm_server(lm_factory):
    return lm_factory("--max-size-gb", "0.25")
