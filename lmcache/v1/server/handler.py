"""One client connection of the cache server: a loop of requests until EOF.

Where upstream's server fails, this one does not: a PUT whose body is cut short
is dropped (never stored), LIST and unknown commands get FAIL (never silence),
a body larger than the budget is read and thrown away in small pieces (never
allocated), and the key field is taken as bytes (no parsing that could fail).
"""

from __future__ import annotations

import logging
import socket
import socketserver

from lmcache.v1.server import protocol as P
from lmcache.v1.server.store import Entry, LRUByteStore

logger = logging.getLogger("lmcache.v1.server")

_DISCARD_BLOCK = 1 << 20


class ConnectionClosed(Exception):
    """The client went away (or sent something after which the stream cannot be trusted)."""


class ClientHandler(socketserver.BaseRequestHandler):
    server: "socketserver.ThreadingTCPServer"  # an LMCacheServer (server.py)

    def setup(self) -> None:
        self.store: LRUByteStore = self.server.store
        self.peer = "%s:%s" % self.client_address[:2]
        self.requests = 0
        self.server.track(self.request)
        logger.info("client %s connected (%d open)", self.peer, self.server.open_connections)

    def finish(self) -> None:
        self.server.untrack(self.request)
        logger.info("client %s disconnected after %d requests (%d open)", self.peer, self.requests,
                    self.server.open_connections)

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        header = bytearray(P.REQUEST.size)
        view = memoryview(header)
        try:
            while True:
                sock.settimeout(None)  # an idle client may keep its connection for as long as it likes
                got = P.recv_exact(sock, view)
                if got == 0:
                    return
                if got < len(header):
                    logger.warning("client %s: connection closed %d bytes into a request header", self.peer, got)
                    return
                sock.settimeout(self.server.io_timeout)  # a request, once begun, must keep moving
                self.requests += 1
                self._serve(sock, P.unpack_request(header))
        except ConnectionClosed:
            return
        except (OSError, socket.timeout) as exc:
            logger.warning("client %s: connection error: %s", self.peer, exc)

    def _serve(self, sock: socket.socket, req: P.Request) -> None:
        if req.command == P.PUT:
            self._put(sock, req)
        elif req.command == P.GET:
            entry = self.store.hold(req.key)
            if entry is None:
                sock.sendall(P.FAIL_REPLY)
                return
            try:
                sock.sendall(P.Reply(P.SUCCESS, entry.length, entry.fmt, entry.dtype, entry.shape, 0).pack())
                sock.sendall(memoryview(entry.data))
            finally:
                self.store.done(entry)
        elif req.command == P.EXIST:
            sock.sendall(P.SUCCESS_REPLY if self.store.contains(req.key) else P.FAIL_REPLY)
        elif req.command == P.HEALTH:
            sock.sendall(P.SUCCESS_REPLY)
        else:  # LIST (not offered: key listing is unbounded) and anything unknown
            name = P.COMMAND_NAMES.get(req.command, f"unknown command {req.command}")
            logger.debug("client %s: %s answered FAIL", self.peer, name)
            sock.sendall(P.FAIL_REPLY)

    def _put(self, sock: socket.socket, req: P.Request) -> None:
        n = req.length
        if n < 0:
            logger.warning("client %s: PUT with length %d: closing the connection (stream cannot be trusted)",
                           self.peer, n)
            raise ConnectionClosed
        data = self.store.reserve(n)
        if data is None:
            logger.warning("client %s: PUT of %d bytes does not fit the %d-byte budget: body discarded",
                           self.peer, n, self.store.budget_bytes)
            self._discard(sock, n)
            return
        try:
            got = P.recv_exact(sock, memoryview(data))
        except BaseException:
            self.store.release(data)
            raise
        if got < n:
            self.store.release(data)
            logger.warning("client %s: PUT body cut short (%d of %d bytes): dropped, not stored", self.peer, got, n)
            raise ConnectionClosed
        self.store.commit(req.key, Entry(data, req.fmt, req.dtype, req.shape, req.location))

    def _discard(self, sock: socket.socket, n: int) -> None:
        scratch = memoryview(bytearray(min(n, _DISCARD_BLOCK)))
        while n > 0:
            got = P.recv_exact(sock, scratch[: min(n, len(scratch))])
            if got == 0:
                raise ConnectionClosed
            n -= got
