"""`lmcache server` (also `python -m lmcache server`): the shared host cache of a node.

Flags carry upstream's names where they apply; anything else comes from the same
sources as the in-process engine (LMCACHE_CONFIG_FILE, LMCACHE_* env), the flags win.
SIGTERM/SIGINT stop it cleanly and remove its shared-memory file.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from lmcache.v1.server.__main__ import default_budget_gb

GB = 1024**3
DEFAULT_PORT = 5555
logger = logging.getLogger("lmcache.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--host", default="127.0.0.1", help="address of the control socket (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"control port (default {DEFAULT_PORT})")
    parser.add_argument("--l1-size-gb", type=float, default=None,
                        help="GB of shared host memory for chunks (default: 5, at most half of this machine's memory)")
    parser.add_argument("--eviction-policy", default="LRU", help="LRU (the only policy)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="tokens per chunk clients should use (default 256)")
    parser.add_argument("--l2-adapter", action="append", default=[], metavar="JSON",
                        help='a tier below host memory, repeatable: {"type": "fs"|"resp"|"valkey"|"s3"|"lm", ...}')
    parser.add_argument("--http-port", type=int, default=None,
                        help="serve /healthcheck, /status and Prometheus /metrics on this port (default: off)")
    parser.add_argument("--http-host", default="127.0.0.1", help="address of the HTTP port (default 127.0.0.1)")
    parser.add_argument("--shm-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="directory of the shared-memory file (default /dev/shm)")
    parser.add_argument("--shm-group", default=None,
                        help="let this group's users connect too (the file is made 0660 and given the group)")
    parser.add_argument("--max-clients", type=int, default=1024, help="open connections at most (default 1024)")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")


def _config(args, parser_error):
    from lmcache.v1.config import ConfigError, apply_overrides, load_config
    from lmcache.v1.mp.l2_adapters import AdapterError, parse_adapters

    if args.eviction_policy.upper() != "LRU":
        parser_error(f"--eviction-policy {args.eviction_policy!r} is not supported; accepted: LRU")
    if not 0 < args.port < 65536:
        parser_error(f"--port {args.port} is not a TCP port (1..65535)")
    overrides: dict = {}
    try:
        l2 = parse_adapters(args.l2_adapter)
        overrides.update(l2.overrides)
        os.environ.update(l2.environment)  # what boto3 reads (this process is the server alone)
        config = load_config(extra_config={})
        if args.l1_size_gb is not None:
            overrides["max_local_cpu_size"] = args.l1_size_gb
        elif "max_local_cpu_size" not in config.sources:
            overrides["max_local_cpu_size"] = default_budget_gb()
        if args.chunk_size is not None:
            overrides["chunk_size"] = args.chunk_size
        overrides["local_cpu"] = True
        config = apply_overrides(config, overrides, source="lmcache server flags")
    except (AdapterError, ConfigError) as exc:
        parser_error(str(exc))
    if not config.max_local_cpu_size > 0:
        parser_error(f"--l1-size-gb {config.max_local_cpu_size} must be > 0")
    return config


def run(args) -> int:
    from lmcache.v1.mp.arena import Arena, arena_path, remove_stale
    from lmcache.v1.mp.http_status import StatusServer
    from lmcache.v1.mp.server import CacheServer
    from lmcache.v1.mp.shared_cache import SharedCache
    from lmcache.v1.remote_urls import redact_url

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def fail(message: str) -> None:
        logger.error("%s", message)
        raise SystemExit(2)

    config = _config(args, fail)
    if args.shm_dir is None:
        fail("no /dev/shm on this machine: give --shm-dir (a tmpfs directory)")
    for path in remove_stale(args.shm_dir, args.port):
        logger.info("removed %s, left by a server that is gone", path)
    try:
        arena = Arena.create(arena_path(args.shm_dir, args.port), config.local_cpu_bytes, group=args.shm_group)
    except (OSError, KeyError) as exc:
        fail(f"cannot create the shared-memory arena in {args.shm_dir}: {exc}")
    cache = server = status = None
    try:
        cache = SharedCache(config, arena)
        try:
            server = CacheServer(args.host, args.port, cache, config.chunk_size, max_clients=args.max_clients)
            if args.http_port is not None:
                status = StatusServer(args.http_host, args.http_port, cache).start()
        except OSError as exc:
            fail(f"cannot listen on {args.host}:{args.port} (or HTTP {args.http_host}:{args.http_port}): {exc}")

        def on_signal(signum, _frame):
            logger.info("%s received: shutting down", signal.Signals(signum).name)
            threading.Thread(target=server.shutdown, name="lmcache-server-stop", daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        l2 = ", ".join(t for t in (config.local_disk and f"disk {config.local_disk}",
                                   config.remote_url and redact_url(config.remote_url)) if t)
        logger.info("lmcache server listening on %s:%d (protocol v%d; L1 %.3f GB shared memory in %s; L2: %s; "
                    "chunk %d%s)", args.host, server.port, _protocol_version(), config.max_local_cpu_size,
                    arena.path, l2 or "none", config.chunk_size,
                    f"; HTTP on {args.http_host}:{args.http_port}" if status else "")
        server.serve_forever()
        return 0
    finally:
        if status is not None:
            status.stop()
        if server is not None:
            server.server_close()
        if cache is not None:
            cache.close()
        arena.unlink()
        logger.info("server stopped; host-memory chunks dropped with it%s",
                    " (the disk tier keeps its files)" if config.local_disk else "")


def _protocol_version() -> int:
    from lmcache.v1.mp.protocol import VERSION

    return VERSION
