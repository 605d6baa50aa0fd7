"""Issue 20's attacks on the lm:// server at the issue's scale, with the server's RSS
before and after (figures for docs/configuration.md, not a test):

    python -m tests.helpers.lm_attack_figures

It only uses the protocol and a server process, so it runs as well from a checkout
of an older commit (the "was" figures). Prints a table, then one JSON line."""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path

from lmcache.v1.server import protocol as P
from lmcache.testing.lm_server import LmServerProcess
from tests.helpers.lm_peers import RawClient, lm_server_process

MB = 1024**2


def server(*args: str) -> LmServerProcess:
    return lm_server_process(Path(tempfile.mkdtemp(prefix="lm-attack-")), args).start()


def oversized_headers(n: int = 300) -> tuple[float, float]:
    s = server()
    base, conns = s.rss_bytes(), []
    for i in range(n):
        c = RawClient(s.port)
        c.send(P.pack_request(P.PUT, b"big%d" % i, P.INT32_MAX, P.FMT_BINARY, 6, (P.INT32_MAX, 0, 0, 0))
               + b"z" * 4096)
        conns.append(c)
    time.sleep(2)
    after = s.rss_bytes()
    for c in conns:
        c.close()
    s.kill()
    return base / MB, after / MB


def unread_gets(budget: int = 102 * MB, size: int = 32 * MB, n: int = 8) -> tuple[float, float]:
    s = server("--max-size-gb", str(budget / 1024**3))
    base, readers = s.rss_bytes(), []
    with RawClient(s.port, timeout=30) as writer:
        for i in range(n):
            writer.put(b"hot", bytes([i]) * size)  # overwrites what the last reader holds
            writer.request(P.HEALTH, b"")
            r = socket.socket()
            r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            r.connect(("127.0.0.1", s.port))
            r.sendall(P.pack_request(P.GET, b"hot"))  # never read
            readers.append(r)
            time.sleep(0.2)
        time.sleep(1)
        after = s.rss_bytes()
    for r in readers:
        r.close()
    s.kill()
    return base / MB, after / MB


def bodiless_headers(budget: int = 64 * MB, n: int = 34) -> tuple[int, bool]:
    s = server("--max-size-gb", str(budget / 1024**3))
    with RawClient(s.port) as c:
        for i in range(16):
            c.put(b"keep%d" % i, bytes([i]) * 2 * MB)
        c.request(P.HEALTH, b"")
    attackers = []
    for i in range(n):
        a = RawClient(s.port)
        a.send(P.pack_request(P.PUT, b"e%d" % i, budget // 16, P.FMT_BINARY, 6, (budget // 16, 0, 0, 0)))
        attackers.append(a)
    time.sleep(1)
    with RawClient(s.port) as c:
        kept = sum(c.exists(b"keep%d" % i) for i in range(16))
        c.put(b"new", b"n" * MB)
        c.request(P.HEALTH, b"")
        stored = c.exists(b"new")
    for a in attackers:
        a.close()
    s.kill()
    return kept, stored


def silent_connections(n: int = 1024) -> bool:
    s = server()
    conns = []
    for i in range(n):
        c = RawClient(s.port)
        if i % 2:
            c.send(P.pack_request(P.HEALTH, b"x")[:185])  # 185 of 186 bytes
        conns.append(c)
    time.sleep(1)
    try:
        with RawClient(s.port, timeout=5) as c:
            served = c.request(P.HEALTH, b"").code == P.SUCCESS
    except OSError:
        served = False
    for c in conns:
        c.close()
    s.kill()
    return served


def main() -> None:
    out = {}
    out["oversized_rss_before_mib"], out["oversized_rss_after_mib"] = oversized_headers()
    print(f"300 oversized PUT headers (default budget): RSS {out['oversized_rss_before_mib']:.0f} -> "
          f"{out['oversized_rss_after_mib']:.0f} MiB")
    out["unread_gets_rss_before_mib"], out["unread_gets_rss_after_mib"] = unread_gets()
    print(f"8 unread GETs of overwritten 32 MiB entries, 102 MiB budget: RSS {out['unread_gets_rss_before_mib']:.0f}"
          f" -> {out['unread_gets_rss_after_mib']:.0f} MiB")
    out["bodiless_entries_kept_of_16"], out["bodiless_new_write_stored"] = bodiless_headers()
    print(f"34 bodiless PUT headers: {out['bodiless_entries_kept_of_16']}/16 entries kept, a new write stored: "
          f"{out['bodiless_new_write_stored']}")
    out["silent_1024_client_served"] = silent_connections()
    print(f"1,024 silent or half-header connections, then a real client: served {out['silent_1024_client_served']}")
    print(json.dumps({"bench": "lm_attacks", **{k: round(v, 1) if isinstance(v, float) else v
                                                 for k, v in out.items()}}))


if __name__ == "__main__":
    main()
