"""Our lm:// server as a real process under the attacks of issue 20 (each bounded in
count and time): bodiless PUT headers, slow senders, silent connections, oversized
headers, unread GETs, and who may connect at all. RSS is read from /proc."""

import os
import socket
import subprocess
import sys
import time

from lmcache.testing.processes import wait_until
from lmcache.v1.server import protocol as P
from tests.helpers.lm_peers import REPO, RawClient, lm_factory  # noqa: F401 (fixture)

MB = 1024**2


def gb(nbytes: int) -> str:
    return str(nbytes / 1024**3)


def closed_within(client: RawClient, seconds: float) -> bool:
    """True if the server closes this connection within `seconds` (what it sends is skipped)."""
    client.sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if client.sock.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def test_bodiless_put_headers_neither_evict_nor_block_writes(lm_factory):
    server = lm_factory("--max-size-gb", gb(8 * MB))
    with RawClient(server.port) as c:
        for i in range(4):
            c.put(b"keep%d" % i, bytes([i]) * MB)
        assert c.request(P.HEALTH, b"").code == P.SUCCESS
    # 34 headers claiming 1 MiB each (34 MiB against an 8 MiB budget), no body
    attackers = [RawClient(server.port) for _ in range(34)]
    try:
        for i, a in enumerate(attackers):
            a.send(P.pack_request(P.PUT, b"evil%d" % i, MB, P.FMT_BINARY, 6, (MB, 0, 0, 0)))
        time.sleep(0.5)
        with RawClient(server.port) as c:
            assert all(c.exists(b"keep%d" % i) for i in range(4))  # nothing evicted
            c.put(b"new", b"n" * MB)  # and a real write still lands
            assert c.request(P.HEALTH, b"").code == P.SUCCESS
            assert c.get(b"new")[1] == b"n" * MB
    finally:
        for a in attackers:
            a.close()


def test_a_trickled_body_is_cut_off_by_the_request_deadline(lm_factory):
    server = lm_factory("--request-timeout", "2")
    slow = RawClient(server.port)
    slow.send(P.pack_request(P.PUT, b"slow", 1000, P.FMT_BINARY, 6, (1000, 0, 0, 0)))
    started = time.monotonic()
    closed = False
    for _ in range(16):  # a byte every 0.25 s: each read is quick, the request is not
        try:
            slow.send(b"x")
        except OSError:
            closed = True
            break
        time.sleep(0.25)
    closed = closed or closed_within(slow, 0.5)
    assert closed and time.monotonic() - started < 4.5
    slow.close()
    with RawClient(server.port) as c:
        assert not c.exists(b"slow")
    assert "request not finished within 2" in server.log()


def test_a_stalled_header_and_an_idle_connection_time_out(lm_factory):
    server = lm_factory("--request-timeout", "1", "--idle-timeout", "2")
    partial = RawClient(server.port)
    partial.send(P.pack_request(P.HEALTH, b"x")[:185])  # 185 of 186 bytes
    assert closed_within(partial, 3)
    partial.close()
    idle = RawClient(server.port)
    assert not closed_within(idle, 1.0)  # quiet, but not for long enough yet
    assert closed_within(idle, 3)
    idle.close()
    assert "idle for 2 s (--idle-timeout)" in server.log()


def test_silent_connections_never_lock_out_a_real_client(lm_factory):
    server = lm_factory("--max-clients", "16")
    assert wait_until(lambda: "disconnected after" in server.log(), timeout=10, interval=0.02)  # the probe
    silent = [RawClient(server.port) for _ in range(12)]
    halves = [RawClient(server.port) for _ in range(4)]
    for h in halves:
        h.send(P.pack_request(P.HEALTH, b"x")[:185])
    try:
        time.sleep(0.3)
        for _ in range(3):  # each newcomer displaces the connection quiet for longest
            with RawClient(server.port) as c:
                assert c.request(P.HEALTH, b"").code == P.SUCCESS
        assert "dropped to make room" in server.log()
    finally:
        for c in silent + halves:
            c.close()


def test_oversized_put_headers_keep_rss_bounded(lm_factory):
    budget = 16 * MB
    server = lm_factory("--max-size-gb", gb(budget))
    base = server.rss_bytes()
    conns = []
    try:
        for i in range(300):  # each claims 2 GiB - 1: more than the budget, read and thrown away
            c = RawClient(server.port)
            c.send(P.pack_request(P.PUT, b"big%d" % i, P.INT32_MAX, P.FMT_BINARY, 6, (P.INT32_MAX, 0, 0, 0))
                   + b"z" * 4096)
            conns.append(c)
        time.sleep(1.0)
        grown = server.rss_bytes() - base
        print(f"300 oversized PUT headers: RSS {base / MB:.0f} -> {(base + grown) / MB:.0f} MiB")
        assert grown < budget + 48 * MB, grown / MB
        with RawClient(server.port) as c:
            assert c.request(P.HEALTH, b"").code == P.SUCCESS
    finally:
        for c in conns:
            c.close()


def test_unread_gets_cannot_hold_memory_past_the_budget(lm_factory):
    budget, size = 24 * MB, 8 * MB
    server = lm_factory("--max-size-gb", gb(budget))
    base = server.rss_bytes()
    readers = []
    with RawClient(server.port, timeout=10) as writer:
        try:
            for i in range(8):
                writer.put(b"hot", bytes([i]) * size)  # overwrites the entry the last reader holds
                assert writer.request(P.HEALTH, b"").code == P.SUCCESS
                r = socket.socket()
                r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read: the send stalls
                r.connect(("127.0.0.1", server.port))
                r.sendall(P.pack_request(P.GET, b"hot"))
                readers.append(r)
                time.sleep(0.1)
            for i in range(4):  # later writes still fit in what the stalled readers leave
                writer.put(b"after%d" % i, bytes([100 + i]) * MB)
            assert writer.request(P.HEALTH, b"").code == P.SUCCESS
            time.sleep(0.3)
            grown = server.rss_bytes() - base
            print(f"8 unread GETs: RSS {base / MB:.0f} -> {(base + grown) / MB:.0f} MiB (budget {budget / MB:.0f})")
            assert grown < budget + 24 * MB, grown / MB
            assert writer.get(b"after3")[1] == bytes([103]) * MB
        finally:
            for r in readers:
                r.close()


def _connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.settimeout(5)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def test_allow_list_closes_other_peers(lm_factory):
    server = lm_factory("--allow", "127.0.0.1/32", "--allow", "10.0.0.0/8")
    outsider = _connect_from("127.0.0.3", server.port)
    outsider.sendall(P.pack_request(P.HEALTH, b""))
    assert outsider.recv(36) == b""
    outsider.close()
    with RawClient(server.port) as c:  # from 127.0.0.1: listed
        assert c.request(P.HEALTH, b"").code == P.SUCCESS
    assert wait_until(lambda: "127.0.0.3" in server.log() and "not in --allow" in server.log(), timeout=5)


def test_non_loopback_bind_without_allow_list_warns_loudly(lm_factory):
    server = lm_factory(host="0.0.0.0")
    log = server.log()
    server.kill()  # exposed for no longer than the check takes
    assert "WARNING" in log and "--allow" in log and "anyone who can reach" in log
    quiet = lm_factory("--allow", "127.0.0.0/8", host="0.0.0.0")
    log = quiet.log()
    quiet.kill()
    assert "anyone who can reach" not in log and "127.0.0.0/8" in log


def test_a_normal_client_is_not_cut_off_by_the_limits(lm_factory):
    """A control: a long-lived connection making whole requests with quiet spells
    shorter than the idle timeout is served throughout."""
    server = lm_factory("--request-timeout", "2", "--idle-timeout", "3")
    with RawClient(server.port) as c:
        for i in range(4):
            c.put(b"k%d" % i, b"v" * 1000)
            time.sleep(1.0)
            assert c.get(b"k%d" % i)[1] == b"v" * 1000
    assert "connection closed" not in server.log()


def test_budget_above_physical_memory_warns(lm_factory):
    server = lm_factory("--max-size-gb", "100000")
    assert "more than this machine's memory" in server.log()


def test_max_clients_fits_the_open_file_limit():
    code = ("import logging, resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
            "from lmcache.v1.server.__main__ import fit_open_files; "
            "print(fit_open_files(1024, logging.getLogger('t')), fit_open_files(100, logging.getLogger('t')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.split() == ["192", "100"], proc.stderr
    assert "--max-clients 1024 needs 1088 open files, the limit is 256" in proc.stderr
