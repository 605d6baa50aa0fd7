"""Where an engine's host tier lives: in this process (StorageManager) or in the
node's `lmcache server` (ServerStorage), decided from config keys mp_host / mp_port
when the engine is built, and said in one start-up line."""

from __future__ import annotations

import logging

from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.storage_backend.storage_manager import StorageManager

logger = logging.getLogger("lmcache.v1.mp")

AUTO_HOST = "127.0.0.1"


def _why_not(host: str, port: int, timeout: float) -> str | None:
    """None if our server answers there (a full hello and auth), else why not."""
    from lmcache.v1.mp import protocol as P
    from lmcache.v1.mp.client import Connection, Refused

    try:
        Connection(host, port, timeout, timeout, "start-up probe", {}).close()
        return None
    except ConnectionRefusedError:
        return "no lmcache server answers"
    except Refused as exc:
        return f"the lmcache server refused us ({exc})"
    except (OSError, ValueError, P.ProtocolError, P.PeerClosed) as exc:
        return f"what answers is not a usable lmcache server ({type(exc).__name__}: {exc})"


def _addresses(urls: list[str]) -> list[tuple[str, int]]:
    """mp_server_urls ("HOST:PORT", parsed by the config) as (host, port)."""
    return [(u.rsplit(":", 1)[0], int(u.rsplit(":", 1)[1])) for u in urls]


def build_storage(config: LMCacheEngineConfig, stats: EngineStats, owns=None):
    """`owns(key)`: whether a key is the engine's (the server's chunk events for it are its)."""
    if config.mp_server_urls:
        (host, port), *fallbacks = _addresses(config.mp_server_urls)
        return _server_storage(config, stats, host, port, tuple(fallbacks), owns)
    host = config.mp_host
    if host is None:
        return StorageManager(config, stats)
    if host == "auto":
        why = _why_not(AUTO_HOST, config.mp_port, config.remote_connect_timeout)
        if why is not None:
            logger.info("LMCache: %s at %s:%d: host cache in this process (%.3g GB)",
                        why, AUTO_HOST, config.mp_port, config.max_local_cpu_size)
            return StorageManager(config, stats)
        host = AUTO_HOST
    return _server_storage(config, stats, host, config.mp_port, (), owns)


def _server_storage(config: LMCacheEngineConfig, stats: EngineStats, host: str, port: int,
                    fallbacks: tuple[tuple[str, int], ...], owns):
    from lmcache.v1.mp.client_storage import ServerStorage

    storage = ServerStorage(config, stats, host, port, fallbacks, owns)
    conn = storage.link.connection()
    if conn is not None:
        logger.info("LMCache: host cache is the shared lmcache server at %s (%.3g GB of shared memory)",
                    storage.link.address, conn.arena.size / 1024**3)
        if conn.server_chunk_size not in (None, config.chunk_size):
            logger.warning("LMCache: chunk_size=%d here, %s on the server: chunks are shared only between "
                           "instances of the same chunk_size", config.chunk_size, conn.server_chunk_size)
    else:
        named = ", ".join(f"{h}:{p}" for h, p in storage.link.addresses)
        logger.info("LMCache: host cache is the lmcache server at %s, not usable now (the line above says "
                    "why): lookups miss and stores are dropped until it is", named)
    return storage
