"""The server's sockets: one thread per client connection, speaking protocol.py.

A connection must say hello (same protocol version) and show the arena's token within
`hello_timeout` seconds, in frames of at most 4 KiB; until then it can do nothing
else. After that a frame that breaks the protocol gets an `error` reply (requests) or
a log line (one-way messages), and the connection goes on. When a connection ends,
for whatever reason, the slots it held are given back (shared_cache.py).
"""

from __future__ import annotations

import hmac
import logging
import socket
import socketserver
import threading
import uuid

from lmcache.v1.mp import protocol as P
from lmcache.v1.mp.shared_cache import SharedCache, dtype_name

logger = logging.getLogger("lmcache.server")


class CacheServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, cache: SharedCache, chunk_size: int, max_clients: int = 1024,
                 hello_timeout: float = 5.0):
        self.cache = cache
        self.chunk_size = chunk_size
        self.max_clients = max_clients
        self.hello_timeout = hello_timeout
        self.server_id = uuid.uuid4().hex
        self._open = 0
        self._open_lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), ClientConnection)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def verify_request(self, request, client_address) -> bool:
        with self._open_lock:
            if self._open >= self.max_clients:
                logger.warning("connection from %s refused: %d open (--max-clients)", client_address[0], self._open)
                return False
            self._open += 1
            return True

    def closed_one(self) -> None:
        with self._open_lock:
            self._open -= 1

    def handle_error(self, request, client_address) -> None:
        logger.exception("client %s: unexpected error", client_address[0])


class ClientConnection(socketserver.BaseRequestHandler):
    server: CacheServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = "%s:%s" % self.client_address[:2]
        try:
            sock.settimeout(self.server.hello_timeout)
            name = self._handshake(sock, peer)
        except (P.ProtocolError, P.PeerClosed, OSError) as exc:
            logger.warning("client %s dropped before it was admitted: %s", peer, exc)
            name = None
        if name is None:
            self.server.closed_one()
            return
        sock.settimeout(None)  # an admitted client may stay idle as long as it likes
        client = self.server.cache.connect(f"{name} ({peer})")
        logger.info("client %s connected", client.name)
        try:
            self._serve(sock, client)
        finally:
            freed, unpinned = self.server.cache.disconnect(client)
            self.server.closed_one()
            logger.info("client %s disconnected%s", client.name,
                        f"; reclaimed {freed} unwritten slot(s) and {unpinned} pin(s)" if freed or unpinned else "")

    def _handshake(self, sock: socket.socket, peer: str) -> str | None:
        first = P.recv(sock, P.MAX_HELLO_FRAME)
        refusal = P.check_hello(first)
        cache = self.server.cache
        if refusal is not None:
            logger.warning("client %s refused: %s", peer, refusal)
            P.send(sock, {"error": refusal, "version": P.VERSION, "protocol": P.PROTOCOL})
            return None
        P.send(sock, {"ok": True, "protocol": P.PROTOCOL, "version": P.VERSION, "arena": cache.arena.path,
                      "arena_bytes": cache.arena.size, "server_id": self.server.server_id,
                      "chunk_size": self.server.chunk_size, "events_next": cache.events.next})
        auth = P.recv(sock, P.MAX_HELLO_FRAME)
        token = auth.get("token")
        if auth.get("op") != "auth" or not isinstance(token, str) or not hmac.compare_digest(
                token.encode(), cache.arena.token.encode()):
            logger.warning("client %s refused: wrong or missing arena token (it cannot read %s)", peer,
                           cache.arena.path)
            P.send(sock, {"error": "wrong arena token: this user cannot read the server's arena"})
            return None
        P.send(sock, {"ok": True})
        name = auth.get("name")
        return name[:80] if isinstance(name, str) else "client"

    def _serve(self, sock: socket.socket, client) -> None:
        while True:
            try:
                message = P.recv(sock)
            except P.PeerClosed:
                return
            except P.ProtocolError as exc:  # the stream can no longer be trusted
                logger.warning("client %s: %s; connection closed", client.name, exc)
                return
            except OSError as exc:
                logger.warning("client %s: connection error: %s", client.name, exc)
                return
            op = message.get("op")
            request_id = message.get("id")
            self.server.cache.count_request(op if op in P.REQUESTS or op in P.ONE_WAY else "unknown")
            try:
                reply = self._dispatch(op, message, client)
            except P.ProtocolError as exc:
                if op in P.ONE_WAY:
                    logger.warning("client %s: %s: %s", client.name, op, exc)
                    continue
                reply = {"error": str(exc)}
            if op in P.ONE_WAY:
                continue
            reply["id"] = request_id
            try:
                P.send(sock, reply)
            except OSError as exc:
                logger.warning("client %s: cannot reply: %s", client.name, exc)
                return

    def _dispatch(self, op, message: dict, client) -> dict:
        cache = self.server.cache
        if op == "lookup":
            return {"ok": True, "found": cache.lookup(P.str_list(message, "keys"))}
        if op == "resident":
            return {"ok": True, "found": cache.resident(P.str_list(message, "keys"))}
        if op == "contains":
            return {"ok": True, "held": cache.contains(P.str_list(message, "keys"))}
        if op == "alloc":
            obj = cache.alloc(client, message.get("shape"), message.get("dtype"), message.get("fmt"))
            return {"ok": True, "offset": None if obj is None else obj.offset}
        if op == "reserve":
            return {"ok": True, "slots": cache.reserve(client, P.str_list(message, "keys"), message.get("shapes"),
                                                       message.get("dtype"), message.get("fmt"))}
        if op == "pin":
            objs = cache.pin(client, P.str_list(message, "keys"))
            return {"ok": True, "slots": [[o.offset, list(o.metadata.shape), dtype_name(o.metadata.dtype),
                                           o.fmt.value] for o in objs]}
        if op == "commit":
            cache.commit(client, P.int_field(message, "offset"), str(message.get("key")))
            return {}
        if op == "free":
            cache.free(client, P.int_field(message, "offset"))
            return {}
        if op == "unpin":
            cache.unpin(client, P.int_list(message, "offsets"))
            return {}
        if op == "stats":
            return {"ok": True, "status": cache.status()}
        if op == "ping":
            return {"ok": True}
        if op == "events":
            events, after, lost = cache.events.since(P.int_field(message, "since"))
            return {"ok": True, "events": events, "next": after, "lost": lost}
        raise P.ProtocolError(f"unknown op {str(op)[:40]!r}; known: {', '.join(sorted(P.REQUESTS | P.ONE_WAY))}")
