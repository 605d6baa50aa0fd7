"""`python -m lmcache.v1.server HOST PORT [cpu]`, also installed as `lmcache_server`.

Same positional arguments as upstream's server (STORAGE: `cpu`, the only kind).
Entries live in memory under --max-size-gb (least recently used evicted first).
SIGTERM and SIGINT stop it cleanly: no new connections, open ones closed, exit 0.
Limits against hostile or broken clients: see docs/configuration.md, "Security".
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from lmcache.v1.config_values import physical_memory_bytes
from lmcache.v1.server.connections import is_loopback_host, parse_networks

GB = 1024**3
DEFAULT_MAX_GB = 5.0
_SPARE_FDS = 64  # the listening socket, logs, interpreter files


def default_budget_gb() -> float:
    """5 GB, but never more than half of this machine's memory."""
    physical = physical_memory_bytes()
    if physical is None:
        return DEFAULT_MAX_GB
    return round(min(DEFAULT_MAX_GB, physical / 2 / GB), 3)


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
    parser.add_argument("--request-timeout", "--io-timeout", dest="request_timeout", type=float, default=60.0,
                        help="seconds a request may take, from its first header byte to the last byte of its body "
                             "or reply, before its connection is closed (default 60)")
    parser.add_argument("--idle-timeout", type=float, default=0.0,
                        help="seconds a connection may stay quiet between requests before it is closed; 0: never "
                             "(the default: upstream's client never reconnects; at --max-clients the quietest "
                             "connection makes room anyway)")
    parser.add_argument("--max-clients", type=int, default=1024,
                        help="open connections at most (one thread each); beyond it the one quiet for longest is "
                             "dropped, or the newcomer refused if all are busy (default 1024)")
    parser.add_argument("--max-inflight-mb", type=float, default=None,
                        help="PUT bodies being received at once, in MiB (memory on top of the budget; "
                             "default min(budget, 256))")
    parser.add_argument("--allow", action="append", default=[], metavar="CIDR",
                        help="only peers in this network may connect (repeatable, e.g. --allow 10.0.0.0/8); "
                             "without it anyone who can reach the port may")
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
    if not args.request_timeout > 0:
        parser.error(f"--request-timeout {args.request_timeout} must be > 0")
    if not args.idle_timeout >= 0:
        parser.error(f"--idle-timeout {args.idle_timeout} must be >= 0 (0: never)")
    if args.max_inflight_mb is not None and not args.max_inflight_mb > 0:
        parser.error(f"--max-inflight-mb {args.max_inflight_mb} must be > 0")
    try:
        args.allow = parse_networks(args.allow)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def fit_open_files(max_clients: int, logger: logging.Logger) -> int:
    """Raise the open-file limit to what max_clients needs (one socket each, plus some);
    where the hard limit is lower, lower max_clients to fit (a full fd table would make
    accept() fail in a loop)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max_clients + _SPARE_FDS
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    except (ImportError, ValueError, OSError):
        return max_clients
    if soft != resource.RLIM_INFINITY and soft < want:
        fitted = max(1, soft - _SPARE_FDS)
        logger.warning("--max-clients %d needs %d open files, the limit is %d: serving at most %d clients",
                       max_clients, want, soft, fitted)
        return fitted
    return max_clients


def exposure_warning(bound_host: str, port: int, allow: tuple) -> str | None:
    """The loud line for a server anyone on the network can reach, or None."""
    if allow or is_loopback_host(bound_host):
        return None
    return (f"listening on {bound_host}:{port} with no --allow list: anyone who can reach this port can read, "
            "overwrite and evict every entry (the lm:// protocol has no authentication and no encryption). "
            "Bind to 127.0.0.1, pass --allow CIDR for your clients' network, or firewall the port; "
            "see docs/configuration.md, Security")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("lmcache.v1.server")
    from lmcache.v1.server.server import LMCacheServer

    physical = physical_memory_bytes()
    if physical is not None and args.max_size_gb * GB > physical:
        logger.warning("--max-size-gb %g is more than this machine's memory (%.1f GB): the server will be "
                       "killed for lack of memory before the budget is full", args.max_size_gb, physical / GB)
    max_clients = fit_open_files(args.max_clients, logger)
    inflight = None if args.max_inflight_mb is None else int(args.max_inflight_mb * 1024**2)
    try:
        server = LMCacheServer(args.host, args.port, int(args.max_size_gb * GB), request_timeout=args.request_timeout,
                               max_clients=max_clients, idle_timeout=args.idle_timeout,
                               inflight_bytes=inflight, allow=args.allow)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    warning = exposure_warning(server.server_address[0], server.port, args.allow)
    if warning:
        logger.warning("*** %s ***", warning)

    def on_signal(signum, _frame):
        logger.info("%s received: shutting down", signal.Signals(signum).name)
        # shutdown() waits for serve_forever (this thread) to return: call it from another one
        threading.Thread(target=server.shutdown, name="lmcache-server-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("lm:// cache server listening on %s:%d (budget %.3f GB, in flight %.0f MiB, storage %s, "
                "allowed: %s)", args.host, server.port, args.max_size_gb, server.store.inflight_cap / 1024**2,
                args.storage, ", ".join(map(str, args.allow)) or "anyone")
    server.serve_forever()
    entries, used = len(server.store), server.store.used_bytes
    server.stop()
    logger.info("server stopped (%d entries, %d bytes, dropped with it)", entries, used)
    return 0


if __name__ == "__main__":
    sys.exit(main())
