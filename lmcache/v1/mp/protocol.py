"""The server's wire protocol: versioned from the first message, JSON only.

Framing: a 4-byte big-endian length, then one UTF-8 JSON object. Nothing is ever
unpickled. The first frame a client sends is `hello` with the protocol name and
version; a server of another version answers with one line saying both versions and
closes, and so does a client that gets a hello of another version. The second frame
is `auth` with the token read from the arena's header: being able to read the
arena file (mode 0600, or 0660 with a configured group) is the permission.

Requests carry `id` and get a reply with the same `id` (`ok` true, or `error`);
one-way messages (commit, free, unpin) carry no `id` and get no reply. Keys are
CacheEngineKey strings; the server parses them before use.

Versions: 1 first; 2 added the `events` request (what the server's tiers stored and
lost, event_log.py) and `events_next` in the hello reply.
"""

from __future__ import annotations

import json
import socket
import struct

PROTOCOL = "lmcache-mp"
VERSION = 2
MAX_FRAME = 4 << 20  # bytes of JSON in one frame (a 1M-token prompt's keys fit)
MAX_HELLO_FRAME = 4096  # before auth a peer may send no more than this
MAX_KEYS = 16384  # keys in one request
_LEN = struct.Struct(">I")

# ops with a reply / without
REQUESTS = frozenset({"lookup", "resident", "contains", "alloc", "reserve", "pin", "stats", "ping", "events"})
ONE_WAY = frozenset({"commit", "free", "unpin"})


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow (the connection is closed)."""


class PeerClosed(Exception):
    """The peer closed the connection."""


def encode(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


def send(sock: socket.socket, message: dict) -> None:
    sock.sendall(encode(message))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise PeerClosed(f"connection closed {got} bytes into a {n}-byte read")
        got += k
    return bytes(buf)


def recv(sock: socket.socket, max_frame: int = MAX_FRAME) -> dict:
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if length > max_frame:
        raise ProtocolError(f"frame of {length} bytes (at most {max_frame} accepted here)")
    try:
        message = json.loads(_recv_exact(sock, length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"frame holds a JSON {type(message).__name__}; a JSON object is expected")
    return message


def hello() -> dict:
    return {"op": "hello", "protocol": PROTOCOL, "version": VERSION}


def version_refusal(mine: int, theirs, me: str, them: str) -> str:
    """The one line both sides print when versions differ."""
    return (f"lmcache {me} speaks protocol {PROTOCOL} v{mine} but the {them} speaks v{theirs}: "
            f"refused; run the same lmcache version on both sides (the server with `lmcache server`)")


def check_hello(message: dict) -> str | None:
    """None if `message` is a hello of our protocol and version, else why not (one line)."""
    if message.get("op") != "hello" or message.get("protocol") != PROTOCOL:
        return f"first frame is not a {PROTOCOL} hello (got op={str(message.get('op'))[:40]!r})"
    if message.get("version") != VERSION:
        return version_refusal(VERSION, str(message.get("version"))[:20], "server", "client")
    return None


# -- field checks (a hostile peer gets a clear error, never a crash) ---------------
def int_field(message: dict, name: str, low: int = 0, high: int = 1 << 62) -> int:
    value = message.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"field {name!r}={str(value)[:40]!r}: an integer in {low}..{high} is expected")
    return value


def str_list(message: dict, name: str, limit: int = MAX_KEYS) -> list[str]:
    value = message.get(name)
    if not isinstance(value, list) or len(value) > limit or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"field {name!r}: a list of at most {limit} strings is expected")
    return value


def int_list(message: dict, name: str, limit: int = MAX_KEYS) -> list[int]:
    value = message.get(name)
    if (not isinstance(value, list) or len(value) > limit
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ProtocolError(f"field {name!r}: a list of at most {limit} integers >= 0 is expected")
    return value
