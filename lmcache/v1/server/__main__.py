"""`python -m lmcache.v1.server HOST PORT [cpu]`, also installed as `lmcache_server`.

Same positional arguments as upstream's server (STORAGE: `cpu`, the only kind).
Entries live in memory under --max-size-gb (least recently used evicted first).
SIGTERM and SIGINT stop it cleanly: no new connections, open ones closed, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

GB = 1024**3
DEFAULT_MAX_GB = 5.0


def default_budget_gb() -> float:
    """5 GB, but never more than half of this machine's memory."""
    try:
        half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 / GB
    except (ValueError, OSError, AttributeError):
        return DEFAULT_MAX_GB
    return round(min(DEFAULT_MAX_GB, half), 3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lmcache_server", description="The lm:// cache server (upstream LMCache 0.5.6's protocol)."
    )
    parser.add_argument("host", help="address to listen on (e.g. localhost, 0.0.0.0)")
    parser.add_argument("port", type=int, help="TCP port")
    parser.add_argument("storage", nargs="?", default="cpu", help="where entries live: cpu (the only kind)")
    parser.add_argument("--max-size-gb", type=float, default=None,
                        help=f"byte budget of the entries in GB; least recently used are evicted beyond it "
                             f"(default: {DEFAULT_MAX_GB:g}, at most half of the machine's memory)")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    parser.add_argument("--io-timeout", type=float, default=60.0,
                        help="seconds a request, once begun, may stall before its connection is closed")
    parser.add_argument("--max-clients", type=int, default=1024,
                        help="open connections at most (one thread each); more are closed at once (default 1024)")
    args = parser.parse_args(argv)
    if args.storage != "cpu":
        parser.error(f"storage {args.storage!r} is not supported; accepted: cpu")
    if not 0 < args.port < 65536:
        parser.error(f"port {args.port} is not a TCP port (1..65535)")
    if args.max_size_gb is None:
        args.max_size_gb = default_budget_gb()
    if not args.max_size_gb > 0:
        parser.error(f"--max-size-gb {args.max_size_gb} must be > 0")
    if args.max_clients <= 0:
        parser.error(f"--max-clients {args.max_clients} must be > 0")
    if not args.io_timeout > 0:
        parser.error(f"--io-timeout {args.io_timeout} must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("lmcache.v1.server")
    from lmcache.v1.server.server import LMCacheServer

    try:
        server = LMCacheServer(args.host, args.port, int(args.max_size_gb * GB), io_timeout=args.io_timeout,
                               max_clients=args.max_clients)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1

    def on_signal(signum, _frame):
        logger.info("%s received: shutting down", signal.Signals(signum).name)
        # shutdown() waits for serve_forever (this thread) to return: call it from another one
        threading.Thread(target=server.shutdown, name="lmcache-server-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("lm:// cache server listening on %s:%d (budget %.3f GB, storage %s)",
                args.host, server.port, args.max_size_gb, args.storage)
    server.serve_forever()
    entries, used = len(server.store), server.store.used_bytes
    server.stop()
    logger.info("server stopped (%d entries, %d bytes, dropped with it)", entries, used)
    return 0


if __name__ == "__main__":
    sys.exit(main())
