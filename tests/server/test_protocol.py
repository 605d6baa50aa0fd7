"""The wire protocol spoken by hand against a real server: versions refuse each other
with one line, nobody is admitted without the arena's token, and bad frames get a
clear error (or a closed connection) while the server goes on serving others."""

from __future__ import annotations

import logging
import struct

import pytest

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.mp import protocol as P
from lmcache.v1.mp.arena import ExtentAllocator
from tests.helpers.cache_server import RawClient
from tests.helpers.workload import make_engine, prompt_tokens, store_prompt


def test_a_server_refuses_a_client_of_another_version_with_one_line(module_server):
    with RawClient(module_server.port, admit=False) as c:
        reply = c.exchange({"op": "hello", "protocol": P.PROTOCOL, "version": 99})
        assert f"speaks protocol lmcache-mp v{P.VERSION} but the client speaks v99" in reply["error"]
        with pytest.raises((P.PeerClosed, ConnectionError)):
            c.exchange({"op": "ping", "id": 1})
    assert module_server.log().count("v99") == 1
    assert module_server.status()["clients"] == 0  # none left connected (/status is HTTP)


def test_a_client_refuses_a_server_of_another_version_with_one_line(module_server, monkeypatch, caplog):
    server_version = P.VERSION
    monkeypatch.setattr(P, "VERSION", server_version + 1)  # this process now speaks the next version
    with caplog.at_level(logging.INFO, logger="lmcache"):
        engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**module_server.config()), 64)
        try:
            assert store_prompt(engine, conn, 1, 64) == 0  # no slot: dropped, not an error
            assert engine.lookup(prompt_tokens(1, 64)) == 0
        finally:
            engine.close()
    refusals = [r.getMessage() for r in caplog.records if "speaks protocol" in r.getMessage()]
    assert len(refusals) == 1, caplog.text
    assert (f"client speaks protocol lmcache-mp v{server_version + 1} but the server speaks v{server_version}"
            in refusals[0])


def test_no_admission_without_the_arena_token(module_server):
    with RawClient(module_server.port, admit=False) as c:
        assert c.exchange(P.hello())["ok"]
        reply = c.exchange({"op": "auth", "token": "00" * 32})
        assert "wrong arena token" in reply["error"]
    with RawClient(module_server.port, admit=False) as c:
        assert c.exchange(P.hello())["ok"]
        reply = c.exchange({"op": "lookup", "id": 1, "keys": []})  # skipping auth
        assert "error" in reply
    assert module_server.status()["clients"] == 0  # none left connected (/status is HTTP)


def test_oversized_or_garbage_frames_before_admission_close_only_that_connection(module_server):
    with RawClient(module_server.port, admit=False) as c:
        c.sock.sendall(struct.pack(">I", 1 << 30))  # a 1 GiB "hello"
        assert c.sock.recv(16) == b""
    with RawClient(module_server.port, admit=False) as c:
        c.sock.sendall(struct.pack(">I", 5) + b"\xff\xfe{[x")
        assert c.sock.recv(16) == b""
    assert "frame of 1073741824 bytes" in module_server.log()
    with RawClient(module_server.port) as ok:
        assert ok.call("ping")["ok"]


def test_bad_requests_get_an_error_naming_what_is_accepted_and_the_connection_goes_on(module_server):
    with RawClient(module_server.port) as c:
        assert "unknown op 'nope'" in c.call("nope")["error"]
        assert "accepted: float16" in c.call("alloc", shape=[2, 2, 16, 64], dtype="complex64", fmt="kv_2ltd")["error"]
        assert "4 positive integers" in c.call("alloc", shape=[2, -1, 16, 64], dtype="float16", fmt="kv_2ltd")["error"]
        assert "not a cache key" in c.call("lookup", keys=["../../etc/passwd"])["error"]
        assert "list of at most" in c.call("pin", keys="x")["error"]
        c.post("commit", offset=4096, key="m@1@0@ab@float16@")  # never allocated: logged, ignored
        c.post("unpin", offsets=[123])
        too_big = c.call("alloc", shape=[2, 64, 1 << 20, 1024], dtype="float32", fmt="kv_2ltd")
        assert too_big == {"ok": True, "offset": None, "id": too_big["id"]}
        assert c.call("ping")["ok"]
    log = module_server.log()
    assert "commit of slot 4096, which this client has not allocated" in log
    assert "unpin of slot 123, which this client has not pinned" in log


def test_extents_are_reused_and_merged():
    extents = ExtentAllocator(4096, 4096 + 10 * 4096)
    a, b, c = (extents.allocate(4096 * 3) for _ in range(3))
    assert (a, b, c) == (4096, 4096 * 4, 4096 * 7) and extents.allocate(8192) is None
    extents.free(b, 4096 * 3)
    extents.free(a, 4096 * 3)
    assert extents.allocate(4096 * 6) == a  # the two freed neighbours merged
    extents.free(c, 4096 * 3)
    assert extents.free_bytes == 4 * 4096
    with pytest.raises(RuntimeError, match="double free"):
        extents.free(c, 4096)


def test_the_http_port_serves_health_status_and_prometheus_metrics(module_server):
    import json
    import urllib.request

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{module_server.http_port}{path}", timeout=10) as r:
            return r.status, r.read().decode()

    assert get("/healthcheck") == (200, "OK\n")
    status = json.loads(get("/status")[1])
    assert status["l1_bytes"] > 0 and "pins" in status
    metrics = get("/metrics")[1]
    assert "# TYPE lmcache_server_l1_used_bytes gauge" in metrics and "lmcache_server_misses_absent_total" in metrics
