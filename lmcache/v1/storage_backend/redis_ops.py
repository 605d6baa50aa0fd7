"""The commands every Redis tier sends (single server, sentinel, cluster), on a
connection taken from a redis-py pool, each under a whole-operation deadline.

redis-py's socket_timeout bounds each read, so a peer that trickles one byte a
second keeps a GET alive forever. Here one watchdog thread holds the deadline of
every operation in flight; an operation past its deadline has its socket shut
down, the blocked read ends at once, and the caller sees `DeadlineExceeded` (a
redis TimeoutError). The connection is then closed, never reused.

Replies are checked for their type: a peer that answers `+OK` to everything
(or anything else that is not Redis) gives `BadReply`, never a hit.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from typing import Any, Callable

import redis




class DeadlineExceeded(redis.TimeoutError):
    """The whole operation took longer than remote_timeout."""


class BadReply(redis.RedisError):
    """A reply of the wrong type: the peer is not a Redis server (or not a sane one)."""


class _Guard:
    __slots__ = ("deadline", "conn", "done", "expired")

    def __init__(self, deadline: float) -> None:
        self.deadline, self.conn, self.done, self.expired = deadline, None, False, False


class Watchdog:
    """Shuts down the socket of any guarded operation that outlives its deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Guard]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self, timeout: float) -> _Guard:
        entry = _Guard(time.monotonic() + timeout)
        with self._cond:
            heapq.heappush(self._heap, (entry.deadline, next(self._order), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lmcache-redis-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
        return entry

    def finish(self, entry: _Guard) -> bool:
        """The operation is over (its socket is left alone from now on); True if it expired."""
        with self._cond:
            entry.done = True
            return entry.expired

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, entry = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                entry.expired = True
                sock = getattr(entry.conn, "_sock", None)
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


WATCHDOG = Watchdog()
_current = threading.local()  # the guard of this thread's operation, while it takes a connection


def _watch_new_connections(pool) -> None:
    """A connection the pool makes inside an operation is guarded from its first
    byte: the handshake (AUTH, CLIENT SETINFO, SELECT) is part of the operation."""
    if getattr(pool, "_lmcache_watched", False):
        return
    make = pool.make_connection

    def make_watched():
        conn = make()
        entry = getattr(_current, "guard", None)
        if entry is not None:
            entry.conn = conn
        return conn

    pool.make_connection = make_watched
    pool._lmcache_watched = True


def on_connection(pool, timeout: float, work: Callable[[Any], Any]) -> Any:
    """work(connection) with a connection of `pool` (taking it, and the handshake of
    a new one, included) under a `timeout`-second deadline. On any error the
    connection is closed (its stream may be out of step) and the error raised;
    past the deadline the error is DeadlineExceeded."""
    _watch_new_connections(pool)
    entry = WATCHDOG.start(timeout)
    conn = None
    try:
        _current.guard = entry
        try:
            conn = pool.get_connection()
        finally:
            _current.guard = None
        entry.conn = conn
        result = work(conn)
    except Exception as exc:
        expired = WATCHDOG.finish(entry)
        if conn is not None:
            conn.disconnect()
            pool.release(conn)
        if expired:
            raise DeadlineExceeded(f"operation took longer than {timeout:.3g}s (remote_timeout)") from exc
        raise
    except BaseException:
        WATCHDOG.finish(entry)
        if conn is not None:
            conn.disconnect()
            pool.release(conn)
        raise
    if WATCHDOG.finish(entry):  # done just as its socket was shut down: never reuse it
        conn.disconnect()
    pool.release(conn)
    return result


def as_bytes_or_none(reply) -> bytes | None:
    if reply is None or isinstance(reply, (bytes, bytearray, memoryview)):
        return reply
    raise BadReply(f"GET answered {type(reply).__name__}, not a bulk string")


def _as_count(reply) -> int:
    if isinstance(reply, int) and not isinstance(reply, bool) and reply in (0, 1):
        return reply
    raise BadReply(f"EXISTS answered {reply!r:.40}, not 0 or 1")


def read_each(conn, n: int, check: Callable[[Any], Any]) -> list:
    """n pipelined replies; an error reply (MOVED, ASK, CLUSTERDOWN, ...) is kept
    in place of its value, so the other replies are still read and used."""
    out = []
    for _ in range(n):
        try:
            out.append(check(conn.read_response()))
        except redis.ResponseError as exc:
            out.append(exc)
    return out


def exists_many(conn, names: list[str]) -> list:
    """EXISTS of each name, pipelined on one connection: 0/1 or the error reply."""
    conn.send_packed_command(conn.pack_commands([("EXISTS", name) for name in names]), check_health=False)
    return read_each(conn, len(names), _as_count)


def get_many(conn, names: list[str]) -> list:
    """GET of each name, pipelined on one connection: the value, None, or the error reply."""
    conn.send_packed_command(conn.pack_commands([("GET", name) for name in names]), check_health=False)
    return read_each(conn, len(names), as_bytes_or_none)


def get_one(conn, name: str) -> bytes | None:
    conn.send_command("GET", name, check_health=False)
    return as_bytes_or_none(conn.read_response())


SEPARATE_SEND_BYTES = 64 * 2**10  # a payload this large is sent from its memory object, not copied


def _as_ok(reply) -> bool:
    if reply in (b"OK", "OK", True):
        return True
    raise BadReply(f"SET answered {reply!r:.40}, not OK")


def set_many(conn, blobs: list[tuple[str, bytes, memoryview]]) -> list:
    """SET of each (name, header, payload), pipelined on one connection, each payload
    sent straight from its memory object (no joined copy): True or the error reply."""
    pieces: list = []
    small = bytearray()  # small blobs and the framing, joined: one send, not three per SET
    for name, header, payload in blobs:
        key = name.encode()
        size = len(header) + payload.nbytes
        small += b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s" % (len(key), key, size, header)
        if payload.nbytes < SEPARATE_SEND_BYTES:
            small += payload
        else:
            pieces += [bytes(small), payload]
            small = bytearray()
        small += b"\r\n"
    conn.send_packed_command(pieces + [bytes(small)], check_health=False)
    return read_each(conn, len(blobs), _as_ok)


def delete_if_same(conn, name: str, blob: bytes) -> None:
    """Delete a bad value unless another writer replaced it meanwhile."""
    if get_one(conn, name) == blob:
        conn.send_command("DEL", name, check_health=False)
        conn.read_response()
