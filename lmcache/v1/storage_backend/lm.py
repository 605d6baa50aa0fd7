"""The `lm://HOST:PORT` tier: upstream LMCache's cache server (ours or upstream's).

Speaks upstream 0.5.6's protocol (lmcache/v1/server/protocol.py) with keys in
the shape its server parses (lm_keys.py). The value is what upstream's `naive`
serde sends: the chunk's raw tensor bytes, with format, dtype and shape in the
header; a reply whose header does not describe a chunk of exactly `length`
bytes is a corrupt miss, and its connection is closed. With a shared secret
(`chunk_secret`) the value is instead a serde blob (header with key digest and
MAC, then the raw bytes) sent as BINARY: upstream's clients cannot read those,
and a naive value (which carries no MAC) is refused; without a secret such
values are not read (not a KV chunk).

Unlike upstream's client it never fails a request and never stays disconnected:
a server that is down or restarting is a miss plus one log line (outage.py),
and connections are made again (bounded back-off) once it answers. Connections
come from a small pool, so the background writer's PUTs do not wait behind the
engine's GETs; a connection that saw any error is closed, never reused.
`timeout` (remote_timeout) is a deadline for a whole operation (a GET with its
payload, a lookup's EXISTs, a PUT), not per read: a server that trickles bytes
cannot hold a request past it. A batch of PUTs ends with a HEALTH round trip on the
same connection (put_many): stored means visible to every other client.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
import urllib.parse

import torch

from lmcache.v1.remote_urls import redact_url
from lmcache.v1.memory import MemoryFormat, MemoryObj, check_shape
from lmcache.v1.server import protocol as P
from lmcache.v1.storage_backend import lm_keys, serde
from lmcache.v1.storage_backend.lm_sealed import BadReply, RefusedReply, ShunnedKeys, get_sealed, sealed_put_header
from lmcache.v1.storage_backend.outage import Outage
from lmcache.v1.storage_backend.serde import Allocator, ChecksumMemo, payload_view
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.token_database import CacheEngineKey, dtype_name

logger = logging.getLogger(__name__)

_FMT_CODES = {MemoryFormat.KV_2LTD: P.FMT_KV_2LTD, MemoryFormat.KV_MLA_FMT: P.FMT_KV_MLA}
_FORMATS = {code: fmt for fmt, code in _FMT_CODES.items()}
HEALTH_KEY = b"health@1@0@0@half"
_EXIST_BATCH = 32  # EXIST requests sent before their replies are read (one round trip per batch)


def parse_lm_url(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "lm" or not parts.hostname or not port or parts.path not in ("", "/"):
        raise ValueError(f"remote_url {redact_url(url)!r}: expected lm://HOST:PORT (port 1..65535)")
    return parts.hostname, port


class _Connections:
    """Idle connections to one server; take() makes a new one when none is idle."""

    def __init__(self, host: str, port: int, connect_timeout: float, timeout: float, max_idle: int = 4):
        self.address = (host, port)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def take(self, deadline: float) -> tuple[socket.socket, bool]:
        """(a connection, whether it was reused); a new one must connect by the deadline too."""
        while True:
            with self._lock:
                sock = self._idle.pop() if self._idle else None
            if sock is None:
                return self._connect(deadline), False
            if _alive(sock):
                return sock, True
            sock.close()

    def _connect(self, deadline: float) -> socket.socket:
        left = deadline - time.monotonic()
        if left <= 0:
            raise P.DeadlineExceeded("no time left to connect")
        sock = socket.create_connection(self.address, timeout=min(self.connect_timeout, left))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def give(self, sock: socket.socket) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


def _alive(sock: socket.socket) -> bool:
    """An idle connection has nothing to read; readable means EOF (server gone) or stray bytes."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class LMServerBackend:
    name = "remote"

    def __init__(self, url: str, *, timeout: float = 2.0, connect_timeout: float = 0.5,
                 retry_interval: float = 10.0, stats: EngineStats | None = None,
                 integrity: serde.Integrity = serde.NO_SECRET):
        self.url = url
        self._integrity = integrity
        self._shunned = ShunnedKeys()  # refused or removed: the protocol has no delete
        host, port = parse_lm_url(url)
        self._stats = stats or EngineStats()
        self._conns = _Connections(host, port, connect_timeout, timeout)
        self._outage = Outage(url, logger, self._stats, retry_interval)
        self._logged: set[str] = set()

    @property
    def is_down(self) -> bool:
        return self._outage.is_down

    def _log_once(self, kind: str, message: str, *args) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            logger.warning("remote tier %s: " + message + " (further such cases are not logged)", self.url, *args)

    def _deadline(self) -> float:
        return time.monotonic() + self._conns.timeout

    def _exchange(self, fn, deadline: float | None = None):
        """fn(sock, deadline) on a pooled connection, all of it by the deadline (default:
        remote_timeout from now). A reused connection that fails is retried once on a
        fresh one (it may have died with a server restart), within the same deadline;
        any failure closes the connection. Raises OSError (outage, timeouts included) or BadReply."""
        deadline = self._deadline() if deadline is None else deadline
        for attempt in (0, 1):
            sock, reused = self._conns.take(deadline)
            try:
                result = fn(sock, deadline)
            except OSError:
                sock.close()
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                sock.close()
                raise
            self._conns.give(sock)
            return result
        raise AssertionError("unreachable")

    def health(self) -> bool:
        """One HEALTH round trip (for probes): True if the server answers SUCCESS. The key
        field holds a parsable key: upstream's server parses it on every command."""
        try:
            reply = self._exchange(lambda sock, by: (P.send_all(sock, P.pack_request(P.HEALTH, HEALTH_KEY), by),
                                                     _read_reply(sock, by))[1])
        except (OSError, BadReply):
            return False
        return reply.code == P.SUCCESS

    # -- the tier -------------------------------------------------------------
    def contains(self, key: CacheEngineKey) -> bool:
        return self.prefix_count([key]) == 1

    def prefix_count(self, keys: list[CacheEngineKey]) -> int:
        """How many of `keys`, from the first, the server holds (EXISTs in batches)."""
        keys = keys[:self._shunned.first_in(keys)]
        if not keys or not self._outage.usable():
            return 0
        n = 0
        deadline = self._deadline()  # one deadline for the whole lookup
        try:
            for start in range(0, len(keys), _EXIST_BATCH):
                batch = keys[start:start + _EXIST_BATCH]
                found = self._exchange(lambda sock, by: _exist_batch(sock, batch, by), deadline)
                for hit in found:
                    if not hit:
                        self._outage.worked()
                        return n
                    n += 1
        except lm_keys.KeyEncodingError as exc:
            self._log_once("key", "%s", exc)
            return n
        except OSError as exc:
            self._outage.failed(exc)
            return 0
        except BadReply as exc:
            self._log_once("exist-reply", "bad EXIST reply: %s", exc)
            return n
        self._outage.worked()
        return n

    def get(self, key: CacheEngineKey, allocate: Allocator) -> MemoryObj | None:
        if not self._outage.usable():
            return None
        if self._shunned.first_in([key]) == 0:
            self._stats.miss("absent")
            return None
        try:
            wire = lm_keys.wire_key(key)
            outcome, obj = self._exchange(lambda sock, by: _get(sock, wire, allocate, key, self._integrity, by))
        except lm_keys.KeyEncodingError as exc:
            self._log_once("key", "%s", exc)
            self._stats.miss("absent")
            return None
        except OSError as exc:
            self._outage.failed(exc)
            return None
        except BadReply as exc:
            self._outage.worked()
            self._log_once(f"get-reply:{type(exc).__name__}", "GET of %s: %s: treated as a miss", key.to_string(), exc)
            self._stats.miss(exc.cause, tier=self.name)
            self._shunned.add(key)
            return None
        self._outage.worked()
        if obj is None:
            self._stats.miss(outcome, tier=self.name if outcome != "absent" else None)
        return obj

    def get_many(self, keys: list[CacheEngineKey], allocate: Allocator) -> list[MemoryObj | None]:
        """get() of each key in turn (the protocol has no batched read), None from the first miss."""
        out: list[MemoryObj | None] = [None] * len(keys)
        for i, key in enumerate(keys):
            out[i] = self.get(key, allocate)
            if out[i] is None:
                break
        return out

    def put_many(self, keys: list[CacheEngineKey], objs: list[MemoryObj],
                 checksums: list[ChecksumMemo | None] | None = None) -> list[bool]:
        """PUT the chunks on one connection, then one HEALTH round trip. The protocol's PUT
        has no reply, but a server handles a connection's requests in order, so its HEALTH
        answer means every chunk before it is stored: True then means another client's
        lookup finds it. All False (counted as dropped) if the server is down or the batch
        cannot be sent; a chunk that cannot be encoded is False alone."""
        checksums = checksums or [None] * len(keys)
        stored = [False] * len(keys)
        if not self._outage.usable():
            self._stats.miss("dropped", len(keys), tier=self.name)
            return stored
        frames = []  # (index, header, payload)
        for i, (key, obj, memo) in enumerate(zip(keys, objs, checksums)):
            header = self._put_header(key, obj, memo)
            if header is not None:
                frames.append((i, header, memoryview(payload_view(obj.tensor))))
        if not frames:
            return stored
        try:
            self._exchange(lambda sock, _: self._send_and_confirm(sock, frames))
        except OSError as exc:
            self._outage.failed(exc)
            self._stats.miss("dropped", len(frames), tier=self.name)
            return stored
        except BadReply as exc:
            self._outage.worked()
            self._log_once("put-reply", "the HEALTH after a PUT was answered with %s: chunks not counted as stored", exc)
            self._stats.miss("dropped", len(frames), tier=self.name)
            return stored
        self._outage.worked()
        for i, _, _ in frames:
            stored[i] = True
            self._shunned.discard(keys[i])
            self._stats.chunk_event(self.name, True, keys[i])
        return stored

    def put(self, key: CacheEngineKey, obj: MemoryObj, checksum: ChecksumMemo | None = None) -> bool:
        """put_many() of one chunk: True once the server has stored it."""
        return self.put_many([key], [obj], [checksum])[0]

    def _put_header(self, key: CacheEngineKey, obj: MemoryObj, checksum: ChecksumMemo | None) -> bytes | None:
        try:
            if self._integrity.has_secret:
                return sealed_put_header(key, obj, self._integrity, checksum)
            return _put_header(key, obj)
        except (lm_keys.KeyEncodingError, P.ProtocolError, serde.SerdeError) as exc:
            self._log_once("put", "chunk not stored: %s", exc)
            self._stats.miss("dropped", tier=self.name)
            return None

    def _send_and_confirm(self, sock: socket.socket, frames: list[tuple[int, bytes, memoryview]]) -> None:
        """Each chunk by its own deadline (remote_timeout from when its sending starts), then the HEALTH."""
        for _, header, payload in frames:
            by = self._deadline()
            P.send_all(sock, header, by)
            P.send_all(sock, payload, by)
        by = self._deadline()
        P.send_all(sock, P.pack_request(P.HEALTH, HEALTH_KEY), by)
        reply = _read_reply(sock, by)
        if reply.code != P.SUCCESS or reply.length != 0:
            raise BadReply(f"code {reply.code}, length {reply.length}")

    def remove(self, key: CacheEngineKey) -> None:
        """The protocol has no delete (the server's LRU eviction removes entries): the
        key is treated as absent here for a while, so lookups stop reporting it."""
        self._shunned.add(key)
        self._stats.chunk_event(self.name, False, key)

    def close(self) -> None:
        self._conns.close()


def _put_header(key: CacheEngineKey, obj: MemoryObj) -> bytes:
    meta = obj.metadata
    dtype_code = P.DTYPE_CODES.get(dtype_name(meta.dtype))
    if dtype_code is None:
        raise P.ProtocolError(f"dtype {meta.dtype} has no lm:// code; supported: {', '.join(P.DTYPE_CODES)}")
    return P.pack_request(P.PUT, lm_keys.wire_key(key), obj.nbytes, _FMT_CODES[meta.fmt], dtype_code, meta.shape)


def _read_reply(sock: socket.socket, deadline: float) -> P.Reply:
    buf = bytearray(P.REPLY.size)
    got = P.recv_exact(sock, memoryview(buf), deadline)
    if got < len(buf):
        raise ConnectionResetError(f"connection closed {got} bytes into a reply header")
    return P.unpack_reply(buf)


def _exist_batch(sock: socket.socket, keys: list[CacheEngineKey], deadline: float) -> list[bool]:
    P.send_all(sock, b"".join(P.pack_request(P.EXIST, lm_keys.wire_key(k)) for k in keys), deadline)
    found = []
    for _ in keys:
        reply = _read_reply(sock, deadline)
        if reply.code not in (P.SUCCESS, P.FAIL) or reply.length != 0:
            raise BadReply(f"code {reply.code}, length {reply.length}")
        found.append(reply.code == P.SUCCESS)
    return found


def _describe(reply: P.Reply) -> tuple[torch.Size, torch.dtype, MemoryFormat]:
    """The chunk a GET reply announces; BadReply unless it is a whole KV chunk."""
    fmt = _FORMATS.get(reply.fmt)
    name = P.DTYPE_NAMES.get(reply.dtype)
    if fmt is None or name is None or not hasattr(torch, name):
        raise BadReply(f"reply names format {reply.fmt} / dtype {reply.dtype}, not a KV chunk")
    dtype = getattr(torch, name)
    try:
        shape = check_shape(torch.Size(P.strip_shape(reply.shape, reply.fmt)), fmt)
    except ValueError as exc:
        raise BadReply(str(exc)) from None
    if min(shape) <= 0 or shape.numel() * dtype.itemsize != reply.length:
        raise BadReply(f"shape {tuple(shape)} x {dtype} does not match the {reply.length}-byte payload")
    return shape, dtype, fmt


def _get(sock: socket.socket, wire: bytes, allocate: Allocator, key: CacheEngineKey,
         integrity: serde.Integrity, deadline: float) -> tuple[str, MemoryObj | None]:
    P.send_all(sock, P.pack_request(P.GET, wire), deadline)
    reply = _read_reply(sock, deadline)
    if reply.code == P.FAIL:
        if reply.length != 0:
            raise BadReply(f"FAIL reply with length {reply.length}")
        return "absent", None
    if reply.code != P.SUCCESS:
        raise BadReply(f"reply code {reply.code}")
    if integrity.has_secret:
        if reply.fmt != P.FMT_BINARY:
            raise RefusedReply("a naive value carries no MAC, and chunk_secret is set")
        return get_sealed(sock, reply, allocate, key, integrity, deadline)
    shape, dtype, fmt = _describe(reply)
    obj = allocate(shape, dtype, fmt)
    if obj is None:  # no host memory: the payload is not read, so this connection is done
        sock.close()
        return "dropped", None
    try:
        got = P.recv_exact(sock, memoryview(payload_view(obj.tensor)), deadline)
    except BaseException:
        obj.free()
        raise
    if got < reply.length:
        # Not counted as an outage: upstream's server closes the connection here when the
        # entry is a PUT it stored cut short. If the server is really gone, the next call says so.
        obj.free()
        raise BadReply(f"connection closed {got} of {reply.length} payload bytes into the reply")
    return "hit", obj
