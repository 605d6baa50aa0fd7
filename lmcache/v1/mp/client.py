"""The vLLM side's connection to the server: hello, auth, requests; reconnection.

`ServerLink.connection()` gives the live connection, or None while the server is
down (then every caller treats the operation as a miss; outage.py logs one line per
outage and backs off; the first call after the back-off tries again, so a restarted
server is found without restarting vLLM).

A request that times out retires its connection instead of closing it: the server
keeps the pins it holds for loads still reading their slots, and the connection is
closed once the last object it gave out is released (no slot is reused under a
reader). A connection the server closed is gone; so are its pins, and the slots
of an arena already mapped stay readable until their views go.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from lmcache.v1.mp import protocol as P
from lmcache.v1.mp.arena import Arena
from lmcache.v1.storage_backend.outage import Outage
from lmcache.v1.storage_backend.stats import EngineStats

logger = logging.getLogger("lmcache.v1.mp")


class Refused(Exception):
    """The server refused us (protocol version, token): one line says why."""


class RequestFailed(Exception):
    """No usable answer (timeout, connection lost, or the server said `error`)."""


class Connection:
    def __init__(self, host: str, port: int, timeout: float, connect_timeout: float, name: str,
                 arenas: dict[str, Arena]):
        self.sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            P.send(self.sock, P.hello())
            reply = P.recv(self.sock, P.MAX_HELLO_FRAME)
            if reply.get("version") != P.VERSION or reply.get("protocol") != P.PROTOCOL:
                raise Refused(P.version_refusal(P.VERSION, str(reply.get("version"))[:20], "client", "server"))
            if "error" in reply:
                raise Refused(str(reply["error"])[:300])
            self.arena = self._map(reply, arenas)
            P.send(self.sock, {"op": "auth", "token": self.arena.token, "name": name})
            answer = P.recv(self.sock, P.MAX_HELLO_FRAME)
            if "error" in answer:
                raise Refused(str(answer["error"])[:300])
        except BaseException:
            self.sock.close()
            raise
        self.server_chunk_size = reply.get("chunk_size")
        self.server_id = str(reply.get("server_id"))[:64]
        events_next = reply.get("events_next")
        self.events_next = events_next if isinstance(events_next, int) and not isinstance(events_next, bool) else 0
        self.sock.settimeout(timeout)
        self.lock = threading.Lock()
        self.retired = False  # no new requests (a timeout or a lost connection)
        self.live = 0  # objects given out over this connection and not yet given back
        self._next_id = 0

    @staticmethod
    def _map(reply: dict, arenas: dict[str, Arena]) -> Arena:
        path, size = reply.get("arena"), reply.get("arena_bytes")
        if not isinstance(path, str) or not isinstance(size, int):
            raise P.ProtocolError("hello reply names no arena")
        arena = arenas.get(path)
        if arena is None or arena.size != size:
            arena = Arena.open(path, size)
            arenas.clear()  # an arena of a server that is gone lives on in the views still using it
            arenas[path] = arena
        return arena

    def call(self, op: str, **fields) -> dict:
        with self.lock:
            if self.retired:
                raise RequestFailed("connection retired")
            self._next_id += 1
            request_id = self._next_id
            try:
                P.send(self.sock, {"op": op, "id": request_id, **fields})
                reply = P.recv(self.sock)
            except (OSError, P.PeerClosed, P.ProtocolError) as exc:
                self._retire_locked()
                raise RequestFailed(f"{op}: {type(exc).__name__}: {exc}") from None
        if reply.get("id") != request_id:
            self.retire()
            raise RequestFailed(f"{op}: reply for request {reply.get('id')!r}, expected {request_id}")
        if "error" in reply:
            raise RequestFailed(f"{op}: the server says: {str(reply['error'])[:300]}")
        return reply

    def post(self, op: str, **fields) -> bool:
        """A one-way message (no reply); False if it could not be sent."""
        with self.lock:
            try:
                P.send(self.sock, {"op": op, **fields})
                return True
            except OSError:
                self._retire_locked()
                return False

    # -- object accounting: a retired connection closes when its last object is back --
    def gave_out(self, n: int = 1) -> None:
        with self.lock:
            self.live += n

    def took_back(self, n: int = 1) -> None:
        with self.lock:
            self.live -= n
            if self.retired and self.live <= 0:
                self.sock.close()

    def free_slot(self, obj) -> None:
        """SlotObj.free() of an allocated, uncommitted slot: the server takes it back."""
        self.post("free", offset=obj.offset)
        self.took_back()

    def retire(self) -> None:
        with self.lock:
            self._retire_locked()

    def _retire_locked(self) -> None:
        self.retired = True
        if self.live <= 0:
            self.sock.close()

    def close(self) -> None:
        with self.lock:
            self.retired = True
            self.sock.close()


class ServerLink:
    """The current connection to a server, re-made after an outage. With `fallbacks`
    (lmcache.mp.server_urls), each new connection goes to the first of host:port and then
    the fallbacks, in order, that answers."""

    def __init__(self, host: str, port: int, stats: EngineStats, *, timeout: float = 2.0,
                 connect_timeout: float = 0.5, retry_interval: float = 10.0,
                 fallbacks: tuple[tuple[str, int], ...] = (), twin_of: "ServerLink | None" = None, role: str = ""):
        """`twin_of`: a second link to the same server(s) for a thread whose round trips must
        not wait behind that link's (the server answers each connection in order); it shares
        that link's outage (one line and one back-off per outage) and mapped arenas. `role`
        names it in the server's log."""
        self.addresses = [(host, port), *fallbacks]
        self.host, self.port = host, port
        self.address = f"{host}:{port}"  # the one connected to last
        self.timeout, self.connect_timeout = timeout, connect_timeout
        named = ", ".join(f"{h}:{p}" for h, p in self.addresses)
        self.outage = twin_of.outage if twin_of is not None else Outage(
            f"lmcache server{'s' if fallbacks else ''} {named}", logger, stats, retry_interval, tier="server")
        self.name = f"pid {os.getpid()}{' ' + role if role else ''}"
        self._arenas: dict[str, Arena] = twin_of._arenas if twin_of is not None else {}
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        # (server_id, its event number) when this link first reached that server: its
        # tier events from there on concern this process (server_events.py)
        self.epoch: tuple[str, int] | None = None

    def connection(self) -> Connection | None:
        conn = self._conn
        if conn is not None and not conn.retired:
            return conn
        with self._lock:
            conn = self._conn
            if conn is not None and not conn.retired:
                return conn
            if not self.outage.usable():
                return None
            conn = failure = None
            for host, port in self.addresses:
                try:
                    conn = Connection(host, port, self.timeout, self.connect_timeout, self.name, self._arenas)
                except (OSError, ValueError, Refused, P.ProtocolError, P.PeerClosed) as exc:
                    failure = exc  # the outage line names every server; this is the last one's reason
                    continue
                self.host, self.port, self.address = host, port, f"{host}:{port}"
                break
            if conn is None:
                self._conn = None
                self.outage.failed(failure)
                return None
            self._conn = conn
            if self.epoch is None or self.epoch[0] != conn.server_id:
                self.epoch = (conn.server_id, conn.events_next)
        self.outage.worked()
        return conn

    def current(self) -> Connection | None:
        conn = self._conn
        return conn if conn is not None and not conn.retired else None

    def failed(self, conn: Connection, exc: Exception) -> None:
        """A request on `conn` failed: the server is treated as down until the back-off passes."""
        conn.retire()
        if self._conn is conn:
            self.outage.failed(exc)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
