"""The Redis tier against peers that are not a healthy Redis (issue 20, item 4):
a peer that trickles a byte a second, and one that answers +OK to everything.
Each is a real TCP server on 127.0.0.1 in a thread of the test."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
import torch

from lmcache.v1.memory import HostMemoryPool, MemoryFormat, MemoryObj
from lmcache.v1.storage_backend.remote import RemoteBackend
from lmcache.v1.storage_backend.storage_manager import StorageManager
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.token_database import CacheEngineKey


class Peer:
    """Accepts connections; `reply(conn)` runs for each, in its own thread."""

    def __init__(self, reply):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self.reply(conn, self.stop)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


def trickle(conn, stop):
    """Reads the request, then sends the start of a huge bulk reply one byte a second."""
    conn.recv(65536)
    for byte in b"$100000000\r\n" + b"x" * 1000:
        if stop.wait(1.0):
            return
        conn.sendall(bytes([byte]))


def ok_to_everything(conn, stop):
    while not stop.is_set():
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(b"+OK\r\n" * max(1, data.count(b"\r\n*") + 1))


@pytest.fixture
def peer():
    peers = []

    def make(reply):
        peers.append(Peer(reply))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def _key(i: int) -> CacheEngineKey:
    return CacheEngineKey("m", 1, 0, f"{i:032x}", "bfloat16", "kv")


def _obj() -> MemoryObj:
    return MemoryObj(torch.zeros(2, 1, 16, 8, dtype=torch.bfloat16), MemoryFormat.KV_2LTD)


def test_remote_timeout_is_a_deadline_for_the_whole_get(peer):
    slow = peer(trickle)
    tier = RemoteBackend(f"redis://127.0.0.1:{slow.port}", timeout=1.0, connect_timeout=0.5)
    pool = HostMemoryPool(1 << 20)
    start = time.monotonic()
    assert tier.get(_key(0), pool.allocate) is None
    elapsed = time.monotonic() - start
    # Without the deadline each byte resets the per-read timeout: the GET would run for
    # the whole trickle (the handshake alone takes ~8 s of single bytes).
    assert elapsed < 3.0, f"a 1 s remote_timeout GET took {elapsed:.1f}s against a trickling peer"
    assert tier.is_down
    tier.close()


def test_a_peer_answering_ok_to_everything_is_misses_and_few_log_lines(peer, caplog):
    fake = peer(ok_to_everything)
    config = LMCacheEngineConfig.from_defaults(remote_url=f"redis://127.0.0.1:{fake.port}", max_local_cpu_size=0.01,
                                               local_cpu=False)
    manager = StorageManager(config)
    caplog.set_level(logging.WARNING)
    keys = [_key(i) for i in range(20)]
    for key in keys:
        manager.put(key, _obj())
    assert manager.flush(30)
    for _ in range(5):
        assert manager.lookup_prefix(keys) == 0
        assert manager.get(keys[0]) is None
    manager.close()
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any(r.exc_info for r in records), "a traceback was logged"
    # one line per kind of failure (SET, EXISTS, GET), not one per chunk or per call
    assert 1 <= len(records) <= 4, [r.getMessage() for r in records]
    assert manager.stats.misses["dropped"] >= len(keys)


@pytest.mark.parametrize("scheme", ["redis-cluster", "redis-sentinel"])
def test_no_seed_answering_is_misses_and_one_line(scheme, caplog):
    from lmcache.testing.processes import free_port

    tier = RemoteBackend(f"{scheme}://127.0.0.1:{free_port()},127.0.0.1:{free_port()}", timeout=0.5,
                         connect_timeout=0.2, retry_interval=0.05)
    pool = HostMemoryPool(1 << 20)
    caplog.set_level(logging.WARNING)
    for i in range(5):
        assert tier.prefix_count([_key(i)]) == 0
        assert tier.get(_key(i), pool.allocate) is None
        assert tier.put(_key(i), _obj()) is False
        time.sleep(0.06)  # past the back-off: each round asks again
    tier.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "unreachable" in lines[0], lines
