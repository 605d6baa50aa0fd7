"""LMCacheServer: the `lm://` cache server (threads, one per connection).

`serve_forever()` in the calling thread, or `start()` in a background thread
(tests, embedding); `stop()` stops accepting, closes every open connection and
waits for their threads (SIGTERM does this in __main__).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading

from lmcache.v1.server.handler import ClientHandler
from lmcache.v1.server.store import LRUByteStore

logger = logging.getLogger("lmcache.v1.server")


class LMCacheServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, budget_bytes: int, io_timeout: float = 60.0, max_clients: int = 1024):
        self.store = LRUByteStore(budget_bytes)
        self.io_timeout = io_timeout
        self.max_clients = max_clients
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._serving = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        super().__init__((host, port), ClientHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def open_connections(self) -> int:
        with self._conn_lock:
            return len(self._connections)

    def track(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._connections.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._connections.discard(sock)

    def verify_request(self, request, client_address) -> bool:
        """Beyond max_clients open connections a new one is closed at once (one thread each)."""
        if self.open_connections < self.max_clients:
            return True
        logger.warning("client %s:%s refused: %d connections open (--max-clients)", *client_address[:2],
                       self.open_connections)
        return False

    def handle_error(self, request, client_address) -> None:  # never a traceback on stderr per client
        logger.exception("client %s:%s: unexpected error", *client_address[:2])

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving = False

    def start(self) -> "LMCacheServer":
        self._thread = threading.Thread(target=self.serve_forever, name="lmcache-server", daemon=True)
        self._serving = True  # before the thread runs: a stop() right away must still shut it down
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the open connections, release the port."""
        if self._serving:
            self.shutdown()  # waits for serve_forever (in another thread) to return
        with self._conn_lock:
            open_now = list(self._connections)
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self.store.clear()
