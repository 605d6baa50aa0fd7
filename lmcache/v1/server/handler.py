"""One client connection of the cache server: a loop of requests until EOF.

Where upstream's server fails, this one does not: a PUT whose body is cut short
is dropped (never stored), LIST and unknown commands get FAIL (never silence),
a body larger than the budget is read and thrown away (never allocated), and the
key field is taken as bytes (no parsing that could fail).

Time limits: a connection quiet between requests for --idle-timeout is closed; a
request, from its first header byte to the last byte of its body or reply, must
finish within --request-timeout (a deadline for the whole request, not per read:
a peer sending a byte a second cannot stretch it). A PUT takes memory only when
its body starts to arrive, and evicts nothing until all of it has.
"""

from __future__ import annotations

import functools
import logging
import socket
import socketserver
import time

from lmcache.v1.server import protocol as P
from lmcache.v1.server.connections import BUSY, HEADER, IDLE, shut
from lmcache.v1.server.store import Entry, LRUByteStore

logger = logging.getLogger("lmcache.v1.server")

# Bodies that are thrown away are all read into this one buffer (by every thread at
# once: its contents are never looked at), so discarding costs no memory per client.
_SCRATCH = memoryview(bytearray(256 * 1024))


class ConnectionClosed(Exception):
    """The client went away (or sent something after which the stream cannot be trusted)."""


class ClientHandler(socketserver.BaseRequestHandler):
    server: "socketserver.ThreadingTCPServer"  # an LMCacheServer (server.py)

    def setup(self) -> None:
        self.store: LRUByteStore = self.server.store
        self.conn = self.server.connections.get(self.request)
        self.peer = "%s:%s" % self.client_address[:2]
        self.requests = 0
        self.aborted = False
        logger.info("client %s connected (%d open)", self.peer, len(self.server.connections))

    def finish(self) -> None:
        if self.conn is not None:
            self.server.connections.remove(self.conn)
        logger.info("client %s disconnected after %d requests (%d open)", self.peer, self.requests,
                    len(self.server.connections))

    def handle(self) -> None:
        if self.conn is None:  # refused by verify_request, or the server is stopping
            return
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        header = bytearray(P.REQUEST.size)
        view = memoryview(header)
        table = self.server.connections
        try:
            while table.enter(self.conn, IDLE):
                got = self._first_bytes(sock, view)
                if got == 0 or not table.enter(self.conn, HEADER):
                    return
                deadline = time.monotonic() + self.server.request_timeout
                got += P.recv_exact(sock, view[got:], deadline)
                if got < len(header):
                    logger.warning("client %s: connection closed %d bytes into a request header", self.peer, got)
                    return
                if not table.enter(self.conn, BUSY):
                    return
                self.requests += 1
                self._serve(sock, P.unpack_request(header), deadline)
        except ConnectionClosed:
            return
        except P.DeadlineExceeded:
            self._late()
        except socket.timeout:  # TimeoutError: only requests have timeouts past the first bytes
            self._late()
        except OSError as exc:
            if self.aborted:
                logger.warning("client %s: reply not read while its memory was needed: connection closed", self.peer)
            elif not self.conn.dropped:
                logger.warning("client %s: connection error: %s", self.peer, exc)

    def _late(self) -> None:
        logger.warning("client %s: request not finished within %g s (--request-timeout): connection closed",
                       self.peer, self.server.request_timeout)

    def _first_bytes(self, sock: socket.socket, view: memoryview) -> int:
        """Wait (at most --idle-timeout) for a request to begin; 0 if it does not."""
        sock.settimeout(self.server.idle_timeout)
        try:
            return sock.recv_into(view, len(view))
        except socket.timeout:
            logger.info("client %s: idle for %g s (--idle-timeout): connection closed", self.peer,
                        self.server.idle_timeout)
            return 0
        except OSError:
            if self.conn.dropped:
                return 0
            raise

    def _serve(self, sock: socket.socket, req: P.Request, deadline: float) -> None:
        if req.command == P.PUT:
            self._put(sock, req, deadline)
        elif req.command == P.GET:
            abort = functools.partial(self._abort_read, sock)
            entry = self.store.hold(req.key, abort)
            if entry is None:
                P.send_all(sock, P.FAIL_REPLY, deadline)
                return
            try:
                reply = P.Reply(P.SUCCESS, entry.length, entry.fmt, entry.dtype, entry.shape, 0).pack()
                P.send_all(sock, reply, deadline)
                P.send_all(sock, memoryview(entry.data), deadline)
            finally:
                self.store.done(entry, abort)
        elif req.command == P.EXIST:
            P.send_all(sock, P.SUCCESS_REPLY if self.store.contains(req.key) else P.FAIL_REPLY, deadline)
        elif req.command == P.HEALTH:
            P.send_all(sock, P.SUCCESS_REPLY, deadline)
        else:  # LIST (not offered: key listing is unbounded) and anything unknown
            name = P.COMMAND_NAMES.get(req.command, f"unknown command {req.command}")
            logger.debug("client %s: %s answered FAIL", self.peer, name)
            P.send_all(sock, P.FAIL_REPLY, deadline)

    def _put(self, sock: socket.socket, req: P.Request, deadline: float) -> None:
        n = req.length
        if n < 0:
            logger.warning("client %s: PUT with length %d: closing the connection (stream cannot be trusted)",
                           self.peer, n)
            raise ConnectionClosed
        if not self.store.fits(n):
            logger.warning("client %s: PUT of %d bytes does not fit the %d-byte budget or the %d-byte in-flight "
                           "allowance: body discarded", self.peer, n, self.store.budget_bytes,
                           self.store.inflight_cap)
            self._discard(sock, n, deadline)
            return
        if n and not self._body_begins(sock, deadline):
            logger.warning("client %s: PUT body cut short (0 of %d bytes): dropped, not stored", self.peer, n)
            raise ConnectionClosed
        data = self.store.reserve(n, timeout=max(0.0, deadline - time.monotonic()))
        if data is None:  # the in-flight allowance stayed full until the deadline
            raise P.DeadlineExceeded
        try:
            got = P.recv_exact(sock, memoryview(data), deadline)
        except BaseException:
            self.store.release(data)
            raise
        if got < n:
            self.store.release(data)
            logger.warning("client %s: PUT body cut short (%d of %d bytes): dropped, not stored", self.peer, got, n)
            raise ConnectionClosed
        if not self.store.commit(req.key, Entry(data, req.fmt, req.dtype, req.shape, req.location)):
            logger.warning("client %s: PUT of %d bytes not stored: the budget is held by entries being sent to "
                           "readers", self.peer, n)

    def _abort_read(self, sock: socket.socket) -> None:
        """The store needs the room this reply holds: end it (the client sees a closed connection)."""
        self.aborted = True
        shut(sock)

    @staticmethod
    def _body_begins(sock: socket.socket, deadline: float) -> bool:
        """Wait for the body's first byte (without taking it): a header alone reserves nothing."""
        P.arm(sock, deadline)
        return sock.recv(1, socket.MSG_PEEK) != b""

    def _discard(self, sock: socket.socket, n: int, deadline: float) -> None:
        while n > 0:
            got = P.recv_exact(sock, _SCRATCH[: min(n, len(_SCRATCH))], deadline)
            if got == 0:
                raise ConnectionClosed
            n -= got
