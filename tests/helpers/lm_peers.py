"""lm:// cache servers for tests, as real processes: ours (`python -m
lmcache.v1.server`) or upstream 0.5.6's (from tests/helpers/upstream_wheel.py),
and a raw protocol client for poking at them."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lmcache.v1.server import protocol as P
from lmcache.testing.lm_server import LmServerProcess

REPO = Path(__file__).resolve().parents[2]
# Upstream's server parses the key of every request, HEALTH included.
PROBE_KEY = b"probe@1@0@0@half"


def _answers_health(port: int) -> bool:
    try:
        with RawClient(port, timeout=1.0) as c:
            return c.request(P.HEALTH, PROBE_KEY).code == P.SUCCESS
    except OSError:
        return False


def lm_server_process(workdir: Path, args: tuple[str, ...] = (), upstream_tree: Path | None = None,
                      port: int | None = None, host: str = "127.0.0.1") -> LmServerProcess:
    """Ours, or upstream's from `upstream_tree`; ready when it answers HEALTH."""
    env = None
    if upstream_tree is not None:
        from tests.helpers.upstream_wheel import upstream_env

        env = upstream_env(upstream_tree)
    return LmServerProcess(workdir, args, port=port, host=host, env=env, ready=_answers_health)


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
             host: str = "127.0.0.1") -> LmServerProcess:
        server = lm_server_process(tmp_path / f"lm{len(servers)}", args, upstream_tree, port, host)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def lm_server(lm_factory):
    return lm_factory("--max-size-gb", "0.25")
