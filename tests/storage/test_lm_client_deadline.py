"""remote_timeout is a deadline for a whole lm:// operation: a peer on 127.0.0.1 that
answers a byte a second (bounded: it gives up after 8 s) cannot hold a GET, a
lookup or a PUT past it."""

import socket
import threading
import time

import pytest
import torch

from lmcache.v1.memory import HostMemoryPool
from lmcache.v1.server import protocol as P
from lmcache.v1.storage_backend.lm import LMServerBackend
from lmcache.v1.storage_backend.stats import EngineStats
from tests.helpers.tier_objects import MB, key, make_obj

TRICKLE_FOR = 8.0  # seconds a connection is trickled to before the peer closes it


class TricklingPeer:
    """Answers every request with a plausible reply (a whole chunk for GET), one byte a
    second; never reads PUT bodies."""

    def __init__(self, reply_for_get: bytes):
        self.reply_for_get = reply_for_get
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        with conn:
            conn.settimeout(TRICKLE_FOR)
            header = bytearray(P.REQUEST.size)
            try:
                if P.recv_exact(conn, memoryview(header)) < len(header):
                    return
                command = P.unpack_request(header).command
                if command == P.PUT:
                    time.sleep(TRICKLE_FOR)  # its body is never read
                    return
                answer = self.reply_for_get if command == P.GET else P.SUCCESS_REPLY
                ends = time.monotonic() + TRICKLE_FOR
                for i in range(len(answer)):
                    if self.stop.is_set() or time.monotonic() > ends:
                        return
                    conn.sendall(answer[i:i + 1])
                    time.sleep(1.0)
            except OSError:
                return

    def close(self):
        self.stop.set()
        self.listener.close()


@pytest.fixture
def chunk():
    pool = HostMemoryPool(256 * MB)
    obj = make_obj(pool, torch.bfloat16, False)
    return pool, obj


@pytest.fixture
def trickler(chunk):
    _, obj = chunk
    reply = P.Reply(P.SUCCESS, obj.nbytes, P.FMT_KV_2LTD, P.DTYPE_CODES["bfloat16"],
                    P.pad_shape(obj.metadata.shape), 0).pack()
    peer = TricklingPeer(reply + bytes(obj.nbytes))
    yield peer
    peer.close()


def timed(fn):
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def test_get_ends_by_its_deadline(trickler, chunk):
    pool, _ = chunk
    stats = EngineStats()
    tier = LMServerBackend(f"lm://127.0.0.1:{trickler.port}", timeout=2.0, stats=stats)
    got, took = timed(lambda: tier.get(key(1), pool.allocate))
    assert got is None and 1.5 < took < 4.0, took  # ec5d26c: 8 s (a timeout per read)
    assert stats.as_dict()["misses_tier_down"] == 1
    tier.close()


def test_lookup_ends_by_its_deadline(trickler):
    tier = LMServerBackend(f"lm://127.0.0.1:{trickler.port}", timeout=2.0)
    found, took = timed(lambda: tier.prefix_count([key(i) for i in range(64)]))  # two batches of EXISTs
    assert found == 0 and took < 4.0, took
    tier.close()


def test_put_to_a_peer_that_never_reads_ends_by_its_deadline(trickler):
    pool = HostMemoryPool(128 * MB)
    obj = make_obj(pool, torch.bfloat16, False, tokens=65536)  # 48 MiB: more than the socket buffers hold
    stats = EngineStats()
    tier = LMServerBackend(f"lm://127.0.0.1:{trickler.port}", timeout=2.0, stats=stats)
    stored, took = timed(lambda: tier.put(key(2), obj))
    assert not stored and took < 4.0, took
    assert stats.as_dict()["misses_dropped"] == 1
    tier.close()
