"""The server's HTTP port: /healthcheck, /status (JSON) and /metrics (Prometheus text).

Read-only, no request body is read; it binds loopback unless told otherwise.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lmcache.v1.mp.shared_cache import SharedCache

PREFIX = "lmcache_server_"


def prometheus_text(status: dict) -> str:
    lines = []

    def gauge(name: str, value, help_text: str, kind: str = "gauge") -> None:
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        lines.append(f"{PREFIX}{name} {float(value)}")

    gauge("clients", status["clients"], "Connected vLLM workers.")
    gauge("l1_bytes", status["l1_bytes"], "Bytes of the shared-memory host tier.")
    gauge("l1_used_bytes", status["l1_used_bytes"], "Bytes of the host tier in use (chunks and slots in flight).")
    gauge("l1_chunks", status["l1_chunks"], "Chunks in the host tier.")
    gauge("pins", status["pins"], "Chunk pins held by clients' loads and leases.")
    stats = status["stats"]
    for name in ("lookups", "hit_tokens", "stored_chunks", "stored_bytes", "loaded_chunks"):
        if name in stats:
            gauge(f"{name}_total", stats[name], f"Running total of {name.replace('_', ' ')}.", "counter")
    for name, value in sorted(stats.items()):
        if name.startswith("misses_"):
            gauge(f"{name}_total", value, f"Chunks missed or dropped: {name[7:]}.", "counter")
    if status.get("requests"):
        lines.append(f"# HELP {PREFIX}requests_total Messages served, by op.")
        lines.append(f"# TYPE {PREFIX}requests_total counter")
        lines.extend(f'{PREFIX}requests_total{{op="{op}"}} {float(n)}' for op, n in sorted(status["requests"].items()))
    return "\n".join(lines) + "\n"


class StatusServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, cache: SharedCache):
        self.cache = cache
        super().__init__((host, port), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, name="lmcache-server-http", daemon=True)

    def start(self) -> "StatusServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: StatusServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/healthcheck":
            self._reply(200, "text/plain", "OK\n")
        elif path == "/status":
            self._reply(200, "application/json", json.dumps(self.server.cache.status()) + "\n")
        elif path == "/metrics":
            self._reply(200, "text/plain; version=0.0.4", prometheus_text(self.server.cache.status()))
        else:
            self._reply(404, "text/plain", "not found; served: /healthcheck /status /metrics\n")

    def _reply(self, code: int, kind: str, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # no line per request
        pass
