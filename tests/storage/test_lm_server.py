"""Our lm:// cache server as a real process, spoken to by hand: the protocol,
and where upstream's server fails (short PUT bodies, LIST, unbounded memory,
garbage, many clients, SIGTERM)."""

import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache.testing.processes import wait_until
from lmcache.v1.server import protocol as P
from lmcache.v1.server.store import Entry, LRUByteStore
from tests.helpers.lm_peers import REPO, RawClient, lm_factory, lm_server  # noqa: F401 (fixtures)

MB = 1024**2


def test_put_get_exist_health_round_trip(lm_server):
    data = os.urandom(100_000)
    with RawClient(lm_server.port) as c:
        assert c.request(P.HEALTH, b"").code == P.SUCCESS  # an empty key is fine here
        assert not c.exists(b"m@1@0@ab@half")
        c.put(b"m@1@0@ab@half", data, fmt=P.FMT_KV_2LTD, dtype=3, shape=(2, 1, 50_000 // 2, 1))
        assert c.exists(b"m@1@0@ab@half")
        reply, got = c.get(b"m@1@0@ab@half")
    assert got == data
    # the header comes back as it was sent
    assert reply == P.Reply(P.SUCCESS, len(data), P.FMT_KV_2LTD, 3, (2, 1, 25_000, 1), 0)
    with RawClient(lm_server.port) as other:  # another connection sees it
        assert other.get(b"m@1@0@ab@half")[1] == data
        miss, body = other.get(b"m@1@0@cd@half")
    assert body is None and miss.pack() == P.FAIL_REPLY


def test_list_and_unknown_commands_get_fail_not_silence(lm_server):
    with RawClient(lm_server.port, timeout=5) as c:
        assert c.request(P.LIST, b"").code == P.FAIL
        assert c.request(99, b"x").code == P.FAIL
        assert c.request(-7, b"x").code == P.FAIL
        assert c.request(P.HEALTH, b"").code == P.SUCCESS  # still in step


def test_put_cut_short_is_never_stored(lm_server):
    key = b"m@1@0@12@half"
    c = RawClient(lm_server.port)
    c.send(P.pack_request(P.PUT, key, 1000, P.FMT_BINARY, 6, (1000, 0, 0, 0)) + b"x" * 400)
    c.close()  # 600 bytes short
    deadline = time.monotonic() + 5
    while "cut short" not in lm_server.log() and time.monotonic() < deadline:
        time.sleep(0.02)
    with RawClient(lm_server.port) as c2:
        assert not c2.exists(key)
        assert c2.get(key)[1] is None
    assert lm_server.log().count("cut short (400 of 1000 bytes)") == 1


def test_store_gives_back_a_short_bodys_reservation():
    store = LRUByteStore(1000)
    buf = store.reserve(600)
    assert buf is not None and len(buf) == 600
    store.release(buf)  # what the handler does with a short body
    assert len(store) == 0 and store.reserve(1000) is not None  # the reservation is given back


def put(store, key, n, fill=0):
    buf = store.reserve(n)
    assert buf is not None
    buf[:] = fill
    assert store.commit(key, Entry(buf, 4, 6, (n, 0, 0, 0), 0))
    return buf


def test_lru_eviction_keeps_the_budget():
    store = LRUByteStore(1000)
    for i in range(5):
        put(store, b"k%d" % i, 300)
        assert store.used_bytes <= 1000
    assert [store.contains(b"k%d" % i) for i in range(5)] == [False, False, True, True, True]
    store.done(store.hold(b"k2"))  # now the most recently used
    put(store, b"k5", 300)
    assert store.contains(b"k2") and not store.contains(b"k3")
    assert store.reserve(1001) is None  # never more than the budget, whatever is evicted


def test_reservations_evict_nothing_until_commit():
    store = LRUByteStore(1000)
    put(store, b"a", 600)
    bodies = [store.reserve(300) for _ in range(3)]  # 900 in flight, next to 600 stored
    assert all(b is not None for b in bodies) and store.contains(b"a")
    assert store.reserve(200, timeout=0.05) is None  # the in-flight allowance (1000) is full
    for b in bodies:
        store.release(b)  # bodies that never arrived
    assert store.contains(b"a") and store.evictions == 0


def test_buffers_are_reused_but_never_under_a_reader():
    store = LRUByteStore(1000)
    first = put(store, b"a", 400, fill=1)
    put(store, b"a", 400, fill=2)  # replaces: the first buffer is kept for reuse
    assert store.reserve(400) is first
    store.release(first)
    reading = store.hold(b"a")
    put(store, b"b", 400, fill=3)
    put(store, b"c", 400, fill=4)  # evicts "b", not "a", which is being sent
    assert store.contains(b"a") and not store.contains(b"b")
    put(store, b"a", 400, fill=5)  # replaces "a" while it is being sent: pinned, counted, untouched
    assert bytes(reading.data) == b"\x02" * 400
    assert store.held_bytes <= 1000
    store.done(reading)
    assert store._pinned == 0 and store.held_bytes <= 1000  # let go of once sent


def test_a_reader_holding_the_room_a_write_needs_is_ended():
    store = LRUByteStore(1000)
    put(store, b"a", 600, fill=1)
    ended = []
    reading = store.hold(b"a", abort=lambda: ended.append(True))
    buf = store.reserve(600)
    buf[:] = 2

    def reader_lets_go():
        while not ended:
            time.sleep(0.01)
        store.done(reading, None)

    t = threading.Thread(target=reader_lets_go)
    t.start()
    assert store.commit(b"b", Entry(buf, 4, 6, (600, 0, 0, 0), 0))  # "a" evicted once its reader let go
    t.join()
    assert ended and store.contains(b"b") and not store.contains(b"a")
    stuck = store.hold(b"b")  # a reader that cannot be ended (no abort): the write is dropped, not over budget
    buf = store.reserve(600)
    assert not store.commit(b"c", Entry(buf, 4, 6, (600, 0, 0, 0), 0), wait=0.1)
    assert store.held_bytes <= 1000
    store.done(stuck)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "short", "read", "done"]), st.integers(0, 5),
                          st.sampled_from([100, 250, 400, 1001])), max_size=60))
def test_store_never_exceeds_its_budget_nor_reuses_a_held_buffer(ops):
    store = LRUByteStore(1000)
    held = []
    for op, k, n in ops:
        key = b"k%d" % k
        if op in ("put", "short"):
            buf = store.reserve(n, timeout=0)
            if buf is None:
                assert n > 1000
                continue
            assert all(buf is not e.data for e in held)  # never a buffer being sent
            buf[:] = k
            if op == "put":
                store.commit(key, Entry(buf, 4, 6, (n, 0, 0, 0), 0), wait=0)
            else:
                store.release(buf)
        elif op == "read":
            entry = store.hold(key)
            if entry is not None:
                assert bytes(entry.data) == bytes([k]) * entry.length  # its own bytes
                held.append(entry)
        elif held:
            store.done(held.pop(0))
        assert store._used + store._pinned + store._idle_bytes <= store.budget_bytes
        assert store._inflight == 0
        for entry in held:
            assert len(set(bytes(entry.data))) == 1  # nothing overwrote what a reader holds


def logged(server, text: str, count: int) -> bool:
    """The server untracks a closed connection on its own thread; wait for it to say so."""
    return wait_until(lambda: server.log().count(text) >= count, timeout=10, interval=0.02)


def test_max_clients_displaces_the_quietest_then_refuses_when_all_are_busy(lm_factory):
    server = lm_factory("--max-clients", "2")
    assert logged(server, "disconnected after", 1), server.log()  # the start-up probe's connection
    first, second = RawClient(server.port), RawClient(server.port)
    assert first.request(P.HEALTH, b"").code == P.SUCCESS and second.request(P.HEALTH, b"").code == P.SUCCESS
    third = RawClient(server.port)  # first has been quiet the longest: it makes room
    assert third.request(P.HEALTH, b"").code == P.SUCCESS
    assert first.sock.recv(1) == b""
    assert logged(server, "dropped to make room", 1)
    for c in (second, third):  # both busy: a PUT whose body has not all arrived
        c.send(P.pack_request(P.PUT, b"busy", 1000, P.FMT_BINARY, 6, (1000, 0, 0, 0)) + b"x")
    time.sleep(0.3)
    fourth = RawClient(server.port)
    assert fourth.sock.recv(1) == b""  # closed at once
    assert logged(server, "all busy (--max-clients)", 1)
    for c in (first, second, third, fourth):
        c.close()
    assert logged(server, "disconnected after", 4), server.log()
    with RawClient(server.port) as fifth:  # room again
        assert fifth.request(P.HEALTH, b"").code == P.SUCCESS


def test_eviction_under_a_small_budget_with_concurrent_writers(lm_factory):
    server = lm_factory("--max-size-gb", str(4 * MB / 1024**3))
    base_rss = server.rss_bytes()
    size, per_writer, writers = 64 * 1024, 64, 8  # 32 MiB written into a 4 MiB budget
    errors = []

    def payload(w, i):
        return bytes([w, i % 256]) * (size // 2)

    def write(w):
        try:
            with RawClient(server.port) as c:
                for i in range(per_writer):
                    c.put(b"w%d-%d" % (w, i), payload(w, i))
                assert c.request(P.HEALTH, b"").code == P.SUCCESS  # all PUTs before it were read
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    present = 0
    with RawClient(server.port) as c:
        for w in range(writers):
            for i in range(per_writer):
                reply, data = c.get(b"w%d-%d" % (w, i))
                if data is not None:
                    present += 1
                    assert data == payload(w, i)  # what is kept is intact
    # full, but never over: concurrent reservations may evict at most one entry per other writer early
    assert 4 * MB // size - writers <= present <= 4 * MB // size
    assert server.rss_bytes() - base_rss < 24 * MB  # bounded by the budget, not by what was written


def test_garbage_and_huge_lengths_never_crash_or_allocate(lm_factory):
    server = lm_factory("--max-size-gb", str(8 * MB / 1024**3))
    base_rss = server.rss_bytes()
    rng = random.Random(7)
    for _ in range(20):  # random headers and bytes, connections dropped at random points
        c = RawClient(server.port, timeout=2)
        try:
            c.send(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 3 * P.REQUEST.size))))
        finally:
            c.close()
    with RawClient(server.port, timeout=5) as c:  # a PUT claiming 2 GiB - 1: never allocated
        c.send(P.pack_request(P.PUT, b"huge", P.INT32_MAX, P.FMT_BINARY, 6, (P.INT32_MAX, 0, 0, 0)))
        c.send(b"z" * (4 * MB))
    with RawClient(server.port, timeout=5) as c:  # a negative length: the connection is closed
        c.send(P.REQUEST.pack(P.PUT, -5, 4, 6, 0, 0, 0, 0, 0, b"neg".ljust(150)))
        assert c.sock.recv(1) == b""
    time.sleep(0.3)
    with RawClient(server.port) as c:
        assert c.request(P.HEALTH, b"").code == P.SUCCESS
        assert not c.exists(b"huge")
    assert server.running
    assert server.rss_bytes() - base_rss < 16 * MB
    assert "does not fit the" in server.log()


def test_many_concurrent_clients(lm_server):
    clients = [RawClient(lm_server.port) for _ in range(48)]
    try:
        for i, c in enumerate(clients):
            c.put(b"k%d" % i, b"%d" % i * 100)
        for i, c in enumerate(reversed(clients)):
            assert c.get(b"k%d" % i)[1] == b"%d" % i * 100
    finally:
        for c in clients:
            c.close()
    deadline = time.monotonic() + 5
    while lm_server.log().count(" disconnected after ") < 49 and time.monotonic() < deadline:
        time.sleep(0.05)
    log = lm_server.log()
    # one line per connect and per disconnect (48 clients, plus the start-up probe)
    assert log.count(" connected (") == 49 and log.count(" disconnected after ") == 49, log[-2000:]


def test_sigterm_stops_cleanly_with_clients_connected(lm_server):
    idle = RawClient(lm_server.port)
    busy = RawClient(lm_server.port)
    busy.send(P.pack_request(P.PUT, b"half", 1000, P.FMT_BINARY, 6, (1000, 0, 0, 0)) + b"x" * 10)
    time.sleep(0.2)
    started = time.monotonic()
    assert lm_server.terminate(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert idle.sock.recv(1) == b""  # its connection was closed, not left hanging
    idle.close()
    busy.close()
    log = lm_server.log()
    assert "SIGTERM received" in log and "server stopped" in log and "Traceback" not in log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", lm_server.port), timeout=1)


@pytest.mark.parametrize("args,message", [
    (["127.0.0.1", "1", "disk"], "storage 'disk' is not supported; accepted: cpu"),
    (["127.0.0.1", "1", "--max-size-gb", "0"], "must be > 0"),
    (["127.0.0.1", "70000"], "not a TCP port"),
    (["127.0.0.1", "1", "--log-level", "LOUD"], "invalid choice"),
])
def test_bad_arguments_are_clear_errors(args, message):
    proc = subprocess.run([sys.executable, "-m", "lmcache.v1.server", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=30)
    assert proc.returncode == 2 and message in proc.stderr


def test_log_level_debug_shows_requests(lm_factory):
    server = lm_factory("--log-level", "debug")
    with RawClient(server.port) as c:
        c.request(P.LIST, b"")
    time.sleep(0.2)
    assert "LIST answered FAIL" in server.log()
    quiet = lm_factory("--log-level", "WARNING")
    with RawClient(quiet.port) as c:
        c.request(P.HEALTH, b"")
    time.sleep(0.2)
    assert "connected" not in quiet.log()
