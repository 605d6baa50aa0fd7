"""Small clients of a real `lmcache server` (its launcher: lmcache/testing/cache_server.py)."""

from __future__ import annotations

import socket

from lmcache.testing.cache_server import REPO, CacheServerProcess  # noqa: F401 (the tests' launcher)
from lmcache.v1.mp import protocol as P

CHUNK = 16  # the tests' chunk size (the server's default is 256)


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
