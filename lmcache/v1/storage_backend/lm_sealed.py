"""The `lm://` tier's integrity parts: sealed values (with `chunk_secret`) and the
keys it treats as absent after refusing or removing them.

A sealed value is a serde blob, header (key digest, MAC) then the raw bytes, sent
as BINARY/uint8 so any lm:// server stores it as opaque bytes. Upstream's clients
cannot read it; that is the price of the MAC (docs/configuration.md).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import OrderedDict

from lmcache.v1.memory import MemoryObj
from lmcache.v1.server import protocol as P
from lmcache.v1.storage_backend import lm_keys, serde
from lmcache.v1.storage_backend.serde import Allocator, ChecksumMemo, payload_view
from lmcache.v1.token_database import CacheEngineKey

SHUNNED_MAX = 65536
SHUNNED_SECONDS = 300.0


class BadReply(Exception):
    """The server's reply cannot be trusted (the connection is closed)."""

    cause = "corrupt"


class RefusedReply(BadReply):
    """A well-formed value that may not be loaded under this key (key digest, MAC)."""

    cause = "refused"


class ShunnedKeys:
    """Keys whose value was refused or removed. The protocol has no delete, so for
    SHUNNED_SECONDS they are absent to this client instead of being found (and refused)
    again; storing the key anew ends that. Bounded: the oldest are forgotten first."""

    def __init__(self, seconds: float = SHUNNED_SECONDS, max_keys: int = SHUNNED_MAX):
        self.seconds = seconds
        self.max_keys = max_keys
        self._until: OrderedDict[CacheEngineKey, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: CacheEngineKey) -> None:
        with self._lock:
            self._until[key] = time.monotonic() + self.seconds
            self._until.move_to_end(key)
            while len(self._until) > self.max_keys:
                self._until.popitem(last=False)

    def discard(self, key: CacheEngineKey) -> None:
        if self._until:
            with self._lock:
                self._until.pop(key, None)

    def first_in(self, keys: list[CacheEngineKey]) -> int:
        """Index of the first key of `keys` that is shunned (len(keys) if none)."""
        if not self._until:
            return len(keys)
        now = time.monotonic()
        with self._lock:
            for i, key in enumerate(keys):
                until = self._until.get(key)
                if until is not None:
                    if until > now:
                        return i
                    del self._until[key]
        return len(keys)


def sealed_put_header(key: CacheEngineKey, obj: MemoryObj, integrity: serde.Integrity,
                      memo: ChecksumMemo | None) -> bytes:
    """PUT header + serde header: the value is that header plus the raw bytes."""
    blob_header = integrity.header(key, obj, None, memo.value if memo is not None else None, memo)
    length = len(blob_header) + obj.nbytes
    return P.pack_request(P.PUT, lm_keys.wire_key(key), length, P.FMT_BINARY, P.DTYPE_CODES["uint8"],
                          (length, 0, 0, 0)) + blob_header


def get_sealed(sock: socket.socket, reply: P.Reply, allocate: Allocator, key: CacheEngineKey,
                integrity: serde.Integrity, deadline: float | None = None) -> tuple[str, MemoryObj | None]:
    """A value that is a serde blob: header checked (key digest, MAC) before it is loaded;
    all of it read by `deadline` (the operation's, see lm.py)."""
    if reply.length < serde.HEADER_SIZE:
        raise BadReply(f"a {reply.length}-byte BINARY value is shorter than a chunk header")
    head = bytearray(serde.HEADER_SIZE)
    if P.recv_exact(sock, memoryview(head), deadline) < len(head):
        raise BadReply("connection closed inside a chunk header")
    try:
        header = serde.decode_header(head)
    except serde.SerdeError as exc:
        raise BadReply(str(exc)) from None
    if serde.HEADER_SIZE + header.payload_nbytes != reply.length:
        raise BadReply(f"chunk header says {header.payload_nbytes} payload bytes, reply {reply.length} in all")
    obj = allocate(header.shape, header.dtype, header.fmt)
    if obj is None:
        sock.close()
        return "dropped", None
    try:
        payload = payload_view(obj.tensor)
        if P.recv_exact(sock, memoryview(payload), deadline) < header.payload_nbytes:
            raise BadReply("connection closed inside a chunk payload")
        serde.verify(header, payload)
        integrity.check(key, header, payload)
    except serde.RefusedChunk as exc:
        obj.free()
        raise RefusedReply(str(exc)) from None
    except serde.SerdeError as exc:
        obj.free()
        raise BadReply(str(exc)) from None
    except BaseException:
        obj.free()
        raise
    return "hit", obj
