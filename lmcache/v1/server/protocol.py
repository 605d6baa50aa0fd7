"""The `lm://` wire format (upstream LMCache 0.5.6's cache-server protocol).

Request, client -> server: 186 bytes = 9 int32 + a 150-byte key field
  command, length, fmt, dtype, location, shape0..shape3, key (UTF-8, space-padded)
Reply, server -> client: 36 bytes = 9 int32, in another order
  code, length, fmt, dtype, shape0..shape3, location
PUT is followed by `length` payload bytes and gets no reply; a GET hit is
followed by `length` payload bytes. Integers are little-endian (upstream packs
in native order, which is little-endian on every machine it runs on).

Pure `struct`, no torch: the server imports only this.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import NamedTuple

KEY_FIELD = 150
REQUEST = struct.Struct(f"<9i{KEY_FIELD}s")
REPLY = struct.Struct("<9i")
assert REQUEST.size == 186 and REPLY.size == 36

PUT, GET, EXIST, LIST, HEALTH = 1, 2, 3, 4, 5
COMMAND_NAMES = {PUT: "PUT", GET: "GET", EXIST: "EXIST", LIST: "LIST", HEALTH: "HEALTH"}
SUCCESS, FAIL = 200, 400

# Upstream's MemoryFormat values (only these two are KV chunks here).
FMT_KV_2LTD = 1
FMT_BINARY = 4
FMT_BINARY_BUFFER = 5
FMT_KV_MLA = 6
# Upstream's dtype codes; 1 ("half") is an alias of 2 on the way in.
DTYPE_CODES = {
    "float16": 2, "bfloat16": 3, "float32": 4, "float64": 5, "uint8": 6,
    "float8_e4m3fn": 7, "float8_e5m2": 8,
}  # fmt: skip
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()} | {1: "float16"}

INT32_MAX = 2**31 - 1


class ProtocolError(ValueError):
    """Bytes on the wire that are not a valid message (or a message that cannot be sent)."""


class Request(NamedTuple):
    command: int
    length: int
    fmt: int
    dtype: int
    location: int
    shape: tuple[int, int, int, int]
    key: bytes  # without the padding

    def pack(self) -> bytes:
        return pack_request(self.command, self.key, self.length, self.fmt, self.dtype, self.shape, self.location)


class Reply(NamedTuple):
    code: int
    length: int
    fmt: int
    dtype: int
    shape: tuple[int, int, int, int]
    location: int

    def pack(self) -> bytes:
        return REPLY.pack(self.code, self.length, self.fmt, self.dtype, *self.shape, self.location)


def pad_shape(shape) -> tuple[int, int, int, int]:
    dims = tuple(int(d) for d in shape)
    if len(dims) > 4:
        raise ProtocolError(f"shape {dims} has {len(dims)} dimensions; the protocol carries at most 4")
    return dims + (0,) * (4 - len(dims))


def strip_shape(dims, fmt: int) -> tuple[int, ...]:
    """Undo pad_shape: trailing zeros go (at least one dim stays), except for the
    binary formats, whose shape is [length, 0, 0, 0] as is."""
    dims = tuple(dims)
    if fmt in (FMT_BINARY, FMT_BINARY_BUFFER):
        return dims
    end = len(dims)
    while end > 1 and dims[end - 1] == 0:
        end -= 1
    return dims[:end]


def pack_request(command: int, key: bytes, length: int = 0, fmt: int = FMT_KV_2LTD, dtype: int = 2,
                 shape=(0, 0, 0, 0), location: int = 0) -> bytes:
    """The 186-byte header. The non-PUT defaults (fmt 1, dtype float16, shape 0s)
    are what upstream's client sends."""
    if len(key) > KEY_FIELD:
        raise ProtocolError(f"key of {len(key)} bytes does not fit the {KEY_FIELD}-byte key field")
    if not 0 <= length <= INT32_MAX:
        raise ProtocolError(f"length {length} does not fit the protocol's int32 length field")
    return REQUEST.pack(command, length, fmt, dtype, location, *pad_shape(shape), key.ljust(KEY_FIELD, b" "))


def unpack_request(header) -> Request:
    command, length, fmt, dtype, location, s0, s1, s2, s3, key = REQUEST.unpack(header)
    return Request(command, length, fmt, dtype, location, (s0, s1, s2, s3), key.rstrip(b" ").lstrip(b" "))


def unpack_reply(header) -> Reply:
    code, length, fmt, dtype, s0, s1, s2, s3, location = REPLY.unpack(header)
    return Reply(code, length, fmt, dtype, (s0, s1, s2, s3), location)


# What upstream's server replies for a miss, an EXIST and a HEALTH (fmt 1, float16, no shape).
FAIL_REPLY = Reply(FAIL, 0, FMT_KV_2LTD, 2, (0, 0, 0, 0), 0).pack()
SUCCESS_REPLY = Reply(SUCCESS, 0, FMT_KV_2LTD, 2, (0, 0, 0, 0), 0).pack()


class DeadlineExceeded(TimeoutError):
    """An operation did not finish by its deadline (an OSError, as socket timeouts are)."""


def arm(sock: socket.socket, deadline: float | None) -> None:
    """Set the socket's timeout to what is left until `deadline` (time.monotonic());
    DeadlineExceeded if nothing is left. None: no deadline (blocking)."""
    if deadline is None:
        sock.settimeout(None)
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline passed")
    sock.settimeout(left)


def recv_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> int:
    """Fill `view` from the socket; returns the bytes received (short only at EOF).
    With a deadline, the whole fill must end by it (each read gets only what is
    left, so a peer sending a byte at a time cannot stretch it)."""
    got, n = 0, len(view)
    while got < n:
        if deadline is not None:
            arm(sock, deadline)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            break
        got += k
    return got


def send_all(sock: socket.socket, data, deadline: float | None) -> None:
    """sendall, ended by the deadline (a socket timeout bounds a whole sendall)."""
    arm(sock, deadline)
    sock.sendall(data)
