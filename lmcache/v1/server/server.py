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

from lmcache.v1.server.connections import ConnectionTable
from lmcache.v1.server.handler import ClientHandler
from lmcache.v1.server.store import LRUByteStore

logger = logging.getLogger("lmcache.v1.server")

DEFAULT_INFLIGHT_BYTES = 256 * 1024**2


class LMCacheServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, budget_bytes: int, request_timeout: float = 60.0,
                 max_clients: int = 1024, idle_timeout: float | None = None,
                 inflight_bytes: int | None = None, allow: tuple = ()):
        """`inflight_bytes`: PUT bodies being received at once (default min(budget, 256 MiB));
        `idle_timeout` None or 0: idle connections are never closed for being idle;
        `allow`: ipaddress networks that may connect (empty: anyone)."""
        if inflight_bytes is None:
            inflight_bytes = min(budget_bytes, DEFAULT_INFLIGHT_BYTES)
        self.store = LRUByteStore(budget_bytes, inflight_bytes)
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout or None
        self.connections = ConnectionTable(max_clients, tuple(allow))
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
        return len(self.connections)

    def verify_request(self, request, client_address) -> bool:
        """Registers the connection, or refuses it (not allowed, or every slot busy)."""
        return self.connections.admit(request, client_address) is not None

    def shutdown_request(self, request) -> None:
        conn = self.connections.get(request)
        if conn is not None:  # the handler's finish() did not run (a failed thread start)
            self.connections.remove(conn)
        super().shutdown_request(request)

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
        self.connections.shut_all()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self.store.clear()

