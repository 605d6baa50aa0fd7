"""HEALTH of an `lm://host:port` cache server, with its own small socket code.

Upstream's framing (the lm:// protocol, as docs/configuration.md describes it): a request header is
9 native 32-bit ints (command first) and a 150-byte key field padded with spaces, 186
bytes; the reply header is 9 ints, 36 bytes, its reply code first. HEALTH is command 5
and a healthy server answers 200. Upstream's server parses the key of every request,
HEALTH included, and drops the connection on one that does not parse, so the probe
sends a key of the shape `model@world_size@worker_id@chunk_hash@dtype`.
"""

from __future__ import annotations

import socket
import statistics
import struct
import time
import urllib.parse

HEALTH = 5
SUCCESS = 200
KEY_FIELD = 150
REQUEST = struct.Struct("9i")
REPLY = struct.Struct("9i")
PROBE_KEY = "lmcache-doctor@1@0@0@bfloat16"


def health_request(key: str = PROBE_KEY) -> bytes:
    raw = key.encode()
    if len(raw) > KEY_FIELD:
        raise ValueError(f"key of {len(raw)} bytes; the key field holds {KEY_FIELD}")
    return REQUEST.pack(HEALTH, 0, 0, 0, 0, 0, 0, 0, 0) + raw.ljust(KEY_FIELD, b" ")


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError(f"the server closed the connection after {len(data)} of {n} reply bytes")
        data += part
    return data


def address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "lm" or not parts.hostname or parts.port is None:
        raise ValueError(f"{url!r}: accepted: lm://host:port")
    return parts.hostname, parts.port


def probe(url: str, timeout: float, rounds: int = 3) -> float:
    """Median HEALTH round trip in seconds; raises OSError/ConnectionError/ValueError if unhealthy."""
    host, port = address(url)
    times = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        for _ in range(rounds):
            start = time.perf_counter()
            sock.sendall(health_request())
            code = REPLY.unpack(_read_exactly(sock, REPLY.size))[0]
            times.append(time.perf_counter() - start)
            if code != SUCCESS:
                raise ConnectionError(f"HEALTH answered code {code}, not {SUCCESS}")
    return statistics.median(times)
