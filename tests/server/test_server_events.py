"""KV events through the server: the real engine, as a vLLM worker's would, hears what
the server's tiers stored and lost of ITS chunks (sync_events, one round trip): its own
stores, a chunk another client's stores pushed out of the server's memory, nothing of
another model's chunks with the same tokens; a server that goes away is everything
lost once, and a restarted one starts afresh. A hostile server's events are refused."""

from __future__ import annotations

import logging
import socket
import threading

import pytest
import torch

from lmcache.testing.processes import wait_until
from lmcache.v1.cache_engine import LMCacheEngine
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.mp import protocol as P
from lmcache.v1.mp.client_storage import ServerStorage
from lmcache.v1.mp.server_events import SERVER_TIERS
from lmcache.v1.storage_backend.stats import EngineStats
from tests.helpers.cache_server import RawClient
from tests.helpers.host_connector import HostPagedConnector
from tests.helpers.workload import SHAPE, make_engine, metadata, prompt_tokens, store_prompt

N = 64  # tokens: 4 chunks of 16 KiB
CHUNK_GB = 16 * 1024 / 1024**3


class Heard:
    """An EngineStats observer, as the vLLM worker's metrics are."""

    def __init__(self, engine):
        self.items: list[tuple[str, bool, object]] = []
        engine.stats.add_observer(lambda tier, stored, key: self.items.append((tier, stored, key)))

    def take(self) -> list:
        items, self.items = self.items, []
        return items


def store_and_hear(engine, conn, heard: Heard, p: int) -> list:
    """Store prompt p, let the server have it all, and what the engine then hears."""
    assert store_prompt(engine, conn, p, N) == N
    engine.storage.flush()
    engine.storage.sync_events()
    return heard.take()


def keys_of(engine, p: int) -> list:
    return [c.key for c in engine.token_db.chunks(prompt_tokens(p, N))]


def other_model_engine(config):
    conn = HostPagedConnector(N, SHAPE["num_layers"], SHAPE["num_heads"], SHAPE["head_size"], torch.float16)
    return LMCacheEngine(config, metadata(config.chunk_size, model="org/other-model"), conn), conn


def test_an_engine_hears_its_stores_and_the_evictions_anothers_stores_caused(cache_server_factory):
    server = cache_server_factory(l1_gb=10 * CHUNK_GB).start()  # 10 chunks
    config = LMCacheEngineConfig.from_defaults(**server.config())
    mine, my_conn = make_engine(config, N)
    other, other_conn = other_model_engine(config)
    try:
        heard = Heard(mine)
        assert store_and_hear(mine, my_conn, heard, 1) == [("cpu", True, k) for k in keys_of(mine, 1)]  # in order

        # the same tokens under another model: a different key, not this engine's chunk
        assert store_prompt(other, other_conn, 1, N) == N
        other.storage.flush()
        mine.storage.sync_events()
        assert heard.take() == []
        assert server.status()["l1_chunks"] == 8

        # the other client's next stores push this engine's oldest chunks out of the server's memory
        assert store_prompt(other, other_conn, 2, N) == N
        other.storage.flush()
        mine.storage.sync_events()
        removed = heard.take()
        assert removed and all(tier == "cpu" and not stored for tier, stored, _ in removed)
        assert [k for _, _, k in removed] == keys_of(mine, 1)[:len(removed)]  # LRU: the oldest first
        mine.storage.sync_events()
        assert heard.take() == []  # each event once
    finally:
        mine.close()
        other.close()


def test_a_server_gone_is_everything_lost_once_and_a_restarted_one_starts_afresh(cache_server):
    config = LMCacheEngineConfig.from_defaults(**cache_server.config())
    engine, conn = make_engine(config, N)
    try:
        heard = Heard(engine)
        assert len(store_and_hear(engine, conn, heard, 1)) == 4
        cache_server.kill()
        assert engine.lookup(prompt_tokens(1, N)) == 0  # the step thread notices the outage
        engine.storage.sync_events()
        engine.storage.sync_events()
        lost = [(tier, stored, key) for tier, stored, key in heard.take() if tier in SERVER_TIERS]
        assert lost == [(tier, False, None) for tier in SERVER_TIERS]  # once, not per sync

        cache_server.start()
        assert wait_until(lambda: store_prompt(engine, conn, 2, N) == N, timeout=15)  # the restarted server
        engine.storage.flush()
        engine.storage.sync_events()
        assert heard.take() == [("cpu", True, k) for k in keys_of(engine, 2)]  # nothing of the old server's
    finally:
        engine.close()


def test_the_same_server_after_an_outage_tells_again_what_it_still_holds(cache_server):
    config = LMCacheEngineConfig.from_defaults(**cache_server.config())
    engine, conn = make_engine(config, N)
    try:
        heard = Heard(engine)
        told = store_and_hear(engine, conn, heard, 1)
        link = engine.storage.link
        link.failed(link.current(), OSError("timed out (the test)"))  # our side gave up; the server lives on
        engine.storage.sync_events()
        assert [i for i in heard.take() if i[0] in SERVER_TIERS] == [(tier, False, None) for tier in SERVER_TIERS]
        assert wait_until(lambda: engine.lookup(prompt_tokens(1, N)) == N, timeout=10)  # the link is back
        engine.storage.sync_events()
        assert heard.take() == told  # replayed from where this process joined the server
    finally:
        engine.close()


class HostileServer:
    """Speaks hello and auth like a server, then answers `events` with what it is told to."""

    def __init__(self, arena_path: str, arena_bytes: int, events_reply: dict):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reply, self.arena = events_reply, (arena_path, arena_bytes)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        sock, _ = self.listener.accept()
        with sock:
            P.recv(sock)
            P.send(sock, {"ok": True, "protocol": P.PROTOCOL, "version": P.VERSION, "arena": self.arena[0],
                          "arena_bytes": self.arena[1], "server_id": "x", "chunk_size": 16, "events_next": 0})
            P.recv(sock)
            P.send(sock, {"ok": True})
            while True:
                try:
                    message = P.recv(sock)
                except (P.PeerClosed, OSError):
                    return
                if "id" in message:
                    P.send(sock, {**self.reply, "ok": True, "id": message["id"]})


@pytest.mark.parametrize("events_reply", [
    {"events": [["cpu", True, "not-a-key"]], "next": 1},
    {"events": [["gpu", True, None]], "next": 1},
    {"events": [["cpu", "yes", None]], "next": 1},
    {"events": "all of them", "next": 1},
    {"events": [], "next": -5},
])
def test_a_hostile_servers_events_are_refused_with_one_line(cache_server, events_reply, caplog):
    with RawClient(cache_server.port) as real:  # a hostile server names an arena this user can map
        arena = real.arena
    hostile = HostileServer(arena.path, arena.size, events_reply)
    stats = EngineStats()
    heard = []
    stats.add_observer(lambda *item: heard.append(item))
    storage = ServerStorage(LMCacheEngineConfig.from_defaults(chunk_size=16), stats, "127.0.0.1", hostile.port,
                            owns=lambda key: True)
    try:
        with caplog.at_level(logging.WARNING, logger="lmcache"):
            storage.sync_events()
            storage.sync_events()
        assert heard == []
        lines = [r.getMessage() for r in caplog.records if "malformed KV event" in r.getMessage()]
        assert len(lines) == 1, caplog.text
    finally:
        storage.close()
